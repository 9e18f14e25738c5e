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

/// Format version of a descriptor with zones.
const DESCRIPTOR_ZONES_VERSION: u16 = 2;

/// The bytes of `store.bf`: format version 1 while no location has a zone (older versions of bf still open it),
/// else version 2.
pub(crate) fn seal_descriptor(d: &StoreDescriptor) -> Vec<u8> {
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
    let payload = postcard::to_allocvec(d).expect("the descriptor is postcard-serialisable");
    format::seal_bytes_version(MAGIC_STORE, DESCRIPTOR_ZONES_VERSION, &payload)
}

/// Reads `store.bf` of either format version; `zones` has one entry per location.
fn open_descriptor(bytes: &[u8], what: &str) -> Result<StoreDescriptor> {
    let (version, payload) = format::open_bytes_version(MAGIC_STORE, what, bytes, 1..=DESCRIPTOR_ZONES_VERSION)?;
    let undecodable = |e: postcard::Error| Error::corrupt(what, format!("undecodable payload: {e}"));
    let mut d = if version == 1 {
        let v1: DescriptorV1 = postcard::from_bytes(payload).map_err(undecodable)?;
        StoreDescriptor {
            store_id: v1.store_id,
            k: v1.k,
            m: v1.m,
            segment_size: v1.segment_size,
            locations: v1.locations,
            key_check: v1.key_check,
            kdf: v1.kdf,
            created_unix: v1.created_unix,
            zones: vec![],
        }
    } else {
        postcard::from_bytes::<StoreDescriptor>(payload).map_err(undecodable)?
    };
    if d.zones.len() > d.locations.len() {
        return Err(Error::corrupt(what, "more zones than locations"));
    }
    d.zones.resize(d.locations.len(), String::new());
    Ok(d)
}

/// Marker stored at the root of each location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationMarker {
    /// Store the location belongs to.
    pub store_id: [u8; 16],
    /// Its index in the descriptor's list.
    pub index: u32,
}

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
            locations,
            key_check: key.check_value(),
            kdf,
            created_unix: crate::clock::unix_secs(),
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
            write_marker(loc.as_ref(), &desc.store_id, i)?;
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
        Ok(Store {
            dir: dir.to_path_buf(),
            desc,
            locations,
            key: None,
            min_shards_written,
            catalog: Mutex::new(None),
            read_stats: ReadStats::default(),
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

    /// Locations in descriptor order.
    pub fn locations(&self) -> &[Arc<dyn Location>] {
        &self.locations
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
        crate::zones::tolerance(&self.desc.zones, self.desc.k as usize, self.desc.m as usize)
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
                if marker.store_id != self.desc.store_id || marker.index as usize != index {
                    return Err(Error::Config(format!("{} already belongs to a store", loc.name())));
                }
            }
            None => {
                if !loc.list("manifests")?.is_empty() || !loc.list("shards")?.is_empty() {
                    return Err(Error::Config(format!("{} is not empty", loc.name())));
                }
            }
        }
        write_marker(loc.as_ref(), &self.desc.store_id, index)?;
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
                let marker: LocationMarker = format::open(MAGIC_LOCATION, &what, &l.get(LOCATION_MARKER)?)?;
                if marker.store_id != self.desc.store_id || marker.index as usize != i {
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

    /// Runs `write` on every location in parallel. Fails with [`Error::WriteQuorum`] (naming `what`) unless at
    /// least m+1 locations (all, when fewer) succeed; what the others did is left for the caller.
    pub fn on_every_location(&self, what: &str, write: &(dyn Fn(&dyn Location) -> Result<()> + Sync)) -> Result<()> {
        let locations = &self.locations;
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
                .zip(locations)
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

/// Reads a location's marker: `Ok(None)` when it has none.
pub(crate) fn read_marker(loc: &dyn Location) -> Result<Option<LocationMarker>> {
    match loc.get(LOCATION_MARKER) {
        Ok(b) => format::open(MAGIC_LOCATION, &format!("location marker of {}", loc.name()), &b).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a location's marker (store id and position) and makes it durable.
pub(crate) fn write_marker(loc: &dyn Location, store_id: &[u8; 16], index: usize) -> Result<()> {
    let marker = LocationMarker { store_id: *store_id, index: index as u32 };
    loc.put(LOCATION_MARKER, &[&format::seal(MAGIC_LOCATION, &marker)])?;
    loc.sync()
}

/// Location index of shard `shard` of segment `segment` for a file whose placement starts at `start`, over
/// `n` locations: consecutive shards of a segment go to consecutive locations (distinct when n >= k+m), and
/// the starting location rotates with the segment so load spreads.
pub fn placement(start: u32, segment: u64, shard: usize, n: usize) -> usize {
    ((start as u64 + segment + shard as u64) % n as u64) as usize
}

/// The placement start of a file, pack or volume over `n` locations: from its (random) id, so starts spread.
pub fn placement_start(id: &[u8; 16], n: usize) -> u32 {
    (u32::from_le_bytes([id[0], id[1], id[2], id[3]]) as usize % n.max(1)) as u32
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
