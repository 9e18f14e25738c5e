//! [`MemBackend`]: a sparse in-memory [`BlockBackend`] for tests and demos.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::backend::{BlockBackend, Extent};

/// Allocation granularity of [`MemBackend`].
pub const MEM_CHUNK_SIZE: u64 = 64 * 1024;

/// A sparse in-memory block device.
///
/// Storage is allocated lazily in 64 KiB chunks ([`MEM_CHUNK_SIZE`]);
/// unallocated chunks read as zeroes and are reported by `block_status` as
/// holes (`hole` and `zero` set). Trimming or zeroing (with `may_trim`) whole
/// chunks releases them. Flush is a no-op apart from a counter that tests can
/// inspect, and all connections share one store, so it is multi-conn safe.
#[derive(Debug)]
pub struct MemBackend {
    size: u64,
    read_only: bool,
    chunks: RwLock<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    block_sizes: (u32, u32),
}

impl MemBackend {
    /// A writable, all-zero (fully sparse) device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            chunks: RwLock::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
            block_sizes: (crate::proto::MIN_BLOCK_SIZE, crate::proto::PREFERRED_BLOCK_SIZE),
        }
    }

    /// Advertise these (minimum, preferred) block sizes instead of the
    /// default (512, 4096); e.g. `(1, 4096)` for byte-granular clients.
    pub fn with_block_sizes(mut self, min: u32, preferred: u32) -> Self {
        self.block_sizes = (min, preferred);
        self
    }

    /// A read-only device of `size` bytes.
    pub fn new_read_only(size: u64) -> Self {
        Self { read_only: true, ..Self::new(size) }
    }

    /// A device with initial contents `data` (size = `data.len()`); read-only
    /// if `read_only`. All-zero chunks of `data` stay unallocated.
    pub fn from_bytes(data: &[u8], read_only: bool) -> Self {
        let me = Self::new(data.len() as u64);
        {
            let mut chunks = me.lock_write();
            for (i, piece) in data.chunks(MEM_CHUNK_SIZE as usize).enumerate() {
                if piece.iter().any(|&b| b != 0) {
                    let mut chunk = vec![0u8; MEM_CHUNK_SIZE as usize].into_boxed_slice();
                    chunk[..piece.len()].copy_from_slice(piece);
                    chunks.insert(i as u64, chunk);
                }
            }
        }
        Self { read_only, ..me }
    }

    /// Number of allocated chunks.
    pub fn allocated_chunks(&self) -> usize {
        self.lock_read().len()
    }

    /// How many times [`BlockBackend::flush`] has been called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always consistent (every update is a single
        // insert/remove/copy), so keep serving.
        self.chunks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.chunks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    /// Zero (or release) `offset..offset+len`; `keep_allocated` keeps whole
    /// chunks allocated (filled with zeroes).
    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut chunks = self.lock_write();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / MEM_CHUNK_SIZE;
            let start_in = (pos % MEM_CHUNK_SIZE) as usize;
            let n = ((MEM_CHUNK_SIZE - pos % MEM_CHUNK_SIZE).min(end - pos)) as usize;
            let whole = start_in == 0 && n as u64 == MEM_CHUNK_SIZE;
            if whole && !keep_allocated {
                chunks.remove(&idx);
            } else if let Some(chunk) = chunks.get_mut(&idx) {
                chunk[start_in..start_in + n].fill(0);
            } else if keep_allocated {
                chunks.insert(idx, vec![0u8; MEM_CHUNK_SIZE as usize].into_boxed_slice());
            }
            pos += n as u64;
        }
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let chunks = self.lock_read();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / MEM_CHUNK_SIZE;
            let start_in = (pos % MEM_CHUNK_SIZE) as usize;
            let n = (MEM_CHUNK_SIZE as usize - start_in).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match chunks.get(&idx) {
                Some(chunk) => dst.copy_from_slice(&chunk[start_in..start_in + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let mut chunks = self.lock_write();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = pos / MEM_CHUNK_SIZE;
            let start_in = (pos % MEM_CHUNK_SIZE) as usize;
            let n = (MEM_CHUNK_SIZE as usize - start_in).min(data.len() - done);
            let chunk = chunks.entry(idx).or_insert_with(|| vec![0u8; MEM_CHUNK_SIZE as usize].into_boxed_slice());
            chunk[start_in..start_in + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_range(offset, len, false);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_range(offset, len, !may_trim);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let first = offset / MEM_CHUNK_SIZE;
        let last = (offset + len - 1) / MEM_CHUNK_SIZE;
        let size = self.size;
        let mut push = |start: u64, end: u64, allocated: bool| {
            let end = end.min(size);
            if end <= start {
                return;
            }
            if let Some(prev) = out.last_mut() {
                if prev.hole != allocated && prev.offset + prev.length == start {
                    prev.length += end - start;
                    return;
                }
            }
            out.push(Extent { offset: start, length: end - start, hole: !allocated, zero: !allocated });
        };
        let chunks = self.lock_read();
        let mut next = first;
        for (&idx, _) in chunks.range(first..=last) {
            if idx > next {
                push(next * MEM_CHUNK_SIZE, idx * MEM_CHUNK_SIZE, false);
            }
            push(idx * MEM_CHUNK_SIZE, (idx + 1) * MEM_CHUNK_SIZE, true);
            next = idx + 1;
        }
        if next <= last {
            push(next * MEM_CHUNK_SIZE, (last + 1) * MEM_CHUNK_SIZE, false);
        }
        Ok(out)
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn min_block_size(&self) -> u32 {
        self.block_sizes.0
    }

    fn preferred_block_size(&self) -> u32 {
        self.block_sizes.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write() {
        let m = MemBackend::new(1 << 20);
        let mut buf = vec![1u8; 100];
        m.read(5, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        m.write(MEM_CHUNK_SIZE - 10, &[7u8; 20], false).unwrap();
        assert_eq!(m.allocated_chunks(), 2);
        let mut buf = vec![0u8; 30];
        m.read(MEM_CHUNK_SIZE - 15, &mut buf).unwrap();
        assert_eq!(&buf[..5], &[0; 5]);
        assert_eq!(&buf[5..25], &[7; 20]);
        assert_eq!(&buf[25..], &[0; 5]);
        assert!(m.read(1 << 20, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn block_status_reports_holes() {
        let m = MemBackend::new(10 * MEM_CHUNK_SIZE + 512);
        m.write(3 * MEM_CHUNK_SIZE, &[1], false).unwrap();
        let ext = m.block_status(0, m.size()).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent { offset: 0, length: 3 * MEM_CHUNK_SIZE, hole: true, zero: true },
                Extent { offset: 3 * MEM_CHUNK_SIZE, length: MEM_CHUNK_SIZE, hole: false, zero: false },
                Extent { offset: 4 * MEM_CHUNK_SIZE, length: 6 * MEM_CHUNK_SIZE + 512, hole: true, zero: true },
            ]
        );
        m.trim(3 * MEM_CHUNK_SIZE, MEM_CHUNK_SIZE, false).unwrap();
        assert_eq!(m.allocated_chunks(), 0);
        m.write_zeroes(0, 2 * MEM_CHUNK_SIZE, false, false).unwrap();
        assert_eq!(m.allocated_chunks(), 2);
        m.write_zeroes(0, 2 * MEM_CHUNK_SIZE, true, false).unwrap();
        assert_eq!(m.allocated_chunks(), 0);
    }

    #[test]
    fn read_only_rejects_writes() {
        let m = MemBackend::new_read_only(4096);
        assert_eq!(m.write(0, &[1], false).unwrap_err().raw_os_error(), Some(libc::EPERM));
        let m = MemBackend::from_bytes(&[0, 0, 3], true);
        let mut b = [0u8; 3];
        m.read(0, &mut b).unwrap();
        assert_eq!(b, [0, 0, 3]);
    }
}
