//! Block volumes: a virtual disk stored as encrypted (AES-256-XTS per 4 KiB sector), erasure-coded stripes.
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
use crate::error::{Error, IoContext, Result};
use crate::format::volume::*;
use crate::location::LocationExt;
use crate::store::Store;
use crate::stripe::{read_stripe, write_stripe, StripeAddr, StripeBuffers, StripeError};

/// Default stripe size: 1 MiB (see the volume benchmark: small enough that a 4 KiB random write rewrites
/// little, large enough that sequential I/O moves 256 KiB shards).
pub const DEFAULT_STRIPE_SIZE: u32 = 1 << 20;
/// Stripes per map page.
pub const ENTRIES_PER_PAGE: u32 = 256;
/// Default stripe cache: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
const PAGE_CACHE_LIMIT: usize = 64;
/// Superseded shard files kept for reuse per location.
const RECYCLE_LIMIT: usize = 256;

/// Tuning for an open volume.
#[derive(Clone, Copy, Debug)]
pub struct VolumeOptions {
    /// Bytes of stripe cache (write-back and read cache together).
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
    /// Stripe size.
    pub stripe_size: u32,
    /// Committed generation.
    pub generation: u64,
}

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
    let mut ids = HashSet::new();
    for loc in store.locations() {
        for name in loc.list("volumes").unwrap_or_default() {
            let mut id = [0u8; 16];
            if hex::decode_to_slice(&name, &mut id).is_ok() {
                ids.insert(id);
            }
        }
    }
    let mut v: Vec<_> = ids.into_iter().collect();
    v.sort();
    v
}

/// Every readable volume.
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
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn find_id(store: &Store, name: &str) -> Result<Option<[u8; 16]>> {
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

/// Creates a thin volume (nothing allocated).
pub fn create(store: &Store, name: &str, size: u64, stripe_size: u32) -> Result<()> {
    let key = store.key()?;
    if name.is_empty() || name.len() > 255 || name.contains('/') || name.contains('\0') {
        return Err(Error::InvalidArgument(format!("invalid volume name {name:?}")));
    }
    if size == 0 || !size.is_multiple_of(SECTOR as u64) {
        return Err(Error::InvalidArgument(format!("volume size {size} must be a positive multiple of 4096")));
    }
    if stripe_size < 64 << 10 || !stripe_size.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "stripe size {stripe_size} must be a power of two of at least 64 KiB"
        )));
    }
    let _lock = store.lock_catalog()?;
    if find_id(store, name)?.is_some() {
        return Err(Error::AlreadyExists(format!("volume {name}")));
    }
    let d = store.descriptor();
    let vol_id: [u8; 16] = random_bytes()?;
    let meta = VolumeMeta { name: name.into(), created_unix: crate::clock::unix_secs() };
    let (sealed_meta, meta_nonce) = key.seal_metadata(
        &vol_id,
        &postcard::to_allocvec(&meta).map_err(|e| Error::internal(format!("encoding volume metadata: {e}")))?,
    )?;
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

/// An open volume. All methods are safe to call from many threads; FLUSH is coherent across them (one
/// instance per volume per process, guarded by a lock file against other processes).
pub struct Volume {
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

impl Volume {
    /// Opens a volume by name (needs the key). Deletes objects a crash left uncommitted.
    pub fn open(store: Arc<Store>, name: &str, opts: VolumeOptions) -> Result<Volume> {
        let id = find_id(&store, name)?.ok_or_else(|| Error::NotFound(format!("volume {name}")))?;
        let lock = lock_volume(&store, &id)?;
        let sb = load_superblock(&store, &id)?;
        let key = store.key()?;
        let xts = key.volume_xts(&id);
        let codec = Codec::new(sb.body.k as usize, sb.body.m as usize)?;
        let cache_stripes = (opts.cache_bytes / sb.body.stripe_size as usize).max(2);
        let vol = Volume {
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
        self.lock().map(|s| s.sb.stripe_size).unwrap_or(DEFAULT_STRIPE_SIZE)
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
                (e, (st.sb.shard_len(), st.sb.placement_start))
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

    /// Reads `[within, within + out.len())` of a stripe from just the data shards that hold it.
    fn read_partial(
        &self,
        stripe: u64,
        entry: &StripeEntry,
        (sl, placement_start): (usize, u32),
        stripe_size: usize,
        within: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let a = within / SECTOR * SECTOR;
        let b = (within + out.len()).div_ceil(SECTOR) * SECTOR;
        let b = b.min(stripe_size);
        let mut plain = vec![0u8; b - a];
        let mut io = Vec::new();
        let id = self.id;
        let gen = entry.gen;
        let key_of = move |i: usize| stripe_shard_key(&id, stripe, gen, i);
        let addr = StripeAddr {
            file_id: &self.id,
            segment: stripe,
            placement_start,
            shard_len: sl,
            key_of: &key_of,
            deferred: true,
        };
        for i in a / sl..=(b - 1) / sl {
            let leaf = entry.leaves.get(i).ok_or_else(|| Error::corrupt("stripe map entry", "missing leaf"))?;
            let (r, _) = match crate::stripe::fetch_shard(&self.store, &addr, i, leaf, &mut io) {
                (Ok(x), _) => x,
                (Err(p), _) => return Err(Error::corrupt(format!("shard {i} of stripe {stripe}"), p.to_string())),
            };
            let shard = &io[r];
            // Overlap of shard i ([i*sl, (i+1)*sl)) with [a, b), in stripe coordinates.
            let lo = a.max(i * sl);
            let hi = b.min((i + 1) * sl);
            plain[lo - a..hi - a].copy_from_slice(&shard[lo - i * sl..hi - i * sl]);
        }
        self.xts.decrypt(&mut plain, stripe * (stripe_size / SECTOR) as u64 + (a / SECTOR) as u64);
        out.copy_from_slice(&plain[within - a..within - a + out.len()]);
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

    fn check_poisoned(st: &State) -> Result<()> {
        match &st.poisoned {
            Some(p) => Err(Error::ReadOnly(format!("the volume (after a failed write-back: {p})"))),
            None => Ok(()),
        }
    }

    fn commit(&self, st: &mut State) -> Result<()> {
        let dirty: Vec<u64> = st.stripes.iter().filter(|(_, c)| c.dirty).map(|(s, _)| *s).collect();
        for stripe in dirty {
            self.write_back(st, stripe)?;
        }
        let dirty_pages: Vec<u32> = st.pages.iter().filter(|(_, p)| p.dirty).map(|(i, _)| *i).collect();
        if dirty_pages.is_empty() && st.superseded.is_empty() && !st.sb_dirty {
            return Ok(());
        }
        for p in dirty_pages {
            self.write_page(st, p)?;
        }
        for loc in self.store.locations() {
            loc.sync()?;
        }
        st.sb.generation += 1;
        publish_superblock(&self.store, &st.sb)?;
        st.sb_dirty = false;
        // Superseded shards become recyclable (bounded); map pages and the excess are deleted.
        let n = self.store.locations().len();
        st.recycle.resize(n, Vec::new());
        for key in std::mem::take(&mut st.superseded) {
            let home = parse_shard_name(key.rsplit('/').next().unwrap_or(""))
                .map(|(stripe, _, i)| crate::store::placement(st.sb.placement_start, stripe, i, n));
            match home {
                Some(h) if st.recycle[h].len() < RECYCLE_LIMIT && self.store.locations()[h].cheap_rename() => {
                    st.recycle[h].push(key)
                }
                _ => {
                    for loc in self.store.locations() {
                        let _ = loc.delete(&key);
                    }
                }
            }
        }
        Ok(())
    }

    fn page_of(st: &State, stripe: u64) -> (u32, usize) {
        let per = st.sb.entries_per_page as u64;
        ((stripe / per) as u32, (stripe % per) as usize)
    }

    fn load_page(&self, st: &mut State, page: u32) -> Result<()> {
        if st.pages.contains_key(&page) {
            return Ok(());
        }
        let r = *st.sb.pages.get(page as usize).ok_or_else(|| Error::internal("page out of range"))?;
        let p = if r.gen == 0 {
            MapPage::empty(self.id, page, st.sb.entries_per_page)
        } else {
            let key = page_key(&self.id, page, r.gen);
            let mut last = None;
            let mut found = None;
            for loc in self.store.locations() {
                let what = format!("map page {key} on {}", loc.name());
                match loc.get(&key).and_then(|b| MapPage::decode(&b, &r, &st.sb, page, &what)) {
                    Ok(p) => {
                        found = Some(p);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            found.ok_or_else(|| {
                last.unwrap_or_else(|| Error::corrupt(format!("map page {page}"), "no copy on any location"))
            })?
        };
        st.tick += 1;
        let tick = st.tick;
        st.pages.insert(page, CachedPage { page: p, dirty: false, last_use: tick });
        self.evict_pages(st)
    }

    fn entry(&self, st: &mut State, stripe: u64) -> Result<StripeEntry> {
        let (page, idx) = Self::page_of(st, stripe);
        self.load_page(st, page)?;
        let p = st.pages.get(&page).ok_or_else(|| Error::internal("page vanished"))?;
        Ok(p.page.entries[idx].clone())
    }

    fn set_entry(&self, st: &mut State, stripe: u64, e: StripeEntry) -> Result<()> {
        let (page, idx) = Self::page_of(st, stripe);
        self.load_page(st, page)?;
        let tick = st.tick;
        let p = st.pages.get_mut(&page).ok_or_else(|| Error::internal("page vanished"))?;
        let old = std::mem::replace(&mut p.page.entries[idx], e);
        p.dirty = true;
        p.last_use = tick;
        if old.gen != 0 {
            let width = st.sb.k as usize + st.sb.m as usize;
            for i in 0..width {
                st.superseded.push(stripe_shard_key(&self.id, stripe, old.gen, i));
            }
        }
        Ok(())
    }

    fn stripe_addr<'a>(
        &'a self,
        st: &State,
        stripe: u64,
        key_of: &'a (dyn Fn(usize) -> String + Sync),
    ) -> StripeAddr<'a> {
        StripeAddr {
            file_id: &self.id,
            segment: stripe,
            placement_start: st.sb.placement_start,
            shard_len: st.sb.shard_len(),
            key_of,
            deferred: true,
        }
    }

    /// Reads, verifies and decrypts a stripe into the cache (clean).
    fn load_stripe(&self, st: &mut State, stripe: u64) -> Result<()> {
        let e = self.entry(st, stripe)?;
        let ss = st.sb.stripe_size as usize;
        let mut data = vec![0u8; ss];
        if e.gen != 0 {
            let id = self.id;
            let key_of = move |i: usize| stripe_shard_key(&id, stripe, e.gen, i);
            let addr = self.stripe_addr(st, stripe, &key_of);
            let State { codec, bufs, .. } = st;
            match read_stripe(&self.store, codec, &addr, &e.leaves, bufs) {
                Ok(()) => {}
                Err(StripeError::Lost { have, bad }) => {
                    return Err(Error::TooManyLost {
                        file: format!("volume {}", self.name),
                        segment: stripe,
                        have,
                        need: st.sb.k as usize,
                        bad: bad.join(", "),
                    })
                }
                Err(StripeError::Mismatch) => {
                    return Err(Error::Authentication { file: format!("volume {}", self.name), segment: stripe })
                }
                Err(StripeError::Other(e)) => return Err(e),
            }
            data.copy_from_slice(&st.bufs.data[..ss]);
            self.xts.decrypt(&mut data, stripe * (ss / SECTOR) as u64);
        }
        st.tick += 1;
        let tick = st.tick;
        st.stripes.insert(stripe, CachedStripe { data, dirty: false, last_use: tick });
        Ok(())
    }

    fn stripe_for_write<'s>(&self, st: &'s mut State, stripe: u64, whole: bool) -> Result<&'s mut CachedStripe> {
        if !st.stripes.contains_key(&stripe) {
            if whole {
                let ss = st.sb.stripe_size as usize;
                st.stripes.insert(stripe, CachedStripe { data: vec![0u8; ss], dirty: false, last_use: 0 });
            } else {
                self.load_stripe(st, stripe)?;
            }
        }
        st.tick += 1;
        let tick = st.tick;
        let c = st.stripes.get_mut(&stripe).ok_or_else(|| Error::internal("stripe vanished"))?;
        c.dirty = true;
        c.last_use = tick;
        Ok(c)
    }

    /// Writes a dirty stripe's shards under a new generation and points the map at them (uncommitted).
    fn write_back(&self, st: &mut State, stripe: u64) -> Result<()> {
        let ss = st.sb.stripe_size as usize;
        let k = st.sb.k as usize;
        let sl = st.sb.shard_len();
        let gen = st.sb.next_gen;
        st.sb.next_gen += 1;
        let mut enc = std::mem::take(&mut st.enc);
        enc.clear();
        enc.resize(k * sl, 0);
        {
            let c = st.stripes.get(&stripe).ok_or_else(|| Error::internal("stripe vanished"))?;
            enc[..ss].copy_from_slice(&c.data);
        }
        self.xts.encrypt(&mut enc[..ss], stripe * (ss / SECTOR) as u64);
        let id = self.id;
        let key_of = move |i: usize| stripe_shard_key(&id, stripe, gen, i);
        let addr = self.stripe_addr(st, stripe, &key_of);
        let n = self.store.locations().len();
        st.recycle.resize(n, Vec::new());
        for i in 0..k + st.sb.m as usize {
            let home = addr.home(&self.store, i);
            if let Some(old) = st.recycle[home].pop() {
                // Best effort: a recycled file that vanished (repair, manual cleanup) just means a fresh create.
                let _ = self.store.locations()[home].rename(&old, &key_of(i));
            }
        }
        let leaves = write_stripe(&self.store, &mut st.codec, &addr, &enc);
        st.enc = enc;
        let written = leaves?;
        if !written.missing.is_empty() {
            let first = st.shortfall == 0;
            st.shortfall += written.missing.len() as u64;
            // Recorded once per open (and again on the next open): scrub finds every missing shard anyway.
            if first {
                if let Err(e) = crate::pending::record(&self.store, &self.id, st.shortfall) {
                    tracing::warn!(volume = %self.name, error = %e, "could not record the pending repair");
                }
            }
        }
        let leaves = written.leaves;
        self.set_entry(st, stripe, StripeEntry { gen, leaves })?;
        if let Some(c) = st.stripes.get_mut(&stripe) {
            c.dirty = false;
        }
        Ok(())
    }

    /// Writes a dirty map page as a new object (uncommitted until the next superblock).
    fn write_page(&self, st: &mut State, page: u32) -> Result<()> {
        let gen = st.sb.next_gen;
        st.sb.next_gen += 1;
        let bytes = {
            let p = st.pages.get_mut(&page).ok_or_else(|| Error::internal("page vanished"))?;
            p.page.gen = gen;
            p.page.encode()
        };
        let key = page_key(&self.id, page, gen);
        self.store.put_replicated(&key, &bytes, "a volume map page")?;
        let old =
            std::mem::replace(&mut st.sb.pages[page as usize], PageRef { gen, hash: *blake3::hash(&bytes).as_bytes() });
        if old.gen != 0 {
            st.superseded.push(page_key(&self.id, page, old.gen));
        }
        if let Some(p) = st.pages.get_mut(&page) {
            p.dirty = false;
        }
        st.sb_dirty = true;
        Ok(())
    }

    fn evict(&self, st: &mut State) -> Result<()> {
        while st.stripes.len() > self.cache_stripes {
            let Some((&victim, _)) = st.stripes.iter().min_by_key(|(_, c)| c.last_use) else { break };
            if st.stripes.get(&victim).is_some_and(|c| c.dirty) {
                if let Err(e) = self.write_back(st, victim) {
                    st.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
            st.stripes.remove(&victim);
        }
        self.evict_pages(st)
    }

    fn evict_pages(&self, st: &mut State) -> Result<()> {
        while st.pages.len() > PAGE_CACHE_LIMIT {
            let Some((&victim, _)) = st.pages.iter().min_by_key(|(_, p)| p.last_use) else { break };
            if st.pages.get(&victim).is_some_and(|p| p.dirty) {
                self.write_page(st, victim)?;
            }
            st.pages.remove(&victim);
        }
        Ok(())
    }

    /// Deletes objects not referenced by the committed superblock (left by a crash or an interrupted GC).
    fn collect_garbage(&self) -> Result<()> {
        let mut st = self.lock()?;
        let prefix = volume_prefix(&self.id);
        let mut doomed: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for loc in self.store.locations() {
            for name in loc.list(&format!("{prefix}/map")).unwrap_or_default() {
                if let Some((page, gen)) = parse_page_name(&name) {
                    let live = st.sb.pages.get(page as usize).is_some_and(|r| r.gen == gen);
                    let key = format!("{prefix}/map/{name}");
                    if !live && seen.insert(key.clone()) {
                        doomed.push(key);
                    }
                }
            }
            for dir in loc.list(&format!("{prefix}/s")).unwrap_or_default() {
                for name in loc.list(&format!("{prefix}/s/{dir}")).unwrap_or_default() {
                    let Some((stripe, gen, _)) = parse_shard_name(&name) else { continue };
                    let live = stripe < st.sb.stripes() && self.entry(&mut st, stripe)?.gen == gen;
                    let key = format!("{prefix}/s/{dir}/{name}");
                    if !live && seen.insert(key.clone()) {
                        doomed.push(key);
                    }
                }
            }
        }
        if !doomed.is_empty() {
            tracing::info!(volume = %self.name, objects = doomed.len(), "deleting uncommitted or superseded objects");
        }
        for key in doomed {
            for loc in self.store.locations() {
                let _ = loc.delete(&key);
            }
        }
        Ok(())
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
