//! Log-structured volumes: a name, a lock and byte-granular I/O over a [`BlockLog`] (which works in whole 4 KiB
//! blocks). A write that covers part of a block reads that block, merges and writes it whole; such merges are
//! serialised so two partial writes of one block never lose each other's bytes.

use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::codec::crypto::random_bytes;
use crate::error::{Error, Result};
use crate::format::log::{checkpoint_key, log_prefix, BLOCK};
use crate::format::volume::VolumeMeta;
use crate::log::{load_checkpoint, BlockLog, LogOptions, NewLog};
use crate::store::Store;

use super::{lock_volume, VolumeInfo, VolumeOptions};

/// Directory under which log volumes live.
const ROOT: &str = "logvol";

/// Ids of every log volume found on any location.
pub(super) fn scan_ids(store: &Store) -> Vec<[u8; 16]> {
    super::ids_under(store, ROOT)
}

/// Every readable log volume.
pub(super) fn list(store: &Store) -> Result<Vec<VolumeInfo>> {
    let mut out = Vec::new();
    for id in scan_ids(store) {
        let c = load_checkpoint(store, &id)?;
        let name = match store.key_opt() {
            Some(key) => VolumeMeta::open(key, &c.vol_id, &c.meta_nonce, &c.sealed_meta)?.name,
            None => format!("id:{}", hex::encode(id)),
        };
        out.push(VolumeInfo {
            name,
            id: hex::encode(id),
            size: c.size,
            stripe_size: c.stripe_blocks * BLOCK as u32,
            generation: c.generation,
            format: "log".into(),
        });
    }
    Ok(out)
}

/// The id of the log volume called `name`.
pub(super) fn find_id(store: &Store, name: &str) -> Result<Option<[u8; 16]>> {
    let tag = store.key()?.name_tag(&format!("volume:{name}"));
    for id in scan_ids(store) {
        if load_checkpoint(store, &id)?.name_tag == tag {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Creates a log volume (the caller holds the catalog lock and checked the name is free).
pub(super) fn create(store: &Store, name: &str, size: u64, stripe_blocks: u32) -> Result<()> {
    let key = store.key()?;
    let vol_id: [u8; 16] = random_bytes()?;
    let (sealed, nonce) = VolumeMeta::new(name).seal(key, &vol_id)?;
    let new = NewLog {
        vol_id,
        name_tag: key.name_tag(&format!("volume:{name}")),
        size,
        stripe_blocks,
        sealed_meta: (&sealed, nonce),
    };
    BlockLog::create(store, &new)
}

/// Removes a log volume: checkpoints first (so it disappears), then every object under it.
pub(super) fn remove(store: &Store, id: &[u8; 16]) -> Result<()> {
    let _lock = store.lock_catalog()?;
    let _vlock = lock_volume(store, id)?;
    for loc in store.locations() {
        loc.delete(&checkpoint_key(id)).and_then(|_| loc.sync())?;
    }
    for loc in store.locations() {
        loc.delete_prefix(&log_prefix(id)).and_then(|_| loc.sync())?;
    }
    Ok(())
}

/// An open log-structured volume.
pub struct LogVolume {
    name: String,
    log: Arc<BlockLog>,
    stripe_size: u32,
    merges: Mutex<()>,
    _lock: File,
}

/// Log options for a cache budget: half for map pages (about 48 KiB each), half for stripe records.
fn log_options(opts: VolumeOptions, stripe_blocks: u32) -> LogOptions {
    let half = opts.cache_bytes / 2;
    LogOptions {
        map_pages: (half / (48 << 10)).max(16),
        records: (half / (stripe_blocks as usize * 24 + 512)).max(16),
        ..LogOptions::default()
    }
}

impl LogVolume {
    /// Opens the log volume `id` called `name`: takes its lock, then replays its log.
    pub(super) fn open(store: Arc<Store>, name: &str, id: &[u8; 16], opts: VolumeOptions) -> Result<LogVolume> {
        let lock = lock_volume(&store, id)?;
        let c = load_checkpoint(&store, id)?;
        let log = BlockLog::open(store, id, log_options(opts, c.stripe_blocks))?;
        Ok(LogVolume {
            name: name.into(),
            log,
            stripe_size: c.stripe_blocks * BLOCK as u32,
            merges: Mutex::new(()),
            _lock: lock,
        })
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.log.size()
    }

    /// Most data bytes per stripe.
    pub fn stripe_size(&self) -> u32 {
        self.stripe_size
    }

    /// The log underneath (counters, checkpoints).
    pub fn log(&self) -> &BlockLog {
        &self.log
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange { what: "the volume".into(), offset, len, size: self.size() }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let (first, head, blocks) = cover(offset, buf.len() as u64);
        if head == 0 && buf.len().is_multiple_of(BLOCK) {
            return self.log.read(first, buf);
        }
        let mut tmp = vec![0u8; blocks as usize * BLOCK];
        self.log.read(first, &mut tmp)?;
        buf.copy_from_slice(&tmp[head..head + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset` (any alignment); with `fua`, durably before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let (first, head, blocks) = cover(offset, data.len() as u64);
        if head == 0 && data.len().is_multiple_of(BLOCK) {
            return self.log.write(first, data, fua);
        }
        // Merge into the covering blocks: read them, overlay, write them whole.
        let _one = self.merges.lock().map_err(|_| Error::internal("merge lock poisoned"))?;
        let mut tmp = vec![0u8; blocks as usize * BLOCK];
        self.log.read(first, &mut tmp)?;
        tmp[head..head + data.len()].copy_from_slice(data);
        self.log.write(first, &tmp, fua)
    }

    /// Makes a range read as zeros: whole blocks become holes, partial ones are written with zeros.
    pub fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let whole_start = offset.div_ceil(BLOCK as u64);
        let whole_end = end / BLOCK as u64;
        if whole_start >= whole_end {
            return self.write(offset, &vec![0u8; len as usize], fua);
        }
        let head_end = whole_start * BLOCK as u64;
        if head_end > offset {
            self.write(offset, &vec![0u8; (head_end - offset) as usize], false)?;
        }
        let tail_start = whole_end * BLOCK as u64;
        if end > tail_start {
            self.write(tail_start, &vec![0u8; (end - tail_start) as usize], false)?;
        }
        self.log.zero(whole_start, whole_end - whole_start, fua)
    }

    /// Allocation of a range in bytes: `(offset, length, allocated)` runs.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.check_range(offset, len)?;
        let (first, _, blocks) = cover(offset, len);
        let end = offset + len;
        let b = BLOCK as u64;
        Ok(self
            .log
            .block_status(first, blocks)?
            .into_iter()
            .map(|(lba, n, alloc)| {
                let start = (lba * b).max(offset);
                (start, ((lba + n) * b).min(end) - start, alloc)
            })
            .collect())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.log.flush()
    }
}

impl Drop for LogVolume {
    fn drop(&mut self) {
        // A clean close: the last checkpoint means the next open replays nothing.
        if let Err(e) = self.log.close() {
            tracing::warn!(volume = %self.name, error = %e, "closing the volume's log failed (the next open replays it)");
        }
    }
}

/// The whole blocks covering `len` bytes at `offset`: first block, offset of the range in it, block count.
fn cover(offset: u64, len: u64) -> (u64, usize, u64) {
    let b = BLOCK as u64;
    let first = offset / b;
    let end = (offset + len).div_ceil(b);
    let blocks = if len == 0 { 0 } else { end - first };
    (first, (offset % b) as usize, blocks)
}

#[cfg(test)]
mod tests {
    use super::cover;

    #[test]
    fn covering_blocks() {
        assert_eq!(cover(0, 4096), (0, 0, 1));
        assert_eq!(cover(4095, 2), (0, 4095, 2));
        assert_eq!(cover(8192, 1), (2, 0, 1));
        assert_eq!(cover(100, 0), (0, 100, 0));
    }
}
