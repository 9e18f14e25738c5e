//! A store: its descriptor (`store.bf`), its locations, its key, and the lock that serialises catalog updates.
//!
//! Directory layout: `<store>/store.bf` (descriptor), `<store>/catalog.lock`, `<store>/master.key` (default key
//! file), and for the embedded default `<store>/locations/loc-NN/` (one directory per shard location). Each
//! location holds a `BLOCKFRAME-LOCATION` marker naming the store and its index, `shards/` and `manifests/`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::codec::crypto::{random_bytes, KdfParams, MasterKey};
use crate::codec::erasure;
use crate::error::{Error, IoContext, LocationFailure, Result};
use crate::files::catalog_log::CatalogState;
use crate::format::{self, MAGIC_KEY, MAGIC_LOCATION, MAGIC_STORE};
use crate::location::{open_location, sync_dir, Location, LocationExt};
use crate::metrics::reads::ReadStats;

/// Default data shards per segment.
pub const DEFAULT_DATA_SHARDS: u16 = 4;
/// Default parity shards per segment.
pub const DEFAULT_PARITY_SHARDS: u16 = 2;
/// Default segment size: 32 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 32 << 20;
/// Smallest allowed segment size: 64 KiB.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// Largest allowed segment size: 1 GiB (memory use is a few segments per worker).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;
/// Name of the marker object at the root of each location.
pub const LOCATION_MARKER: &str = "BLOCKFRAME-LOCATION";
const DESCRIPTOR: &str = "store.bf";

/// The store descriptor, written once by `bf init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreDescriptor {
    /// Random store id; every shard header names it.
    pub store_id: [u8; 16],
    /// Data shards per segment.
    pub k: u16,
    /// Parity shards per segment.
    pub m: u16,
    /// Segment size for new files.
    pub segment_size: u64,
    /// Location paths; relative ones are inside the store directory.
    pub locations: Vec<String>,
    /// Key check value (see [`MasterKey::check_value`]).
    pub key_check: [u8; 32],
    /// Present when the key is derived from a passphrase.
    pub kdf: Option<KdfParams>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The failure domain (machine, rack, site) of each location, by index; empty for none (see
    /// [`crate::zones`]). As long as no location has one, the descriptor is written in format version 1.
    pub zones: Vec<String>,
    /// The stable number of each location, by index: the number its marker carries. It is its index in a store
    /// whose locations were never added or removed; `bf location add` gives one above the highest in use.
    pub ids: Vec<u32>,
    /// True for a location being drained by `bf location remove`: it is read from, but it is no shard's home
    /// and nothing new is written to it.
    pub draining: Vec<bool>,
    /// Layout generation: 0 at `bf init`, one more at each location added, drained or removed.
    pub layout_gen: u64,
}

impl StoreDescriptor {
    /// True when the layout is the one `bf init` made (no location added, drained or removed).
    fn initial_layout(&self) -> bool {
        self.layout_gen == 0
            && !self.draining.contains(&true)
            && self.ids.iter().enumerate().all(|(i, id)| *id as usize == i)
    }

    /// The indices of the locations that are shards' homes (all but draining ones), in order.
    pub fn active(&self) -> Vec<usize> {
        (0..self.locations.len()).filter(|&i| !self.draining[i]).collect()
    }
}

/// Refuses a zone name that would not print or could be taken for a location without one.
fn check_zone(zone: &str) -> Result<()> {
    if zone.len() > 64 || zone.chars().any(|c| c.is_control()) || zone.starts_with('#') {
        return Err(Error::Config(format!(
            "zone {zone:?}: at most 64 characters, no control characters, not starting with #"
        )));
    }
    Ok(())
}

/// The descriptor as format version 1 has it (no zones).
#[derive(Serialize, Deserialize)]
struct DescriptorV1 {
    store_id: [u8; 16],
    k: u16,
    m: u16,
    segment_size: u64,
    locations: Vec<String>,
    key_check: [u8; 32],
    kdf: Option<KdfParams>,
    created_unix: u64,
}

/// The descriptor as format version 2 has it (zones, the initial layout).
#[derive(Serialize, Deserialize)]
struct DescriptorV2 {
    store_id: [u8; 16],
    k: u16,
    m: u16,
    segment_size: u64,
    locations: Vec<String>,
    key_check: [u8; 32],
    kdf: Option<KdfParams>,
    created_unix: u64,
    zones: Vec<String>,
}

/// Format version of a descriptor with zones.
const DESCRIPTOR_ZONES_VERSION: u16 = 2;
/// Format version of a descriptor whose locations were added, drained or removed.
const DESCRIPTOR_LAYOUT_VERSION: u16 = 3;

/// The bytes of `store.bf`: the oldest format version that holds it (older versions of bf still open those):
/// 1 while no location has a zone and the layout is the initial one, 2 with zones, else 3.
pub(crate) fn seal_descriptor(d: &StoreDescriptor) -> Vec<u8> {
    if !d.initial_layout() {
        let payload = postcard::to_allocvec(d).expect("the descriptor is postcard-serialisable");
        return format::seal_bytes_version(MAGIC_STORE, DESCRIPTOR_LAYOUT_VERSION, &payload);
    }
    if d.zones.iter().all(String::is_empty) {
        let v1 = DescriptorV1 {
            store_id: d.store_id,
            k: d.k,
            m: d.m,
            segment_size: d.segment_size,
            locations: d.locations.clone(),
            key_check: d.key_check,
            kdf: d.kdf.clone(),
            created_unix: d.created_unix,
        };
        return format::seal(MAGIC_STORE, &v1);
    }
    let v2 = DescriptorV2 {
        store_id: d.store_id,
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        locations: d.locations.clone(),
        key_check: d.key_check,
        kdf: d.kdf.clone(),
        created_unix: d.created_unix,
        zones: d.zones.clone(),
    };
    let payload = postcard::to_allocvec(&v2).expect("the descriptor is postcard-serialisable");
    format::seal_bytes_version(MAGIC_STORE, DESCRIPTOR_ZONES_VERSION, &payload)
}

/// Reads `store.bf` of any format version; `zones`, `ids` and `draining` have one entry per location.
fn open_descriptor(bytes: &[u8], what: &str) -> Result<StoreDescriptor> {
    let (version, payload) = format::open_bytes_version(MAGIC_STORE, what, bytes, 1..=DESCRIPTOR_LAYOUT_VERSION)?;
    let undecodable = |e: postcard::Error| Error::corrupt(what, format!("undecodable payload: {e}"));
    let mut d = match version {
        1 => {
            let v1: DescriptorV1 = postcard::from_bytes(payload).map_err(undecodable)?;
            let v2 = DescriptorV2 {
                store_id: v1.store_id,
                k: v1.k,
                m: v1.m,
                segment_size: v1.segment_size,
                locations: v1.locations,
                key_check: v1.key_check,
                kdf: v1.kdf,
                created_unix: v1.created_unix,
                zones: vec![],
            };
            initial_descriptor(v2)
        }
        2 => initial_descriptor(postcard::from_bytes(payload).map_err(undecodable)?),
        _ => postcard::from_bytes::<StoreDescriptor>(payload).map_err(undecodable)?,
    };
    let n = d.locations.len();
    if d.zones.len() > n || d.ids.len() != n || d.draining.len() != n {
        return Err(Error::corrupt(what, "per-location lists of different lengths"));
    }
    if d.ids.iter().enumerate().any(|(i, id)| d.ids[..i].contains(id)) {
        return Err(Error::corrupt(what, "two locations with one number"));
    }
    d.zones.resize(n, String::new());
    Ok(d)
}

/// A descriptor of format version 1 or 2: the layout `bf init` made.
fn initial_descriptor(v2: DescriptorV2) -> StoreDescriptor {
    let n = v2.locations.len();
    StoreDescriptor {
        store_id: v2.store_id,
        k: v2.k,
        m: v2.m,
        segment_size: v2.segment_size,
        locations: v2.locations,
        key_check: v2.key_check,
        kdf: v2.kdf,
        created_unix: v2.created_unix,
        zones: v2.zones,
        ids: (0..n as u32).collect(),
        draining: vec![false; n],
        layout_gen: 0,
    }
}

/// Marker stored at the root of each location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationMarker {
    /// Store the location belongs to.
    pub store_id: [u8; 16],
    /// Its number ([`StoreDescriptor::ids`]; its index in a store whose locations never changed).
    pub index: u32,
    /// The layout generation it was written at (0: the initial layout, format version 1).
    pub layout_gen: u64,
    /// The numbers of the store's locations in order at that generation (empty at generation 0), for
    /// `bf recover`.
    pub layout: Vec<u32>,
}

/// The marker as format version 1 has it.
#[derive(Serialize, Deserialize)]
struct MarkerV1 {
    store_id: [u8; 16],
    index: u32,
}

/// Format version of a marker that carries the layout.
const MARKER_LAYOUT_VERSION: u16 = 2;

/// How `bf init` obtains the master key.
pub enum KeySource {
    /// Generate a random key and write it to this file (mode 0600, must not exist).
    NewKeyFile(PathBuf),
    /// Derive the key from a passphrase with Argon2id.
    Passphrase(Vec<u8>),
}

/// Settings for a new store.
pub struct InitOptions {
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Location specs (paths, `file:///path` or `s3://bucket/prefix`); empty means k+m directories inside the
    /// store.
    pub locations: Vec<String>,
    /// The failure domain (zone) of each location, in the same order; empty when none has one. The locations
    /// are then ordered so that each stripe's shards fall into as many zones as possible (see
    /// [`crate::zones::spread_order`]).
    pub zones: Vec<String>,
    /// Key source.
    pub key: KeySource,
}

/// An open store.
pub struct Store {
    dir: PathBuf,
    desc: StoreDescriptor,
    locations: Vec<Arc<dyn Location>>,
    key: Option<MasterKey>,
    min_shards_written: usize,
    /// The catalog as last read or written by this process (see [`crate::files::catalog_log`]).
    catalog: Mutex<Option<Arc<CatalogState>>>,
    /// What this process's reads met (shards rebuilt on the fly, verification failures).
    read_stats: ReadStats,
    /// The indices of the locations that are shards' homes ([`StoreDescriptor::active`]).
    active: Vec<usize>,
    /// A shared lock on `use.lock` while the store is open: a change of the locations' layout takes it
    /// exclusively, so every process sees the same homes (see [`Store::exclusively`]).
    in_use: Option<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).field("locations", &self.desc.locations).finish()
    }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let r = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("renaming into {}", path.display()))?;
        sync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Writes a new key file (refuses to overwrite one: that would orphan every file encrypted with it).
pub fn write_key_file(path: &Path, key: &MasterKey) -> Result<()> {
    if path.exists() {
        return Err(Error::Config(format!("key file {} already exists; refusing to overwrite it", path.display())));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    write_atomic(path, &format::seal_bytes(MAGIC_KEY, key.as_bytes()), 0o600)
}

/// Reads a key file written by [`write_key_file`].
pub fn read_key_file(path: &Path) -> Result<MasterKey> {
    let bytes = fs::read(path).ctx(|| format!("reading key file {}", path.display()))?;
    let payload = format::open_bytes(MAGIC_KEY, &format!("key file {}", path.display()), &bytes)?;
    let raw: [u8; 32] =
        payload.try_into().map_err(|_| Error::corrupt(format!("key file {}", path.display()), "not 32 bytes"))?;
    Ok(MasterKey::from_bytes(raw))
}

impl Store {
    /// Default key file path of a store directory.
    pub fn default_key_path(dir: &Path) -> PathBuf {
        dir.join("master.key")
    }

    /// True when `dir` holds a store descriptor.
    pub fn exists(dir: &Path) -> bool {
        dir.join(DESCRIPTOR).is_file()
    }

    /// Creates a new store in `dir` (created if missing) and returns it unlocked.
    pub fn init(dir: &Path, opts: InitOptions) -> Result<Store> {
        erasure::validate(opts.k as usize, opts.m as usize)?;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&opts.segment_size) {
            return Err(Error::Config(format!(
                "segment size {} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE} bytes",
                opts.segment_size
            )));
        }
        if Store::exists(dir) {
            return Err(Error::StoreExists(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).ctx(|| format!("creating store directory {}", dir.display()))?;
        let width = opts.k as usize + opts.m as usize;
        let locations: Vec<String> = if opts.locations.is_empty() {
            (0..width).map(|i| format!("locations/loc-{i:02}")).collect()
        } else {
            opts.locations.iter().map(|l| canonical_spec(l)).collect::<Result<_>>()?
        };
        for (i, l) in locations.iter().enumerate() {
            if locations[..i].contains(l) {
                return Err(Error::Config(format!("location {l} is listed twice")));
            }
        }
        let (locations, zones) = if opts.zones.is_empty() {
            (locations, vec![])
        } else {
            if opts.zones.len() != locations.len() {
                return Err(Error::Config(format!(
                    "{} zones for {} locations: give one zone per location, or none",
                    opts.zones.len(),
                    locations.len()
                )));
            }
            for z in &opts.zones {
                check_zone(z)?;
            }
            let order = crate::zones::spread_order(&opts.zones);
            (
                order.iter().map(|&i| locations[i].clone()).collect(),
                order.iter().map(|&i| opts.zones[i].clone()).collect(),
            )
        };
        let (key, kdf) = match &opts.key {
            KeySource::NewKeyFile(_) => (MasterKey::generate()?, None),
            KeySource::Passphrase(p) => {
                let params = KdfParams::generate()?;
                (MasterKey::from_passphrase(p, &params)?, Some(params))
            }
        };
        let desc = StoreDescriptor {
            store_id: random_bytes()?,
            k: opts.k,
            m: opts.m,
            segment_size: opts.segment_size,
            key_check: key.check_value(),
            kdf,
            created_unix: crate::clock::unix_secs(),
            ids: (0..locations.len() as u32).collect(),
            draining: vec![false; locations.len()],
            layout_gen: 0,
            locations,
            zones,
        };
        // Locations first (each with its marker), then the key, then the descriptor: a store is only seen as
        // existing once everything it needs is in place.
        for (i, l) in desc.locations.iter().enumerate() {
            let loc = create_location(dir, l)?;
            if !loc.list("manifests")?.is_empty()
                || !loc.list("volumes")?.is_empty()
                || !loc.list("catalog")?.is_empty()
            {
                return Err(Error::Config(format!("location {} already holds a store's data", loc.name())));
            }
            write_marker(loc.as_ref(), &desc, i)?;
        }
        if let KeySource::NewKeyFile(path) = &opts.key {
            write_key_file(path, &key)?;
        }
        write_atomic(&dir.join(DESCRIPTOR), &seal_descriptor(&desc), 0o644)?;
        let mut store = Store::open(dir)?;
        store.key = Some(key);
        Ok(store)
    }

    /// Opens an existing store without a key (enough for scrub and verify).
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(DESCRIPTOR);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoStore { path: dir.to_path_buf() })
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let desc = open_descriptor(&bytes, &format!("store descriptor {}", path.display()))?;
        erasure::validate(desc.k as usize, desc.m as usize)?;
        if desc.locations.is_empty() {
            return Err(Error::corrupt("store descriptor", "no locations"));
        }
        let locations = desc.locations.iter().map(|l| open_location(dir, l)).collect::<Result<_>>()?;
        let min_shards_written = default_min_shards_written(desc.k, desc.m);
        // Best effort: a store directory this user cannot write (a read-only `bf get`) is opened without it.
        let in_use =
            lock_use(dir, false).map_err(|e| tracing::debug!(error = %e, "store opened without its use lock")).ok();
        Ok(Store {
            dir: dir.to_path_buf(),
            active: desc.active(),
            desc,
            locations,
            key: None,
            min_shards_written,
            catalog: Mutex::new(None),
            read_stats: ReadStats::default(),
            in_use,
        })
    }

    /// Verifies and installs the key.
    pub fn unlock(&mut self, key: MasterKey) -> Result<()> {
        key.verify_check_value(&self.desc.key_check)?;
        self.key = Some(key);
        self.forget_catalog();
        Ok(())
    }

    /// Unlocks with a passphrase (for stores created with one).
    pub fn unlock_with_passphrase(&mut self, passphrase: &[u8]) -> Result<()> {
        let params = self
            .desc
            .kdf
            .clone()
            .ok_or_else(|| Error::Config("this store uses a key file, not a passphrase".into()))?;
        self.unlock(MasterKey::from_passphrase(passphrase, &params)?)
    }

    /// The key, or an error naming what needs it.
    pub fn key(&self) -> Result<&MasterKey> {
        self.key.as_ref().ok_or_else(|| Error::KeyRequired("no key loaded".into()))
    }

    /// The key when loaded.
    pub fn key_opt(&self) -> Option<&MasterKey> {
        self.key.as_ref()
    }

    /// Store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Descriptor.
    pub fn descriptor(&self) -> &StoreDescriptor {
        &self.desc
    }

    /// Locations in descriptor order (draining ones included: they are read from).
    pub fn locations(&self) -> &[Arc<dyn Location>] {
        &self.locations
    }

    /// Runs `f` on every location (draining ones too) and returns what it gave, in location order: concurrently
    /// when some location is remote, so a listing costs one round trip (and a location that is down costs its
    /// retries once, not once after another), else one location after another.
    pub fn each_location<T: Send>(&self, f: impl Fn(usize, &dyn Location) -> T + Sync) -> Vec<T> {
        let all = self.locations.iter().enumerate();
        if !self.locations.iter().any(|l| l.remote()) {
            return all.map(|(i, l)| f(i, l.as_ref())).collect();
        }
        let f = &f;
        std::thread::scope(|s| {
            let hs: Vec<_> = all.map(|(i, l)| s.spawn(move || f(i, l.as_ref()))).collect();
            // A panic in `f` is the caller's bug, not a location's answer: it is passed on.
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        })
    }

    /// The indices of the locations that are shards' homes and receive new writes (all but draining ones).
    pub fn active(&self) -> &[usize] {
        &self.active
    }

    /// The home location (an index into [`Store::locations`]) of shard `shard` of stripe `segment` of the file,
    /// pack or log volume `id`: [`placement`] over the active locations, from [`placement_start`] of the id.
    /// Computed from the current layout, not from what was recorded when the stripe was written, so that after
    /// locations are added or removed a rebalance knows where every shard belongs from its name alone.
    pub fn home(&self, id: &[u8; 16], segment: u64, shard: usize) -> usize {
        let n = self.active.len();
        self.active[placement(placement_start(id, n), segment, shard, n)]
    }

    /// Runs `read` on location `home`, then, until one succeeds, on each other location in turn (a repair may have
    /// put a shard elsewhere, or a layout change left it where it was until a rebalance moves it home), as
    /// [`crate::stripe`]'s shard search does. Returns the first success, else the first error other than "not
    /// found", else "not found".
    pub fn from_holders<T>(&self, home: usize, mut read: impl FnMut(&dyn Location) -> Result<T>) -> Result<T> {
        let n = self.locations.len();
        let (mut missing, mut problem) = (None, None);
        for at in (0..n).map(|j| (home + j) % n) {
            match read(self.locations[at].as_ref()) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_not_found() => missing = missing.or(Some(e)),
                // Home unreachable or its copy bad is just when a repair put a good copy elsewhere: look on.
                Err(e) => problem = problem.or(Some(e)),
            }
        }
        Err(problem.or(missing).unwrap_or_else(|| Error::NotFound("object on no location".into())))
    }

    /// [`Store::home`] of a shard of a copy-on-write volume (format of `crate::volume::cow`), whose placement
    /// starts from the first byte of its id.
    pub fn cow_home(&self, vol_id: &[u8; 16], stripe: u64, shard: usize) -> usize {
        let n = self.active.len();
        self.active[placement(cow_placement_start(vol_id, n), stripe, shard, n)]
    }

    /// The counters of what reads of this store met since it was opened: shards missing or failing verification,
    /// stripes rebuilt from parity or beyond repair (the metrics endpoints render them).
    pub fn read_stats(&self) -> &ReadStats {
        &self.read_stats
    }

    /// Shards of a stripe that must be stored for a write to succeed (see [`Store::set_min_shards_written`]).
    pub fn min_shards_written(&self) -> usize {
        self.min_shards_written
    }

    /// Sets the write policy: a stripe write succeeds when at least `n` of its k+m shards are stored (the rest
    /// are left for `bf scrub --repair`). `n` must be within k..=k+m. The default, k+1, makes every
    /// acknowledged write survive the loss of at least one more location; k accepts writes with m locations
    /// down, at no redundancy until the repair.
    pub fn set_min_shards_written(&mut self, n: usize) -> Result<()> {
        let (k, m) = (self.desc.k as usize, self.desc.m as usize);
        if !(k..=k + m).contains(&n) {
            return Err(Error::Config(format!("min_shards_written = {n} is outside {k}..={} for k={k}, m={m}", k + m)));
        }
        self.min_shards_written = n;
        Ok(())
    }

    /// Points location `index` at a new (empty) location, `bf location replace`: writes the new location's
    /// marker, then the descriptor. The shards and manifest copies that lived on the old location are rebuilt
    /// onto the new one by a repairing scrub. Holds the catalog lock so no commit runs meanwhile.
    pub fn replace_location(&mut self, index: usize, spec: &str) -> Result<()> {
        let spec = canonical_spec(spec)?;
        self.check_replacement(index, &spec)?;
        let _lock = self.lock_catalog()?;
        let loc = create_location(&self.dir, &spec)?;
        self.replace_location_locked(index, spec, loc)
    }

    /// [`Store::replace_location`] with the new location's backend already opened (tests pass a fault-injecting
    /// one). `spec` is what the descriptor records for it.
    pub fn replace_location_with(&mut self, index: usize, spec: String, loc: Arc<dyn Location>) -> Result<()> {
        self.check_replacement(index, &spec)?;
        let _lock = self.lock_catalog()?;
        self.replace_location_locked(index, spec, loc)
    }

    /// Puts location `index` into failure domain `zone` (empty: none), recorded in the descriptor.
    pub fn set_zone(&mut self, index: usize, zone: &str) -> Result<()> {
        self.check_location_number(index)?;
        check_zone(zone)?;
        let _lock = self.lock_catalog()?;
        let mut desc = self.desc.clone();
        desc.zones[index] = zone.to_string();
        self.save_descriptor(desc)
    }

    /// Adds a new, empty location (`bf location add`) at the end of the list, in failure domain `zone` (empty:
    /// none), with a location number no other location has; returns its index. Its marker is written first, then the
    /// descriptor. Every shard's home is computed over the new layout from then on: a rebalance
    /// ([`crate::rebalance`]) moves the shards there. Takes the store for this process alone ([`Store::exclusively`]).
    pub fn add_location(&mut self, spec: &str, zone: &str) -> Result<usize> {
        let spec = canonical_spec(spec)?;
        check_zone(zone)?;
        if self.desc.locations.contains(&spec) {
            return Err(Error::Config(format!("location {spec} is already part of this store")));
        }
        let loc = create_location(&self.dir, &spec)?;
        self.add_location_with(spec, zone, loc)
    }

    /// [`Store::add_location`] with the new location's backend already opened.
    pub fn add_location_with(&mut self, spec: String, zone: &str, loc: Arc<dyn Location>) -> Result<usize> {
        self.exclusively(|st| st.add_location_locked(spec, zone, loc))
    }

    fn add_location_locked(&mut self, spec: String, zone: &str, loc: Arc<dyn Location>) -> Result<usize> {
        let _lock = self.lock_catalog()?;
        if read_marker(loc.as_ref())?.is_some() || !loc.list("shards")?.is_empty() || !loc.list("catalog")?.is_empty() {
            return Err(Error::Config(format!("{} is not empty", loc.name())));
        }
        let mut desc = self.desc.clone();
        let id = desc.ids.iter().max().map_or(0, |m| m + 1).max(desc.locations.len() as u32);
        desc.locations.push(spec);
        desc.zones.push(zone.to_string());
        desc.ids.push(id);
        desc.draining.push(false);
        desc.layout_gen += 1;
        write_marker(loc.as_ref(), &desc, desc.locations.len() - 1)?;
        let mut locations = self.locations.clone();
        locations.push(loc);
        let (desc, locations) = spread_by_zone(desc, locations);
        self.save_layout(desc, locations)?;
        Ok(self.desc.ids.iter().position(|i| *i == id).unwrap_or(self.locations.len() - 1))
    }

    /// Reorders the locations so that each stripe's shards fall into as many zones as possible
    /// ([`crate::zones::spread_order`]; `bf rebalance --spread-zones`, after `bf location zone`): a new layout,
    /// whose homes a rebalance then moves the shards to. Takes the store for this process alone. Returns whether
    /// the order changed.
    pub fn spread_zones(&mut self) -> Result<bool> {
        self.exclusively(|st| {
            let _lock = st.lock_catalog()?;
            let (mut desc, locations) = spread_by_zone(st.desc.clone(), st.locations.clone());
            if desc.ids == st.desc.ids {
                return Ok(false);
            }
            desc.layout_gen += 1;
            st.save_layout(desc, locations)?;
            Ok(true)
        })
    }

    /// Marks location `index` as draining (the first step of `bf location remove`): it stops being any shard's
    /// home and receives nothing new, but is still read. Refuses when too few locations would remain for k+m
    /// distinct homes. Takes the store for this process alone ([`Store::exclusively`]).
    pub fn start_draining(&mut self, index: usize) -> Result<()> {
        self.check_location_number(index)?;
        if self.desc.draining[index] {
            return Ok(());
        }
        let width = self.desc.k as usize + self.desc.m as usize;
        if self.active.len() <= width {
            return Err(Error::Config(format!(
                "the store has {} active locations and needs {width} (k+m) for its stripes: add one first",
                self.active.len()
            )));
        }
        self.exclusively(|st| {
            let _lock = st.lock_catalog()?;
            let mut desc = st.desc.clone();
            desc.draining[index] = true;
            desc.layout_gen += 1;
            let locations = st.locations.clone();
            st.save_layout(desc, locations)
        })
    }

    /// Forgets a drained location (the last step of `bf location remove`): drops it from the descriptor and
    /// rewrites the other locations' markers with the new layout. The caller holds the store alone
    /// ([`Store::exclusively`]) and has checked that the location holds nothing the store needs.
    pub fn forget_location(&mut self, index: usize) -> Result<()> {
        self.check_location_number(index)?;
        if !self.desc.draining[index] {
            return Err(Error::Config(format!("location {index} is not drained: run `bf location remove` on it")));
        }
        let _lock = self.lock_catalog()?;
        let mut desc = self.desc.clone();
        desc.locations.remove(index);
        desc.zones.remove(index);
        desc.ids.remove(index);
        desc.draining.remove(index);
        desc.layout_gen += 1;
        let mut locations = self.locations.clone();
        locations.remove(index);
        self.save_layout(desc, locations)
    }

    /// Saves a descriptor with a new layout and takes it, with `locations` (its open locations, in its order),
    /// as the store's once it is written; then rewrites each location's marker with it (best effort: a marker of
    /// an older generation still names its location; `bf recover` prefers the newest).
    fn save_layout(&mut self, desc: StoreDescriptor, locations: Vec<Arc<dyn Location>>) -> Result<()> {
        self.save_descriptor(desc)?;
        self.locations = locations;
        self.active = self.desc.active();
        self.forget_catalog();
        for (i, loc) in self.locations.iter().enumerate() {
            if let Err(e) = write_marker(loc.as_ref(), &self.desc, i) {
                tracing::warn!(location = loc.name(), error = %e, "could not update the location marker");
            }
        }
        Ok(())
    }

    /// Runs `f` with the store held by this process alone, for a change of the locations' layout: every process
    /// that has the store open holds `use.lock` shared, so none of them keeps placing shards by a layout that
    /// changed under it. Fails with [`Error::InUse`] while another process has the store open.
    pub fn exclusively<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        self.in_use = None;
        let only = lock_use(&self.dir, true);
        let r = only.and_then(|_only| f(self));
        self.in_use = lock_use(&self.dir, false).ok();
        r
    }

    /// Refuses a location number the store lacks.
    fn check_location_number(&self, index: usize) -> Result<()> {
        if index >= self.desc.locations.len() {
            return Err(Error::Config(format!("no location number {index}")));
        }
        Ok(())
    }

    /// Writes `desc` as the store's descriptor (atomically) and takes it as the one in use.
    fn save_descriptor(&mut self, desc: StoreDescriptor) -> Result<()> {
        write_atomic(&self.dir.join(DESCRIPTOR), &seal_descriptor(&desc), 0o644)?;
        self.desc = desc;
        Ok(())
    }

    /// How many failure domains the store's layout survives losing (see [`crate::zones`]).
    pub fn zone_tolerance(&self) -> crate::zones::ZoneTolerance {
        let zones: Vec<String> = self.active.iter().map(|&i| self.desc.zones[i].clone()).collect();
        crate::zones::tolerance(&zones, self.desc.k as usize, self.desc.m as usize)
    }

    /// Refuses a replacement of a location number the store lacks, or by a location it has already.
    fn check_replacement(&self, index: usize, spec: &str) -> Result<()> {
        self.check_location_number(index)?;
        if self.desc.locations.iter().any(|l| l == spec) {
            return Err(Error::Config(format!("location {spec} is already part of this store")));
        }
        Ok(())
    }

    /// The replacement itself, the catalog lock held: the marker on the new location, then the descriptor.
    fn replace_location_locked(&mut self, index: usize, spec: String, loc: Arc<dyn Location>) -> Result<()> {
        match read_marker(loc.as_ref())? {
            Some(marker) => {
                if !marker_matches(&marker, &self.desc, index) {
                    return Err(Error::Config(format!("{} already belongs to a store", loc.name())));
                }
            }
            None => {
                if !loc.list("manifests")?.is_empty() || !loc.list("shards")?.is_empty() {
                    return Err(Error::Config(format!("{} is not empty", loc.name())));
                }
            }
        }
        write_marker(loc.as_ref(), &self.desc, index)?;
        let mut desc = self.desc.clone();
        desc.locations[index] = spec;
        self.save_descriptor(desc)?;
        self.locations[index] = loc;
        self.forget_catalog();
        Ok(())
    }

    /// Replaces the location backends (tests use this to inject faulty locations).
    pub fn set_locations(&mut self, locations: Vec<Arc<dyn Location>>) -> Result<()> {
        if locations.len() != self.desc.locations.len() {
            return Err(Error::Config("location count differs from the descriptor".into()));
        }
        self.locations = locations;
        self.forget_catalog();
        Ok(())
    }

    /// Checks each location's presence and marker; returns one entry per location, `Err` with the reason when
    /// unusable.
    pub fn probe_locations(&self) -> Vec<Result<()>> {
        self.locations
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.probe()?;
                let what = format!("location marker of {}", l.name());
                let marker = read_marker(l.as_ref())?.ok_or_else(|| Error::corrupt(&what, "missing"))?;
                if !marker_matches(&marker, &self.desc, i) {
                    return Err(Error::corrupt(what, "belongs to another store or position (swapped disks?)"));
                }
                Ok(())
            })
            .collect()
    }

    /// Puts one small object (a manifest copy, a superblock, a map page) on every location in parallel, each made
    /// durable. Fails with [`Error::WriteQuorum`] unless at least m+1 locations (all, when fewer) accept it; the
    /// copies already written are then left for the caller to clean up.
    pub fn put_replicated(&self, key: &str, bytes: &[u8], what: &str) -> Result<()> {
        self.on_every_location(what, &|l| l.put(key, &[bytes]).and_then(|_| l.sync()))
    }

    /// Runs `write` on every active location in parallel (a draining one receives nothing new). Fails with
    /// [`Error::WriteQuorum`] (naming `what`) unless at least m+1 locations (all, when fewer) succeed; what the
    /// others did is left for the caller.
    pub fn on_every_location(&self, what: &str, write: &(dyn Fn(&dyn Location) -> Result<()> + Sync)) -> Result<()> {
        let locations: Vec<&Arc<dyn Location>> = self.active.iter().map(|&i| &self.locations[i]).collect();
        let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = locations.iter().map(|l| s.spawn(move || write(l.as_ref()))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("location writer panicked"))))
                .collect()
        });
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        let need = (self.desc.m as usize + 1).min(locations.len());
        if ok < need {
            let failures = outcomes
                .into_iter()
                .zip(&locations)
                .filter_map(|(o, l)| o.err().map(|e| LocationFailure::new(l.name(), e)))
                .collect();
            return Err(Error::write_quorum(what, ok, need, failures));
        }
        Ok(())
    }

    /// Deletes every shard of `file_id` on every location (best effort: used to undo a failed commit and to
    /// drop the shards of a removed file).
    pub fn remove_shards(&self, file_id: &[u8; 16]) {
        for loc in &self.locations {
            if let Err(e) = loc.delete_prefix(&shard_prefix(file_id)).and_then(|_| loc.sync()) {
                tracing::warn!(location = loc.name(), error = %e, "could not remove shards");
            }
        }
    }

    /// The catalog state this process last saw, if any.
    pub fn catalog_cache(&self) -> Option<Arc<CatalogState>> {
        self.catalog.lock().ok().and_then(|c| c.clone())
    }

    /// Remembers the catalog state (after reading or changing it).
    pub fn set_catalog_cache(&self, state: CatalogState) -> Arc<CatalogState> {
        let st = Arc::new(state);
        if let Ok(mut c) = self.catalog.lock() {
            *c = Some(st.clone());
        }
        st
    }

    fn forget_catalog(&self) {
        if let Ok(mut c) = self.catalog.lock() {
            *c = None;
        }
    }

    /// Takes the catalog lock (exclusive) for the life of the returned guard. Commits, removals and repairs of
    /// manifests hold it, so concurrent processes never interleave name checks and publications.
    pub fn lock_catalog(&self) -> Result<CatalogLock> {
        let path = self.dir.join("catalog.lock");
        let f = open_lock_file(&path)?;
        f.lock().ctx(|| format!("locking {}", path.display()))?;
        Ok(CatalogLock { _file: f })
    }
}

/// Opens (creating it if needed) a lock file for `flock`-style locking.
pub fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).ctx(|| format!("opening {}", path.display()))
}

/// Held catalog lock; released on drop.
pub struct CatalogLock {
    _file: File,
}

/// How long a layout change waits for other processes to close the store (short commands finish).
const EXCLUSIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `desc` and its open `locations` put in [`crate::zones::spread_order`] when some location has a zone (else
/// as they are).
fn spread_by_zone(
    mut desc: StoreDescriptor,
    locations: Vec<Arc<dyn Location>>,
) -> (StoreDescriptor, Vec<Arc<dyn Location>>) {
    if desc.zones.iter().all(String::is_empty) {
        return (desc, locations);
    }
    let order = crate::zones::spread_order(&desc.zones);
    let pick = |v: &[String]| order.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
    desc.locations = pick(&desc.locations);
    desc.zones = pick(&desc.zones);
    desc.ids = order.iter().map(|&i| desc.ids[i]).collect();
    desc.draining = order.iter().map(|&i| desc.draining[i]).collect();
    let locations = order.iter().map(|&i| locations[i].clone()).collect();
    (desc, locations)
}

/// Takes `use.lock` in `dir`: shared (waiting for a layout change to finish), or exclusive, waiting at most
/// [`EXCLUSIVE_WAIT`] for the processes that have the store open to close it.
fn lock_use(dir: &Path, exclusive: bool) -> Result<File> {
    let path = dir.join("use.lock");
    let f = open_lock_file(&path)?;
    if !exclusive {
        f.lock_shared().ctx(|| format!("locking {}", path.display()))?;
        return Ok(f);
    }
    let until = std::time::Instant::now() + EXCLUSIVE_WAIT;
    loop {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            r => break r.map(|()| f).map_err(|e| in_use_error(dir, &path, e)),
        }
    }
}

/// The error of a layout change that could not have the store to itself.
fn in_use_error(dir: &Path, path: &Path, e: std::fs::TryLockError) -> Error {
    match e {
        std::fs::TryLockError::WouldBlock => Error::InUse(format!(
            "the store {} (another bf process has it open: a mount, an NBD or HTTP server, or a running command; \
             stop it and try again)",
            dir.display()
        )),
        std::fs::TryLockError::Error(e) => Error::io(format!("locking {}", path.display()), e),
    }
}

/// The default write policy: k+1 shards per stripe (k when there is no parity).
fn default_min_shards_written(k: u16, m: u16) -> usize {
    k as usize + usize::from(m > 0)
}

/// A spec as the descriptor keeps it: local paths made absolute (relative to the current directory), URLs
/// checked and kept as written.
pub(crate) fn canonical_spec(spec: &str) -> Result<String> {
    match crate::location::spec::parse(spec)? {
        crate::location::spec::LocationSpec::Local(p) => {
            Ok(std::path::absolute(&p).ctx(|| format!("resolving {}", p.display()))?.display().to_string())
        }
        crate::location::spec::LocationSpec::S3(_) => Ok(spec.to_string()),
    }
}

/// Opens a location for a new store, creating a local directory when needed.
fn create_location(dir: &Path, spec: &str) -> Result<Arc<dyn Location>> {
    if let crate::location::spec::LocationSpec::Local(p) = crate::location::spec::parse(spec)? {
        let path = if p.is_absolute() { p } else { dir.join(p) };
        fs::create_dir_all(&path).ctx(|| format!("creating location {}", path.display()))?;
        sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    }
    let loc = open_location(dir, spec)?;
    loc.probe()?;
    Ok(loc)
}

/// Reads a location's marker (either format version): `Ok(None)` when it has none.
pub(crate) fn read_marker(loc: &dyn Location) -> Result<Option<LocationMarker>> {
    let bytes = match loc.get(LOCATION_MARKER) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let what = format!("location marker of {}", loc.name());
    let (version, payload) = format::open_bytes_version(MAGIC_LOCATION, &what, &bytes, 1..=MARKER_LAYOUT_VERSION)?;
    let undecodable = |e: postcard::Error| Error::corrupt(&what, format!("undecodable payload: {e}"));
    if version == 1 {
        let v1: MarkerV1 = postcard::from_bytes(payload).map_err(undecodable)?;
        return Ok(Some(LocationMarker { store_id: v1.store_id, index: v1.index, layout_gen: 0, layout: vec![] }));
    }
    postcard::from_bytes(payload).map(Some).map_err(undecodable)
}

/// Writes the marker of the location at `position` of `desc` (its number, and the layout when it is not the
/// initial one) and makes it durable.
pub(crate) fn write_marker(loc: &dyn Location, desc: &StoreDescriptor, position: usize) -> Result<()> {
    let index = desc.ids[position];
    let bytes = if desc.initial_layout() {
        format::seal(MAGIC_LOCATION, &MarkerV1 { store_id: desc.store_id, index })
    } else {
        let marker =
            LocationMarker { store_id: desc.store_id, index, layout_gen: desc.layout_gen, layout: desc.ids.clone() };
        let payload = postcard::to_allocvec(&marker).expect("the marker is postcard-serialisable");
        format::seal_bytes_version(MAGIC_LOCATION, MARKER_LAYOUT_VERSION, &payload)
    };
    loc.put(LOCATION_MARKER, &[&bytes])?;
    loc.sync()
}

/// True when `marker` is the one the location at `position` of `desc` must carry (its store and number; an
/// older layout generation is still this location's).
pub(crate) fn marker_matches(marker: &LocationMarker, desc: &StoreDescriptor, position: usize) -> bool {
    marker.store_id == desc.store_id && desc.ids.get(position) == Some(&marker.index)
}

/// Location index of shard `shard` of segment `segment` for a file whose placement starts at `start`, over
/// `n` locations: consecutive shards of a segment go to consecutive locations (distinct when n >= k+m), and
/// the starting location rotates with the segment so load spreads.
pub fn placement(start: u32, segment: u64, shard: usize, n: usize) -> usize {
    ((start as u64 + segment + shard as u64) % n as u64) as usize
}

/// The placement start of a file, pack or log volume over `n` locations: from its (random) id, so starts
/// spread.
pub fn placement_start(id: &[u8; 16], n: usize) -> u32 {
    (u32::from_le_bytes([id[0], id[1], id[2], id[3]]) as usize % n.max(1)) as u32
}

/// The placement start of a copy-on-write volume over `n` locations (its format took it from the first byte).
pub fn cow_placement_start(vol_id: &[u8; 16], n: usize) -> u32 {
    (vol_id[0] as usize % n.max(1)) as u32
}

/// Directory under which every file's shards live, one subdirectory per file id.
pub const SHARDS_DIR: &str = "shards";

/// Object key of a shard.
pub fn shard_key(file_id: &[u8; 16], segment: u64, shard: usize) -> String {
    format!("{SHARDS_DIR}/{}/{segment:010}.{shard:03}", hex::encode(file_id))
}

/// Parses the name of a shard object (the last part of [`shard_key`]) into `(segment, shard)`.
pub fn parse_shard_name(name: &str) -> Option<(u64, u16)> {
    let (seg, shard) = name.split_once('.')?;
    Some((seg.parse().ok()?, shard.parse().ok()?))
}

/// Object key prefix of all shards of a file.
pub fn shard_prefix(file_id: &[u8; 16]) -> String {
    format!("{SHARDS_DIR}/{}", hex::encode(file_id))
}

/// Parses a directory name under [`SHARDS_DIR`] (the last part of [`shard_prefix`]) into a file id.
pub fn parse_shard_dir(name: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(name, &mut id).ok().map(|()| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_distinct_within_a_segment() {
        for n in 6..10 {
            for seg in 0..20u64 {
                let mut seen: Vec<usize> = (0..6).map(|i| placement(3, seg, i, n)).collect();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), 6);
            }
        }
    }

    /// The descriptor's format version of `dir`.
    fn descriptor_version(dir: &Path) -> u16 {
        let b = fs::read(dir.join(DESCRIPTOR)).unwrap();
        u16::from_le_bytes([b[8], b[9]])
    }

    #[test]
    fn zones_are_kept_in_a_second_descriptor_format_written_only_once_one_is_set() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let opts = InitOptions {
            k: 2,
            m: 1,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(dir.join("master.key")),
        };
        let mut st = Store::init(&dir, opts).unwrap();
        assert_eq!(descriptor_version(&dir), 1, "a store without zones stays readable by older versions");
        assert_eq!(Store::open(&dir).unwrap().descriptor().zones, ["", "", ""]);
        assert_eq!(st.zone_tolerance().tolerance, 1);
        st.set_zone(0, "rack-a").unwrap();
        st.set_zone(1, "rack-a").unwrap();
        assert_eq!(descriptor_version(&dir), DESCRIPTOR_ZONES_VERSION);
        let back = Store::open(&dir).unwrap();
        assert_eq!(back.descriptor().zones, ["rack-a", "rack-a", ""]);
        // Two of a 2+1 stripe's three shards share rack-a: losing it loses the stripe.
        assert_eq!((back.zone_tolerance().domains, back.zone_tolerance().tolerance), (2, 0));
        for bad in ["#x", "a\nb", &"z".repeat(65)] {
            assert!(matches!(st.set_zone(2, bad), Err(Error::Config(_))), "{bad:?} accepted");
        }
        assert!(matches!(st.set_zone(3, "b"), Err(Error::Config(_))));
        st.set_zone(0, "").unwrap();
        st.set_zone(1, "").unwrap();
        assert_eq!(descriptor_version(&dir), 1, "without zones again, format 1 again");
        assert_eq!(Store::open(&dir).unwrap().descriptor(), st.descriptor());
    }

    #[test]
    fn a_changed_layout_is_kept_in_a_third_format_and_in_the_markers_and_needs_the_store_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let opts = InitOptions {
            k: 2,
            m: 1,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(dir.join("master.key")),
        };
        let mut st = Store::init(&dir, opts).unwrap();
        assert_eq!(read_marker(st.locations()[0].as_ref()).unwrap().unwrap().layout_gen, 0);
        // Another process with the store open: the layout stays as it is.
        let other = Store::open(&dir).unwrap();
        let extra = d.path().join("extra").display().to_string();
        let busy = std::time::Instant::now();
        assert!(matches!(st.add_location(&extra, "z"), Err(Error::InUse(_))));
        assert!(busy.elapsed() >= EXCLUSIVE_WAIT, "gave up before waiting");
        drop(other);
        assert_eq!(st.add_location(&extra, "z").unwrap(), 3);
        assert_eq!(descriptor_version(&dir), DESCRIPTOR_LAYOUT_VERSION);
        assert!(matches!(st.add_location(&extra, ""), Err(Error::Config(_))), "added twice");
        st.start_draining(0).unwrap();
        assert_eq!(st.active(), [1, 2, 3]);
        assert!(matches!(st.start_draining(1), Err(Error::Config(_))), "left fewer than k+m homes");
        st.exclusively(|st| st.forget_location(0)).unwrap();
        let back = Store::open(&dir).unwrap();
        assert_eq!(back.descriptor(), st.descriptor());
        assert_eq!((back.descriptor().ids.clone(), back.descriptor().layout_gen), (vec![1, 2, 3], 3));
        assert!(back.probe_locations().iter().all(|p| p.is_ok()), "{:?}", back.probe_locations());
        let marker = read_marker(back.locations()[2].as_ref()).unwrap().unwrap();
        assert_eq!((marker.index, marker.layout_gen, marker.layout), (3, 3, vec![1, 2, 3]));
        // Every shard's home is one of the active locations, distinct within a stripe.
        for seg in 0..10 {
            let homes: std::collections::BTreeSet<usize> =
                (0..3).map(|i| back.home(&[seg as u8; 16], seg, i)).collect();
            assert_eq!(homes.len(), 3);
        }
    }

    #[test]
    fn init_open_unlock() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let key_path = dir.join("master.key");
        let opts = InitOptions {
            k: 2,
            m: 1,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(key_path.clone()),
        };
        let s = Store::init(&dir, opts).unwrap();
        assert_eq!(s.locations().len(), 3);
        assert!(s.probe_locations().iter().all(|r| r.is_ok()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut s2 = Store::open(&dir).unwrap();
        s2.unlock(read_key_file(&key_path).unwrap()).unwrap();
        assert!(matches!(s2.unlock(MasterKey::from_bytes([0; 32])), Err(Error::WrongKey)));
        assert!(matches!(
            Store::init(
                &dir,
                InitOptions {
                    k: 2,
                    m: 1,
                    segment_size: MIN_SEGMENT_SIZE,
                    locations: vec![],
                    zones: vec![],
                    key: KeySource::Passphrase(b"x".to_vec())
                }
            ),
            Err(Error::StoreExists(_))
        ));
    }
}
