//! Tests of the filesystem layer through its API, on a real store in a temporary directory.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::files::commit::{commit, CommitRequest};
use crate::store::MIN_SEGMENT_SIZE;
use crate::tests::{data, new_store};

const SEG: usize = MIN_SEGMENT_SIZE as usize;

fn vfs(dir: &std::path::Path) -> Vfs {
    let store = Arc::new(new_store(dir, 2, 1));
    // Write-behind long enough that only fsync, sync_all and drop commit: the tests see exactly when.
    let opts = VfsOptions {
        cache_bytes: 4 * SEG,
        catalog_ttl: Duration::ZERO,
        write_behind: Duration::from_secs(3600),
        ..VfsOptions::default()
    };
    Vfs::new(store, opts).unwrap()
}

fn put(v: &Vfs, name: &str, bytes: &[u8]) {
    let req = CommitRequest {
        name: name.into(),
        mtime_unix_ns: 42,
        mode: 0o600,
        replace: true,
        workers: 1,
        size: None,
        ..Default::default()
    };
    commit(v.store(), &mut Cursor::new(bytes), &req, &|_| {}).unwrap();
}

/// The view another process gets after `v` is closed (everything it had is committed by its drop).
fn remount(v: Vfs, d: &std::path::Path) -> Vfs {
    let dir = v.store().dir().to_path_buf();
    drop(v);
    let mut s = crate::store::Store::open(&dir).unwrap();
    s.unlock(crate::store::read_key_file(&d.join("store/master.key")).unwrap()).unwrap();
    Vfs::new(Arc::new(s), VfsOptions { catalog_ttl: Duration::ZERO, ..VfsOptions::default() }).unwrap()
}

/// Every catalog entry as "name kind" (directories with a trailing `/`), sorted.
fn entries(v: &Vfs) -> Vec<String> {
    let mut out: Vec<String> = catalog::list(v.store())
        .unwrap()
        .0
        .iter()
        .map(|e| {
            let m = e.meta.as_ref().unwrap();
            let slash = if m.kind == EntryKind::Dir { "/" } else { "" };
            let kind = format!("{:?}", m.kind);
            format!("{}{slash} {}", m.name, kind.split(' ').next().unwrap())
        })
        .collect();
    out.sort();
    out
}

fn resolve(v: &Vfs, path: &str) -> Result<Attr> {
    let mut attr = v.getattr(ROOT)?;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        attr = v.lookup(attr.ino, part)?;
    }
    Ok(attr)
}

fn read_all(v: &Vfs, path: &str) -> Result<Vec<u8>> {
    let a = resolve(v, path)?;
    let fh = v.open(a.ino, OpenMode::default())?;
    let mut out = Vec::new();
    loop {
        let chunk = v.read(fh, out.len() as u64, 100_000)?;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    v.release(fh)?;
    Ok(out)
}

fn write_file(v: &Vfs, parent: Ino, name: &str, bytes: &[u8]) -> Ino {
    let (attr, fh) = v.create(parent, name, 0o640, None).unwrap();
    for (i, chunk) in bytes.chunks(50_000).enumerate() {
        v.write(fh, (i * 50_000) as u64, chunk).unwrap();
    }
    v.flush(fh).unwrap();
    v.release(fh).unwrap();
    attr.ino
}

#[test]
fn committed_files_appear_with_metadata_and_read_at_any_offset() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let big = data(5 * SEG + 777, 1);
    put(&v, "dir/sub/big", &big);
    put(&v, "top", b"hello");
    let a = resolve(&v, "dir/sub/big").unwrap();
    assert_eq!((a.size, a.stat.mode, a.stat.mtime_unix_ns, a.kind), (big.len() as u64, 0o600, 42, FileType::File));
    assert_eq!(resolve(&v, "dir").unwrap().kind, FileType::Dir);
    let fh = v.opendir(ROOT).unwrap();
    let names: Vec<String> = v.readdir(fh).unwrap().iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, ["dir", "top"]);
    v.releasedir(fh).unwrap();
    assert_eq!(read_all(&v, "dir/sub/big").unwrap(), big);
    let fh = v.open(a.ino, OpenMode::default()).unwrap();
    for (off, len) in
        [(0u64, 10u32), (SEG as u64 - 3, 10), (3 * SEG as u64 + 5, 2 * SEG as u32), (big.len() as u64 - 1, 100)]
    {
        let got = v.read(fh, off, len).unwrap();
        let end = (off as usize + len as usize).min(big.len());
        assert_eq!(&*got, &big[off as usize..end], "offset {off}");
    }
    assert!(v.read(fh, big.len() as u64 + 10, 10).unwrap().is_empty());
    v.release(fh).unwrap();
    assert_eq!(resolve(&v, "nope").unwrap_err().fs_kind(), FsErrorKind::NotFound);
}

#[test]
fn writes_are_committed_on_close_and_survive_a_new_view() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let body = data(3 * SEG + 5, 2);
    let dir = v.mkdir(ROOT, "new", 0o755, None).unwrap();
    write_file(&v, dir.ino, "file", &body);
    // Closed, not yet committed (write-behind): served from the spool meanwhile.
    assert!(catalog::find(v.store(), "new/file").is_err());
    assert_eq!(read_all(&v, "new/file").unwrap(), body);
    v.sync_all().unwrap();
    assert_eq!(catalog::find(v.store(), "new/file").unwrap().meta.unwrap().mode, 0o640);
    // Overwrite the middle through O_RDWR: the spool starts as a copy of the committed version.
    let a = resolve(&v, "new/file").unwrap();
    let fh = v.open(a.ino, OpenMode { write: true, truncate: false }).unwrap();
    v.write(fh, 10, b"XYZ").unwrap();
    v.release(fh).unwrap();
    let mut expect = body.clone();
    expect[10..13].copy_from_slice(b"XYZ");
    // Truncate without a handle.
    v.setattr(a.ino, None, SetAttr { size: Some(SEG as u64 + 1), ..SetAttr::default() }).unwrap();
    expect.truncate(SEG + 1);
    // chmod re-seals the manifest only.
    v.setattr(a.ino, None, SetAttr { mode: Some(0o600), ..SetAttr::default() }).unwrap();
    let v2 = remount(v, d.path());
    assert_eq!(read_all(&v2, "new/file").unwrap(), expect);
    assert_eq!(resolve(&v2, "new/file").unwrap().stat.mode, 0o600);
    assert_eq!(entries(&v2), ["new/ Dir", "new/file File"], "old versions are gone");
}

#[test]
fn rename_unlink_mkdir_rmdir() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "a/one", &data(2 * SEG, 3));
    put(&v, "a/two", b"2");
    put(&v, "b", b"bbb");
    let a = resolve(&v, "a").unwrap();
    // Directory rename re-seals every file below; inodes are kept.
    let one = resolve(&v, "a/one").unwrap().ino;
    v.rename(ROOT, "a", ROOT, "z", false).unwrap();
    assert_eq!(resolve(&v, "z").unwrap().ino, a.ino);
    assert_eq!(resolve(&v, "z/one").unwrap().ino, one);
    assert_eq!(read_all(&v, "z/one").unwrap(), data(2 * SEG, 3));
    assert!(catalog::find(v.store(), "a/one").is_err());
    // File over file.
    v.rename(ROOT, "b", a.ino, "two", false).unwrap();
    assert_eq!(read_all(&v, "z/two").unwrap(), b"bbb");
    assert_eq!(v.rename(a.ino, "one", a.ino, "two", true).unwrap_err().fs_kind(), FsErrorKind::AlreadyExists);
    let mut names: Vec<String> = catalog::list(v.store()).unwrap().0.iter().map(|e| e.label()).collect();
    names.sort();
    assert_eq!(names, ["z/one", "z/two"]);
    // rmdir of a non-empty directory fails; after unlinking, the emptied directory stays until rmdir.
    assert_eq!(v.rmdir(ROOT, "z").unwrap_err().fs_kind(), FsErrorKind::DirectoryNotEmpty);
    assert_eq!(v.unlink(ROOT, "z").unwrap_err().fs_kind(), FsErrorKind::IsADirectory);
    v.unlink(a.ino, "one").unwrap();
    v.unlink(a.ino, "two").unwrap();
    v.sync_all().unwrap();
    assert_eq!(entries(&v), ["z/ Dir"], "the emptied directory is an entry of its own");
    assert_eq!(resolve(&v, "z").unwrap().kind, FileType::Dir);
    v.rmdir(ROOT, "z").unwrap();
    assert_eq!(resolve(&v, "z").unwrap_err().fs_kind(), FsErrorKind::NotFound);
    v.sync_all().unwrap();
    assert!(entries(&v).is_empty());
    // Shards of removed files are gone.
    for loc in v.store().locations() {
        assert!(loc.list("shards").unwrap().is_empty());
    }
}

#[test]
fn external_commits_appear_and_corruption_is_an_io_error() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let bytes = data(4 * SEG, 4);
    put(&v, "late", &bytes);
    assert_eq!(read_all(&v, "late").unwrap(), bytes, "found after the catalog TTL");
    put(&v, "victim", &bytes);
    let e = catalog::find(v.store(), "victim").unwrap();
    // Corrupt two of the three shards of segment 2 (m = 1): beyond repair.
    for shard in 0..2 {
        let key = crate::store::shard_key(&e.manifest.body.file_id, 2, shard);
        for loc in v.store().locations() {
            if let Ok(mut b) = crate::location::LocationExt::get(loc.as_ref(), &key) {
                let n = b.len() - 1;
                b[n] ^= 0xff;
                loc.put(&key, &[&b]).unwrap();
            }
        }
    }
    let a = resolve(&v, "victim").unwrap();
    let fh = v.open(a.ino, OpenMode::default()).unwrap();
    assert_eq!(&*v.read(fh, 0, SEG as u32).unwrap(), &bytes[..SEG]);
    assert_eq!(v.read(fh, 2 * SEG as u64 + 1, 10).unwrap_err().fs_kind(), FsErrorKind::Io);
    assert_eq!(&*v.read(fh, 3 * SEG as u64, 10).unwrap(), &bytes[3 * SEG..3 * SEG + 10]);
    v.release(fh).unwrap();
}

#[test]
fn read_only_refuses_changes() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(d.path(), 2, 1));
    let v = Vfs::new(store, VfsOptions { read_only: true, ..VfsOptions::default() }).unwrap();
    assert_eq!(v.mkdir(ROOT, "x", 0o755, None).unwrap_err().fs_kind(), FsErrorKind::ReadOnly);
    assert_eq!(v.create(ROOT, "x", 0o644, None).unwrap_err().fs_kind(), FsErrorKind::ReadOnly);
}

fn catalog_records(v: &Vfs) -> usize {
    let loc = &v.store().locations()[0];
    loc.list("catalog").unwrap().iter().filter(|n| n.starts_with("rec-") || n.starts_with("ckpt-")).count()
}

#[test]
fn closed_files_are_committed_together_by_fsync_and_unlinked_ones_never() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let before = catalog_records(&v);
    let mut inos = Vec::new();
    for i in 0..50 {
        inos.push(write_file(&v, ROOT, &format!("f{i}"), &data(4096, i)));
    }
    assert!(catalog::list(v.store()).unwrap().0.is_empty(), "close does not commit");
    assert_eq!(read_all(&v, "f7").unwrap(), data(4096, 7));
    v.unlink(ROOT, "f3").unwrap();
    // fsync of one open file commits it and every closed one: one record.
    let (_, fh) = v.create(ROOT, "last", 0o600, None).unwrap();
    v.write(fh, 0, b"end").unwrap();
    v.fsync(fh).unwrap();
    assert_eq!(catalog_records(&v), before + 1);
    let names: Vec<String> = catalog::list(v.store()).unwrap().0.iter().map(|e| e.label()).collect();
    assert_eq!(names.len(), 50, "49 closed files and the fsynced one: {names:?}");
    assert!(!names.contains(&"f3".to_string()));
    v.release(fh).unwrap();
    assert_eq!(read_all(&v, "f49").unwrap(), data(4096, 49));
    // Unlinks of committed files are write-behind too: gone from the mount at once, from the catalog in one
    // record at the next commit.
    for i in 10..30 {
        v.unlink(ROOT, &format!("f{i}")).unwrap();
    }
    assert_eq!(resolve(&v, "f12").unwrap_err().fs_kind(), FsErrorKind::NotFound);
    assert_eq!(catalog::list(v.store()).unwrap().0.len(), 50);
    let records = catalog_records(&v);
    v.sync_all().unwrap();
    assert_eq!(catalog_records(&v), records + 1, "{:?}", v.store().locations()[0].list("catalog"));
    assert_eq!(catalog::list(v.store()).unwrap().0.len(), 30);
    assert_eq!(resolve(&v, "f12").unwrap_err().fs_kind(), FsErrorKind::NotFound);
}

#[test]
fn the_flusher_commits_closed_files_after_the_write_behind_delay() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(d.path(), 2, 1));
    let opts = VfsOptions { write_behind: Duration::from_millis(50), ..VfsOptions::default() };
    let v = Vfs::new(store, opts).unwrap();
    write_file(&v, ROOT, "soon", b"data");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while catalog::find(v.store(), "soon").is_err() {
        assert!(std::time::Instant::now() < deadline, "not committed by the flusher");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_all(&v, "soon").unwrap(), b"data");
}

#[test]
fn long_paths_huge_sizes_and_fallocate_get_their_errno() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    // A path past 4095 bytes: ENAMETOOLONG (each component is within 255).
    let mut parent = ROOT;
    for i in 0..16 {
        parent = v.mkdir(parent, &format!("{i:0>250}"), 0o755, None).unwrap().ino;
    }
    let err = v.create(parent, &"x".repeat(200), 0o600, None).unwrap_err();
    assert_eq!(err.fs_kind(), FsErrorKind::NameTooLong, "{err}");
    assert_eq!(v.mkdir(parent, &"y".repeat(200), 0o755, None).unwrap_err().fs_kind(), FsErrorKind::NameTooLong);
    assert_eq!(v.create(ROOT, &"z".repeat(256), 0o600, None).unwrap_err().fs_kind(), FsErrorKind::NameTooLong);
    assert_eq!(v.lookup(ROOT, &"z".repeat(256)).unwrap_err().fs_kind(), FsErrorKind::NameTooLong);
    // Sizes past the largest file: EFBIG, not EIO.
    let (attr, fh) = v.create(ROOT, "f", 0o600, None).unwrap();
    let big = SetAttr { size: Some(MAX_FILE_SIZE + 1), ..SetAttr::default() };
    assert_eq!(v.setattr(attr.ino, Some(fh), big).unwrap_err().fs_kind(), FsErrorKind::FileTooLarge);
    assert_eq!(v.write(fh, u64::MAX - 2, b"abc").unwrap_err().fs_kind(), FsErrorKind::FileTooLarge);
    // fallocate mode 0 extends with zeros and never shrinks; KEEP_SIZE changes nothing; punching a hole and
    // zeroing a range make bytes read as zeros; collapsing is unsupported.
    v.write(fh, 0, b"head-and-tail").unwrap();
    v.fallocate(fh, 0, 10_000, 0).unwrap();
    v.fallocate(fh, 0, 10, 0).unwrap();
    v.fallocate(fh, 0, 20_000, 0x01).unwrap();
    v.fallocate(fh, 2, 3, 0x03).unwrap();
    v.fallocate(fh, 9_999, 2, 0x10).unwrap();
    assert_eq!(v.fallocate(fh, 0, 10, 0x08).unwrap_err().fs_kind(), FsErrorKind::Unsupported);
    v.fsync(fh).unwrap();
    v.release(fh).unwrap();
    let mut want = b"he\0\0\0and-tail".to_vec();
    want.resize(10_001, 0);
    assert_eq!(read_all(&v, "f").unwrap(), want);
}

#[test]
fn renaming_a_directory_reseals_its_files_in_one_record() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let dir = v.mkdir(ROOT, "a", 0o755, None).unwrap();
    for i in 0..30 {
        write_file(&v, dir.ino, &format!("f{i}"), &data(100, i));
    }
    v.sync_all().unwrap();
    let records = catalog_records(&v);
    v.rename(ROOT, "a", ROOT, "b", false).unwrap();
    assert_eq!(catalog_records(&v), records + 1);
    let names = entries(&v);
    assert!(names.len() == 31 && names.iter().all(|n| n.starts_with("b/")), "{names:?}");
    assert_eq!(read_all(&v, "b/f7").unwrap(), data(100, 7));
}

#[test]
fn directories_keep_mode_owner_and_times_across_remounts() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let dir = v.mkdir(ROOT, "d", 0o2750, Some((1000, 100))).unwrap();
    assert_eq!((dir.stat.mode, dir.stat.uid, dir.stat.gid), (0o2750, 1000, 100));
    // A set-group-ID directory passes on its group (and the bit to subdirectories).
    let sub = v.mkdir(dir.ino, "empty", 0o700, Some((7, 7))).unwrap();
    assert_eq!((sub.stat.mode, sub.stat.uid, sub.stat.gid), (0o2700, 7, 100));
    let before = v.getattr(dir.ino).unwrap().stat;
    write_file(&v, dir.ino, "f", b"x");
    let after = v.getattr(dir.ino).unwrap().stat;
    assert!(after.mtime_unix_ns > before.mtime_unix_ns && after.ctime_unix_ns > before.ctime_unix_ns);
    let times = SetAttr { atime_unix_ns: Some(11), mtime_unix_ns: Some(22), ..SetAttr::default() };
    v.setattr(dir.ino, None, times).unwrap();
    let set = v.getattr(dir.ino).unwrap().stat;
    assert_eq!((set.atime_unix_ns, set.mtime_unix_ns), (11, 22));
    assert!(set.ctime_unix_ns >= after.ctime_unix_ns, "a metadata change moves the ctime");
    let v = remount(v, d.path());
    let back = resolve(&v, "d").unwrap();
    assert_eq!(back.stat, set);
    assert_eq!(back.nlink, 3, "two plus one subdirectory");
    let empty = resolve(&v, "d/empty").unwrap();
    assert_eq!((empty.kind, empty.stat.mode, empty.stat.gid), (FileType::Dir, 0o2700, 100));
    // rmdir removes the entry.
    v.rmdir(back.ino, "empty").unwrap();
    let v = remount(v, d.path());
    assert!(resolve(&v, "d/empty").is_err());
    assert_eq!(entries(&v), ["d/ Dir", "d/f File"]);
}

#[test]
fn symbolic_links_are_stored_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let l = v.symlink(ROOT, "link", "../some/where", Some((5, 6))).unwrap();
    assert_eq!((l.kind, l.size, l.stat.uid), (FileType::Symlink, 13, 5));
    assert_eq!(v.readlink(l.ino).unwrap(), "../some/where");
    assert_eq!(v.open(l.ino, OpenMode::default()).unwrap_err().fs_kind(), FsErrorKind::SymlinkLoop);
    assert_eq!(v.readlink(ROOT).unwrap_err().fs_kind(), FsErrorKind::InvalidArgument);
    let d2 = v.mkdir(ROOT, "x", 0o755, None).unwrap();
    v.rename(ROOT, "link", d2.ino, "moved", false).unwrap();
    v.sync_all().unwrap();
    let v = remount(v, d.path());
    let back = resolve(&v, "x/moved").unwrap();
    assert_eq!((back.kind, back.stat.uid, back.stat.gid), (FileType::Symlink, 5, 6));
    assert_eq!(v.readlink(back.ino).unwrap(), "../some/where");
    let fh = v.opendir(resolve(&v, "x").unwrap().ino).unwrap();
    assert_eq!(v.readdir(fh).unwrap()[0].kind, FileType::Symlink);
    v.releasedir(fh).unwrap();
    v.unlink(resolve(&v, "x").unwrap().ino, "moved").unwrap();
    let v = remount(v, d.path());
    assert!(resolve(&v, "x/moved").is_err());
    assert_eq!(entries(&v), ["x/ Dir"]);
}

#[test]
fn files_keep_owner_atime_and_ctime_apart_from_mtime() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let (a, fh) = v.create(ROOT, "f", 0o640, Some((3, 4))).unwrap();
    v.write(fh, 0, b"data").unwrap();
    v.release(fh).unwrap();
    // While pending, and once committed: chown, then utimens.
    v.setattr(a.ino, None, SetAttr { uid: Some(30), ..SetAttr::default() }).unwrap();
    v.sync_all().unwrap();
    let times = SetAttr { gid: Some(40), atime_unix_ns: Some(100), mtime_unix_ns: Some(200), ..SetAttr::default() };
    let set = v.setattr(a.ino, None, times).unwrap().stat;
    assert_eq!((set.uid, set.gid, set.atime_unix_ns, set.mtime_unix_ns, set.mode), (30, 40, 100, 200, 0o640));
    assert!(set.ctime_unix_ns > 200, "ctime is the time of the change, not the mtime set");
    let v = remount(v, d.path());
    assert_eq!(resolve(&v, "f").unwrap().stat, set);
    let m = catalog::find(v.store(), "f").unwrap().meta.unwrap();
    assert_eq!((m.owner, m.atime_unix_ns, m.mtime_unix_ns), (Some((30, 40)), 100, 200));
    // A file committed without an owner shows the default owner.
    put(&v, "plain", b"p");
    let p = resolve(&v, "plain").unwrap().stat;
    assert_eq!((p.uid, p.gid), owner_of(v.store().dir()));
}

#[test]
fn an_open_file_unlinked_keeps_its_attributes_until_closed() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "f", b"hello");
    let a = resolve(&v, "f").unwrap();
    let fh = v.open(a.ino, OpenMode::default()).unwrap();
    v.unlink(ROOT, "f").unwrap();
    let g = v.getattr(a.ino).unwrap();
    assert_eq!((g.size, g.nlink, g.kind), (5, 0, FileType::File));
    assert_eq!(&v.read(fh, 0, 10).unwrap()[..], b"hello");
    v.release(fh).unwrap();
    assert_eq!(v.getattr(a.ino).unwrap_err().fs_kind(), FsErrorKind::NotFound);
}

// ---- races and collisions found in review ----

/// A directory made while no location answers must still be committed once they answer again.
#[test]
fn a_directory_queued_while_the_session_cannot_start_is_committed_later() {
    let d = tempfile::tempdir().unwrap();
    let ms = crate::testing::mem_store(d.path(), 2, 1, 3, MIN_SEGMENT_SIZE).unwrap();
    let faulty = ms.faulty.clone();
    let opts = VfsOptions {
        catalog_ttl: Duration::from_secs(3600),
        write_behind: Duration::from_secs(3600),
        ..VfsOptions::default()
    };
    let v = Vfs::new(Arc::new(ms.store), opts).unwrap();
    v.mkdir(ROOT, "d", 0o700, None).unwrap();
    v.symlink(ROOT, "l", "target", None).unwrap();
    for f in &faulty {
        f.set_gone(true);
    }
    assert!(v.sync_all().is_err(), "no location answers");
    for f in &faulty {
        f.set_gone(false);
    }
    v.sync_all().unwrap();
    assert_eq!(entries(&v), ["d/ Dir", "l Symlink"], "the directory and the link were dropped");
}

/// rename(2) of a closed-but-uncommitted file over a committed one: until the new file is committed, the store
/// should still hold the old version (a crash now loses both).
#[test]
fn rename_over_a_committed_file_keeps_it_until_the_new_one_is_committed() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "t", b"old");
    resolve(&v, "t").unwrap();
    write_file(&v, ROOT, "tmp", b"new");
    v.rename(ROOT, "tmp", ROOT, "t", false).unwrap();
    assert!(catalog::find(v.store(), "t").is_ok(), "the store holds neither version of t");
}

/// A store holding both a file `D` and `D/x` (the tree shows the directory): creating a file in `D` through the
/// mount must not delete the file `D`.
#[test]
fn touching_a_directory_does_not_delete_a_hidden_file_of_the_same_name() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "D/x", b"x");
    let dir = resolve(&v, "D").unwrap();
    assert_eq!(dir.kind, FileType::Dir);
    put(&v, "D", b"precious"); // e.g. by `bf commit`; not shown (the directory was seen first)
    assert_eq!(resolve(&v, "D").unwrap().kind, FileType::Dir);
    write_file(&v, dir.ino, "y", b"y");
    v.sync_all().unwrap();
    let e = catalog::find(v.store(), "D").unwrap();
    assert_eq!(e.meta.unwrap().kind, EntryKind::File, "the file D was replaced by a directory entry");
}

/// Another writer replaces directory `d` (an entry of this mount) with a symbolic link: the mount must not
/// turn its directory into a link, nor write a link entry for a directory with files below it.
#[test]
fn a_link_entry_from_elsewhere_does_not_land_on_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let dir = v.mkdir(ROOT, "d", 0o755, None).unwrap();
    v.sync_all().unwrap();
    let req = CommitRequest {
        name: "d".into(),
        replace: true,
        workers: 1,
        size: Some(0),
        kind: EntryKind::Symlink { target: "elsewhere".into() },
        ..Default::default()
    };
    commit(v.store(), &mut std::io::empty(), &req, &|_| {}).unwrap();
    let a = resolve(&v, "d").unwrap(); // refreshes
    assert_eq!(a.kind, FileType::Dir);
    let answers_readlink = v.readlink(dir.ino).ok();
    write_file(&v, dir.ino, "f", b"f");
    v.sync_all().unwrap();
    let m = catalog::find(v.store(), "d").unwrap().meta.unwrap();
    assert!(
        !matches!(m.kind, EntryKind::Symlink { .. }),
        "a link entry was written for a directory with files below it"
    );
    assert_eq!(answers_readlink, None, "a directory answers readlink");
}

/// A directory with an entry of its own in the catalog (its mode was set through the mount) stays when its last
/// file is removed by another process.
#[test]
fn a_directory_with_an_entry_is_not_pruned_when_its_last_file_goes() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "a/f", b"f");
    let a = resolve(&v, "a").unwrap();
    v.setattr(a.ino, None, SetAttr { mode: Some(0o700), ..SetAttr::default() }).unwrap();
    v.sync_all().unwrap();
    assert_eq!(entries(&v), ["a/ Dir", "a/f File"]);
    let e = catalog::find(v.store(), "a/f").unwrap();
    catalog::remove(v.store(), &e).unwrap(); // `bf rm a/f`
    assert_eq!(entries(&v), ["a/ Dir"]);
    let got = resolve(&v, "a");
    assert!(got.is_ok(), "the directory vanished from the mount though the catalog has its entry");
}

/// Another process compacts the pack holding `f` (as `bf rm` does); a chmod through the mount afterwards must
/// not publish a manifest naming the dropped pack.
#[test]
fn a_chmod_after_a_compaction_elsewhere_keeps_the_file_readable() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put_packed(&v, &[("f", 100, 1), ("g", 5000, 1)]);
    let f = resolve(&v, "f").unwrap();
    catalog::remove(v.store(), &catalog::find(v.store(), "g").unwrap()).unwrap();
    let rep = crate::files::compact::compact(v.store(), 16).unwrap();
    assert_eq!(rep.files_moved, 1);
    v.setattr(f.ino, None, SetAttr { mode: Some(0o600), ..SetAttr::default() }).unwrap();
    assert_eq!(read_all(&v, "f").unwrap(), data(100, 1));
}

/// The kernel writes back the cached times of an inode after it was unlinked (as for the placeholders `tar x`
/// makes for links): that must succeed, or the next syncfs(2) of the mount fails; other changes of it, and any
/// change of a number never given, are refused.
#[test]
fn times_written_back_to_an_unlinked_inode_are_taken_and_other_changes_refused() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let ino = write_file(&v, ROOT, "placeholder", b"");
    v.unlink(ROOT, "placeholder").unwrap();
    let times = SetAttr { mtime_unix_ns: Some(7), ctime_unix_ns: Some(8), ..SetAttr::default() };
    let a = v.setattr(ino, None, times).unwrap();
    assert_eq!((a.nlink, a.stat.mtime_unix_ns), (0, 7));
    let chmod = SetAttr { mode: Some(0o600), ..SetAttr::default() };
    assert_eq!(v.setattr(ino, None, chmod).unwrap_err().fs_kind(), FsErrorKind::NotFound);
    assert_eq!(v.setattr(ino + 1000, None, times).unwrap_err().fs_kind(), FsErrorKind::NotFound);
    v.sync_all().unwrap();
    assert!(resolve(&v, "placeholder").is_err(), "the unlinked file came back");
}

/// Commits `files` (name, length, seed) in one session, so small ones share a pack.
fn put_packed(v: &Vfs, files: &[(&str, usize, u64)]) {
    let mut s = Session::new(v.store(), SessionOptions::default()).unwrap();
    for &(name, len, seed) in files {
        let req = CommitRequest { name: name.into(), mode: 0o644, replace: true, workers: 1, ..Default::default() };
        s.commit(&mut Cursor::new(data(len, seed)), &req, &|_| {}).unwrap();
    }
    for r in s.flush().unwrap() {
        r.unwrap();
    }
}

/// The packs in the catalog, by id.
fn packs(v: &Vfs) -> Vec<[u8; 16]> {
    let st = crate::files::catalog_log::current(v.store()).unwrap();
    st.entries.values().filter(|m| m.body.is_pack()).map(|m| m.body.file_id).collect()
}

/// Unlinks through the mount that leave a pack mostly dead free its space: the pack is compacted (once
/// removals pause, or at unmount), and the files left in it read back exact from their new pack.
#[test]
fn removals_through_the_mount_compact_the_packs_they_leave_mostly_dead() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, usize, u64)> = names.iter().enumerate().map(|(i, n)| (n.as_str(), 3000, i as u64)).collect();
    put_packed(&v, &files);
    let before = packs(&v);
    assert_eq!(before.len(), 1, "ten small files share one pack");
    for n in &names[..7] {
        resolve(&v, n).unwrap();
        v.unlink(ROOT, n).unwrap();
    }
    v.sync_all().unwrap();
    assert_eq!(packs(&v), before, "a pack is not compacted while removals may go on");
    let v = remount(v, d.path());
    let after = packs(&v);
    assert_eq!(after.len(), 1, "the live files moved into one new pack");
    assert_ne!(after, before, "the mostly dead pack is still there after unmount");
    for (i, n) in names.iter().enumerate().skip(7) {
        assert_eq!(read_all(&v, n).unwrap(), data(3000, i as u64), "{n} after the compaction");
    }
}

/// A file open for reading and one open for writing when another process compacts their pack: both go on
/// from where the file is now (the old pack is gone).
#[test]
fn handles_open_across_a_compaction_read_and_write_the_moved_file() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put_packed(&v, &[("f", 100, 1), ("w", 200, 2), ("g", 5000, 3)]);
    let reading = v.open(resolve(&v, "f").unwrap().ino, OpenMode::default()).unwrap();
    let writing = v.open(resolve(&v, "w").unwrap().ino, OpenMode { write: true, truncate: false }).unwrap();
    let before = packs(&v);
    catalog::remove(v.store(), &catalog::find(v.store(), "g").unwrap()).unwrap();
    assert_eq!(crate::files::compact::compact(v.store(), 16).unwrap().files_moved, 2);
    assert_ne!(packs(&v), before, "the test needs the pack to move");
    assert_eq!(&*v.read(reading, 0, 1000).unwrap(), &data(100, 1)[..], "an open handle reads the moved file");
    v.write(writing, 10, b"XY").unwrap();
    v.release(writing).unwrap();
    v.release(reading).unwrap();
    v.sync_all().unwrap();
    let mut want = data(200, 2);
    want[10..12].copy_from_slice(b"XY");
    assert_eq!(read_all(&v, "w").unwrap(), want, "a write to a moved file keeps the rest of it");
}

/// A refresh while a commit has taken the queued removals but not yet the namespace lock (it waits for `heavy`,
/// held here as a large spool copy would hold it) must not show the unlinked file again.
#[test]
fn an_unlinked_file_does_not_come_back_while_its_removal_is_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "f", b"gone");
    resolve(&v, "f").unwrap();
    v.unlink(ROOT, "f").unwrap();
    let heavy = lock(&v.shared.heavy);
    std::thread::scope(|s| {
        let t = s.spawn(|| v.sync_all());
        std::thread::sleep(Duration::from_millis(300));
        let back = resolve(&v, "f");
        drop(heavy);
        t.join().unwrap().unwrap();
        assert!(back.is_err(), "the unlinked file is shown again: {back:?}");
    });
}

/// chmod of a committed file racing an open for writing: the chmod must survive the writer's commit.
#[test]
fn a_chmod_racing_an_open_for_writing_is_kept() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    put(&v, "f", b"data");
    let f = resolve(&v, "f").unwrap();
    let ns = lock(&v.shared.ns);
    std::thread::scope(|s| {
        let t = s.spawn(|| v.setattr(f.ino, None, SetAttr { mode: Some(0o640), ..SetAttr::default() }));
        std::thread::sleep(Duration::from_millis(300)); // setattr now waits in reseal_meta
        let fh = v.open(f.ino, OpenMode { write: true, truncate: false }).unwrap();
        drop(ns);
        t.join().unwrap().unwrap();
        v.write(fh, 0, b"DATA").unwrap();
        v.release(fh).unwrap();
    });
    v.sync_all().unwrap();
    assert_eq!(catalog::find(v.store(), "f").unwrap().meta.unwrap().mode, 0o640, "the chmod was reverted");
}

#[test]
fn parallel_sequential_readers_sharing_a_small_cache_decode_each_segment_once() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(d.path(), 2, 1));
    // Room for two segments, four readers of two segments each: under plain LRU they evicted each other's
    // segments before reading them through, and every read decoded a whole segment again.
    let opts = VfsOptions { cache_bytes: 2 * SEG, catalog_ttl: Duration::ZERO, ..VfsOptions::default() };
    let v = Vfs::new(store, opts).unwrap();
    for i in 0..4 {
        put(&v, &format!("f{i}"), &data(2 * SEG, i));
    }
    let inos: Vec<Ino> = (0..4).map(|i| resolve(&v, &format!("f{i}")).unwrap().ino).collect();
    std::thread::scope(|s| {
        for (i, ino) in inos.into_iter().enumerate() {
            let v = &v;
            s.spawn(move || {
                let fh = v.open(ino, OpenMode::default()).unwrap();
                let mut got = Vec::new();
                loop {
                    let chunk = v.read(fh, got.len() as u64, 4096).unwrap();
                    if chunk.is_empty() {
                        break;
                    }
                    got.extend_from_slice(&chunk);
                }
                v.release(fh).unwrap();
                assert_eq!(got, data(2 * SEG, i as u64));
            });
        }
    });
    assert_eq!(v.segments_decoded(), 8, "each segment decoded once");
}

/// A chown that waited for a closed file's writer while the flusher committed and retired it, then a chmod:
/// both must be kept (the chown went to the retired writer and the chmod to the older committed version, and
/// the writer's later commit reverted the chmod: pjdfstest's utimensat/06.t).
#[test]
fn a_chown_racing_the_commit_of_a_closed_file_and_a_chmod_after_are_both_kept() {
    let d = tempfile::tempdir().unwrap();
    let v = vfs(d.path());
    let ino = write_file(&v, ROOT, "f", b"data");
    let ns = lock(&v.shared.ns);
    std::thread::scope(|s| {
        let sync = s.spawn(|| v.sync_all());
        std::thread::sleep(Duration::from_millis(200)); // the commit holds the writer's op lock, waits for ns
        let chown = s.spawn(|| v.setattr(ino, None, SetAttr { uid: Some(65534), ..SetAttr::default() }));
        std::thread::sleep(Duration::from_millis(200)); // the chown waits for the writer's op lock
        drop(ns);
        sync.join().unwrap().unwrap();
        let a = chown.join().unwrap().unwrap();
        assert_eq!(a.stat.uid, 65534, "the chown's reply");
    });
    let a = v.setattr(ino, None, SetAttr { mode: Some(0o444), ..SetAttr::default() }).unwrap();
    assert_eq!((a.stat.uid, a.stat.mode & 0o7777), (65534, 0o444));
    v.sync_all().unwrap();
    let meta = catalog::find(v.store(), "f").unwrap().meta.unwrap();
    assert_eq!((meta.owner.map(|o| o.0), meta.mode & 0o7777), (Some(65534), 0o444), "a change was lost");
    assert_eq!(v.getattr(ino).unwrap().stat.mode & 0o7777, 0o444);
}
