//! The store as a filesystem, independent of any kernel interface: mount adapters (FUSE in `fs-mount/`) are
//! thin translations of [`Vfs`] calls.
//!
//! - Namespace ([`tree`]): committed files under their names, directories derived from the `/`-separated
//!   paths. The catalog is re-read at most every `catalog_ttl` on lookups and directory listings, so files
//!   committed by other processes appear. Directories made with mkdir and symbolic links are catalog entries of
//!   their own (an empty packed file whose metadata says what it is), written behind like files.
//! - Reads: random access; a read decrypts (and when needed rebuilds from parity) only the segments it touches,
//!   each verified against the Merkle tree and its AES-GCM tag; a segment beyond repair is an I/O error, never
//!   wrong bytes. Decoded segments are kept in a bounded [`cache`]; sequential readers trigger read-ahead.
//! - Writes: a file opened for writing gets a [`spool`] file on disk (a copy of the committed version, made at
//!   the first change, or empty); on flush, fsync or the last close it is committed with the ordinary commit
//!   pipeline (`replace`), which is all-or-nothing: until it completes the old version is what the store holds.
//! - Renames and metadata changes re-seal the manifest (no data is rewritten, see [`catalog::reseal`]).
//!
//! Lock order (outer to inner): a writer's `op` → `heavy` → `ns` → `state` → a writer's `spool`.

pub mod cache;
pub mod handles;
mod reader;
pub mod spool;
pub mod tree;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::codec::erasure::Codec;
use crate::codec::merkle::Hash;
use crate::error::{Error, FsErrorKind, Result};
use crate::files::catalog::validate_name;
use crate::files::catalog::{self, Entry};
use crate::files::commit::CommitRequest;
use crate::files::read::{read_to, OpenFile, SegmentReader};
use crate::files::session::{Session, SessionOptions};
use crate::format::manifest::{EntryKind, FileMeta};
use crate::store::Store;
use crate::stripe::StripeBuffers;

use cache::{Bytes, SegmentCache};
use handles::HandleTable;
pub use reader::ReadData;
use spool::Spool;
pub use tree::{Ino, ROOT};
use tree::{NodeKind, Tree};

/// Settings of a filesystem view.
#[derive(Clone, Debug)]
pub struct VfsOptions {
    /// Refuse every change.
    pub read_only: bool,
    /// Bytes of decrypted segments kept for repeated and sequential reads.
    pub cache_bytes: usize,
    /// How long a catalog listing is trusted before lookups re-read it.
    pub catalog_ttl: Duration,
    /// Worker threads of each commit (each holds about 1.5 segments of memory).
    pub commit_workers: usize,
    /// Bytes read ahead of a sequential reader (at least one segment, at most half the cache).
    pub read_ahead_bytes: u64,
    /// Segments decoded at once (each decoder keeps about 1.5 segments of buffers).
    pub decoders: usize,
    /// Most handles open at once.
    pub max_open: usize,
    /// How long a closed file may wait before it is committed (write-behind; `fsync` does not wait).
    pub write_behind: Duration,
    /// Owner and group shown for entries that recorded none (files committed by `bf commit`, older formats,
    /// directories implied by file names); `None`: the owner of the store directory.
    pub owner: Option<(u32, u32)>,
}

impl Default for VfsOptions {
    fn default() -> Self {
        VfsOptions {
            read_only: false,
            cache_bytes: 128 << 20,
            catalog_ttl: Duration::from_secs(1),
            commit_workers: 1,
            read_ahead_bytes: 64 << 20,
            decoders: 2,
            max_open: 4096,
            write_behind: Duration::from_secs(1),
            owner: None,
        }
    }
}

/// Kind of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// Ownership, permission bits and times of a node: what `stat` shows besides kind, size and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access (set by `utimensat` and at creation; reads do not change it, as with `noatime`).
    pub atime_unix_ns: i64,
    /// Last change of the contents.
    pub mtime_unix_ns: i64,
    /// Last change of the contents or the metadata.
    pub ctime_unix_ns: i64,
}

impl Stat {
    /// A node made now with `mode` by `owner`.
    fn new(mode: u32, (uid, gid): (u32, u32), now: i64) -> Self {
        Stat { mode: mode & 0o7777, uid, gid, atime_unix_ns: now, mtime_unix_ns: now, ctime_unix_ns: now }
    }

    /// The metadata a committed entry recorded (`default_owner` when it recorded none).
    fn of(meta: &FileMeta, default_owner: (u32, u32)) -> Self {
        let (uid, gid) = meta.owner.unwrap_or(default_owner);
        Stat {
            mode: meta.mode & 0o7777,
            uid,
            gid,
            atime_unix_ns: meta.atime_unix_ns,
            mtime_unix_ns: meta.mtime_unix_ns,
            ctime_unix_ns: meta.ctime_unix_ns,
        }
    }

    /// Applies the metadata part of `changes`; any change also sets the ctime (to `now` unless it is given).
    fn apply(&mut self, changes: &SetAttr, now: i64) {
        if let Some(m) = changes.mode {
            self.mode = m & 0o7777;
        }
        self.uid = changes.uid.unwrap_or(self.uid);
        self.gid = changes.gid.unwrap_or(self.gid);
        self.atime_unix_ns = changes.atime_unix_ns.unwrap_or(self.atime_unix_ns);
        self.mtime_unix_ns = changes.mtime_unix_ns.unwrap_or(self.mtime_unix_ns);
        self.ctime_unix_ns = changes.ctime_unix_ns.unwrap_or(now);
    }

    /// A change of the contents at `now`.
    fn modified(&mut self, now: i64) {
        self.mtime_unix_ns = now;
        self.ctime_unix_ns = now;
    }

    /// `meta` carrying this metadata.
    fn sealed_into(&self, meta: &FileMeta) -> FileMeta {
        FileMeta {
            mode: self.mode,
            owner: Some((self.uid, self.gid)),
            atime_unix_ns: self.atime_unix_ns,
            mtime_unix_ns: self.mtime_unix_ns,
            ctime_unix_ns: self.ctime_unix_ns,
            ..meta.clone()
        }
    }

    /// A commit of `name` with this metadata.
    fn request(&self, name: String, kind: EntryKind) -> CommitRequest {
        CommitRequest {
            name,
            mtime_unix_ns: self.mtime_unix_ns,
            mode: self.mode,
            replace: true,
            workers: 1,
            size: None,
            kind,
            owner: Some((self.uid, self.gid)),
            atime_unix_ns: Some(self.atime_unix_ns),
            ctime_unix_ns: Some(self.ctime_unix_ns),
        }
    }
}

/// Attributes of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// File, directory or symbolic link.
    pub kind: FileType,
    /// Size in bytes (0 for directories, the target's length for symbolic links).
    pub size: u64,
    /// Link count.
    pub nlink: u32,
    /// Owner, permission bits and times.
    pub stat: Stat,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: Ino,
    /// Name within the directory.
    pub name: String,
    /// File or directory.
    pub kind: FileType,
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// Opened for writing (or reading and writing).
    pub write: bool,
    /// Truncate to zero length at open.
    pub truncate: bool,
}

/// Attribute changes (`None` leaves a value alone). Who may make them is checked by the kernel
/// (`default_permissions`), not here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New size (truncate or extend with zeros).
    pub size: Option<u64>,
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time, nanoseconds since the epoch.
    pub atime_unix_ns: Option<i64>,
    /// New modification time, nanoseconds since the epoch.
    pub mtime_unix_ns: Option<i64>,
    /// New status-change time (`None`: the time of the change), nanoseconds since the epoch.
    pub ctime_unix_ns: Option<i64>,
}

impl SetAttr {
    /// True when it changes times and nothing else.
    fn times_only(&self) -> bool {
        self.size.is_none() && self.mode.is_none() && self.uid.is_none() && self.gid.is_none()
    }

    /// True when it changes more than the size.
    fn changes_metadata(&self) -> bool {
        SetAttr { size: None, ..*self } != SetAttr::default()
    }
}

fn now_ns() -> i64 {
    crate::clock::unix_ns() as i64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A committed version of a file, as read from its manifest.
struct Committed {
    entry: Entry,
    meta: FileMeta,
    open: OnceLock<Arc<OpenFile>>,
}

impl Committed {
    fn new(entry: Entry) -> Result<Self> {
        let what = || format!("manifest of {}", entry.label());
        let meta = entry.meta.clone().ok_or_else(|| Error::KeyRequired(what()))?;
        if meta.size != entry.manifest.body.plain_size() {
            return Err(Error::corrupt(what(), "metadata size differs from the segment lengths"));
        }
        Ok(Committed { entry, meta, open: OnceLock::new() })
    }

    fn key(&self) -> (Hash, [u8; 16]) {
        (self.entry.file.name_tag, self.entry.file.file_id)
    }

    fn file(&self, store: &Store) -> Result<Arc<OpenFile>> {
        if let Some(f) = self.open.get() {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenFile::new(store, &self.entry)?);
        Ok(self.open.get_or_init(|| f).clone())
    }
}

/// Write state of a file open for writing, shared by its handles.
struct Writer {
    /// Serialises changes to the spool and commits.
    op: Mutex<WriterOp>,
    spool: RwLock<Option<Arc<Spool>>>,
    dirty: AtomicBool,
    unlinked: AtomicBool,
    writers: AtomicUsize,
    /// Owner, mode and times the next commit records.
    stat: Mutex<Stat>,
    /// The kernel sent this file's times (writeback cache): writes no longer set them.
    kernel_times: AtomicBool,
}

struct WriterOp {
    /// The committed version the spool starts from.
    base: Option<Arc<Committed>>,
}

/// What a file node holds: its committed version and, while open for writing, its write state. A symbolic
/// link is a leaf too: its slot is empty and its [`EntrySlot`] holds the rest.
#[derive(Default)]
struct FileSlot {
    committed: Option<Arc<Committed>>,
    writer: Option<Arc<Writer>>,
}

/// A directory or symbolic link: its entry in the catalog (once written) and its metadata now. Changes are
/// written behind, like files' data: the entry is re-committed with the next commit.
struct EntrySlot {
    committed: Option<Arc<Committed>>,
    stat: Stat,
    /// The target of a symbolic link (`None` for a directory).
    target: Option<String>,
    /// Changed since `committed` (queued in `Shared::dirty_entries`).
    dirty: bool,
}

impl EntrySlot {
    fn kind(&self) -> EntryKind {
        match &self.target {
            Some(target) => EntryKind::Symlink { target: target.clone() },
            None => EntryKind::Dir,
        }
    }
}

struct FileHandle {
    ino: Ino,
    committed: Option<Arc<Committed>>,
    writer: Option<Arc<Writer>>,
    writable: bool,
    last_end: AtomicU64,
}

enum Handle {
    File(FileHandle),
    Dir(Arc<Vec<DirEntry>>),
}

struct State {
    tree: Tree<FileSlot>,
    /// Directories with metadata of their own, and every symbolic link (other directories show defaults).
    entries: HashMap<Ino, EntrySlot>,
    /// The catalog as last applied to the tree, by name.
    known: HashMap<String, Arc<Committed>>,
    handles: HandleTable<Handle>,
    refreshed: Instant,
}

/// Manifests read so far (guarded by the namespace lock, which also serialises catalog changes).
#[derive(Default)]
struct Loaded {
    by_key: HashMap<(Hash, [u8; 16]), Arc<Committed>>,
    failed: HashSet<(Hash, [u8; 16])>,
}

/// A bounded pool of decoders (codec and stripe buffers), so decoding memory does not grow with readers.
struct DecoderPool {
    free: Mutex<(Vec<(Codec, StripeBuffers)>, usize)>,
    returned: Condvar,
    max: usize,
}

struct Prefetch {
    file: Arc<OpenFile>,
    segment: u64,
}

struct Shared {
    store: Arc<Store>,
    opts: VfsOptions,
    state: Mutex<State>,
    ns: Mutex<Loaded>,
    /// One commit or spool copy at a time: each holds several segment buffers.
    heavy: Mutex<()>,
    cache: SegmentCache<([u8; 16], u64)>,
    decoders: DecoderPool,
    /// Segments decoded so far (a segment decoded twice was evicted before it was read through).
    decoded: AtomicU64,
    spool_dir: PathBuf,
    mount_time_ns: i64,
    /// Closed files whose writes are not committed yet (write-behind), with when they were closed.
    dirty: Mutex<Vec<(Ino, Arc<Writer>, Instant)>>,
    /// Committed files unlinked through the mount whose removal is not in the catalog yet, with when.
    removals: Mutex<Vec<(catalog::FileRef, Instant)>>,
    /// Directories and symbolic links whose entry must be (re)written by the next commit, with when.
    dirty_entries: Mutex<Vec<(Ino, Instant)>>,
    /// Owner shown for entries that recorded none.
    default_owner: (u32, u32),
    /// When committed removals may have left packs to compact (see [`Shared::compact_if_due`]).
    compact_due: Mutex<Option<Instant>>,
    /// Held by [`Shared::sync_dirty`]: one write-behind commit at a time.
    syncing: Mutex<()>,
    /// Stops the background flusher.
    flusher_stop: Mutex<bool>,
    flusher_wake: Condvar,
}

/// The filesystem view of a store. All methods take `&self` and may be called from many threads.
pub struct Vfs {
    shared: Arc<Shared>,
    prefetch: Mutex<Option<SyncSender<Prefetch>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Vfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vfs").field("store", &self.shared.store).field("opts", &self.shared.opts).finish()
    }
}

/// Owner and group of `dir` (root when it cannot be read).
fn owner_of(dir: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).map(|m| (m.uid(), m.gid())).unwrap_or((0, 0))
}

/// Largest file the mount keeps (2^44 bytes, ext4's limit for the spool); beyond it, EFBIG.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// Refuses an offset or size past [`MAX_FILE_SIZE`].
fn check_size(end: Option<u64>, what: &str) -> Result<()> {
    match end {
        Some(e) if e <= MAX_FILE_SIZE => Ok(()),
        _ => Err(Error::fs(FsErrorKind::FileTooLarge, what)),
    }
}

/// Checks a whole path: too long is ENAMETOOLONG (as on Linux, PATH_MAX 4096), anything else invalid EINVAL.
fn check_path(path: &str) -> Result<()> {
    if path.len() > 4095 {
        let head: String = path.chars().take(64).collect();
        return Err(Error::fs(FsErrorKind::NameTooLong, format!("{head}...")));
    }
    validate_name(path).map_err(|_| Error::fs(FsErrorKind::InvalidArgument, path))
}

fn check_component(name: &str) -> Result<()> {
    if name.len() > 255 {
        return Err(Error::fs(FsErrorKind::NameTooLong, name));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::fs(FsErrorKind::InvalidArgument, name));
    }
    Ok(())
}

impl Vfs {
    /// A view of `store` (which must be unlocked). Reads the catalog once; fails when no location answers.
    pub fn new(store: Arc<Store>, opts: VfsOptions) -> Result<Vfs> {
        store.key()?;
        let spool_dir = store.dir().join("spool");
        let max_open = opts.max_open.max(1);
        let shared = Arc::new(Shared {
            cache: SegmentCache::new(opts.cache_bytes),
            decoded: AtomicU64::new(0),
            decoders: DecoderPool {
                free: Mutex::new((Vec::new(), 0)),
                returned: Condvar::new(),
                max: opts.decoders.max(1),
            },
            state: Mutex::new(State {
                tree: Tree::new(),
                entries: HashMap::new(),
                known: HashMap::new(),
                handles: HandleTable::new(max_open),
                refreshed: Instant::now(),
            }),
            ns: Mutex::new(Loaded::default()),
            heavy: Mutex::new(()),
            spool_dir,
            mount_time_ns: now_ns(),
            dirty: Mutex::new(Vec::new()),
            removals: Mutex::new(Vec::new()),
            dirty_entries: Mutex::new(Vec::new()),
            default_owner: opts.owner.unwrap_or_else(|| owner_of(store.dir())),
            compact_due: Mutex::new(None),
            syncing: Mutex::new(()),
            flusher_stop: Mutex::new(false),
            flusher_wake: Condvar::new(),
            store,
            opts,
        });
        {
            let mut loaded = lock(&shared.ns);
            shared.refresh_locked(&mut loaded)?;
        }
        let (tx, rx) = sync_channel::<Prefetch>(64);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads: Vec<std::thread::JoinHandle<()>> = (0..shared.opts.decoders.max(1))
            .map(|_| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::spawn(move || reader::prefetch_loop(&shared, &rx))
            })
            .collect();
        let flusher = shared.clone();
        threads.push(std::thread::spawn(move || flusher.flush_loop()));
        Ok(Vfs { shared, prefetch: Mutex::new(Some(tx)), threads: Mutex::new(threads) })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The segment cache's hit, miss and read-ahead counters and its fill (for `bf mount --metrics-listen`).
    pub fn cache_stats(&self) -> cache::CacheStats {
        self.shared.cache.stats()
    }

    /// Segments decoded (verified, rebuilt when needed, decrypted) since the view was made.
    pub fn segments_decoded(&self) -> u64 {
        self.shared.decoded.load(Ordering::Relaxed)
    }

    /// Whether changes are refused.
    pub fn read_only(&self) -> bool {
        self.shared.opts.read_only
    }

    fn writable(&self) -> Result<()> {
        if self.shared.opts.read_only {
            return Err(Error::fs(FsErrorKind::ReadOnly, "mount"));
        }
        Ok(())
    }

    /// Attributes of child `name` of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Attr> {
        if name.len() > 255 {
            return Err(Error::fs(FsErrorKind::NameTooLong, name));
        }
        self.shared.maybe_refresh();
        let st = lock(&self.shared.state);
        let ino = st.tree.lookup(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        self.shared.attr(&st, ino)
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let st = lock(&self.shared.state);
        self.shared.attr(&st, ino)
    }

    /// The parent directory of `ino` (the root is its own parent).
    pub fn parent(&self, ino: Ino) -> Result<Ino> {
        let st = lock(&self.shared.state);
        st.tree.get(ino).map(|n| n.parent).ok_or_else(|| Error::fs(FsErrorKind::NotFound, format!("inode {ino}")))
    }

    /// Opens directory `ino` for listing; the listing is fixed at open.
    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        self.shared.maybe_refresh();
        let mut st = lock(&self.shared.state);
        let children =
            st.tree.children(ino).ok_or_else(|| Error::fs(FsErrorKind::NotADirectory, format!("inode {ino}")))?;
        let entries: Vec<DirEntry> =
            children.map(|(name, i)| DirEntry { ino: i, name: name.to_string(), kind: st.kind(i) }).collect();
        st.handles.insert(Handle::Dir(Arc::new(entries)))
    }

    /// The entries of an open directory (without `.` and `..`).
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        match &*lock(&self.shared.state).handles.get(fh)? {
            Handle::Dir(e) => Ok(e.clone()),
            Handle::File(_) => Err(Error::fs(FsErrorKind::NotADirectory, format!("handle {fh}"))),
        }
    }

    /// Closes a directory handle.
    pub fn releasedir(&self, fh: u64) -> Result<()> {
        lock(&self.shared.state).handles.remove(fh).map(|_| ())
    }

    /// Makes a directory with `mode`, owned by `owner` (`None`: the default owner). Its entry, with mode, owner
    /// and times, is written with the next commit (write-behind, like files).
    pub fn mkdir(&self, parent: Ino, name: &str, mode: u32, owner: Option<(u32, u32)>) -> Result<Attr> {
        self.writable()?;
        check_component(name)?;
        let mut st = lock(&self.shared.state);
        if let Some(path) = st.tree.child_path(parent, name) {
            check_path(&path)?;
        }
        let mut stat = self.shared.new_stat(&st, parent, mode, owner);
        if stat.mode & 0o2000 == 0 && self.shared.stat_of(&st, parent).mode & 0o2000 != 0 {
            stat.mode |= 0o2000; // a set-group-ID directory passes the bit on to its subdirectories
        }
        let ino = st.tree.mkdir(parent, name)?;
        st.entries.insert(ino, EntrySlot { committed: None, stat, target: None, dirty: true });
        self.shared.queue_entry(ino);
        self.shared.touch_dir(&mut st, parent);
        self.shared.attr(&st, ino)
    }

    /// Makes a symbolic link `name` in `parent` pointing to `target`, owned by `owner`.
    pub fn symlink(&self, parent: Ino, name: &str, target: &str, owner: Option<(u32, u32)>) -> Result<Attr> {
        self.writable()?;
        check_component(name)?;
        if target.is_empty() || target.contains('\0') {
            return Err(Error::fs(FsErrorKind::InvalidArgument, name));
        }
        if target.len() > 4095 {
            return Err(Error::fs(FsErrorKind::NameTooLong, name));
        }
        let mut st = lock(&self.shared.state);
        let path = st.tree.child_path(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        check_path(&path)?;
        let stat = self.shared.new_stat(&st, parent, 0o777, owner);
        let ino = st.tree.create(parent, name, FileSlot::default())?;
        st.entries.insert(ino, EntrySlot { committed: None, stat, target: Some(target.to_string()), dirty: true });
        self.shared.queue_entry(ino);
        self.shared.touch_dir(&mut st, parent);
        self.shared.attr(&st, ino)
    }

    /// The target of symbolic link `ino`.
    pub fn readlink(&self, ino: Ino) -> Result<String> {
        let st = lock(&self.shared.state);
        st.entries
            .get(&ino)
            .and_then(|e| e.target.clone())
            .ok_or_else(|| Error::fs(FsErrorKind::InvalidArgument, format!("inode {ino} is not a symbolic link")))
    }

    /// Removes an empty directory (its entry with the next commit).
    pub fn rmdir(&self, parent: Ino, name: &str) -> Result<()> {
        self.writable()?;
        let mut loaded = lock(&self.shared.ns);
        let mut st = lock(&self.shared.state);
        let ino = st.tree.lookup(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        if !st.tree.get(ino).is_some_and(|n| n.is_dir()) {
            return Err(Error::fs(FsErrorKind::NotADirectory, name));
        }
        let path = st.tree.path(ino).unwrap_or_default();
        st.tree.remove(ino, true)?;
        self.shared.forget_entry(&mut st, ino, &path, &mut loaded);
        self.shared.touch_dir(&mut st, parent);
        Ok(())
    }

    /// Removes a file from the store (its manifests, then its shards). Open handles keep reading what they
    /// have cached; pending writes to it are dropped.
    pub fn unlink(&self, parent: Ino, name: &str) -> Result<()> {
        self.writable()?;
        let mut loaded = lock(&self.shared.ns);
        let (ino, path, slot_committed, writer) = {
            let st = lock(&self.shared.state);
            let ino = st.tree.lookup(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
            let slot = st.tree.file(ino).ok_or_else(|| Error::fs(FsErrorKind::IsADirectory, name))?;
            (ino, st.tree.path(ino).unwrap_or_default(), slot.committed.clone(), slot.writer.clone())
        };
        if let Some(c) = &slot_committed {
            // Write-behind like the files' data: removed from the catalog with the next commit.
            self.shared.queue_removal(c.entry.file.clone());
            loaded.by_key.remove(&c.key());
        }
        if let Some(w) = writer {
            w.unlinked.store(true, Ordering::SeqCst);
        }
        let mut st = lock(&self.shared.state);
        st.known.remove(&path);
        st.tree.remove(ino, true)?;
        self.shared.forget_entry(&mut st, ino, &path, &mut loaded);
        self.shared.touch_dir(&mut st, parent);
        Ok(())
    }

    /// Renames a file or directory, replacing a file (or an empty directory) at the target like rename(2).
    /// Each committed file is re-sealed under its new name (no data is rewritten). With `no_replace`, an
    /// existing target is refused.
    pub fn rename(&self, parent: Ino, name: &str, new_parent: Ino, new_name: &str, no_replace: bool) -> Result<()> {
        self.writable()?;
        check_component(new_name)?;
        let mut loaded = lock(&self.shared.ns);
        let Some(plan) = self.shared.plan_rename(parent, name, new_parent, new_name, no_replace)? else {
            return Ok(());
        };
        self.shared.drop_rename_target(&plan, &mut loaded)?;
        let moved = self.shared.reseal_moved(&plan, &mut loaded)?;
        self.shared.apply_rename(&plan, moved, &mut loaded)
    }

    /// Commits every file with uncommitted writes, open or closed, in one catalog record (at unmount, on a
    /// signal, on `syncfs`); returns the failures (each failed file's data is kept in `<store>/spool/failed-*`).
    pub fn flush_all(&self) -> Vec<Error> {
        let writers: Vec<(Ino, Arc<Writer>)> = {
            let st = lock(&self.shared.state);
            st.tree
                .files_below(ROOT)
                .into_iter()
                .filter_map(|(i, _)| st.tree.file(i).and_then(|s| s.writer.clone()).map(|w| (i, w)))
                .collect()
        };
        self.shared.sync_dirty(writers)
    }

    /// Commits outstanding writes and stops the read-ahead and flusher threads.
    pub fn shutdown(&self) -> Vec<Error> {
        let errors = self.flush_all();
        self.shared.compact_if_due(true);
        self.shared.stop_flusher();
        lock(&self.prefetch).take();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        errors
    }
}

impl Drop for Vfs {
    fn drop(&mut self) {
        // Like closing a filesystem: what was written is committed (after `shutdown` nothing is left).
        for e in self.flush_all() {
            tracing::error!(error = %e, "commit at close of the filesystem view failed (the data was kept in the spool directory)");
        }
        self.shared.compact_if_due(true);
        self.shared.stop_flusher();
        lock(&self.prefetch).take();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl State {
    /// The committed version of file, directory or link `ino`.
    fn committed(&self, ino: Ino) -> Option<Arc<Committed>> {
        match self.entries.get(&ino) {
            Some(e) => e.committed.clone(),
            None => self.tree.file(ino).and_then(|s| s.committed.clone()),
        }
    }

    /// What `ino` is (a file when unknown).
    fn kind(&self, ino: Ino) -> FileType {
        match (self.tree.get(ino), self.entries.get(&ino)) {
            (Some(n), _) if n.is_dir() => FileType::Dir,
            (_, Some(e)) if e.target.is_some() => FileType::Symlink,
            _ => FileType::File,
        }
    }
}

impl Shared {
    fn attr(&self, st: &State, ino: Ino) -> Result<Attr> {
        let Some(node) = st.tree.get(ino) else {
            return self.unlinked_attr(st, ino).ok_or_else(|| Error::fs(FsErrorKind::NotFound, format!("inode {ino}")));
        };
        let entry = st.entries.get(&ino);
        Ok(match (&node.kind, entry) {
            (NodeKind::Dir { children, .. }, _) => {
                let subdirs = children.values().filter(|i| st.tree.get(**i).is_some_and(|n| n.is_dir())).count();
                let nlink = u32::try_from(subdirs + 2).unwrap_or(u32::MAX);
                Attr { ino, kind: FileType::Dir, size: 0, nlink, stat: self.stat_of(st, ino) }
            }
            (NodeKind::File(_), Some(e)) => {
                let size = e.target.as_ref().map_or(0, |t| t.len() as u64);
                Attr { ino, kind: FileType::Symlink, size, nlink: 1, stat: e.stat }
            }
            (NodeKind::File(slot), None) => {
                let (size, stat) = self.file_stat(slot.writer.as_ref(), slot.committed.as_ref());
                Attr { ino, kind: FileType::File, size, nlink: 1, stat }
            }
        })
    }

    /// Attributes of a file unlinked while open (fstat(2) of its handle): what the handle reads, no links.
    fn unlinked_attr(&self, st: &State, ino: Ino) -> Option<Attr> {
        let h = st.handles.values().find_map(|h| match &**h {
            Handle::File(f) if f.ino == ino => Some(f),
            _ => None,
        })?;
        let (size, stat) = self.file_stat(h.writer.as_ref(), h.committed.as_ref());
        Some(Attr { ino, kind: FileType::File, size, nlink: 0, stat })
    }

    /// Size and metadata of a file: its pending writes when it has any, else its committed version.
    fn file_stat(&self, writer: Option<&Arc<Writer>>, committed: Option<&Arc<Committed>>) -> (u64, Stat) {
        match (writer.and_then(|w| w.spool().map(|s| (w, s))), committed) {
            (Some((w, s)), _) => (s.len(), *lock(&w.stat)),
            (None, Some(c)) => (c.meta.size, Stat::of(&c.meta, self.default_owner)),
            (None, None) => (0, Stat::new(0o644, self.default_owner, self.mount_time_ns)),
        }
    }

    /// The metadata of directory or link `ino` (defaults for a directory without an entry of its own).
    fn stat_of(&self, st: &State, ino: Ino) -> Stat {
        st.entries.get(&ino).map_or_else(|| Stat::new(0o755, self.default_owner, self.mount_time_ns), |e| e.stat)
    }

    /// The metadata of a node made now in `parent` by `owner`: the group of a set-group-ID parent is inherited.
    fn new_stat(&self, st: &State, parent: Ino, mode: u32, owner: Option<(u32, u32)>) -> Stat {
        let (uid, mut gid) = owner.unwrap_or(self.default_owner);
        let p = self.stat_of(st, parent);
        if p.mode & 0o2000 != 0 {
            gid = p.gid;
        }
        Stat::new(mode, (uid, gid), now_ns())
    }

    /// A change of directory `dir`'s contents: its mtime and ctime move, and its entry is rewritten with the
    /// next commit (the root has no entry: its times live while mounted).
    fn touch_dir(&self, st: &mut State, dir: Ino) {
        let now = now_ns();
        self.edit_entry(st, dir, |s| s.modified(now));
    }

    /// Changes the metadata of directory or link `ino` (an implied directory gets an entry of its own, and is
    /// then kept when empty); the entry is rewritten with the next commit.
    fn edit_entry(&self, st: &mut State, ino: Ino, change: impl FnOnce(&mut Stat)) {
        st.tree.set_explicit(ino);
        let default = self.stat_of(st, ino);
        let e =
            st.entries.entry(ino).or_insert(EntrySlot { committed: None, stat: default, target: None, dirty: false });
        change(&mut e.stat);
        if !e.dirty && ino != ROOT {
            e.dirty = true;
            self.queue_entry(ino);
        }
    }

    /// Forgets the entry of a removed directory or link (its removal goes with the next commit).
    fn forget_entry(&self, st: &mut State, ino: Ino, path: &str, loaded: &mut Loaded) {
        if let Some(c) = st.entries.remove(&ino).and_then(|e| e.committed) {
            self.queue_removal(c.entry.file.clone());
            loaded.by_key.remove(&c.key());
            st.known.remove(path);
        }
    }

    fn maybe_refresh(&self) {
        if lock(&self.state).refreshed.elapsed() < self.opts.catalog_ttl {
            return;
        }
        // A commit or rename in progress holds the namespace lock: serve the current view meanwhile.
        let Ok(mut loaded) = self.ns.try_lock() else {
            return;
        };
        if let Err(e) = self.refresh_locked(&mut loaded) {
            tracing::warn!(error = %e, "re-reading the catalog failed; keeping the previous view");
        }
    }

    /// Re-reads the catalog (object listings, plus manifests not seen before) and applies the differences to
    /// the tree. Files with uncommitted writes in this mount are left alone.
    fn refresh_locked(&self, loaded: &mut Loaded) -> Result<()> {
        let by_name = self.read_catalog(loaded)?;
        let mut st = lock(&self.state);
        let old = std::mem::take(&mut st.known);
        remove_vanished(&mut st, &old, &by_name);
        show_changed(&mut st, &old, &by_name, self.default_owner);
        st.known = by_name;
        st.refreshed = Instant::now();
        Ok(())
    }

    /// The newest committed version of every name in the catalog. `loaded` keeps what was read for the next
    /// refresh and forgets files that are gone.
    fn read_catalog(&self, loaded: &mut Loaded) -> Result<HashMap<String, Arc<Committed>>> {
        let refs = catalog::scan(&self.store)?;
        let removing: HashSet<(Hash, [u8; 16])> =
            lock(&self.removals).iter().map(|(f, _)| (f.name_tag, f.file_id)).collect();
        let mut present = HashSet::new();
        let mut by_name: HashMap<String, Arc<Committed>> = HashMap::new();
        let shown = |f: &catalog::FileRef| {
            f.name_tag != crate::format::manifest::PACK_NAME_TAG && !removing.contains(&(f.name_tag, f.file_id))
        };
        for f in refs.into_iter().filter(shown) {
            present.insert((f.name_tag, f.file_id));
            let Some(c) = self.committed(loaded, &f) else {
                continue;
            };
            match by_name.get(&c.meta.name) {
                Some(cur) if cur.entry.manifest.body.committed_unix_ns >= c.entry.manifest.body.committed_unix_ns => {}
                _ => {
                    by_name.insert(c.meta.name.clone(), c);
                }
            }
        }
        loaded.by_key.retain(|k, _| present.contains(k));
        loaded.failed.retain(|k| present.contains(k));
        Ok(by_name)
    }

    /// The committed version `f` refers to: as read before, else read now. `None` when its manifest cannot be
    /// read (which is remembered, so it is not read again on every refresh).
    fn committed(&self, loaded: &mut Loaded, f: &catalog::FileRef) -> Option<Arc<Committed>> {
        let key = (f.name_tag, f.file_id);
        if let Some(c) = loaded.by_key.get(&key) {
            // Same entry, unless its data moved (a packed file moved to another pack by a compaction).
            if catalog::data_of(&self.store, f).is_none_or(|d| d == c.entry.manifest.body.data) {
                return Some(c.clone());
            }
            loaded.by_key.remove(&key);
        }
        if loaded.failed.contains(&key) {
            return None;
        }
        match catalog::load(&self.store, f).and_then(Committed::new) {
            Ok(c) => {
                let c = Arc::new(c);
                loaded.by_key.insert(key, c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a file is not shown: its manifest cannot be read");
                loaded.failed.insert(key);
                None
            }
        }
    }

    /// What a rename moves and replaces, read under the state lock; `None` when the source is the target.
    fn plan_rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        no_replace: bool,
    ) -> Result<Option<RenamePlan>> {
        let st = lock(&self.state);
        let ino = st.tree.lookup(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        let target = st.tree.check_rename(ino, new_parent, new_name)?;
        if target == Some(ino) {
            return Ok(None);
        }
        if no_replace && target.is_some() {
            return Err(Error::fs(FsErrorKind::AlreadyExists, new_name));
        }
        let src_path = st.tree.path(ino).unwrap_or_default();
        let dst_path =
            st.tree.child_path(new_parent, new_name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, new_name))?;
        check_path(&dst_path)?;
        let files = st.tree.nodes_below(ino).into_iter().map(|(i, p)| (i, p, st.committed(i))).collect();
        let target = target.map(|t| RenameTarget {
            ino: t,
            committed: st.committed(t),
            writer: st.tree.file(t).and_then(|s| s.writer.clone()),
        });
        Ok(Some(RenamePlan { ino, new_parent, new_name: new_name.to_string(), src_path, dst_path, files, target }))
    }

    /// The replaced target: its pending writes are dropped; when nothing will be committed over it, its
    /// committed version is removed now (rename(2) replaces the target at once).
    fn drop_rename_target(&self, plan: &RenamePlan, loaded: &mut Loaded) -> Result<()> {
        let Some(target) = &plan.target else {
            return Ok(());
        };
        if let Some(w) = &target.writer {
            w.unlinked.store(true, Ordering::SeqCst);
        }
        let src_committed = plan.files.iter().any(|(i, _, c)| *i == plan.ino && c.is_some());
        if let (Some(tc), false) = (&target.committed, src_committed) {
            // Removed with the source's first commit, in the same record: until then the store keeps the old
            // version (hidden here), so a crash never leaves neither.
            self.queue_removal(tc.entry.file.clone());
            loaded.by_key.remove(&tc.key());
        }
        Ok(())
    }

    /// Re-seals every committed entry being moved under its new name (the moved node's ctime becomes now);
    /// returns (inode, old path, new version).
    /// On a failure part of a directory may have moved: the namespace is rebuilt from the store, which is
    /// consistent.
    fn reseal_moved(&self, plan: &RenamePlan, loaded: &mut Loaded) -> Result<Vec<(Ino, String, Arc<Committed>)>> {
        // Every committed entry at or below the renamed node, in one catalog record.
        let now = now_ns();
        let items: Vec<(Ino, String, (Entry, FileMeta))> = plan
            .files
            .iter()
            .filter_map(|(i, p, c)| {
                let c = c.as_ref()?;
                let mut meta = FileMeta { name: plan.new_path(p), ..c.meta.clone() };
                if *i == plan.ino {
                    meta.ctime_unix_ns = now;
                }
                Some((*i, p.clone(), (c.entry.clone(), meta)))
            })
            .collect();
        if items.is_empty() {
            return Ok(vec![]);
        }
        let pairs: Vec<(Entry, FileMeta)> = items.iter().map(|(_, _, x)| x.clone()).collect();
        let resealed = catalog::reseal_all(&self.store, &pairs, true)
            .and_then(|entries| entries.into_iter().map(Committed::new).collect::<Result<Vec<_>>>());
        match resealed {
            Ok(new) => Ok(items.into_iter().zip(new).map(|((i, p, _), c)| (i, p, Arc::new(c))).collect()),
            Err(e) => {
                tracing::warn!(error = %e, "rename failed; re-reading the catalog");
                if let Err(e2) = self.refresh_locked(loaded) {
                    tracing::warn!(error = %e2, "re-reading the catalog failed");
                }
                Err(e)
            }
        }
    }

    /// Moves the node in the tree and shows the re-sealed versions under their new names.
    fn apply_rename(
        &self,
        plan: &RenamePlan,
        moved: Vec<(Ino, String, Arc<Committed>)>,
        loaded: &mut Loaded,
    ) -> Result<()> {
        let mut st = lock(&self.state);
        if let Some(t) = &plan.target {
            if let Some(p) = st.tree.path(t.ino) {
                st.known.remove(&p);
            }
            st.entries.remove(&t.ino);
        }
        let st = &mut *st;
        let old_parent = st.tree.get(plan.ino).map_or(ROOT, |n| n.parent);
        st.tree.rename(plan.ino, plan.new_parent, &plan.new_name)?;
        for (i, old, c) in moved {
            loaded.by_key.insert(c.key(), c.clone());
            st.known.remove(&old);
            st.known.insert(c.meta.name.clone(), c.clone());
            // A writer's base keeps the old entry: it names the same shards, so copying from it still works.
            match (st.entries.get_mut(&i), st.tree.file_mut(i)) {
                (Some(e), _) => e.committed = Some(c),
                (None, Some(slot)) => slot.committed = Some(c),
                (None, None) => {}
            }
        }
        self.renamed_now(st, plan.ino, old_parent, plan.new_parent);
        Ok(())
    }

    /// The times a rename changes: both parents' mtime and ctime, and the moved node's ctime.
    fn renamed_now(&self, st: &mut State, ino: Ino, old_parent: Ino, new_parent: Ino) {
        let now = now_ns();
        if let Some(e) = st.entries.get_mut(&ino) {
            e.stat.ctime_unix_ns = now;
            if !e.dirty {
                e.dirty = true;
                self.queue_entry(ino);
            }
        } else if let Some(w) = st.tree.file(ino).and_then(|s| s.writer.clone()) {
            lock(&w.stat).ctime_unix_ns = now;
        }
        self.touch_dir(st, old_parent);
        if new_parent != old_parent {
            self.touch_dir(st, new_parent);
        }
    }
}

/// What a rename moves, gathered under the state lock before any manifest is re-sealed.
struct RenamePlan {
    ino: Ino,
    new_parent: Ino,
    new_name: String,
    src_path: String,
    dst_path: String,
    /// Every node at or below the source: inode, path and committed version.
    files: Vec<(Ino, String, Option<Arc<Committed>>)>,
    /// The node the rename replaces.
    target: Option<RenameTarget>,
}

impl RenamePlan {
    /// Where the file at `path` (at or below the source) lands.
    fn new_path(&self, path: &str) -> String {
        format!("{}{}", self.dst_path, &path[self.src_path.len()..])
    }
}

/// The node a rename replaces, with its committed version and write state.
struct RenameTarget {
    ino: Ino,
    committed: Option<Arc<Committed>>,
    writer: Option<Arc<Writer>>,
}

/// Takes out of the tree the entries of `old` that the catalog no longer has (keeping those with changes
/// pending).
fn remove_vanished(st: &mut State, old: &HashMap<String, Arc<Committed>>, by_name: &HashMap<String, Arc<Committed>>) {
    // Deepest first, so a directory whose entry vanished with its files is empty when its turn comes.
    let mut gone: Vec<(&String, &Arc<Committed>)> = old.iter().filter(|(n, _)| !by_name.contains_key(*n)).collect();
    gone.sort_by_key(|(n, _)| std::cmp::Reverse(n.matches('/').count()));
    for (name, c) in gone {
        let Some(ino) = st.tree.resolve(name) else {
            continue;
        };
        let remove = match (st.entries.get_mut(&ino), st.tree.file_mut(ino)) {
            (Some(e), _) => {
                if e.committed.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
                    e.committed = None;
                }
                let empty = st.tree.children(ino).is_none_or(|mut c| c.next().is_none());
                e.committed.is_none() && !e.dirty && empty
            }
            (None, Some(slot)) => {
                if slot.committed.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
                    slot.committed = None;
                }
                slot.committed.is_none() && slot.writer.is_none()
            }
            (None, None) => false,
        };
        if remove && st.tree.remove(ino, false).is_ok() {
            st.entries.remove(&ino);
        }
    }
}

/// Shows the entries of the catalog that are new or have a new committed version since `old`.
fn show_changed(
    st: &mut State,
    old: &HashMap<String, Arc<Committed>>,
    by_name: &HashMap<String, Arc<Committed>>,
    default_owner: (u32, u32),
) {
    for (name, c) in by_name {
        if old.get(name).is_some_and(|o| Arc::ptr_eq(o, c)) {
            continue;
        }
        let shown = match &c.meta.kind {
            EntryKind::File => show_file(st, name, c),
            EntryKind::Dir => st.tree.ensure_dir(name).map(|ino| show_entry(st, ino, c, None, default_owner)),
            EntryKind::Symlink { target } => match st.tree.resolve(name) {
                Some(ino) if st.entries.contains_key(&ino) && st.tree.file(ino).is_some() => {
                    show_entry(st, ino, c, Some(target), default_owner);
                    Ok(())
                }
                Some(_) => Err(Error::fs(FsErrorKind::AlreadyExists, name)),
                None => st
                    .tree
                    .insert_file(name, FileSlot::default())
                    .map(|ino| show_entry(st, ino, c, Some(target), default_owner)),
            },
        };
        if let Err(e) = shown {
            tracing::warn!(name = %name, error = %e, "an entry is not shown: its path collides with another");
        }
    }
}

fn show_file(st: &mut State, name: &str, c: &Arc<Committed>) -> Result<()> {
    match st.tree.resolve(name) {
        Some(ino) if st.entries.contains_key(&ino) => Err(Error::fs(FsErrorKind::AlreadyExists, name)),
        Some(ino) => match st.tree.file_mut(ino) {
            // A new version from elsewhere of a file this mount does not write: a new inode number, because
            // the kernel keeps the size and times of an inode it knows (writeback cache). Handles open on the
            // old number read the old version to their end, as after a rename over a local file.
            Some(FileSlot { committed: Some(old), writer: None }) if old.key() != c.key() => {
                st.tree.renumber(ino, FileSlot { committed: Some(c.clone()), writer: None }).map(|_| ())
            }
            Some(slot) => {
                slot.committed = Some(c.clone());
                Ok(())
            }
            None => Err(Error::fs(FsErrorKind::IsADirectory, name)),
        },
        None => st.tree.insert_file(name, FileSlot { committed: Some(c.clone()), writer: None }).map(|_| ()),
    }
}

/// Records the committed entry of directory or link `ino`; its metadata shows unless changes are pending.
fn show_entry(st: &mut State, ino: Ino, c: &Arc<Committed>, target: Option<&String>, default_owner: (u32, u32)) {
    st.tree.set_explicit(ino);
    let stat = Stat::of(&c.meta, default_owner);
    let e = st.entries.entry(ino).or_insert(EntrySlot { committed: None, stat, target: target.cloned(), dirty: false });
    e.committed = Some(c.clone());
    if !e.dirty {
        e.stat = stat;
        e.target = target.cloned();
    }
}

#[cfg(test)]
mod tests;
