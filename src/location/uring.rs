//! io_uring file I/O for local locations (Linux): a whole object is written with one `writev` linked to an
//! `fdatasync` in a single submission, and read with one `read`, through a per-thread ring.
//!
//! Opening, renaming and directory syncs stay ordinary syscalls. Any short transfer is finished with ordinary
//! syscalls, so callers get the same results as with the portable path ([`crate::location::IoEngine::Std`]).

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// True when io_uring can be used on this machine (a ring can be created).
pub fn available() -> bool {
    IoUring::new(4).is_ok()
}

fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> io::Result<T>) -> io::Result<T> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(8)?);
        }
        match slot.as_mut() {
            Some(ring) => f(ring),
            None => Err(io::Error::other("io_uring unavailable")),
        }
    })
}

/// Submits `entries` and returns their results in order (negative values are `-errno`).
fn run(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<Vec<i32>> {
    // SAFETY: every buffer an entry points to is borrowed by our caller for the whole call, and we wait for all
    // completions before returning, so the kernel never touches memory after it is released.
    unsafe {
        let mut sq = ring.submission();
        for e in entries {
            sq.push(e).map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
    }
    ring.submit_and_wait(entries.len())?;
    let mut results = vec![0i32; entries.len()];
    let mut seen = 0;
    while seen < entries.len() {
        let mut got = false;
        for cqe in ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(slot) = results.get_mut(idx) {
                *slot = cqe.result();
            }
            seen += 1;
            got = true;
        }
        if !got && seen < entries.len() {
            ring.submit_and_wait(1)?;
        }
    }
    Ok(results)
}

/// Writes `parts` at offset 0 of `file` and, with `sync`, fdatasyncs it, in one linked submission.
pub fn write_parts(file: &mut File, parts: &[&[u8]], sync: bool) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let iov: Vec<libc::iovec> =
        parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect();
    let fd = types::Fd(file.as_raw_fd());
    let written = with_ring(|ring| {
        let write = opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32).offset(0).build().user_data(0);
        if sync {
            let fsync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(1);
            let r = run(ring, &[write.flags(squeue::Flags::IO_LINK), fsync])?;
            if r[0] < 0 {
                return Err(io::Error::from_raw_os_error(-r[0]));
            }
            if r[0] as usize == total && r[1] < 0 {
                return Err(io::Error::from_raw_os_error(-r[1]));
            }
            Ok((r[0] as usize, r[0] as usize == total))
        } else {
            let r = run(ring, &[write])?;
            if r[0] < 0 {
                return Err(io::Error::from_raw_os_error(-r[0]));
            }
            Ok((r[0] as usize, true))
        }
    })?;
    let (n, synced) = written;
    if n < total {
        // Short write (rare): finish with ordinary syscalls, positioned after what was written.
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(n as u64))?;
        let mut skip = n;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            file.write_all(&p[skip..])?;
            skip = 0;
        }
    }
    if sync && !synced {
        file.sync_data()?;
    }
    Ok(())
}

/// Reads the whole file into `buf`, replacing what it held. Only bytes past `buf`'s old length are zeroed
/// first: a buffer reused for shards of one size is not zeroed again for every read (a sixth of a cold read's
/// CPU time went to that).
pub fn read_all(file: &mut File, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = file.metadata()?.len() as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    } else {
        buf.truncate(len);
    }
    let fd = types::Fd(file.as_raw_fd());
    let n = if len == 0 {
        0
    } else {
        with_ring(|ring| {
            let read = opcode::Read::new(fd, buf.as_mut_ptr(), len as u32).offset(0).build().user_data(0);
            let r = run(ring, &[read])?;
            if r[0] < 0 {
                Err(io::Error::from_raw_os_error(-r[0]))
            } else {
                Ok(r[0] as usize)
            }
        })?
    };
    buf.truncate(n);
    // A short read (or a file that grew since fstat): finish with ordinary syscalls.
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(n as u64))?;
    file.read_to_end(buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_sync_and_read_round_trip() {
        if !available() {
            eprintln!("SKIP: io_uring not available");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for sync in [true, false] {
            let mut f = File::create(&p).unwrap();
            write_parts(&mut f, &[b"header", &big, b""], sync).unwrap();
            drop(f);
            let mut f = File::open(&p).unwrap();
            let mut back = Vec::new();
            read_all(&mut f, &mut back).unwrap();
            assert_eq!(&back[..6], b"header");
            assert_eq!(&back[6..], &big[..]);
        }
        // A reused buffer, longer or shorter than the file, holds exactly the file afterwards.
        let mut back = vec![7u8; 1_000_000];
        read_all(&mut File::open(&p).unwrap(), &mut back).unwrap();
        assert_eq!((&back[..6], &back[6..]), (&b"header"[..], &big[..]));
        std::fs::write(d.path().join("small"), b"abc").unwrap();
        read_all(&mut File::open(d.path().join("small")).unwrap(), &mut back).unwrap();
        assert_eq!(back, b"abc");
        read_all(&mut File::open(&p).unwrap(), &mut back).unwrap();
        assert_eq!((&back[..6], &back[6..]), (&b"header"[..], &big[..]));
        let mut f = File::create(d.path().join("empty")).unwrap();
        write_parts(&mut f, &[], true).unwrap();
        let mut back = vec![1];
        read_all(&mut File::open(d.path().join("empty")).unwrap(), &mut back).unwrap();
        assert!(back.is_empty());
    }
}
