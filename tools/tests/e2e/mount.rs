//! `bf mount` / `bf umount` with real FUSE mounts: reads compared byte for byte with the sources (cmp, dd at
//! random offsets, concurrent sha256sum), writes through cp/mv/rm/mkdir/rmdir checked with `bf get` after
//! unmounting, corruption within and beyond repair, refusals, read-only mounts, signals and background mode.
//! Skipped (with a message) when /dev/fuse is unusable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{data, is_root, Env};

const SEG: usize = 64 * 1024;

/// True when FUSE mounts can be made here; otherwise says why the test is skipped.
pub(crate) fn fuse_usable() -> bool {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
    let helper = Command::new("sh").args(["-c", "command -v fusermount3"]).output().is_ok_and(|o| o.status.success());
    if !dev || !(is_root() || helper) {
        eprintln!("SKIP: /dev/fuse is not usable here (need /dev/fuse and root or fusermount3)");
        return false;
    }
    true
}

fn mounted(dir: &Path) -> bool {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(want.as_str())))
        .unwrap_or(false)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `bf mount --foreground` process; unmounted (and killed if need be) on drop.
pub(crate) struct Mounted {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Mounted {
        let dir = env.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let log = env.path("mount.log");
        let child = env
            .bf()
            .env("BF_LOG", "warn")
            .args(["mount", dir.to_str().unwrap(), "--foreground"])
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting bf mount");
        let mut m = Mounted { dir, child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mounted(&m.dir) {
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("bf mount exited with {status}: {}", std::fs::read_to_string(&m.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub(crate) fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Waits for the server to exit and checks it exited cleanly, without errors in its log.
    fn wait_exit(&mut self) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "bf mount did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "bf mount exit status {status}: {log}");
        // fuser reports replies to requests the kernel already abandoned (interrupted read-ahead): harmless.
        let errors = log.lines().filter(|l| l.contains("ERROR") && !l.contains("Failed to send FUSE reply"));
        assert_eq!(errors.count(), 0, "{log}");
        assert!(!log.contains("panicked"), "{log}");
        assert!(!mounted(&self.dir));
    }

    /// kill -9 of the server (no unmount, no commit), then `while_dead`, then a lazy unmount of the dead mount.
    /// Until that unmount the dead mount answers ENOTCONN, so a process writing into it stops there; after it,
    /// the process's paths would lead into the empty directory below.
    pub(crate) fn kill9_then<T>(mut self, while_dead: impl FnOnce() -> T) -> T {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let out = while_dead();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        wait_for("the dead mount to go", || !mounted(&self.dir));
        out
    }

    /// `bf umount`, then the server exits by itself.
    pub(crate) fn unmount(mut self, env: &Env) {
        env.ok(&["umount", self.dir.to_str().unwrap()]);
        self.wait_exit();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> Vec<u8> {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn sh(script: &str) -> Output {
    run(Command::new("sh").args(["-c", script]))
}

fn sha256(path: &Path) -> String {
    let out = ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out).split_whitespace().next().unwrap_or("").to_string()
}

/// Shard directories (one per committed file) on every location.
fn shard_dirs(env: &Env) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..6 {
        if let Ok(rd) = std::fs::read_dir(env.location(i).join("shards")) {
            v.extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Flips the last byte of shards `shards` of `segment` of the file whose shard directory is `file_dir`.
fn corrupt(env: &Env, file_dir: &str, segment: u64, shards: &[usize]) {
    for &shard in shards {
        let mut hit = false;
        for i in 0..6 {
            let p = env.location(i).join(format!("shards/{file_dir}/{segment:010}.{shard:03}"));
            if let Ok(mut b) = std::fs::read(&p) {
                let n = b.len() - 1;
                b[n] ^= 0x5a;
                std::fs::write(&p, b).unwrap();
                hit = true;
            }
        }
        assert!(hit, "shard {shard} of segment {segment} not found");
    }
}

#[test]
fn mount_serves_committed_files_byte_exact() {
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let files: Vec<(&str, usize)> = vec![
        ("in/empty", 0),
        ("in/one", 1),
        ("in/seg", SEG),
        ("in/dir/multi", 40 * SEG + 123),
        ("in/dir/sub/x", SEG + 1),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        env.write(name, &data(*len, i as u64 + 10));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.path("in/one"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    env.ok(&["commit", "-r", "in"]);
    let m = Mounted::start(&env, &[]);
    let ls = String::from_utf8(ok(Command::new("ls").arg("-lR").arg(m.p("in")))).unwrap();
    assert!(ls.contains(&format!(" {} ", 40 * SEG + 123)) && ls.contains("multi") && ls.contains("sub:"), "{ls}");
    for (name, len) in &files {
        let (src, dst) = (env.path(name), m.p(name));
        let (a, b) = (std::fs::metadata(&src).unwrap(), std::fs::metadata(&dst).unwrap());
        assert_eq!(b.len(), *len as u64, "{name}");
        assert_eq!(a.modified().unwrap(), b.modified().unwrap(), "mtime of {name}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(a.permissions().mode() & 0o7777, b.permissions().mode() & 0o7777, "mode of {name}");
        }
        ok(Command::new("cmp").arg(&src).arg(&dst));
    }
    // dd at random offsets, lengths up to three segments, compared with the source.
    let multi = data(40 * SEG + 123, 13);
    let mut x = 0x2545F4914F6CDD1Du64;
    for _ in 0..25 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % multi.len() as u64) as usize;
        let len = ((x >> 20) % (3 * SEG as u64)) as usize + 1;
        let out = ok(Command::new("dd")
            .arg(format!("if={}", m.p("in/dir/multi").display()))
            .args(["bs=65536", "iflag=skip_bytes,count_bytes", "status=none"])
            .arg(format!("skip={off}"))
            .arg(format!("count={len}")));
        assert_eq!(out, &multi[off..(off + len).min(multi.len())], "dd at {off}+{len}");
    }
    // sha256sum while two other readers read the same multi-segment file.
    let target = m.p("in/dir/multi");
    let readers: Vec<Child> =
        (0..2).map(|_| Command::new("cat").arg(&target).stdout(Stdio::piped()).spawn().unwrap()).collect();
    assert_eq!(sha256(&target), sha256(&env.path("in/dir/multi")));
    for r in readers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(out.stdout == multi, "a concurrent reader got different bytes");
    }
    // A file committed by another process while mounted appears.
    env.write("later.bin", &data(3 * SEG, 99));
    env.ok(&["commit", "later.bin"]);
    wait_for("later.bin to appear", || m.p("later.bin").exists());
    ok(Command::new("cmp").arg(env.path("later.bin")).arg(m.p("later.bin")));
    // Replaced by another process, larger then smaller: the mount shows each new version whole (the kernel,
    // which keeps the size of an inode it knows, gets a new inode), while a handle opened before reads the old one.
    let mut old_reader = std::fs::File::open(m.p("later.bin")).unwrap();
    for (len, seed) in [(5 * SEG + 11, 100), (SEG / 3, 101)] {
        env.write("later.bin", &data(len, seed));
        env.ok(&["commit", "--replace", "later.bin"]);
        wait_for("the new version to show", || {
            std::fs::metadata(m.p("later.bin")).is_ok_and(|md| md.len() == len as u64)
        });
        ok(Command::new("cmp").arg(env.path("later.bin")).arg(m.p("later.bin")));
    }
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut old_reader, &mut old).unwrap();
    drop(old_reader);
    assert!(old == data(3 * SEG, 99), "a handle opened before the replacements read other bytes");
    m.unmount(&env);
}

#[test]
fn mount_writes_are_committed_and_behave_like_a_disk() {
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    env.write("keep", b"old file");
    env.ok(&["commit", "keep"]);
    let src = env.write("big.bin", &data(30 * SEG + 7, 5));
    let m = Mounted::start(&env, &[]);
    ok(Command::new("cp").arg(&src).arg(m.p("new.bin")));
    ok(Command::new("cmp").arg(&src).arg(m.p("new.bin")));
    ok(Command::new("mkdir").arg("-p").arg(m.p("a/b/c")));
    ok(Command::new("mv").arg(m.p("new.bin")).arg(m.p("a/b/c/moved.bin")));
    assert!(!m.p("new.bin").exists());
    ok(Command::new("mv").arg(m.p("a")).arg(m.p("z")));
    ok(Command::new("cmp").arg(&src).arg(m.p("z/b/c/moved.bin")));
    ok(Command::new("rm").arg(m.p("keep")));
    assert!(!m.p("keep").exists());
    // rmdir of a non-empty directory and rm of a directory fail as on ext4.
    let o = run(Command::new("rmdir").arg(m.p("z/b")));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not empty"), "{o:?}");
    let o = run(Command::new("rm").arg(m.p("z/b")));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Is a directory"), "{o:?}");
    // Shell redirections: create, append, truncate.
    let edit = m.p("edit.txt");
    assert!(sh(&format!("printf hello > {0} && printf ' world' >> {0}", edit.display())).status.success());
    assert_eq!(std::fs::read(&edit).unwrap(), b"hello world");
    ok(Command::new("truncate").args(["-s", "3"]).arg(&edit));
    assert_eq!(std::fs::read(&edit).unwrap(), b"hel");
    ok(Command::new("chmod").arg("600").arg(&edit));
    // mkdir + rmdir of an empty directory, and one left empty (a catalog entry of its own: it persists).
    ok(Command::new("mkdir").arg(m.p("gone")));
    ok(Command::new("rmdir").arg(m.p("gone")));
    assert!(!m.p("gone").exists());
    ok(Command::new("mkdir").arg(m.p("empty")));
    // rm -r of a tree written through the mount.
    ok(Command::new("mkdir").arg("-p").arg(m.p("tree/x")));
    ok(Command::new("cp").arg(&src).arg(m.p("tree/x/f")));
    ok(Command::new("rm").arg("-r").arg(m.p("tree")));
    assert!(!m.p("tree").exists());
    m.unmount(&env);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&env.ok(&["ls", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["edit.txt", "empty", "z", "z/b", "z/b/c", "z/b/c/moved.bin"]);
    let out = env.path("back.bin");
    env.ok(&["get", "z/b/c/moved.bin", "-o", out.to_str().unwrap()]);
    ok(Command::new("cmp").arg(&src).arg(&out));
    env.ok(&["verify"]);
    // Remounted: the files are there, and so is the empty directory.
    let m = Mounted::start(&env, &[]);
    assert_eq!(std::fs::read(m.p("edit.txt")).unwrap(), b"hel");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(m.p("edit.txt")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(m.p("empty").is_dir());
    m.unmount(&env);
}

/// What users see of a file written through the mount (size, content, mtime and ctime to the nanosecond) is what
/// a remount shows: with the kernel's writeback cache the kernel keeps the times of a file being written and sends
/// them on before the close, and a partial-page write into a write-only file makes the kernel read the page first.
#[test]
fn mount_keeps_the_times_and_bytes_users_saw_with_and_without_the_writeback_cache() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    if !fuse_usable() {
        return;
    }
    for extra in [&[][..], &["--no-writeback-cache"][..]] {
        let env = Env::new();
        env.init(4, 2);
        let mut base = data(3 * SEG + 100, 9);
        env.write("base.bin", &base);
        env.ok(&["commit", "base.bin"]);
        let m = Mounted::start(&env, extra);
        // New file: several writes, the last one past a hole.
        let mut f = std::fs::File::create(m.p("new.bin")).unwrap();
        let mut want = data(2 * SEG + 1234, 3);
        f.write_all(&want).unwrap();
        f.seek(SeekFrom::Start(5 * SEG as u64)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        want.resize(5 * SEG, 0);
        want.extend_from_slice(b"end");
        // Committed file: a few bytes in the middle of a page through a write-only handle, then an append.
        let mut f = std::fs::OpenOptions::new().write(true).open(m.p("base.bin")).unwrap();
        f.seek(SeekFrom::Start(5000)).unwrap();
        f.write_all(b"XYZ").unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().append(true).open(m.p("base.bin")).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        base[5000..5003].copy_from_slice(b"XYZ");
        base.extend_from_slice(b"tail");
        let seen = |m: &Mounted, name: &str| {
            let md = std::fs::metadata(m.p(name)).unwrap();
            (md.len(), md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec())
        };
        let before = (seen(&m, "new.bin"), seen(&m, "base.bin"));
        assert_eq!(std::fs::read(m.p("new.bin")).unwrap(), want, "{extra:?}");
        assert_eq!(std::fs::read(m.p("base.bin")).unwrap(), base, "{extra:?}");
        m.unmount(&env);
        let m = Mounted::start(&env, extra);
        assert_eq!((seen(&m, "new.bin"), seen(&m, "base.bin")), before, "size and times after a remount {extra:?}");
        assert_eq!(std::fs::read(m.p("new.bin")).unwrap(), want, "{extra:?}");
        assert_eq!(std::fs::read(m.p("base.bin")).unwrap(), base, "{extra:?}");
        m.unmount(&env);
    }
}

#[test]
fn mount_reads_through_m_bad_shards_and_returns_eio_beyond() {
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let fixable = data(10 * SEG, 21);
    let lost = data(10 * SEG, 22);
    env.write("fixable", &fixable);
    env.ok(&["commit", "fixable"]);
    let fixable_dir = shard_dirs(&env)[0].clone();
    env.write("lost", &lost);
    env.ok(&["commit", "lost"]);
    let lost_dir = shard_dirs(&env).into_iter().find(|d| *d != fixable_dir).unwrap();
    let m = Mounted::start(&env, &[]);
    // While mounted: m = 2 bad shards in one segment, one in another.
    corrupt(&env, &fixable_dir, 3, &[0, 4]);
    corrupt(&env, &fixable_dir, 6, &[2]);
    assert_eq!(std::fs::read(m.p("fixable")).unwrap(), fixable);
    // Three bad shards in segment 7: EIO there, correct bytes elsewhere, never wrong bytes.
    corrupt(&env, &lost_dir, 7, &[0, 1, 5]);
    let o = run(Command::new("cat").arg(m.p("lost")));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Input/output error"), "{o:?}");
    assert!(o.stdout.len() <= 7 * SEG && lost.starts_with(&o.stdout), "only verified bytes before the bad segment");
    let dd = |off: usize, len: usize| {
        run(Command::new("dd")
            .arg(format!("if={}", m.p("lost").display()))
            .args(["bs=4096", "iflag=skip_bytes,count_bytes", "status=none"])
            .arg(format!("skip={off}"))
            .arg(format!("count={len}")))
    };
    let o = dd(7 * SEG + 100, 10);
    assert!(!o.status.success() && o.stdout.is_empty(), "{o:?}");
    let o = dd(8 * SEG, SEG);
    assert!(o.status.success() && o.stdout == lost[8 * SEG..9 * SEG]);
    m.unmount(&env);
}

#[test]
fn mount_refuses_bad_setups_with_one_line_errors() {
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    std::fs::create_dir_all(env.path("mnt")).unwrap();
    let one_line = |err: &str, want: &str| {
        assert!(err.contains(want), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    one_line(&env.fails(&["mount", "mnt"], 1), "no BlockFrame store");
    env.init(2, 1);
    one_line(&env.fails(&["mount", "nowhere"], 1), "does not exist");
    env.write("full/x", b"x");
    one_line(&env.fails(&["mount", "full"], 1), "not empty");
    let other = Env::new();
    other.init(2, 1);
    let key = other.store().join("master.key");
    one_line(&env.fails(&["--key-file", key.to_str().unwrap(), "mount", "mnt"], 1), "wrong key");
    one_line(&env.fails(&["umount", "mnt"], 1), "not a mount point");
    assert!(!mounted(&env.path("mnt")));
}

#[test]
fn mount_read_only_signals_and_background_mode() {
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    env.init(2, 1);
    env.write("f", &data(5 * SEG, 3));
    env.ok(&["commit", "f"]);
    // Read-only: reads work, writes are refused with EROFS. SIGTERM unmounts and exits 0.
    let mut m = Mounted::start(&env, &["--read-only"]);
    assert_eq!(std::fs::read(m.p("f")).unwrap(), data(5 * SEG, 3));
    let o = sh(&format!("echo x > {}", m.p("new").display()));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only file system"), "{o:?}");
    let o = run(Command::new("rm").arg(m.p("f")));
    assert!(!o.status.success());
    let pid = m.child.as_ref().unwrap().id().to_string();
    ok(Command::new("kill").args(["-TERM", &pid]));
    m.wait_exit();
    // SIGINT with a file open for writing: it is committed before the unmount.
    let mut m = Mounted::start(&env, &[]);
    let mut writer = Command::new("sh")
        .args(["-c", &format!("exec 3>{}; printf pending >&3; sleep 30", m.p("open.txt").display())])
        .spawn()
        .unwrap();
    wait_for("the writer", || std::fs::metadata(m.p("open.txt")).is_ok_and(|md| md.len() == 7));
    let pid = m.child.as_ref().unwrap().id().to_string();
    ok(Command::new("kill").args(["-INT", &pid]));
    // The mount is busy, so it is detached; the server ends when the writer closes its file.
    wait_for("the detach", || !mounted(&m.dir));
    let _ = writer.kill();
    let _ = writer.wait();
    m.wait_exit();
    let out = env.path("open.back");
    env.ok(&["get", "open.txt", "-o", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), b"pending");
    // Background mode: `bf mount` returns once mounted; `bf umount` ends the server.
    let dir = env.path("mnt");
    env.ok(&["mount", dir.to_str().unwrap()]);
    assert!(mounted(&dir));
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), data(5 * SEG, 3));
    env.ok(&["umount", dir.to_str().unwrap()]);
    wait_for("the unmount", || !mounted(&dir));
}

/// Writes files into `dir` until the mount fails (or is no longer there); prints each name once its fsync returned. The
/// contents follow from the name, sizes from a few bytes to 300 KiB (packed and files of their own). With
/// `check` instead of a seed, reads names from stdin and prints those whose contents differ or are missing.
const CRASH_WRITER: &str = r#"
import hashlib, os, sys
def body(name):
    h = hashlib.sha256(name.encode()).digest()
    n = int.from_bytes(h[:4], "little")
    size = 300_000 if n % 17 == 0 else n % 20_000 + 1
    return (h * (size // 32 + 1))[:size]
d, mode = sys.argv[1], sys.argv[2]
if mode == "check":
    for name in sys.stdin.read().split():
        try:
            ok = open(os.path.join(d, name), "rb").read() == body(name)
        except OSError as e:
            ok = False
        if not ok:
            print(name)
    sys.exit(0)
seed, i = int(mode), 0
# Only ever into the mount: stop when the directory is no longer the file system it was at the start.
dev = os.stat(d).st_dev
try:
    while i < 200_000 and os.stat(d).st_dev == dev:
        name = f"s{seed}/d{i % 7}/f{i}"
        os.makedirs(os.path.join(d, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(body(name))
            if i % 3 == 0:
                f.flush()
                os.fsync(f.fileno())
                print(name, flush=True)
        i += 1
except OSError as e:
    print(f"stopped after {i} files: {e}", file=sys.stderr)
"#;

#[test]
fn mount_crash_keeps_every_fsynced_file() {
    if !fuse_usable() {
        return;
    }
    let iterations: u64 = std::env::var("BF_CRASH_ITERATIONS_MOUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let env = Env::new();
    env.init(4, 2);
    let script = env.write("writer.py", CRASH_WRITER.as_bytes());
    let mut kept: Vec<String> = Vec::new();
    for seed in 0..iterations {
        let m = Mounted::start(&env, &[]);
        let writer = Command::new("python3")
            .arg(&script)
            .arg(&m.dir)
            .arg(seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A different moment each round, past several flusher rounds.
        std::thread::sleep(Duration::from_millis(1000 + 500 * (seed % 4)));
        let dir = m.dir.clone();
        let out = m.kill9_then(|| writer.wait_with_output().unwrap());
        let synced: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        assert!(
            !synced.is_empty(),
            "round {seed}: nothing was fsynced before the crash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        kept.extend(synced);
        // After the crash: every file whose fsync returned, in this round and the earlier ones, is intact.
        let m = Mounted::start(&env, &[]);
        assert_eq!(m.dir, dir);
        let mut check = Command::new("python3")
            .arg(&script)
            .arg(&m.dir)
            .arg("check")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = check.stdin.take().unwrap();
            stdin.write_all(kept.join("\n").as_bytes()).unwrap();
        }
        let out = check.wait_with_output().unwrap();
        let bad = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && bad.trim().is_empty(), "round {seed}: lost or wrong after the crash: {bad}");
        m.unmount(&env);
    }
    // The catalog reads, and scrub finds the store whole after repairing what the crashes left.
    env.ok(&["ls"]);
    let _ = env.run(&["scrub", "--repair"]);
    let out = env.ok(&["scrub"]);
    assert!(out.contains("result: healthy"), "{out}");
}

/// Builds a tree with what archivers keep: modes (set-ID bits included), owners, nanosecond times on files,
/// directories and links, relative, absolute and dangling symbolic links, empty files and directories.
const TREE: &str = r#"
set -e
cd "$1"
mkdir -p a/b empty sgid deep/er/still
printf hello > a/f1
head -c 300000 /dev/urandom > a/b/big
: > zero
printf x > deep/er/still/leaf
ln -s f1 a/lnk
ln -s /etc/passwd abs
ln -s missing/target dangling
chmod 0640 a/f1; chmod 4755 zero; chmod 0750 a; chmod 2775 sgid; chmod 0700 empty
chown 1234:5678 a/f1 a/b/big sgid; chown -h 42:43 a/lnk
find . -mindepth 1 -depth -exec touch -h -d '2020-02-03 04:05:06.123456789' {} +
touch -h -d '2021-07-08 09:10:11.5' a/f1 a/lnk a
"#;

/// Every node below `dir` as one line: kind, mode, owner, mtime in nanoseconds, size (not for directories),
/// link target and path; sorted.
fn listing(dir: &Path) -> String {
    let d = dir.to_str().unwrap();
    let out = ok(Command::new("sh").arg("-c").arg(format!(
        "cd '{d}' && {{ find . -mindepth 1 -type d -printf '%y %m %U:%G %T@ - %P\\n'; \
         find . -mindepth 1 ! -type d -printf '%y %m %U:%G %T@ %s %l %P\\n'; }} | sort"
    )));
    String::from_utf8(out).unwrap()
}

#[test]
fn mount_keeps_what_tar_and_rsync_set_across_remounts() {
    if !fuse_usable() {
        return;
    }
    if !is_root() {
        eprintln!("SKIP: needs root (the tree has other owners)");
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    ok(Command::new("sh").args(["-c", TREE, "tree"]).arg(&src));
    let want = listing(&src);
    assert!(want.contains("l 777 42:43") && want.contains(" 2775 1234:5678 "), "{want}");
    let tar = env.path("src.tar");
    ok(Command::new("tar").args(["--format=posix", "--numeric-owner", "-cf"]).arg(&tar).arg("-C").arg(&src).arg("."));

    // tar x into the mount and rsync -a beside it; then unmount and mount again.
    let m = Mounted::start(&env, &[]);
    std::fs::create_dir(m.p("t")).unwrap();
    ok(Command::new("tar").args(["--numeric-owner", "-xpf"]).arg(&tar).arg("-C").arg(m.p("t")));
    // tar made placeholders for the links and unlinked them; the kernel writing back their times must not
    // fail the mount's syncfs(2).
    ok(Command::new("sync").arg("-f").arg(m.p("t")));
    ok(Command::new("rsync").args(["-a", "--numeric-ids"]).arg(format!("{}/", src.display())).arg(m.p("r")));
    assert_eq!(listing(&m.p("t")), want, "right after tar x");
    m.unmount(&env);
    let m = Mounted::start(&env, &[]);
    assert_eq!(listing(&m.p("t")), want, "tar x, after a remount");
    assert_eq!(listing(&m.p("r")), want, "rsync -a, after a remount");
    // rsync finds nothing to change, and tar c of the mount extracts to the same tree.
    let changes = ok(Command::new("rsync")
        .args(["-a", "--numeric-ids", "-n", "-i"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", m.p("r").display())));
    assert!(changes.is_empty(), "rsync would change: {}", String::from_utf8_lossy(&changes));
    let out_tar = env.path("out.tar");
    ok(Command::new("tar")
        .args(["--format=posix", "--numeric-owner", "-cf"])
        .arg(&out_tar)
        .arg("-C")
        .arg(m.p("t"))
        .arg("."));
    m.unmount(&env);
    let back = env.path("back");
    std::fs::create_dir(&back).unwrap();
    ok(Command::new("tar").args(["--numeric-owner", "-xpf"]).arg(&out_tar).arg("-C").arg(&back));
    assert_eq!(listing(&back), want, "tar c of the mount");
    ok(Command::new("diff").args(["-r", "--no-dereference"]).arg(&src).arg(&back));
    // What the store lists: directories and links are entries of their own.
    let ls = env.ok(&["ls"]);
    assert!(
        ls.contains("t/a/lnk -> f1") && ls.contains("t/empty/") && ls.contains("r/dangling -> missing/target"),
        "{ls}"
    );
}

/// xfstests' fsx (built by `scripts/test` into target/tools) on a file of up to ~9 segments through the mount:
/// reads, writes, truncations, fallocate (keep-size, punch-hole, zero-range), copy_file_range and mmap, each read
/// checked against fsx's own model; then with closes and fsyncs every few operations, so reads come from what
/// was committed. The last contents survive unmounting.
#[test]
fn fsx_on_the_mount_with_files_spanning_segments() {
    let fsx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/fs-exercisers/fsx");
    if !fsx.exists() {
        eprintln!("SKIP: fsx is not built (scripts/test builds it into target/tools when ../shared has it)");
        return;
    }
    if !fuse_usable() {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let m = Mounted::start(&env, &[]);
    let max = (9 * SEG + 4321).to_string();
    ok(Command::new(&fsx).args(["-N", "2000", "-l", &max, "-S", "7", "-q"]).arg(m.p("a")));
    ok(Command::new(&fsx).args(["-N", "300", "-l", &max, "-S", "9", "-c", "10", "-y", "-q"]).arg(m.p("b")));
    let want = [sha256(&m.p("a")), sha256(&m.p("b"))];
    m.unmount(&env);
    for (name, want) in ["a", "b"].iter().zip(want) {
        let out = env.path(&format!("{name}.out"));
        env.ok(&["get", name, "-o", out.to_str().unwrap()]);
        assert_eq!(sha256(&out), want, "{name} after unmounting");
    }
    let m = Mounted::start(&env, &[]);
    assert!(std::fs::metadata(m.p("a")).unwrap().len() > 0);
    m.unmount(&env);
}

/// The value of an unlabelled sample in a Prometheus text exposition.
pub(crate) fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `/metrics` URL a server printed on stderr (`bf: metrics on http://ADDR/metrics`).
pub(crate) fn metrics_url(log: &str) -> Option<String> {
    let i = log.find("metrics on ")?;
    log[i + "metrics on ".len()..].split_whitespace().next().map(str::to_string)
}

#[test]
fn mount_metrics_count_cache_hits_and_misses() {
    if !fuse_usable() || !crate::nbd::have("curl") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(SEG * 3, 31);
    let src = env.write("src.bin", &bytes);
    env.ok(&["commit", src.to_str().unwrap(), "--name", "f.bin"]);
    let m = Mounted::start(&env, &["--metrics-listen", "127.0.0.1:0"]);
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    let url = metrics_url(&log).unwrap_or_else(|| panic!("no metrics address in the log: {log}"));
    let scrape = || String::from_utf8_lossy(&ok(Command::new("curl").args(["-sf", &url]))).into_owned();
    let before = scrape();
    assert_eq!(metric(&before, "bf_mount_cache_misses_total"), Some(0), "{before}");
    assert_eq!(metric(&before, "bf_mount_cache_capacity_bytes"), Some(128 << 20), "{before}");
    // Two whole reads, the kernel's page cache of the file dropped between them (dd's fadvise DONTNEED), so
    // the second reaches the server and finds every segment in its cache.
    let f = m.p("f.bin");
    assert!(std::fs::read(&f).unwrap() == bytes);
    ok(Command::new("dd").arg(format!("if={}", f.display())).args(["iflag=nocache", "count=0", "status=none"]));
    assert!(std::fs::read(&f).unwrap() == bytes);
    let after = scrape();
    let hits = metric(&after, "bf_mount_cache_hits_total").unwrap_or(0);
    let misses = metric(&after, "bf_mount_cache_misses_total").unwrap_or(0);
    let ahead = metric(&after, "bf_mount_cache_read_ahead_loads_total").unwrap_or(0);
    assert_eq!(misses + ahead, 3, "each of the three segments loaded once:\n{after}");
    assert!(hits >= 3, "the second read hit the cache:\n{after}");
    assert_eq!(metric(&after, "bf_mount_segments_decoded_total"), Some(3), "{after}");
    m.unmount(&env);
}

#[test]
fn mount_metrics_count_segments_rebuilt_on_the_fly() {
    if !fuse_usable() || !crate::nbd::have("curl") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(SEG * 2, 32);
    let id = env.commit_file("f.bin", &bytes);
    let m = Mounted::start(&env, &["--metrics-listen", "127.0.0.1:0"]);
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    let url = metrics_url(&log).unwrap_or_else(|| panic!("no metrics address in the log: {log}"));
    let scrape = || String::from_utf8_lossy(&ok(Command::new("curl").args(["-sf", &url]))).into_owned();
    let before = scrape();
    assert_eq!(metric(&before, "bf_read_stripes_rebuilt_total"), Some(0), "{before}");
    // Data shard 3 of segment 1 lost while mounted: the mount rebuilds that segment from parity, once (cached).
    std::fs::remove_file(env.shard_file(&id, 1, 3)).unwrap();
    assert!(std::fs::read(m.p("f.bin")).unwrap() == bytes);
    let after = scrape();
    assert_eq!(metric(&after, "bf_read_stripes_rebuilt_total"), Some(1), "{after}");
    assert_eq!(crate::serve::sample(&after, "bf_read_shard_failures_total{reason=\"missing\"}"), Some(1), "{after}");
    assert_eq!(metric(&after, "bf_read_stripes_lost_total"), Some(0), "{after}");
    m.unmount(&env);
}
