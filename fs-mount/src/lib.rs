//! The FUSE adapter: a thin translation of kernel requests into [`blockframe::vfs::Vfs`] calls.
//!
//! Everything a filesystem does (namespace, caching, spooling, commits) lives in the core's `vfs` module; this
//! crate only converts types, maps [`FsErrorKind`] to errno values, and keeps panics from crossing into the
//! kernel session (a panic becomes `EIO` for that request). Linux only (`fuser` with its pure-Rust mount, no
//! libfuse): mounting needs root or `fusermount3`.

use std::ffi::OsStr;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockframe::error::FsErrorKind;
use blockframe::vfs::{self, Attr, OpenMode, SetAttr, Vfs};
use blockframe::Error;
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow,
    WriteFlags,
};

/// How long the kernel may cache names and attributes. Short, so changes by other processes show up soon.
const TTL: Duration = Duration::from_secs(1);

/// Mount settings.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Mount read-only.
    pub read_only: bool,
    /// Let other users access the mount (`allow_other`).
    pub allow_other: bool,
    /// Threads serving kernel requests. A thread waiting for a segment to be decoded (or for room in the
    /// cache) serves nothing else meanwhile, so there are more threads than cores: readers of segments already
    /// decoded are served while other readers wait.
    pub threads: usize,
    /// Let the kernel cache writes (FUSE's writeback cache): a `write` returns once the data is in the page
    /// cache, and the kernel sends it on in large requests, several at once, at the latest when the file is
    /// closed or fsynced. The kernel then keeps the size, mtime and ctime of files being written, and sends the
    /// times in a `setattr` before the close. Off: every `write` waits for the server (about 1.4× slower for a
    /// large sequential write here).
    pub writeback_cache: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { read_only: false, allow_other: false, threads: 16, writeback_cache: true }
    }
}

/// Maps a core error to an errno value.
pub fn errno(e: &Error) -> Errno {
    match e.fs_kind() {
        FsErrorKind::NotFound => Errno::ENOENT,
        FsErrorKind::AlreadyExists => Errno::EEXIST,
        FsErrorKind::NotADirectory => Errno::ENOTDIR,
        FsErrorKind::IsADirectory => Errno::EISDIR,
        FsErrorKind::DirectoryNotEmpty => Errno::ENOTEMPTY,
        FsErrorKind::ReadOnly => Errno::EROFS,
        FsErrorKind::InvalidArgument => Errno::EINVAL,
        FsErrorKind::NameTooLong => Errno::ENAMETOOLONG,
        FsErrorKind::BadHandle => Errno::EBADF,
        FsErrorKind::TooManyOpenFiles => Errno::EMFILE,
        FsErrorKind::NoSpace => Errno::ENOSPC,
        FsErrorKind::FileTooLarge => Errno::EFBIG,
        FsErrorKind::Unsupported => Errno::EOPNOTSUPP,
        FsErrorKind::NotPermitted => Errno::EPERM,
        FsErrorKind::SymlinkLoop => Errno::ELOOP,
        _ => Errno::EIO,
    }
}

/// Runs `f`, turning errors into errno values and panics into `EIO`, so neither crosses into the session.
fn guard<T>(op: &str, f: impl FnOnce() -> blockframe::Result<T>) -> Result<T, Errno> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let code = errno(&e);
            if code == Errno::EIO {
                tracing::warn!(op, error = %e, "request failed");
            } else {
                tracing::debug!(op, error = %e, "request refused");
            }
            Err(code)
        }
        Err(_) => {
            tracing::error!(op, "request panicked; answered EIO");
            Err(Errno::EIO)
        }
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// The `fuser` filesystem over a [`Vfs`].
pub struct BlockFrameFs {
    vfs: Arc<Vfs>,
    writeback_cache: bool,
}

/// The caller of a request, as the owner of what it creates.
fn owner(req: &Request) -> Option<(u32, u32)> {
    Some((req.uid(), req.gid()))
}

fn kind_of(kind: vfs::FileType) -> FileType {
    match kind {
        vfs::FileType::Dir => FileType::Directory,
        vfs::FileType::File => FileType::RegularFile,
        vfs::FileType::Symlink => FileType::Symlink,
    }
}

impl BlockFrameFs {
    /// Serves `vfs`, asking the kernel for its writeback cache when `writeback_cache`.
    pub fn new(vfs: Arc<Vfs>, writeback_cache: bool) -> Self {
        BlockFrameFs { vfs, writeback_cache }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let st = &a.stat;
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: time_of(st.atime_unix_ns),
            mtime: time_of(st.mtime_unix_ns),
            ctime: time_of(st.ctime_unix_ns),
            crtime: time_of(st.ctime_unix_ns),
            kind: kind_of(a.kind),
            perm: (st.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: st.uid,
            gid: st.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

impl Filesystem for BlockFrameFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large requests: fewer round trips for sequential reads and writes.
        let _ = config.set_max_readahead(4 << 20).or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_write(1 << 20);
        if self.writeback_cache && !self.vfs.read_only() {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                tracing::info!(?missing, "the kernel offers no writeback cache: every write waits for the server");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        for e in self.vfs.shutdown() {
            tracing::error!(error = %e, "commit at unmount failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match name_str(name).and_then(|n| guard("lookup", || self.vfs.lookup(parent.0, n))) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match guard("getattr", || self.vfs.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Who may change what was checked by the kernel (default_permissions).
        let changes = SetAttr {
            size,
            mode,
            uid,
            gid,
            atime_unix_ns: atime.map(ns_of),
            mtime_unix_ns: mtime.map(ns_of),
            // Sent by the kernel when it keeps the times (writeback cache).
            ctime_unix_ns: ctime.map(|t| ns_of(TimeOrNow::SpecificTime(t))),
        };
        match guard("setattr", || self.vfs.setattr(ino.0, fh.map(|f| f.0), changes)) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mode = mode & !umask;
        match name_str(name).and_then(|n| guard("mkdir", || self.vfs.mkdir(parent.0, n, mode, owner(req)))) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = name_str(name).and_then(|n| {
            let target = target.to_str().ok_or(Errno::EINVAL)?;
            guard("symlink", || self.vfs.symlink(parent.0, n, target, owner(req)))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match guard("readlink", || self.vfs.readlink(ino.0)) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        // Hard links are not kept (documented; link(2) gives EPERM on filesystems without them).
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Regular files only: device nodes, FIFOs and sockets are not kept (EPERM, as mknod(2) documents).
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(Errno::EPERM);
        }
        let r = name_str(name).and_then(|n| {
            guard("mknod", || {
                let (a, fh) = self.vfs.create(parent.0, n, mode & !umask, owner(req))?;
                self.vfs.flush(fh)?;
                self.vfs.release(fh)?;
                Ok(a)
            })
        });
        match r {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match name_str(name).and_then(|n| guard("unlink", || self.vfs.unlink(parent.0, n))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match name_str(name).and_then(|n| guard("rmdir", || self.vfs.rmdir(parent.0, n))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = name_str(name).and_then(|from| {
            let to = name_str(newname)?;
            guard("rename", || self.vfs.rename(parent.0, from, newparent.0, to, no_replace))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode =
            OpenMode { write: flags.acc_mode() != OpenAccMode::O_RDONLY, truncate: flags.0 & libc::O_TRUNC != 0 };
        match guard("open", || self.vfs.open(ino.0, mode)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match name_str(name).and_then(|n| guard("create", || self.vfs.create(parent.0, n, mode & !umask, owner(req)))) {
            Ok((a, fh)) => reply.created(&TTL, &self.attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match guard("read", || self.vfs.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match guard("fallocate", || self.vfs.fallocate(fh.0, offset, length, mode)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match guard("write", || self.vfs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match guard("flush", || self.vfs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match guard("release", || self.vfs.release(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match guard("fsync", || self.vfs.fsync(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match guard("opendir", || self.vfs.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match guard("readdir", || self.vfs.readdir(fh.0)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let parent = match guard("readdir", || self.vfs.parent(ino.0)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        // Offsets: 1 = ".", 2 = "..", 3.. = entries; each entry carries the offset of the next one.
        let dots = [(ino.0, ".".to_string(), FileType::Directory), (parent, "..".to_string(), FileType::Directory)];
        let all = dots.into_iter().chain(entries.iter().map(|e| (e.ino, e.name.clone(), kind_of(e.kind))));
        for (i, (ino, name, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        match guard("releasedir", || self.vfs.releasedir(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // A directory's entries are its files' names: make every queued file durable.
        match guard("fsyncdir", || self.vfs.sync_all()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // The statvfs field types differ between platforms (u32 or u64): the casts are not always no-ops.
    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(self.vfs.store().dir()) {
            Ok(s) => reply.statfs(
                s.f_blocks as u64,
                s.f_bfree as u64,
                s.f_bavail as u64,
                s.f_files as u64,
                s.f_ffree as u64,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(_) => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); only existence is checked here.
        match guard("access", || self.vfs.getattr(ino.0)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn statvfs(dir: &Path) -> io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `s` points to writable memory of the right type.
    let r = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it initialised the struct.
    Ok(unsafe { s.assume_init() })
}

/// A mounted filesystem, not yet serving (call [`Mount::run`]).
pub struct Mount {
    session: fuser::Session<BlockFrameFs>,
    dir: PathBuf,
}

/// Unmounts a running [`Mount`] from another thread (a signal handler).
pub struct Unmounter {
    inner: fuser::SessionUnmounter,
    dir: PathBuf,
}

impl Unmounter {
    /// Unmounts; when files are still open there, detaches the mount instead (it goes away when they close).
    pub fn unmount(&mut self) -> io::Result<()> {
        match self.inner.unmount() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "mount point busy; detaching it (it ends when the last file closes)");
                unmount_dir(&self.dir, true)
            }
        }
    }
}

impl Mount {
    /// Mounts `vfs` on `dir` (an existing empty directory).
    pub fn new(vfs: Arc<Vfs>, dir: &Path, opts: &MountOptions) -> io::Result<Mount> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("{FS_NAME_PREFIX}{}", std::process::id())),
            MountOption::Subtype("blockframe".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            if opts.read_only || vfs.read_only() { MountOption::RO } else { MountOption::RW },
        ];
        config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let session = fuser::Session::new(BlockFrameFs::new(vfs, opts.writeback_cache), dir, &config)?;
        Ok(Mount { session, dir: dir.to_path_buf() })
    }

    /// A handle that unmounts from elsewhere.
    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter { inner: self.session.unmount_callable(), dir: self.dir.clone() }
    }

    /// Serves requests until the filesystem is unmounted (by [`Unmounter`], `bf umount` or `fusermount3 -u`).
    /// A connection the kernel aborted (`ECONNABORTED`: how a lazily detached mount can end once its last file
    /// closes, or an abort through `/sys/fs/fuse/connections`) is an end like any unmount, not an error.
    pub fn run(self) -> io::Result<()> {
        match self.session.run() {
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::info!("the kernel ended the FUSE connection");
                Ok(())
            }
            r => r,
        }
    }
}

/// Unmounts `dir`: umount(2) when privileged, else `fusermount3 -u`. `lazy` detaches a busy mount.
pub fn unmount_dir(dir: &Path, lazy: bool) -> io::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg("--").arg(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// What the mount table shows as a mount's source: this prefix, then the server's process id (so `bf umount`
/// can wait for the server to finish committing).
const FS_NAME_PREFIX: &str = "blockframe:";

/// The process id of the server of the mount at `dir`, from the mount table.
pub fn server_pid(dir: &Path) -> Option<u32> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let (source, target) = (f.next()?, f.next()?);
        // The table escapes spaces, tabs, newlines and backslashes as octal.
        let target = target.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\");
        (Path::new(&target) == dir).then(|| source.strip_prefix(FS_NAME_PREFIX)?.parse().ok()).flatten()
    })
}

/// True when `dir` is a mount point (its device differs from its parent's).
pub fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.join("..");
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_errno() {
        assert_eq!(errno(&Error::fs(FsErrorKind::NotFound, "x")), Errno::ENOENT);
        assert_eq!(errno(&Error::fs(FsErrorKind::DirectoryNotEmpty, "x")), Errno::ENOTEMPTY);
        assert_eq!(errno(&Error::fs(FsErrorKind::ReadOnly, "x")), Errno::EROFS);
        assert_eq!(errno(&Error::fs(FsErrorKind::FileTooLarge, "x")), Errno::EFBIG);
        assert_eq!(errno(&Error::fs(FsErrorKind::NameTooLong, "x")), Errno::ENAMETOOLONG);
        let lost = Error::TooManyLost { file: "f".into(), segment: 1, have: 1, need: 2, bad: String::new() };
        assert_eq!(errno(&lost), Errno::EIO, "data beyond repair is an I/O error");
        assert_eq!(errno(&Error::Authentication { file: "f".into(), segment: 0 }), Errno::EIO);
    }

    #[test]
    fn panics_become_eio() {
        let r: Result<(), Errno> = guard("test", || panic!("boom"));
        assert_eq!(r, Err(Errno::EIO));
    }

    #[test]
    fn times_round_trip() {
        for ns in [0i64, 1_700_000_000_123_456_789, -5_000_000_000] {
            assert_eq!(ns_of(TimeOrNow::SpecificTime(time_of(ns))), ns);
        }
    }
}

/// The text exposition for `bf mount --metrics-listen` (Prometheus text): the segment cache's hits, misses,
/// read-ahead loads and fill, and the segments decoded (verified, rebuilt when needed, decrypted). Pure.
pub fn render_metrics(cache: blockframe::vfs::cache::CacheStats, segments_decoded: u64) -> String {
    use blockframe::metrics::single;
    let mut out = String::new();
    let counters = [
        ("bf_mount_cache_hits_total", "Reads answered from the segment cache (or a load in progress).", cache.hits),
        ("bf_mount_cache_misses_total", "Reads that loaded a segment.", cache.misses),
        ("bf_mount_cache_read_ahead_loads_total", "Segments loaded by read-ahead.", cache.read_ahead_loads),
        ("bf_mount_segments_decoded_total", "Segments verified and decrypted.", segments_decoded),
    ];
    for (name, help, v) in counters {
        single(&mut out, name, "counter", help, v);
    }
    single(&mut out, "bf_mount_cache_used_bytes", "gauge", "Bytes held by the segment cache.", cache.used_bytes);
    single(&mut out, "bf_mount_cache_capacity_bytes", "gauge", "The segment cache's capacity.", cache.capacity_bytes);
    out
}

#[cfg(test)]
mod metrics_tests {
    #[test]
    fn renders_the_cache_counters() {
        let stats = blockframe::vfs::cache::CacheStats {
            hits: 7,
            misses: 2,
            read_ahead_loads: 1,
            used_bytes: 64,
            capacity_bytes: 128,
        };
        let text = super::render_metrics(stats, 3);
        for line in [
            "bf_mount_cache_hits_total 7",
            "bf_mount_cache_misses_total 2",
            "bf_mount_cache_read_ahead_loads_total 1",
            "bf_mount_segments_decoded_total 3",
            "bf_mount_cache_used_bytes 64",
            "# TYPE bf_mount_cache_capacity_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
