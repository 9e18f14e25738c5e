//! Spool files: where a file written through the mount is kept until it is committed.
//!
//! A spool is a temporary file in `<store>/spool/` (on disk, not in memory, so a multi-GiB write costs no RAM).
//! On Unix its name is removed as soon as it is created: the space is freed when the last descriptor closes,
//! so a crashed mount leaves nothing behind (the store still holds the previous committed version).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::crypto::random_bytes;
use crate::error::{IoContext, Result};

#[cfg(unix)]
use std::os::unix::fs::FileExt;
#[cfg(windows)]
use std::os::windows::fs::FileExt;

#[cfg(unix)]
fn pread(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    f.read_at(buf, off)
}
#[cfg(windows)]
fn pread(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    f.seek_read(buf, off)
}
#[cfg(unix)]
fn pwrite_all(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    f.write_all_at(buf, off)
}
#[cfg(windows)]
fn pwrite_all(f: &File, mut buf: &[u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = f.seek_write(buf, off)?;
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// One spool file. Positional reads and writes take `&self`, so readers do not wait for each other.
#[derive(Debug)]
pub struct Spool {
    file: File,
    path: PathBuf,
    len: AtomicU64,
}

impl Spool {
    /// Creates an empty spool in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Spool> {
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let id: [u8; 8] = random_bytes()?;
        let path = dir.join(format!("{}.spool", hex::encode(id)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("creating spool file {}", path.display()))?;
        // Unix: unlink now, the open descriptor keeps the data (freed at close or crash).
        #[cfg(unix)]
        fs::remove_file(&path).ctx(|| format!("unlinking spool file {}", path.display()))?;
        Ok(Spool { file, path, len: AtomicU64::new(0) })
    }

    /// Where the spool was created (already unlinked on Unix).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current length in bytes.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns the count (0 at the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match pread(&self.file, &mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(r) => n += r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(crate::Error::io("reading a spool file", e)),
            }
        }
        Ok(n)
    }

    /// Writes `data` at `offset`, growing the file as needed. Callers serialise writes and length changes.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        pwrite_all(&self.file, data, offset).ctx(|| "writing a spool file".into())?;
        self.len.fetch_max(offset + data.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).ctx(|| "resizing a spool file".into())?;
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }

    /// A reader over the whole content from the start (the commit pipeline's input).
    pub fn reader(&self) -> SpoolReader<'_> {
        SpoolReader { spool: self, pos: 0 }
    }

    /// Copies the content to a new file at `dest` (used to keep writes whose commit failed).
    pub fn save_copy(&self, dest: &Path) -> Result<u64> {
        let mut out = File::create(dest).ctx(|| format!("creating {}", dest.display()))?;
        let n = std::io::copy(&mut self.reader(), &mut out).ctx(|| format!("writing {}", dest.display()))?;
        out.sync_all().ctx(|| format!("syncing {}", dest.display()))?;
        Ok(n)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        #[cfg(not(unix))]
        let _ = fs::remove_file(&self.path);
    }
}

/// Sequential reader over a [`Spool`].
pub struct SpoolReader<'a> {
    spool: &'a Spool,
    pos: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = pread(&self.spool.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positional_io_and_length() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::create(&d.path().join("spool")).unwrap();
        #[cfg(unix)]
        assert_eq!(fs::read_dir(d.path().join("spool")).unwrap().count(), 0, "unlinked at once");
        s.write_at(5, b"world").unwrap();
        s.write_at(0, b"hello").unwrap();
        assert_eq!(s.len(), 10);
        let mut buf = [0u8; 20];
        assert_eq!(s.read_at(0, &mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], b"helloworld");
        s.set_len(3).unwrap();
        let mut all = Vec::new();
        s.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"hel");
        s.set_len(5).unwrap();
        assert_eq!(s.read_at(0, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hel\0\0");
        let copy = d.path().join("copy");
        assert_eq!(s.save_copy(&copy).unwrap(), 5);
        assert_eq!(fs::read(copy).unwrap(), b"hel\0\0");
    }
}
