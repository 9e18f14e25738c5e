//! Block volumes: virtual disks whose bytes at rest are encrypted (AES-256-XTS per 4 KiB sector, tweak = the
//! logical sector), erasure-coded and spread over the store's locations.
//!
//! New volumes are log-structured ([`crate::log`]): writes are appended into stripes that are erasure-coded when
//! sealed, so small random writes cost sequential I/O and a FLUSH one parallel round of writes. Volumes of the
//! first format (copy-on-write stripes, [`cow`]) still open, serve and scrub as before, and `bf volume migrate`
//! copies one onto the log. This module is the one API over both: listing, creating, removing, opening by name.

pub mod cow;
mod logged;

use std::fs::File;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::store::Store;

pub use logged::LogVolume;

/// Default data per stripe of new volumes: 4 MiB (1 MiB shards at k = 4; a FLUSH seals shorter stripes).
pub const DEFAULT_STRIPE_SIZE: u32 = 4 << 20;
/// Default memory for a volume's caches: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Tuning for an open volume.
#[derive(Clone, Copy, Debug)]
pub struct VolumeOptions {
    /// Bytes of cache: the stripe cache of copy-on-write volumes; the map pages and stripe records of log
    /// volumes.
    pub cache_bytes: usize,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions { cache_bytes: DEFAULT_CACHE_BYTES }
    }
}

/// Summary of a volume for listings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeInfo {
    /// Name (or `id:<hex>` without the key).
    pub name: String,
    /// Hex id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Stripe size (most data bytes per stripe).
    pub stripe_size: u32,
    /// Committed generation (superblock or checkpoint).
    pub generation: u64,
    /// `log` (log-structured) or `cow` (the first, copy-on-write format).
    pub format: String,
}

/// Which format a volume is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Log-structured (the current format).
    Log,
    /// Copy-on-write stripes (the first format).
    Cow,
}

/// Checks a volume name.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name.contains('\0') {
        return Err(Error::InvalidArgument(format!("invalid volume name {name:?}")));
    }
    Ok(())
}

/// The id and format of the volume called `name`, if there is one.
pub fn find(store: &Store, name: &str) -> Result<Option<([u8; 16], Format)>> {
    if let Some(id) = logged::find_id(store, name)? {
        return Ok(Some((id, Format::Log)));
    }
    Ok(cow::find_id(store, name)?.map(|id| (id, Format::Cow)))
}

/// Every readable volume of either format, by name.
pub fn list(store: &Store) -> Result<Vec<VolumeInfo>> {
    let mut out = logged::list(store)?;
    out.extend(cow::list(store)?);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Creates a thin log-structured volume (nothing allocated) of `size` bytes with stripes of up to
/// `stripe_size` data bytes (a multiple of 4 KiB).
pub fn create(store: &Store, name: &str, size: u64, stripe_size: u32) -> Result<()> {
    validate_name(name)?;
    if stripe_size == 0 || !stripe_size.is_multiple_of(4096) || stripe_size > 64 << 20 {
        return Err(Error::InvalidArgument(format!(
            "stripe size {stripe_size} must be a multiple of 4 KiB of at most 64 MiB"
        )));
    }
    let _lock = store.lock_catalog()?;
    if find(store, name)?.is_some() {
        return Err(Error::AlreadyExists(format!("volume {name}")));
    }
    logged::create(store, name, size, stripe_size / 4096)
}

/// Removes a volume of either format.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    match find(store, name)? {
        Some((id, Format::Log)) => logged::remove(store, &id),
        Some((_, Format::Cow)) => cow::remove(store, name),
        None => Err(Error::NotFound(format!("volume {name}"))),
    }
}

/// Ids (hex directory names) found under `dir` on any location, sorted.
fn ids_under(store: &Store, dir: &str) -> Vec<[u8; 16]> {
    let mut ids = std::collections::BTreeSet::new();
    for loc in store.locations() {
        for name in loc.list(dir).unwrap_or_default() {
            let mut id = [0u8; 16];
            if hex::decode_to_slice(&name, &mut id).is_ok() {
                ids.insert(id);
            }
        }
    }
    ids.into_iter().collect()
}

/// Ids of every log-structured volume on any location.
pub fn log_ids(store: &Store) -> Vec<[u8; 16]> {
    logged::scan_ids(store)
}

/// Takes a volume's lock file without waiting (fails while a server or another process has the volume open).
pub fn try_lock_volume(store: &Store, id: &[u8; 16]) -> Result<File> {
    lock_volume(store, id)
}

fn lock_volume(store: &Store, id: &[u8; 16]) -> Result<File> {
    let dir = store.dir().join("volumes");
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.lock", hex::encode(id)));
    let f = crate::store::open_lock_file(&path)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse("the volume".into())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
    }
}

/// An open volume of either format. All methods are safe to call from many threads; FLUSH is coherent across
/// them (one instance per volume per process, guarded by a lock file against other processes).
pub enum Volume {
    /// A log-structured volume.
    Log(LogVolume),
    /// A copy-on-write volume.
    Cow(Box<cow::CowVolume>),
}

impl Volume {
    /// Opens a volume by name (needs the key).
    pub fn open(store: Arc<Store>, name: &str, opts: VolumeOptions) -> Result<Volume> {
        match find(&store, name)? {
            Some((id, Format::Log)) => Ok(Volume::Log(LogVolume::open(store, name, &id, opts)?)),
            Some((_, Format::Cow)) => Ok(Volume::Cow(Box::new(cow::CowVolume::open(store, name, opts)?))),
            None => Err(Error::NotFound(format!("volume {name}"))),
        }
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        match self {
            Volume::Log(v) => v.name(),
            Volume::Cow(v) => v.name(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Volume::Log(v) => v.size(),
            Volume::Cow(v) => v.size(),
        }
    }

    /// Most data bytes per stripe.
    pub fn stripe_size(&self) -> u32 {
        match self {
            Volume::Log(v) => v.stripe_size(),
            Volume::Cow(v) => v.stripe_size(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Volume::Log(v) => v.read(offset, buf),
            Volume::Cow(v) => v.read(offset, buf),
        }
    }

    /// Writes `data` at `offset` (any alignment); with `fua`, durably before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        match self {
            Volume::Log(v) => v.write(offset, data, fua),
            Volume::Cow(v) => v.write(offset, data, fua),
        }
    }

    /// Makes a range read as zeros; `keep_allocated` asks for allocated zeros (WRITE_ZEROES without NO_HOLE is
    /// free to trim).
    pub fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> Result<()> {
        match self {
            Volume::Log(v) => v.zero(offset, len, fua),
            Volume::Cow(v) => v.zero(offset, len, keep_allocated, fua),
        }
    }

    /// Allocation of a range: `(offset, length, allocated)` runs.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        match self {
            Volume::Log(v) => v.block_status(offset, len),
            Volume::Cow(v) => v.block_status(offset, len),
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Volume::Log(v) => v.flush(),
            Volume::Cow(v) => v.flush(),
        }
    }
}

#[cfg(test)]
mod tests;
