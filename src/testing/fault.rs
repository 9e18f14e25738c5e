//! Fault injection: a wrapper that makes any location vanish or turn read-only, and a seeded planner that damages
//! a store's shards and manifest copies the way real disks do (bit rot, torn and misdirected writes, lost files,
//! dead or replaced disks).
//!
//! Planning is pure ([`plan`] maps a seed and an [`Inventory`] to a [`FaultPlan`]); applying goes through the
//! [`Location`] trait, so the same plan damages in-memory locations and real directories alike. Every plan
//! replays exactly from its seed: tests print the seed when they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::format::manifest::parse_manifest_name;
use crate::location::{LocalDir, Location, LocationExt};
use crate::store::{parse_shard_dir, parse_shard_name, shard_key, shard_prefix, LOCATION_MARKER, SHARDS_DIR};

/// (writes and deletes fail, reads work), or crash (see [`CrashSwitch`]).
#[derive(Debug)]
pub struct FaultyLocation {
    inner: Arc<dyn Location>,
    gone: AtomicBool,
    read_only: AtomicBool,
    crash: std::sync::Mutex<Option<Arc<CrashSwitch>>>,
}

/// A crash point shared by the locations of a store: after the n-th change (put, delete, write, sync) through
/// any of them, every later change fails, as if the process had been killed right after that change: what was
/// done before stays, nothing after happens. Arm it, run an operation, then reopen the store and check.
#[derive(Debug, Default)]
pub struct CrashSwitch {
    /// Changes allowed before the crash (`u64::MAX`: never).
    after: std::sync::atomic::AtomicU64,
    /// Changes made so far.
    done: std::sync::atomic::AtomicU64,
}

impl CrashSwitch {
    /// A switch that never crashes but counts changes (a dry run measures an operation's length).
    pub fn counting() -> Arc<Self> {
        Arc::new(CrashSwitch { after: u64::MAX.into(), done: 0.into() })
    }

    /// Crash after `n` more changes (0: at the first), counting from now.
    pub fn arm(&self, n: u64) {
        self.done.store(0, Ordering::SeqCst);
        self.after.store(n, Ordering::SeqCst);
    }

    /// No crash any more (the store is "reopened"); the count restarts.
    pub fn disarm(&self) {
        self.after.store(u64::MAX, Ordering::SeqCst);
        self.done.store(0, Ordering::SeqCst);
    }

    /// Changes made since the last arm or disarm.
    pub fn changes(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.done.load(Ordering::SeqCst) >= self.after.load(Ordering::SeqCst)
    }

    /// Takes one change: `Err` once the crash happened (the change is not made).
    fn take(&self, what: &str) -> Result<()> {
        let after = self.after.load(Ordering::SeqCst);
        let n = self.done.fetch_add(1, Ordering::SeqCst);
        if n >= after {
            self.done.store(after, Ordering::SeqCst);
            return Err(Error::io(
                format!("{what} after the crash point"),
                std::io::Error::new(std::io::ErrorKind::Interrupted, "crashed (injected)"),
            ));
        }
        Ok(())
    }
}

impl FaultyLocation {
    /// Wraps `inner`, healthy at first.
    pub fn new(inner: Arc<dyn Location>) -> Self {
        FaultyLocation {
            inner,
            gone: AtomicBool::new(false),
            read_only: AtomicBool::new(false),
            crash: std::sync::Mutex::new(None),
        }
    }

    /// Makes changes through this location count towards `switch`'s crash point (`None`: no crash points).
    pub fn set_crash_switch(&self, switch: Option<Arc<CrashSwitch>>) {
        *self.crash.lock().unwrap_or_else(|e| e.into_inner()) = switch;
    }

    /// The wrapped location, bypassing injected modes (faults are applied through it).
    pub fn inner(&self) -> &Arc<dyn Location> {
        &self.inner
    }

    /// Makes the location vanish (`true`) or come back.
    pub fn set_gone(&self, gone: bool) {
        self.gone.store(gone, Ordering::SeqCst);
    }

    /// Makes writes and deletes fail (`true`) or work again.
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    /// One change towards the crash point, if any.
    fn crash_point(&self) -> Result<()> {
        let switch = self.crash.lock().unwrap_or_else(|e| e.into_inner()).clone();
        switch.map_or(Ok(()), |s| s.take(self.inner.name()))
    }

    fn check_present(&self) -> Result<()> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(Error::io(
                format!("location {}", self.inner.name()),
                std::io::Error::new(std::io::ErrorKind::NotFound, "location directory is missing"),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        self.check_present()?;
        self.crash_point()?;
        if self.read_only.load(Ordering::SeqCst) {
            return Err(Error::io(
                format!("location {}", self.inner.name()),
                std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "Read-only file system"),
            ));
        }
        Ok(())
    }
}

impl Location for FaultyLocation {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        self.inner.put(key, parts)
    }
    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        self.inner.put_new(key, parts)
    }
    fn put_deferred(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        self.inner.put_deferred(key, parts)
    }
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.check_present()?;
        self.inner.get_into(key, buf)
    }
    fn get_split_into(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> Result<u64> {
        self.check_present()?;
        self.inner.get_split_into(key, head, body)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_present()?;
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.check_present()?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.inner.delete(key)
    }
    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        self.check_writable()?;
        self.inner.preallocate(key, len)
    }
    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        self.check_writable()?;
        self.inner.write_at(key, offset, parts)
    }
    fn cheap_rename(&self) -> bool {
        self.inner.cheap_rename()
    }

    fn remote(&self) -> bool {
        self.inner.remote()
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.check_writable()?;
        self.inner.delete_prefix(prefix)
    }
    fn sync(&self) -> Result<()> {
        self.check_present()?;
        self.crash_point()?;
        self.inner.sync()
    }
    fn probe(&self) -> Result<()> {
        self.check_present()?;
        self.inner.probe()
    }
    fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        self.check_present()?;
        self.inner.modified(key)
    }
}

/// Identity of one shard: file id, segment, shard index.
pub type ShardId = ([u8; 16], u64, u16);

/// A shard object found on a location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardObject {
    /// Location index.
    pub location: usize,
    /// Object key.
    pub key: String,
    /// Which shard its name says it is.
    pub id: ShardId,
}

/// A manifest copy or a catalog log object found on a location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestObject {
    /// Location index.
    pub location: usize,
    /// Object key.
    pub key: String,
    /// File id from its name; for a catalog log object, the first 16 bytes of BLAKE3 of its key (one pseudo
    /// file per object, so the budget keeps a good copy of each).
    pub file_id: [u8; 16],
}

impl ManifestObject {
    /// True for an object of the catalog log (reported once for the store, not per file).
    pub fn in_catalog_log(&self) -> bool {
        self.key.starts_with(crate::format::catalog::CATALOG_DIR)
    }
}

/// What a store holds, as listed from its locations.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Number of locations.
    pub locations: usize,
    /// Every shard object, sorted by location then key.
    pub shards: Vec<ShardObject>,
    /// Every manifest copy.
    pub manifests: Vec<ManifestObject>,
}

/// Parses `<segment:010>.<shard:03>`.
/// Lists the shards and manifest copies of `locations` (raw access: pass the unwrapped locations).
pub fn inventory(locations: &[&dyn Location]) -> Result<Inventory> {
    let mut inv = Inventory { locations: locations.len(), ..Inventory::default() };
    for (i, loc) in locations.iter().enumerate() {
        for dir in loc.list(SHARDS_DIR)? {
            let Some(file_id) = parse_shard_dir(&dir) else { continue };
            for name in loc.list(&shard_prefix(&file_id))? {
                if let Some((seg, shard)) = parse_shard_name(&name) {
                    let key = shard_key(&file_id, seg, shard as usize);
                    inv.shards.push(ShardObject { location: i, key, id: (file_id, seg, shard) });
                }
            }
        }
        for name in loc.list("manifests")? {
            if let Some((_, file_id)) = parse_manifest_name(&name) {
                inv.manifests.push(ManifestObject { location: i, key: format!("manifests/{name}"), file_id });
            }
        }
        for name in loc.list(crate::format::catalog::CATALOG_DIR)? {
            let Some(parsed) = crate::format::catalog::parse_name(&name) else { continue };
            let key = crate::format::catalog::key_of(&parsed);
            let mut file_id = [0u8; 16];
            file_id.copy_from_slice(&blake3::hash(key.as_bytes()).as_bytes()[..16]);
            inv.manifests.push(ManifestObject { location: i, key, file_id });
        }
    }
    Ok(inv)
}

/// One injected fault. Byte positions are fractions (per mille) or raw random numbers resolved against the
/// object's real size when applied, so planning needs no object contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip bits at these positions (each taken modulo the object's bit length).
    FlipBits {
        /// Location index.
        location: usize,
        /// Object key.
        key: String,
        /// Raw bit positions.
        bits: Vec<u64>,
    },
    /// Cut the object to `permille`/1000 of its length (a torn write).
    Truncate {
        /// Location index.
        location: usize,
        /// Object key.
        key: String,
        /// Fraction kept, 0..1000.
        permille: u16,
    },
    /// Zero a range (a lost sector) starting at `start_permille` of the length, `len` bytes long (at least one).
    ZeroRange {
        /// Location index.
        location: usize,
        /// Object key.
        key: String,
        /// Start as a fraction of the length, 0..1000.
        start_permille: u16,
        /// Bytes zeroed (clipped at the end).
        len: usize,
    },
    /// Delete the object.
    Delete {
        /// Location index.
        location: usize,
        /// Object key.
        key: String,
    },
    /// Exchange the contents of two objects (a misdirected write).
    Swap {
        /// First (location, key).
        a: (usize, String),
        /// Second (location, key).
        b: (usize, String),
    },
    /// Empty a location completely, marker included (a replaced disk).
    Wipe {
        /// Location index.
        location: usize,
    },
    /// The location disappears (an unmounted or dead disk).
    Remove {
        /// Location index.
        location: usize,
    },
    /// The location turns read-only (writes fail, reads work).
    ReadOnly {
        /// Location index.
        location: usize,
    },
}

/// A planned set of faults and what they were meant to damage.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// The seed it came from.
    pub seed: u64,
    /// Faults in application order.
    pub faults: Vec<Fault>,
}

/// Limits for [`plan`].
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Number of faults to try to place.
    pub faults: usize,
    /// Most damaged shards allowed in any one segment (m for a repairable campaign).
    pub max_bad_per_segment: usize,
    /// Keep at least this many intact manifest copies per file.
    pub min_good_manifests: usize,
    /// Allow whole-location faults (wipe, remove).
    pub location_faults: bool,
    /// Allow one read-only location (no manifest copy on it is damaged: nothing could repair it).
    pub read_only: bool,
}

/// Bookkeeping of the damage a plan may cause, so budgets hold.
#[derive(Default)]
struct Budget {
    bad: BTreeMap<([u8; 16], u64), BTreeSet<u16>>,
    bad_manifests: BTreeMap<[u8; 16], BTreeSet<usize>>,
    dead_locations: BTreeSet<usize>,
}

impl Budget {
    fn shard_ok(&self, ids: &[ShardId], max: usize) -> bool {
        let mut extra: BTreeMap<([u8; 16], u64), BTreeSet<u16>> = BTreeMap::new();
        for &(f, s, i) in ids {
            extra.entry((f, s)).or_default().insert(i);
        }
        extra.iter().all(|(seg, new)| {
            let mut all = self.bad.get(seg).cloned().unwrap_or_default();
            all.extend(new);
            all.len() <= max
        })
    }

    fn take_shards(&mut self, ids: &[ShardId]) {
        for &(f, s, i) in ids {
            self.bad.entry((f, s)).or_default().insert(i);
        }
    }

    fn manifest_ok(&self, inv: &Inventory, hits: &[(usize, [u8; 16])], min_good: usize) -> bool {
        let mut extra: BTreeMap<[u8; 16], BTreeSet<usize>> = BTreeMap::new();
        for &(loc, f) in hits {
            extra.entry(f).or_default().insert(loc);
        }
        extra.iter().all(|(f, new)| {
            let copies = inv.manifests.iter().filter(|m| &m.file_id == f).count();
            let mut all = self.bad_manifests.get(f).cloned().unwrap_or_default();
            all.extend(new);
            copies.saturating_sub(all.len()) >= min_good
        })
    }

    fn take_manifests(&mut self, hits: &[(usize, [u8; 16])]) {
        for &(loc, f) in hits {
            self.bad_manifests.entry(f).or_default().insert(loc);
        }
    }
}

/// Plans up to `opts.faults` faults from `seed` over `inv`, never damaging more than `max_bad_per_segment`
/// shards of a segment nor leaving fewer than `min_good_manifests` intact copies of a manifest. Each object is
/// damaged at most once. Pure: the same seed and inventory give the same plan.
pub fn plan(seed: u64, inv: &Inventory, opts: &PlanOptions) -> FaultPlan {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    // The read-only location (if any) is chosen first, so no manifest copy is damaged where no repair can write.
    let read_only = (opts.read_only && inv.locations > 1 && rng.gen_bool(0.3)).then(|| rng.gen_range(0..inv.locations));
    if let Some(location) = read_only {
        faults.push(Fault::ReadOnly { location });
    }
    let mut p = Planner { inv, opts, rng, read_only, budget: Budget::default(), touched: BTreeSet::new() };
    // Bounded: a fixed number of attempts, whatever the budgets allow.
    for _ in 0..opts.faults * 8 {
        if faults.len() >= opts.faults {
            break;
        }
        let kind = p.rng.gen_range(0..100u32);
        let fault = if kind < 8 && opts.location_faults && inv.locations > 1 {
            p.location_fault()
        } else if kind < 20 && !inv.manifests.is_empty() {
            p.manifest_fault()
        } else if kind < 30 && inv.shards.len() > 1 {
            p.swap_fault()
        } else if !inv.shards.is_empty() {
            p.shard_fault()
        } else {
            None
        };
        faults.extend(fault);
    }
    FaultPlan { seed, faults }
}

/// The state of [`plan`] between attempts. Each `*_fault` method draws one candidate from the random stream
/// and returns it when the budgets allow (then charged to them), else `None`.
struct Planner<'a> {
    inv: &'a Inventory,
    opts: &'a PlanOptions,
    rng: StdRng,
    read_only: Option<usize>,
    budget: Budget,
    /// Objects damaged already, as (location, key).
    touched: BTreeSet<(usize, String)>,
}

impl Planner<'_> {
    /// A whole location wiped or removed (one no other fault has touched).
    fn location_fault(&mut self) -> Option<Fault> {
        let (inv, opts) = (self.inv, self.opts);
        let location = self.rng.gen_range(0..inv.locations);
        if self.budget.dead_locations.contains(&location)
            || self.read_only == Some(location)
            || self.touched.iter().any(|(l, _)| *l == location)
        {
            return None;
        }
        let ids: Vec<ShardId> = inv.shards.iter().filter(|s| s.location == location).map(|s| s.id).collect();
        let hits: Vec<(usize, [u8; 16])> =
            inv.manifests.iter().filter(|m| m.location == location).map(|m| (location, m.file_id)).collect();
        if !self.budget.shard_ok(&ids, opts.max_bad_per_segment)
            || !self.budget.manifest_ok(inv, &hits, opts.min_good_manifests)
        {
            return None;
        }
        self.budget.take_shards(&ids);
        self.budget.take_manifests(&hits);
        self.budget.dead_locations.insert(location);
        Some(if self.rng.gen_bool(0.5) { Fault::Wipe { location } } else { Fault::Remove { location } })
    }

    /// One manifest copy damaged.
    fn manifest_fault(&mut self) -> Option<Fault> {
        let inv = self.inv;
        let m = &inv.manifests[self.rng.gen_range(0..inv.manifests.len())];
        let hit = [(m.location, m.file_id)];
        if self.budget.dead_locations.contains(&m.location)
            || self.read_only == Some(m.location)
            || self.touched.contains(&(m.location, m.key.clone()))
            || !self.budget.manifest_ok(inv, &hit, self.opts.min_good_manifests)
        {
            return None;
        }
        self.budget.take_manifests(&hit);
        self.touched.insert((m.location, m.key.clone()));
        Some(object_fault(&mut self.rng, m.location, m.key.clone()))
    }

    /// Two shards' contents exchanged (a misdirected write).
    fn swap_fault(&mut self) -> Option<Fault> {
        let inv = self.inv;
        let a = &inv.shards[self.rng.gen_range(0..inv.shards.len())];
        let b = &inv.shards[self.rng.gen_range(0..inv.shards.len())];
        let ids = [a.id, b.id];
        if a == b
            || [a, b].iter().any(|s| {
                self.budget.dead_locations.contains(&s.location) || self.touched.contains(&(s.location, s.key.clone()))
            })
            || !self.budget.shard_ok(&ids, self.opts.max_bad_per_segment)
        {
            return None;
        }
        self.budget.take_shards(&ids);
        self.touched.insert((a.location, a.key.clone()));
        self.touched.insert((b.location, b.key.clone()));
        Some(Fault::Swap { a: (a.location, a.key.clone()), b: (b.location, b.key.clone()) })
    }

    /// One shard damaged.
    fn shard_fault(&mut self) -> Option<Fault> {
        let inv = self.inv;
        let s = &inv.shards[self.rng.gen_range(0..inv.shards.len())];
        if self.budget.dead_locations.contains(&s.location)
            || self.touched.contains(&(s.location, s.key.clone()))
            || !self.budget.shard_ok(&[s.id], self.opts.max_bad_per_segment)
        {
            return None;
        }
        self.budget.take_shards(&[s.id]);
        self.touched.insert((s.location, s.key.clone()));
        Some(object_fault(&mut self.rng, s.location, s.key.clone()))
    }
}

fn object_fault(rng: &mut StdRng, location: usize, key: String) -> Fault {
    match rng.gen_range(0..4u32) {
        0 => Fault::FlipBits { location, key, bits: (0..rng.gen_range(1..4)).map(|_| rng.gen()).collect() },
        1 => Fault::Truncate { location, key, permille: rng.gen_range(0..1000) },
        2 => Fault::ZeroRange { location, key, start_permille: rng.gen_range(0..1000), len: rng.gen_range(1..4096) },
        _ => Fault::Delete { location, key },
    }
}

/// Where faults are applied: raw access to each location, and the whole-location faults a backend supports.
pub trait FaultTarget {
    /// Number of locations.
    fn count(&self) -> usize;
    /// Raw access to location `i` (bypassing injected modes).
    fn raw(&self, i: usize) -> &dyn Location;
    /// Makes location `i` disappear.
    fn remove(&self, i: usize) -> Result<()>;
    /// Makes location `i` read-only; `Ok(false)` when this backend cannot.
    fn set_read_only(&self, i: usize) -> Result<bool>;
}

impl FaultTarget for [Arc<FaultyLocation>] {
    fn count(&self) -> usize {
        self.len()
    }
    fn raw(&self, i: usize) -> &dyn Location {
        self[i].inner().as_ref()
    }
    fn remove(&self, i: usize) -> Result<()> {
        self[i].set_gone(true);
        Ok(())
    }
    fn set_read_only(&self, i: usize) -> Result<bool> {
        self[i].set_read_only(true);
        Ok(true)
    }
}

/// Real location directories (for end-to-end tests of the `bf` binary). Removing deletes the directory;
/// read-only is not supported (root ignores permissions).
#[derive(Debug)]
pub struct LocalDirs {
    dirs: Vec<LocalDir>,
}

impl LocalDirs {
    /// The directories, in location order.
    pub fn new(roots: &[PathBuf]) -> Self {
        LocalDirs { dirs: roots.iter().map(LocalDir::new).collect() }
    }

    /// Raw location handles, for [`inventory`].
    pub fn locations(&self) -> Vec<&dyn Location> {
        self.dirs.iter().map(|d| d as &dyn Location).collect()
    }
}

impl FaultTarget for LocalDirs {
    fn count(&self) -> usize {
        self.dirs.len()
    }
    fn raw(&self, i: usize) -> &dyn Location {
        &self.dirs[i]
    }
    fn remove(&self, i: usize) -> Result<()> {
        let root = self.dirs[i].root();
        std::fs::remove_dir_all(root).map_err(|e| Error::io(format!("removing {}", root.display()), e))
    }
    fn set_read_only(&self, _: usize) -> Result<bool> {
        Ok(false)
    }
}

/// What applying a plan actually changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// Shards whose object at some location was changed or removed: (location, shard).
    pub shards: BTreeSet<(usize, ShardId)>,
    /// Manifest copies changed or removed: (location, file id).
    pub manifests: BTreeSet<(usize, [u8; 16])>,
    /// Locations made read-only.
    pub read_only: BTreeSet<usize>,
    /// Locations wiped or removed.
    pub dead: BTreeSet<usize>,
}

impl Damage {
    /// Damaged shards per segment: `(file id, segment) -> shard indexes`.
    pub fn per_segment(&self) -> BTreeMap<([u8; 16], u64), BTreeSet<u16>> {
        let mut out: BTreeMap<([u8; 16], u64), BTreeSet<u16>> = BTreeMap::new();
        for &(_, (f, s, i)) in &self.shards {
            out.entry((f, s)).or_default().insert(i);
        }
        out
    }
}

/// Replaces an object's bytes, recording the damage when they really changed.
fn rewrite(
    target: &(impl FaultTarget + ?Sized),
    inv: &Inventory,
    damage: &mut Damage,
    location: usize,
    key: &str,
    f: impl FnOnce(&mut Vec<u8>),
) -> Result<()> {
    let loc = target.raw(location);
    let before = loc.get(key)?;
    let mut after = before.clone();
    f(&mut after);
    if after != before {
        loc.put(key, &[&after])?;
        loc.sync()?;
        record(inv, damage, location, key);
    }
    Ok(())
}

fn record(inv: &Inventory, damage: &mut Damage, location: usize, key: &str) {
    if let Some(s) = inv.shards.iter().find(|s| s.location == location && s.key == key) {
        damage.shards.insert((location, s.id));
    }
    if let Some(m) = inv.manifests.iter().find(|m| m.location == location && m.key == key) {
        damage.manifests.insert((location, m.file_id));
    }
}

/// Applies `plan` to `target` and returns what it changed.
pub fn apply(plan: &FaultPlan, inv: &Inventory, target: &(impl FaultTarget + ?Sized)) -> Result<Damage> {
    let mut damage = Damage::default();
    for fault in &plan.faults {
        match fault {
            Fault::FlipBits { location, key, bits } => rewrite(target, inv, &mut damage, *location, key, |b| {
                if !b.is_empty() {
                    let total = b.len() as u64 * 8;
                    for &bit in bits {
                        let bit = bit % total;
                        b[(bit / 8) as usize] ^= 1 << (bit % 8);
                    }
                }
            })?,
            Fault::Truncate { location, key, permille } => {
                rewrite(target, inv, &mut damage, *location, key, |b| b.truncate(b.len() * *permille as usize / 1000))?
            }
            Fault::ZeroRange { location, key, start_permille, len } => {
                rewrite(target, inv, &mut damage, *location, key, |b| {
                    let start = b.len() * *start_permille as usize / 1000;
                    let end = start.saturating_add(*len).min(b.len());
                    b[start..end].fill(0);
                })?
            }
            Fault::Delete { location, key } => {
                let loc = target.raw(*location);
                loc.delete(key)?;
                loc.sync()?;
                record(inv, &mut damage, *location, key);
            }
            Fault::Swap { a, b } => {
                let (la, lb) = (target.raw(a.0), target.raw(b.0));
                let (ba, bb) = (la.get(&a.1)?, lb.get(&b.1)?);
                if ba != bb {
                    la.put(&a.1, &[&bb])?;
                    lb.put(&b.1, &[&ba])?;
                    la.sync()?;
                    lb.sync()?;
                    record(inv, &mut damage, a.0, &a.1);
                    record(inv, &mut damage, b.0, &b.1);
                }
            }
            Fault::Wipe { location } | Fault::Remove { location } => {
                if matches!(fault, Fault::Wipe { .. }) {
                    let loc = target.raw(*location);
                    loc.delete_prefix("shards")?;
                    loc.delete_prefix("manifests")?;
                    loc.delete(LOCATION_MARKER)?;
                    loc.sync()?;
                } else {
                    target.remove(*location)?;
                }
                damage.dead.insert(*location);
                for s in inv.shards.iter().filter(|s| s.location == *location) {
                    damage.shards.insert((s.location, s.id));
                }
                for m in inv.manifests.iter().filter(|m| m.location == *location) {
                    damage.manifests.insert((m.location, m.file_id));
                }
            }
            Fault::ReadOnly { location } => {
                if target.set_read_only(*location)? {
                    damage.read_only.insert(*location);
                }
            }
        }
    }
    Ok(damage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mem::MemLocation;

    #[test]
    fn faulty_location_vanishes_and_turns_read_only() {
        let f = FaultyLocation::new(Arc::new(MemLocation::new("m")));
        f.put("k", &[b"v"]).unwrap();
        f.set_read_only(true);
        assert!(f.put("k", &[b"w"]).is_err());
        assert_eq!(f.put_new("new", &[b"w"]).unwrap_err().kind(), crate::ErrorKind::ReadOnly);
        assert!(f.delete("k").is_err());
        assert_eq!(f.get("k").unwrap(), b"v");
        f.set_gone(true);
        assert!(f.get("k").unwrap_err().is_not_found());
        assert!(f.probe().is_err() && f.list("x").is_err());
        assert_eq!(f.put_new("new", &[b"w"]).unwrap_err().kind(), crate::ErrorKind::NotFound);
        f.set_gone(false);
        f.set_read_only(false);
        f.put("k", &[b"w"]).unwrap();
        assert_eq!(f.get("k").unwrap(), b"w");
        assert!(f.get("new").unwrap_err().is_not_found(), "refused creates store nothing");
    }

    fn sample_inventory() -> Inventory {
        let mut inv = Inventory { locations: 3, ..Inventory::default() };
        for seg in 0..4u64 {
            for shard in 0..3u16 {
                let location = (seg as usize + shard as usize) % 3;
                inv.shards.push(ShardObject {
                    location,
                    key: format!("shards/00/{seg:010}.{shard:03}"),
                    id: ([0; 16], seg, shard),
                });
            }
        }
        for location in 0..3 {
            inv.manifests.push(ManifestObject { location, key: "manifests/m.bfm".into(), file_id: [0; 16] });
        }
        inv
    }

    #[test]
    fn plans_replay_and_respect_budgets() {
        let inv = sample_inventory();
        let opts = PlanOptions {
            faults: 10,
            max_bad_per_segment: 1,
            min_good_manifests: 1,
            location_faults: true,
            read_only: true,
        };
        for seed in 0..200 {
            let p = plan(seed, &inv, &opts);
            assert_eq!(p.faults, plan(seed, &inv, &opts).faults, "seed {seed}");
            let mut budget = Budget::default();
            for f in &p.faults {
                let ids: Vec<ShardId> = match f {
                    Fault::Wipe { location } | Fault::Remove { location } => {
                        inv.shards.iter().filter(|s| s.location == *location).map(|s| s.id).collect()
                    }
                    Fault::Swap { a, b } => [a, b]
                        .iter()
                        .filter_map(|(l, k)| inv.shards.iter().find(|s| s.location == *l && &s.key == k))
                        .map(|s| s.id)
                        .collect(),
                    Fault::FlipBits { location, key, .. }
                    | Fault::Truncate { location, key, .. }
                    | Fault::ZeroRange { location, key, .. }
                    | Fault::Delete { location, key } => {
                        inv.shards.iter().filter(|s| s.location == *location && &s.key == key).map(|s| s.id).collect()
                    }
                    Fault::ReadOnly { .. } => vec![],
                };
                budget.take_shards(&ids);
            }
            assert!(budget.bad.values().all(|s| s.len() <= 1), "seed {seed}: {:?}", p.faults);
        }
    }

    #[test]
    fn applying_records_only_real_changes() {
        const ID: &str = "000102030405060708090a0b0c0d0e0f";
        let locs: Vec<Arc<FaultyLocation>> =
            (0..2).map(|i| Arc::new(FaultyLocation::new(Arc::new(MemLocation::new(format!("m{i}")))))).collect();
        locs[0].inner().put(&format!("shards/{ID}/0000000000.000"), &[&[0u8; 8]]).unwrap();
        locs[1].inner().put(&format!("shards/{ID}/0000000000.001"), &[&[1u8; 8]]).unwrap();
        let raw: Vec<&dyn Location> = locs.iter().map(|l| l.inner().as_ref()).collect();
        let inv = inventory(&raw).unwrap();
        assert_eq!(inv.shards.len(), 2);
        let zero = |location| Fault::ZeroRange {
            location,
            key: format!("shards/{ID}/0000000000.00{location}"),
            start_permille: 0,
            len: 4,
        };
        let p = FaultPlan { seed: 0, faults: vec![zero(0), zero(1), Fault::ReadOnly { location: 1 }] };
        let d = apply(&p, &inv, locs.as_slice()).unwrap();
        // Zeroing zeros changes nothing and is not counted.
        assert_eq!(d.shards.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1]);
        assert!(locs[1].put("x", &[b"x"]).is_err());
        assert_eq!(locs[1].get(&format!("shards/{ID}/0000000000.001")).unwrap(), [0, 0, 0, 0, 1, 1, 1, 1]);
    }
}
