//! Copy-on-write block volumes (the first volume format; new volumes are log-structured, see [`super`]): a
//! virtual disk stored as encrypted (AES-256-XTS per 4 KiB sector), erasure-coded stripes rewritten whole.
//! They are still opened, served and scrubbed; `bf volume migrate` copies one onto the log.
//!
//! Crash consistency comes from copy-on-write: a stripe is never rewritten in place; a write-back produces
//! shards of a new generation, the stripe map points at them, and only a new superblock (written atomically on
//! every location, at least m+1 must accept it) makes them current. [`Volume::flush`] writes back every dirty
//! stripe and map page, then the superblock, then deletes what the previous superblock referenced and the new
//! one does not. After a crash the volume opens at its last committed superblock, i.e. at or after the last
//! completed flush; objects written after it are deleted on open.
//!
//! Memory is bounded by the stripe cache (`cache_bytes`) and the map page cache, not by the volume size: map pages
//! are loaded on demand, and dirty ones are written out early (as uncommitted objects) when the cache is full.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::codec::crypto::random_bytes;
use crate::codec::erasure::{self, Codec};
use crate::codec::xts::{Xts, SECTOR};
use crate::error::{Error, Result};
use crate::format::volume::*;
use crate::location::LocationExt;
use crate::store::Store;
use crate::stripe::StripeBuffers;

use super::{lock_volume, VolumeInfo, VolumeOptions};

mod cache;
mod commit;
mod map;

/// Stripes per map page.
pub const ENTRIES_PER_PAGE: u32 = 256;
const PAGE_CACHE_LIMIT: usize = 64;
/// Superseded shard files kept for reuse per location.
const RECYCLE_LIMIT: usize = 256;

/// Reads the newest valid superblock copy of a volume (checking the MAC when the store has the key).
pub fn load_superblock(store: &Store, vol_id: &[u8; 16]) -> Result<Superblock> {
    let key = superblock_key(vol_id);
    let mut best: Option<Superblock> = None;
    let mut problems = Vec::new();
    for loc in store.locations() {
        let what = format!("superblock of volume {} on {}", hex::encode(vol_id), loc.name());
        match loc.get(&key).and_then(|b| Superblock::decode(&b, store.key_opt(), &what)) {
            Ok(sb) if sb.body.vol_id == *vol_id && sb.body.store_id == store.descriptor().store_id => {
                if best.as_ref().is_none_or(|b| sb.body.generation > b.body.generation) {
                    best = Some(sb);
                }
            }
            Ok(_) => problems.push(format!("{what}: belongs elsewhere")),
            Err(e) if e.is_not_found() => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    best.ok_or_else(|| {
        Error::corrupt(
            format!("volume {}", hex::encode(vol_id)),
            format!("no valid superblock ({})", problems.join("; ")),
        )
    })
}

/// Ids of every volume found on any location.
pub fn scan_ids(store: &Store) -> Vec<[u8; 16]> {
    super::ids_under(store, "volumes")
}

/// Every readable copy-on-write volume.
pub fn list(store: &Store) -> Result<Vec<VolumeInfo>> {
    let mut out = Vec::new();
    for id in scan_ids(store) {
        let sb = load_superblock(store, &id)?;
        let name = match store.key_opt() {
            Some(k) => sb.meta(k)?.name,
            None => format!("id:{}", hex::encode(id)),
        };
        out.push(VolumeInfo {
            name,
            id: hex::encode(id),
            size: sb.body.size,
            stripe_size: sb.body.stripe_size,
            generation: sb.body.generation,
            format: "cow".into(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub(super) fn find_id(store: &Store, name: &str) -> Result<Option<[u8; 16]>> {
    let tag = store.key()?.name_tag(&format!("volume:{name}"));
    for id in scan_ids(store) {
        if load_superblock(store, &id)?.body.name_tag == tag {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Writes a superblock copy to every location; fails unless at least m+1 accept it.
fn publish_superblock(store: &Store, body: &SuperBody) -> Result<()> {
    let key = superblock_key(&body.vol_id);
    let bytes = Superblock::encode(body, store.key()?);
    store.put_replicated(&key, &bytes, "a volume superblock")
}

/// Creates a thin copy-on-write volume (nothing allocated): for tests of this format and of migration.
pub fn create(store: &Store, name: &str, size: u64, stripe_size: u32) -> Result<()> {
    let key = store.key()?;
    super::validate_name(name)?;
    if size == 0 || !size.is_multiple_of(SECTOR as u64) {
        return Err(Error::InvalidArgument(format!("volume size {size} must be a positive multiple of 4096")));
    }
    if stripe_size < 64 << 10 || !stripe_size.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "stripe size {stripe_size} must be a power of two of at least 64 KiB"
        )));
    }
    let _lock = store.lock_catalog()?;
    if super::find(store, name)?.is_some() {
        return Err(Error::AlreadyExists(format!("volume {name}")));
    }
    let d = store.descriptor();
    let vol_id: [u8; 16] = random_bytes()?;
    let (sealed_meta, meta_nonce) = VolumeMeta::new(name).seal(key, &vol_id)?;
    let stripes = size.div_ceil(stripe_size as u64);
    let body = SuperBody {
        store_id: d.store_id,
        vol_id,
        name_tag: key.name_tag(&format!("volume:{name}")),
        generation: 1,
        next_gen: 1,
        size,
        stripe_size,
        k: d.k,
        m: d.m,
        entries_per_page: ENTRIES_PER_PAGE,
        placement_start: (vol_id[0] as usize % store.locations().len()) as u32,
        pages: vec![PageRef::default(); stripes.div_ceil(ENTRIES_PER_PAGE as u64) as usize],
        meta_nonce,
        sealed_meta,
    };
    body.validate("new superblock")?;
    publish_superblock(store, &body)
}

/// Removes a volume: superblocks first (so it disappears), then every object under it.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    let _lock = store.lock_catalog()?;
    let id = find_id(store, name)?.ok_or_else(|| Error::NotFound(format!("volume {name}")))?;
    let _vlock = lock_volume(store, &id)?;
    for loc in store.locations() {
        loc.delete(&superblock_key(&id)).and_then(|_| loc.sync())?;
    }
    for loc in store.locations() {
        loc.delete_prefix(&volume_prefix(&id)).and_then(|_| loc.sync())?;
    }
    Ok(())
}

struct CachedStripe {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

struct CachedPage {
    page: MapPage,
    dirty: bool,
    last_use: u64,
}

struct State {
    sb: SuperBody,
    pages: HashMap<u32, CachedPage>,
    stripes: HashMap<u64, CachedStripe>,
    /// Objects the committed superblock references but the pending state no longer does.
    superseded: Vec<String>,
    /// Shard objects of the previous stripe generations the last commit superseded, per location: their files
    /// are renamed into new shards instead of being deleted and created again.
    recycle: Vec<Vec<String>>,
    codec: Codec,
    bufs: StripeBuffers,
    enc: Vec<u8>,
    tick: u64,
    /// The page table changed since the last committed superblock.
    sb_dirty: bool,
    /// A write-back or commit failed; the volume refuses further writes until reopened.
    poisoned: Option<String>,
    /// Shards not stored since the volume was opened (locations down, within the write policy).
    shortfall: u64,
}

/// An open copy-on-write volume. All methods are safe to call from many threads; FLUSH is coherent across them (one
/// instance per volume per process, guarded by a lock file against other processes).
pub struct CowVolume {
    store: Arc<Store>,
    id: [u8; 16],
    name: String,
    xts: Xts,
    cache_stripes: usize,
    state: Mutex<State>,
    _lock: File,
}

/// Where a byte range falls within stripes: (stripe, offset within stripe, length).
fn split_range(offset: u64, len: u64, stripe_size: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let stripe = pos / stripe_size;
        let within = pos % stripe_size;
        let n = (stripe_size - within).min(end - pos);
        pos += n;
        Some((stripe, within as usize, n as usize))
    })
}

impl CowVolume {
    /// Opens a copy-on-write volume by name (needs the key). Deletes objects a crash left uncommitted.
    pub fn open(store: Arc<Store>, name: &str, opts: VolumeOptions) -> Result<CowVolume> {
        let id = find_id(&store, name)?.ok_or_else(|| Error::NotFound(format!("volume {name}")))?;
        let lock = lock_volume(&store, &id)?;
        let sb = load_superblock(&store, &id)?;
        let key = store.key()?;
        let xts = key.volume_xts(&id);
        let codec = Codec::new(sb.body.k as usize, sb.body.m as usize)?;
        let cache_stripes = (opts.cache_bytes / sb.body.stripe_size as usize).max(2);
        let vol = CowVolume {
            store,
            id,
            name: name.into(),
            xts,
            cache_stripes,
            state: Mutex::new(State {
                sb: sb.body,
                pages: HashMap::new(),
                stripes: HashMap::new(),
                superseded: Vec::new(),
                recycle: Vec::new(),
                shortfall: 0,
                codec,
                bufs: StripeBuffers::default(),
                enc: Vec::new(),
                tick: 0,
                sb_dirty: false,
                poisoned: None,
            }),
            _lock: lock,
        };
        vol.collect_garbage()?;
        Ok(vol)
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.lock().map(|s| s.sb.size).unwrap_or(0)
    }

    /// Stripe size in bytes.
    pub fn stripe_size(&self) -> u32 {
        self.lock().map(|s| s.sb.stripe_size).unwrap_or(super::DEFAULT_STRIPE_SIZE)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::internal("volume state poisoned by a panic"))
    }

    fn check_range(st: &State, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= st.sb.size => Ok(()),
            _ => Err(Error::OutOfRange { what: "the volume".into(), offset, len, size: st.sb.size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Uncached stripes are read without holding the volume lock and only
    /// the data shards covering the range are fetched (each verified against its leaf); only when one of them
    /// is missing or corrupt is the whole stripe rebuilt from parity.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ss = {
            let st = self.lock()?;
            Self::check_range(&st, offset, buf.len() as u64)?;
            st.sb.stripe_size as u64
        };
        let mut done = 0;
        for (stripe, within, n) in split_range(offset, buf.len() as u64, ss) {
            let out = &mut buf[done..done + n];
            done += n;
            let (entry, shape) = {
                let mut st = self.lock()?;
                st.tick += 1;
                let tick = st.tick;
                if let Some(c) = st.stripes.get_mut(&stripe) {
                    c.last_use = tick;
                    out.copy_from_slice(&c.data[within..within + n]);
                    continue;
                }
                let e = self.entry(&mut st, stripe)?;
                if e.gen == 0 {
                    out.fill(0);
                    continue;
                }
                (e, st.sb.shard_len())
            };
            if let Err(e) = self.read_partial(stripe, &entry, shape, ss as usize, within, out) {
                tracing::debug!(stripe, error = %e, "direct shard read failed; rebuilding the stripe");
                let mut st = self.lock()?;
                self.load_stripe(&mut st, stripe)?;
                let c = st.stripes.get(&stripe).ok_or_else(|| Error::internal("stripe vanished from cache"))?;
                out.copy_from_slice(&c.data[within..within + n]);
                self.evict(&mut st)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` the write is durable (committed) when this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        {
            let mut st = self.lock()?;
            Self::check_range(&st, offset, data.len() as u64)?;
            Self::check_poisoned(&st)?;
            let ss = st.sb.stripe_size as u64;
            let mut done = 0;
            for (stripe, within, n) in split_range(offset, data.len() as u64, ss) {
                let c = self.stripe_for_write(&mut st, stripe, n == ss as usize)?;
                c.data[within..within + n].copy_from_slice(&data[done..done + n]);
                done += n;
                self.evict(&mut st)?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole stripes become holes (freed) unless `keep_allocated`;
    /// partial stripes are zero-filled.
    pub fn zero(&self, offset: u64, len: u64, keep_allocated: bool, fua: bool) -> Result<()> {
        {
            let mut st = self.lock()?;
            Self::check_range(&st, offset, len)?;
            Self::check_poisoned(&st)?;
            let ss = st.sb.stripe_size as u64;
            for (stripe, within, n) in split_range(offset, len, ss) {
                if n == ss as usize && !keep_allocated {
                    st.stripes.remove(&stripe);
                    self.set_entry(&mut st, stripe, StripeEntry::default())?;
                } else {
                    let c = self.stripe_for_write(&mut st, stripe, n == ss as usize)?;
                    c.data[within..within + n].fill(0);
                    self.evict(&mut st)?;
                }
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Allocation status: `(offset, length, allocated)` runs covering `[offset, offset+len)`, per stripe.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut st = self.lock()?;
        Self::check_range(&st, offset, len)?;
        let ss = st.sb.stripe_size as u64;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        for (stripe, _, n) in split_range(offset, len, ss) {
            let allocated = st.stripes.get(&stripe).is_some_and(|c| c.dirty) || self.entry(&mut st, stripe)?.gen != 0;
            match out.last_mut() {
                Some(last) if last.2 == allocated => last.1 += n as u64,
                _ => out.push((pos, n as u64, allocated)),
            }
            pos += n as u64;
        }
        Ok(out)
    }

    /// Makes every write completed before this call durable: writes back dirty stripes and map pages, commits
    /// a new superblock, then deletes superseded objects.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        Self::check_poisoned(&st)?;
        let r = self.commit(&mut st);
        if let Err(e) = &r {
            st.poisoned = Some(e.to_string());
        }
        r
    }
}

/// Checks a stripe size for `bf volume create`.
pub fn validate_stripe_size(stripe_size: u32, k: usize) -> Result<()> {
    if erasure::shard_len(stripe_size as u64, k) * k != stripe_size as usize {
        return Err(Error::InvalidArgument("stripe size must divide evenly into k shards".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
