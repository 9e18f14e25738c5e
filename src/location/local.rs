//! The local-directory backend: objects are files under a root directory, written through a temporary file,
//! fdatasync and rename (create-only: a hard link, which refuses an existing name), or, deferred, straight to
//! their name and made durable by one syncfs.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{validate_key, Location};
use crate::error::{Error, IoContext, Result};

/// How a local location does its file I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    /// Ordinary read/write/fdatasync syscalls (portable).
    Std,
    /// io_uring on Linux: each object is one linked writev + fdatasync submission, or one read.
    Uring,
}

static DEFAULT_ENGINE: std::sync::OnceLock<IoEngine> = std::sync::OnceLock::new();

impl IoEngine {
    /// Parses `std`, `uring` or `auto` (io_uring when the kernel allows it, else std).
    pub fn parse(s: &str) -> Result<IoEngine> {
        match s {
            "std" => Ok(IoEngine::Std),
            "uring" | "io_uring" if cfg!(target_os = "linux") => {
                if super::uring::available() {
                    Ok(IoEngine::Uring)
                } else {
                    Err(Error::Config("io_engine = \"uring\" but io_uring is not available here".into()))
                }
            }
            "auto" => Ok(IoEngine::auto()),
            other => Err(Error::Config(format!("unknown io_engine {other:?} (use auto, uring or std)"))),
        }
    }

    fn auto() -> IoEngine {
        if cfg!(target_os = "linux") && super::uring::available() {
            IoEngine::Uring
        } else {
            IoEngine::Std
        }
    }

    /// Sets the engine new local locations use in this process (first call wins).
    pub fn set_default(engine: IoEngine) {
        let _ = DEFAULT_ENGINE.set(engine);
    }

    /// The engine new local locations use: as set by [`IoEngine::set_default`], else `BF_IO_ENGINE`, else auto.
    pub fn current() -> IoEngine {
        *DEFAULT_ENGINE.get_or_init(|| {
            std::env::var("BF_IO_ENGINE").ok().and_then(|v| IoEngine::parse(&v).ok()).unwrap_or_else(IoEngine::auto)
        })
    }
}

/// A directory on a local disk.
#[derive(Debug)]
pub struct LocalDir {
    engine: IoEngine,
    root: PathBuf,
    name: String,
    dirty_dirs: Mutex<HashSet<PathBuf>>,
    tmp_counter: AtomicU64,
    deferred: Mutex<Deferred>,
    /// Open files of preallocated objects, kept for in-place writes.
    in_place: Mutex<HashMap<PathBuf, Arc<File>>>,
}

impl LocalDir {
    /// A location rooted at `root`. The directory itself is never created by puts: a missing root means the
    /// disk is not mounted, and writing into an empty mount point would be wrong.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_engine(root, IoEngine::current())
    }

    /// A location doing its I/O with `engine`.
    pub fn with_engine(root: impl Into<PathBuf>, engine: IoEngine) -> Self {
        let root = root.into();
        LocalDir {
            engine,
            name: root.display().to_string(),
            root,
            dirty_dirs: Mutex::new(HashSet::new()),
            tmp_counter: AtomicU64::new(0),
            deferred: Mutex::new(Deferred::default()),
            in_place: Mutex::new(HashMap::new()),
        }
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn mark_dirty(&self, dir: PathBuf) {
        if let Ok(mut d) = self.dirty_dirs.lock() {
            d.insert(dir);
        }
    }

    /// Writes an object; `publish` says how it gets its name. Durable writes go through a temporary file and
    /// fdatasync, then a rename (replacing) or a hard link (create-only, which fails atomically when the name
    /// exists), so a reader sees the old object or the new one. Deferred writes go straight to the final name:
    /// nothing references such an object before the next sync() and commit point, and a crash mid-write leaves
    /// only unreferenced garbage (this halves the metadata operations, which dominate small-object write cost on
    /// ext4). Returns the object's path.
    fn write_object(&self, key: &str, parts: &[&[u8]], publish: Publish) -> Result<PathBuf> {
        let path = self.path(key)?;
        if publish == Publish::CreateNew && fs::symlink_metadata(&path).is_ok() {
            // Fail before writing any bytes; the hard link below still decides races.
            return Err(Error::already_exists_object(format!("creating {}", path.display())));
        }
        self.ensure_parent(&path)?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        let target = if publish == Publish::InPlace { path.clone() } else { self.temp_path(&path, &parent) };
        let result = self.write_file(&target, parts, publish != Publish::InPlace).and_then(|()| match publish {
            Publish::Replace => fs::rename(&target, &path).ctx(|| format!("renaming into {}", path.display())),
            Publish::CreateNew => link_new(&target, &path),
            Publish::InPlace => Ok(()),
        });
        if let Err(e) = result {
            // A failed write leaves nothing behind.
            let _ = fs::remove_file(&target);
            return Err(e);
        }
        if publish == Publish::CreateNew {
            // The created object keeps only its final name. A temporary name that cannot be removed is hidden
            // garbage (listings skip dot files), not a failed put.
            if let Err(e) = fs::remove_file(&target) {
                tracing::warn!(path = %target.display(), error = %e, "cannot remove a temporary file");
            }
        }
        self.mark_dirty(parent);
        Ok(path)
    }

    /// Writes a zero-filled file of `len` bytes at `path`, durably, name included. Zeros are written rather than
    /// fallocated: the first write into a fallocated (unwritten) extent changes metadata, and then a data sync
    /// of an in-place write would no longer be enough.
    fn write_zeros(&self, path: &Path, len: u64) -> Result<()> {
        self.ensure_parent(path)?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        let temp = self.temp_path(path, &parent);
        let zeros = vec![0u8; 1 << 20];
        let result = (|| {
            let mut f = File::create(&temp).ctx(|| format!("creating {}", temp.display()))?;
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n]).ctx(|| format!("writing {}", temp.display()))?;
                left -= n as u64;
            }
            f.sync_all().ctx(|| format!("syncing {}", temp.display()))?;
            fs::rename(&temp, path).ctx(|| format!("renaming into {}", path.display()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
            return result;
        }
        sync_dir(&parent)
    }

    /// The open file of a preallocated object.
    fn in_place_file(&self, path: &Path) -> Result<Arc<File>> {
        let mut files = self.in_place.lock().map_err(|_| Error::internal("location state poisoned"))?;
        if let Some(f) = files.get(path) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(OpenOptions::new().write(true).open(path).ctx(|| format!("opening {}", path.display()))?);
        files.insert(path.to_path_buf(), Arc::clone(&f));
        Ok(f)
    }

    /// Makes the deferred objects and changed directories a [`Location::sync`] took durable.
    fn sync_taken(&self, deferred: &Deferred, dirs: Vec<PathBuf>) -> Result<()> {
        if deferred.overflow {
            // One syncfs(2) makes every deferred object's bytes and names durable at once, cheaper than an
            // fsync per object when there are many; it covers the directories too.
            let f = File::open(&self.root).ctx(|| format!("opening {}", self.root.display()))?;
            return sync_filesystem(&f).ctx(|| format!("syncing the filesystem of {}", self.root.display()));
        }
        // Each object by itself: a syncfs would also write every other dirty file of the filesystem (a mount's
        // spools, other programs' files), which can be far more than the objects.
        for path in &deferred.files {
            match File::open(path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                // Deleted since (a failed commit's shards): nothing left to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("syncing {}", path.display()), e)),
            }
        }
        // Deepest first, so that a new directory's own entries are durable before its name is.
        let mut dirs = dirs;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            match sync_dir(&d) {
                Ok(()) => {}
                // The directory was removed meanwhile (rm of the file): nothing left to make durable.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A fresh temporary name next to `path` (hidden, unique within this process and location).
    fn temp_path(&self, path: &Path, parent: &Path) -> PathBuf {
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("object");
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        parent.join(format!(".{file_name}.{}.{n}.tmp", std::process::id()))
    }

    /// Creates (or truncates) `target` and writes `parts` into it with the location's I/O engine; with
    /// `durable`, fdatasyncs it, and otherwise starts its writeback.
    fn write_file(&self, target: &Path, parts: &[&[u8]], durable: bool) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(target)
            .ctx(|| format!("creating {}", target.display()))?;
        match self.engine {
            IoEngine::Uring => super::uring::write_parts(&mut f, parts, durable)
                .ctx(|| format!("writing {} (io_uring)", target.display())),
            IoEngine::Std => {
                for p in parts {
                    f.write_all(p).ctx(|| format!("writing {}", target.display()))?;
                }
                if durable {
                    f.sync_data().ctx(|| format!("syncing {}", target.display()))?;
                }
                Ok(())
            }
        }?;
        if !durable {
            start_writeback(&f);
        }
        Ok(())
    }

    /// Outcome of removing `path`: its directory needs a sync; an already absent path is not an error.
    fn removed(&self, path: &Path, result: std::io::Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                if let Some(p) = path.parent() {
                    self.mark_dirty(p.to_path_buf());
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("deleting {}", path.display()), e)),
        }
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        if !self.root.is_dir() {
            return Err(Error::io(
                format!("location {}", self.name),
                std::io::Error::new(std::io::ErrorKind::NotFound, "location directory is missing"),
            ));
        }
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        if parent.is_dir() {
            return Ok(());
        }
        // Create missing ancestors one by one so that each new directory's parent is fsynced on sync().
        let mut missing = Vec::new();
        let mut p = parent;
        while !p.is_dir() && p != self.root {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(pp) => p = pp,
                None => break,
            }
        }
        for dir in missing.into_iter().rev() {
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
            }
            if let Some(pp) = dir.parent() {
                self.mark_dirty(pp.to_path_buf());
            }
        }
        Ok(())
    }
}

/// How a written object gets its final name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publish {
    /// Renamed over any previous object ([`Location::put`]).
    Replace,
    /// Hard-linked, failing when the name exists ([`Location::put_new`]).
    CreateNew,
    /// Written at its name directly ([`Location::put_deferred`]).
    InPlace,
}

/// Gives the written temporary file `temp` the name `path` unless that name exists: link(2) fails with EEXIST
/// atomically, so of racing creators exactly one wins.
fn link_new(temp: &Path, path: &Path) -> Result<()> {
    match fs::hard_link(temp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::already_exists_object(format!("creating {}", path.display())))
        }
        Err(e) => Err(Error::io(format!("linking {} to {}", temp.display(), path.display()), e)),
    }
}

/// Deferred objects written since the last [`Location::sync`], which makes them durable.
#[derive(Debug, Default)]
struct Deferred {
    /// Their paths, for one fdatasync each (paths, not open files: thousands of descriptors would run into
    /// the process's file limit).
    files: Vec<PathBuf>,
    /// More than [`MAX_TRACKED`] were written (or a sync failed): the next sync runs one syncfs instead.
    overflow: bool,
}

/// Past this many deferred objects between two syncs, one syncfs is cheaper than an fdatasync each.
const MAX_TRACKED: usize = 4096;

/// Starts writing a deferred object's dirty pages to the disk now, without waiting for them. A batch's objects
/// are made durable together at publish time; without this, the kernel would hold them all in the page cache
/// until then (its background threshold is a share of RAM), leaving the disk idle while the CPU encodes and the
/// CPU idle while the disk writes; and the fdatasync of each would allocate and commit one after another.
/// Errors are left to that sync, which reports them.
#[cfg(target_os = "linux")]
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads the descriptor, which `f` keeps open for the duration of the call.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File) {}

#[cfg(target_os = "linux")]
fn sync_filesystem(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(_: &File) -> std::io::Result<()> {
    // Without syncfs, fall back to a global sync.
    std::process::Command::new("sync").status().map(|_| ())
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).ctx(|| format!("syncing directory {}", dir.display()))
}

impl Location for LocalDir {
    fn name(&self) -> &str {
        &self.name
    }

    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.write_object(key, parts, Publish::Replace).map(drop)
    }

    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.write_object(key, parts, Publish::CreateNew).map(drop)
    }

    fn put_deferred(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        let f = self.write_object(key, parts, Publish::InPlace)?;
        // Recorded only once the object is complete: any sync() that starts after this put returned covers it.
        let mut d = self.deferred.lock().map_err(|_| Error::internal("location state poisoned"))?;
        if d.files.len() < MAX_TRACKED {
            d.files.push(f);
        } else {
            d.overflow = true;
        }
        Ok(())
    }

    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        let path = self.path(key)?;
        if fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            return Ok(true);
        }
        if let Ok(mut files) = self.in_place.lock() {
            files.remove(&path);
        }
        self.write_zeros(&path, len)?;
        Ok(true)
    }

    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.path(key)?;
        let f = self.in_place_file(&path)?;
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let len = f.metadata().ctx(|| format!("reading {}", path.display()))?.len();
        if offset.checked_add(total).is_none_or(|end| end > len) {
            return Err(Error::InvalidArgument(format!("write beyond the end of {}", path.display())));
        }
        let mut at = offset;
        for p in parts {
            f.write_all_at(p, at).ctx(|| format!("writing {}", path.display()))?;
            at += p.len() as u64;
        }
        f.sync_data().ctx(|| format!("syncing {}", path.display()))
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        let mut f = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        match self.engine {
            IoEngine::Uring => {
                super::uring::read_all(&mut f, buf).ctx(|| format!("reading {} (io_uring)", path.display()))
            }
            IoEngine::Std => {
                buf.clear();
                f.read_to_end(buf).map(|_| ()).ctx(|| format!("reading {}", path.display()))
            }
        }
    }

    /// Reads the header and the payload each straight into place (two reads, no intermediate buffer), after
    /// one fstat for the length.
    fn get_split_into(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> Result<u64> {
        let path = self.path(key)?;
        let mut f = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        let len = f.metadata().ctx(|| format!("reading {}", path.display()))?.len();
        if len == (head.len() + body.len()) as u64 {
            let read = f.read_exact(head).and_then(|()| f.read_exact(body));
            // A file cut short since the fstat reads as the bytes it still had: the caller sees the length differ.
            if let Err(e) = read {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    return Err(Error::io(format!("reading {}", path.display()), e));
                }
                return f.stream_position().ctx(|| format!("reading {}", path.display()));
            }
        }
        Ok(len)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let mut f = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        f.seek(SeekFrom::Start(offset)).ctx(|| format!("seeking {}", path.display()))?;
        let mut v = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut v).ctx(|| format!("reading {}", path.display()))?;
        Ok(v)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.path(prefix)?;
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.root.is_dir() => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                if !name.starts_with('.') {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.removed(&path, fs::remove_file(&path))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.path(from)?, self.path(to)?);
        self.ensure_parent(&dst)?;
        fs::rename(&src, &dst).ctx(|| format!("renaming {} to {}", src.display(), dst.display()))?;
        for p in [src.parent(), dst.parent()].into_iter().flatten() {
            self.mark_dirty(p.to_path_buf());
        }
        Ok(())
    }

    fn cheap_rename(&self) -> bool {
        true
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let path = self.path(prefix)?;
        self.removed(&path, fs::remove_dir_all(&path))
    }

    fn sync(&self) -> Result<()> {
        // Taken before a syncfs, so that every directory changed before it is covered by it.
        let dirs: Vec<PathBuf> = match self.dirty_dirs.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Err(Error::internal("location state poisoned")),
        };
        let deferred = match self.deferred.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => return Err(Error::internal("location state poisoned")),
        };
        let result = self.sync_taken(&deferred, dirs);
        if result.is_err() {
            // What this sync took is not known to be durable: the next one syncs the whole filesystem.
            if let Ok(mut d) = self.deferred.lock() {
                d.overflow = true;
            }
        }
        result
    }

    fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        let path = self.path(key)?;
        let md = fs::metadata(&path).ctx(|| format!("reading {}", path.display()))?;
        Ok(md.modified().ok())
    }

    fn probe(&self) -> Result<()> {
        fs::metadata(&self.root).ctx(|| format!("location {}", self.name)).and_then(|m| {
            if m.is_dir() {
                Ok(())
            } else {
                Err(Error::Config(format!("location {} is not a directory", self.name)))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::{uring, LocationExt};
    use std::os::unix::fs::MetadataExt;

    fn engines() -> Vec<IoEngine> {
        let mut v = vec![IoEngine::Std];
        if uring::available() {
            v.push(IoEngine::Uring);
        }
        v
    }

    #[test]
    fn a_sync_makes_each_deferred_object_durable_by_itself_until_there_are_too_many() {
        let d = tempfile::tempdir().unwrap();
        let loc = LocalDir::new(d.path());
        let tracked = |loc: &LocalDir| {
            let g = loc.deferred.lock().unwrap();
            (g.files.len(), g.overflow)
        };
        loc.put_deferred("s/a", &[b"one"]).unwrap();
        loc.put_deferred("s/b", &[b"two"]).unwrap();
        loc.put("s/durable", &[b"three"]).unwrap();
        assert_eq!(tracked(&loc), (2, false), "only deferred puts wait for the sync");
        // A deferred object deleted before the sync (a failed commit's shard) does not fail it.
        loc.delete("s/b").unwrap();
        loc.sync().unwrap();
        assert_eq!(tracked(&loc), (0, false));
        assert_eq!(loc.get("s/a").unwrap(), b"one");
        for i in 0..=MAX_TRACKED {
            loc.put_deferred(&format!("t/{i}"), &[b"x"]).unwrap();
        }
        assert_eq!(tracked(&loc), (MAX_TRACKED, true), "past the limit, the sync falls back to syncfs");
        loc.sync().unwrap();
        assert_eq!(tracked(&loc), (0, false));
        assert_eq!(loc.list("t").unwrap().len(), MAX_TRACKED + 1);
    }

    #[test]
    fn put_get_list_delete() {
        for e in engines() {
            put_get_list_delete_with(e);
        }
    }

    fn put_get_list_delete_with(engine: IoEngine) {
        let d = tempfile::tempdir().unwrap();
        let loc = LocalDir::with_engine(d.path(), engine);
        loc.put("a/b/c", &[b"hello ", b"world"]).unwrap();
        loc.sync().unwrap();
        assert_eq!(loc.get("a/b/c").unwrap(), b"hello world");
        assert_eq!(loc.get_range("a/b/c", 6, 100).unwrap(), b"world");
        assert_eq!(loc.list("a/b").unwrap(), vec!["c".to_string()]);
        assert!(loc.list("nope").unwrap().is_empty());
        loc.put("a/b/c", &[b"new"]).unwrap();
        assert_eq!(loc.get("a/b/c").unwrap(), b"new");
        loc.delete("a/b/c").unwrap();
        loc.delete("a/b/c").unwrap();
        assert!(loc.get("a/b/c").unwrap_err().is_not_found());
        loc.delete_prefix("a").unwrap();
        assert!(!d.path().join("a").exists());
        let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
        loc.put_deferred("d/x", &[&big[..10], &big[10..]]).unwrap();
        loc.sync().unwrap();
        assert_eq!(loc.get("d/x").unwrap(), big, "{engine:?}");
    }

    #[test]
    fn put_new_links_and_leaves_no_temporary_files() {
        for e in engines() {
            let d = tempfile::tempdir().unwrap();
            let loc = LocalDir::with_engine(d.path(), e);
            loc.put_new("a/x", &[b"one"]).unwrap();
            let err = loc.put_new("a/x", &[b"two"]).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::AlreadyExists, "{e:?}: {err}");
            loc.sync().unwrap();
            assert_eq!(loc.get("a/x").unwrap(), b"one");
            let names: Vec<_> = fs::read_dir(d.path().join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["x"], "{e:?}: only the object itself remains");
            assert_eq!(fs::metadata(d.path().join("a/x")).unwrap().nlink(), 1, "{e:?}: the temporary link is gone");
            let gone = LocalDir::with_engine(d.path().join("missing"), e);
            assert_eq!(gone.put_new("x", &[b"x"]).unwrap_err().kind(), crate::ErrorKind::NotFound);
        }
    }

    #[test]
    fn rejects_escaping_keys_and_missing_root() {
        let d = tempfile::tempdir().unwrap();
        let loc = LocalDir::new(d.path());
        assert!(loc.put("../x", &[b"x"]).is_err());
        assert!(loc.put("a//b", &[b"x"]).is_err());
        let gone = LocalDir::new(d.path().join("missing"));
        assert!(gone.put("x", &[b"x"]).is_err());
        assert!(!d.path().join("missing").exists());
        assert!(gone.probe().is_err());
    }
}
