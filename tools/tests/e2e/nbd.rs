//! `bf volume` + `bf nbd serve` driven by real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio,
//! nbdfuse + mkfs.ext4/e2fsck, and kill -9 crash loops (raw NBD writes; ext4 with a workload running).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{data, Env};

/// True when `tool` is on PATH; otherwise prints why the test is skipped (scripts/test installs them all).
pub(crate) fn have(tool: &str) -> bool {
    let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (scripts/test installs it)");
    }
    ok
}

/// nbdsh with Debian's python (which has the libnbd bindings) first on PATH.
fn nbdsh() -> Command {
    let mut c = Command::new("nbdsh");
    c.env("PATH", format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c
}

pub(crate) struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Server {
        let socket = env.path("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        Server::start_on(env, socket, extra)
    }

    /// Starts `bf nbd serve --socket SOCKET` and waits until it accepts connections.
    pub(crate) fn start_on(env: &Env, socket: PathBuf, extra: &[&str]) -> Server {
        let child = env
            .bf()
            .args(["nbd", "serve", "--socket", socket.to_str().unwrap()])
            .args(extra)
            .env("BF_LOG", "info")
            .stderr(env.log_file())
            .spawn()
            .expect("starting bf nbd serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server did not start:\n{}", env.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM: in-flight requests finish, volumes are flushed, the process exits 0.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit status {status}");
    }

    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn volume_env(size: &str) -> Env {
    let env = Env::new();
    env.init(4, 2);
    env.ok(&["volume", "create", "disk", "--size", size]);
    env
}

#[test]
fn qemu_io_qemu_img_nbdcopy_and_nbdinfo() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let env = volume_env("96M");
    env.ok(&["volume", "create", "second", "--size", "8M", "--stripe-size", "64K"]);
    let srv = Server::start(&env, &[]);
    let list = ok(Command::new("nbdinfo").args(["--list", "--json", &srv.uri("")]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2);
    let disk = exports.iter().find(|e| e["export-name"] == "disk").unwrap();
    assert_eq!(disk["export-size"], 96u64 << 20);
    for flag in ["can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"] {
        assert_eq!(disk[flag], true, "{flag}");
    }
    assert_eq!(disk["is_read_only"], false);
    assert_eq!(disk["block_size_preferred"], 4096);
    assert!(disk["block_size_maximum"].as_u64().unwrap() >= 32 << 20);
    // Pattern I/O at odd offsets and lengths, discard, write-zeroes.
    let uri = srv.uri("disk");
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1000 5000",
        "-c",
        "read -P 0xab 1000 5000",
        "-c",
        "write -P 0x17 1048000 3000",
        "-c",
        "read -P 0x17 1048000 3000",
        "-c",
        "write -z 3000 1000",
        "-c",
        "read -P 0 3000 1000",
        "-c",
        "read -P 0xab 1000 2000",
        "-c",
        "discard 4M 2M",
        "-c",
        "read -P 0 4M 2M",
        "-c",
        "flush",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A multi-ten-MiB image in and out with qemu-img, then nbdcopy back out.
    let img = env.write("img.raw", &data(40 << 20, 9));
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(&uri));
    let cmp = ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(&uri));
    assert!(cmp.contains("identical") || cmp.is_empty() || cmp.contains("Images are identical"), "{cmp}");
    let out_path = env.path("out.raw");
    ok(Command::new("nbdcopy").arg(&uri).arg(&out_path));
    let back = std::fs::read(&out_path).unwrap();
    assert_eq!(&back[..40 << 20], &std::fs::read(&img).unwrap()[..]);
    assert!(back[40 << 20..].iter().all(|b| *b == 0));
    srv.stop();
    // Everything flushed at SIGTERM survives a restart.
    let srv = Server::start(&env, &["--read-only"]);
    ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(srv.uri("disk")));
    srv.stop();
}

#[test]
fn nbdsh_errors_holes_and_simple_replies() {
    if !have("nbdsh") {
        return;
    }
    let env = volume_env("16M");
    let script = r#"
import errno, os
def expect_err(f, code):
    try:
        f()
    except nbd.Error as e:
        assert e.errno == errno.errorcode[code], (e.errno, code, e)
        return
    raise AssertionError("expected errno %d" % code)
size = h.get_size()
assert size == 16 << 20
expect_err(lambda: h.pread(4096, size - 100), errno.EINVAL)
if h.is_read_only():
    expect_err(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
    expect_err(lambda: h.trim(4096, 0), errno.EPERM)
else:
    h.pwrite(b"\x55" * 8192, 3 << 20)
    h.flush()
    assert h.pread(8192, 3 << 20) == b"\x55" * 8192
if h.can_meta_context("base:allocation"):
    ext = []
    def cb(meta, off, entries, err):
        ext.extend(entries)
    h.block_status(2 << 20, 0, cb)
    # First extent: the unwritten 1 MiB stripe at 0 is a hole that reads as zeros (flags 3).
    assert ext[1] == 3, ext
print("ok")
"#;
    for (extra, structured) in [(&[][..], "True"), (&[][..], "False"), (&["--read-only"][..], "True")] {
        let srv = Server::start(&env, extra);
        let full = format!(
            "h = nbd.NBD()\nh.set_strict_mode(0)\nh.set_request_structured_replies({structured})\nh.add_meta_context('base:allocation')\nh.connect_uri('{}')\n{script}",
            srv.uri("disk")
        );
        let out = ok(nbdsh().args(["-n", "-c", &full]));
        assert!(out.contains("ok"), "{out}");
        srv.stop();
    }
}

/// fio random read/write with crc32c verification over a working set many times the volume cache (1 MiB:
/// 16 map pages of 16 MiB each and 16 stripe records, against 320 MiB: 20 map pages and 80 stripes).
#[test]
fn fio_random_read_write_with_verify() {
    if !have("fio") {
        return;
    }
    let env = volume_env("512M");
    let srv = Server::start(&env, &["--cache-mb", "1"]);
    let out = ok(Command::new("fio").current_dir(env.dir.path()).args([
        "--name=bfverify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
        "--rw=randrw",
        "--bs=4k",
        "--size=320M",
        "--fsync=64",
        "--iodepth=8",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0);
    srv.stop();
}

#[test]
fn ext4_through_nbdfuse_survives_restart() {
    if !have("nbdfuse") || !have("mkfs.ext4") || !have("e2fsck") || !have("debugfs") || !crate::util::is_root() {
        return;
    }
    let env = volume_env("64M");
    let mnt = env.path("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    let with_fuse = |srv: &Server, f: &dyn Fn(&PathBuf)| {
        let mut fuse = Command::new("nbdfuse").arg(&mnt).arg(srv.uri("disk")).spawn().unwrap();
        let file = mnt.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        f(&file);
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        let _ = fuse.wait();
    };
    let payload = env.write("hello.bin", &data(300_000, 5));
    let srv = Server::start(&env, &[]);
    with_fuse(&srv, &|file| {
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(file));
        ok(Command::new("debugfs").args(["-w", "-R"]).arg(format!("write {} hello.bin", payload.display())).arg(file));
    });
    srv.stop();
    let srv = Server::start(&env, &["--read-only"]);
    with_fuse(&srv, &|file| {
        ok(Command::new("e2fsck").args(["-fn"]).arg(file));
        let back = env.path("hello.back");
        ok(Command::new("debugfs").args(["-R"]).arg(format!("dump hello.bin {}", back.display())).arg(file));
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&payload).unwrap());
    });
    srv.stop();
}

/// kill -9 at random moments: every block written before a completed FLUSH must read back; blocks written
/// after it read either as before or as written, never anything else. Then lose m locations and check again.
#[test]
fn crash_loop_keeps_every_flushed_write() {
    if !have("nbdsh") {
        return;
    }
    let iterations: u64 = std::env::var("BF_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let env = volume_env("256M");
    let region = 4u64 << 20;
    let writer = r#"
import sys, random
it = int(sys.argv[1]); base = it * REGION
rnd = random.Random(it)
blocks = rnd.sample(range(REGION // 4096), 48)
flushed, later = blocks[:24], blocks[24:]
for b in flushed:
    h.pwrite(bytes([it % 251 + 1]) * 4096, base + b * 4096)
h.flush()
print("FLUSHED", flush=True)
for b in later:
    h.pwrite(bytes([(it % 251) + 2]) * 4096, base + b * 4096)
"#
    .replace("REGION", &region.to_string());
    let checker = r#"
import sys, random
for it in range(int(sys.argv[1])):
    base = it * REGION
    rnd = random.Random(it)
    blocks = rnd.sample(range(REGION // 4096), 48)
    flushed, later = blocks[:24], blocks[24:]
    for b in flushed:
        assert h.pread(4096, base + b * 4096) == bytes([it % 251 + 1]) * 4096, ("flushed block lost", it, b)
    for b in later:
        got = h.pread(4096, base + b * 4096)
        assert got in (b"\0" * 4096, bytes([(it % 251) + 2]) * 4096), ("torn or garbage block", it, b)
print("ok")
"#
    .replace("REGION", &region.to_string());
    let mut rng = 0x1234_5678_9abc_def0u64 ^ iterations;
    for it in 0..iterations.min(64) {
        let srv = Server::start(&env, &[]);
        let script = format!(
            "h = nbd.NBD()\nh.connect_uri('{}')\nimport sys\nsys.argv = ['w', '{it}']\n{writer}",
            srv.uri("disk")
        );
        let mut w = nbdsh().args(["-n", "-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        // Wait for the flush to complete, then kill the server at a random moment of the unflushed writes.
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(w.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "FLUSHED", "iteration {it}");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 40));
        srv.kill9();
        let _ = w.wait();
    }
    let check = |what: &str| {
        let srv = Server::start(&env, &["--read-only"]);
        let script = format!(
            "h = nbd.NBD()\nh.connect_uri('{}')\nimport sys\nsys.argv = ['c', '{}']\n{checker}",
            srv.uri("disk"),
            iterations.min(64)
        );
        let o = nbdsh().args(["-n", "-c", &script]).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("ok"),
            "{what}: {out}{}\nserver log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            env.log_tail()
        );
        srv.stop();
    };
    check("after crashes");
    std::fs::remove_dir_all(env.location(1)).unwrap();
    std::fs::remove_dir_all(env.location(4)).unwrap();
    check("after losing m locations");
}

/// `bf scrub` walks volumes too: every shard of every stripe lost on one location and corrupt on another (m = 2)
/// is found (exit 3) and repaired, and a second scrub is clean; the data served afterwards is unchanged.
#[test]
fn scrub_repairs_volume_shards() {
    if !have("qemu-img") {
        return;
    }
    let env = volume_env("16M");
    let img = env.write("img.raw", &data(10 << 20, 21));
    let srv = Server::start(&env, &[]);
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(srv.uri("disk")));
    // While served, scrub verifies but cannot repair.
    let o = env.run(&["scrub", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["volumes"][0]["exclusive"], false);
    assert!(v["volumes"][0]["stripes"].as_u64().unwrap() >= 3, "10 MiB in stripes of 4 MiB: {v}");
    srv.stop();
    // Lose every volume shard on one location.
    let shards = crate::util::files_under(&env.location(2).join("logvol"));
    let mut removed = 0;
    for f in shards.iter().filter(|p| p.to_string_lossy().contains("/log/")) {
        std::fs::remove_file(f).unwrap();
        removed += 1;
    }
    assert!(removed > 0);
    // And corrupt every volume shard on a second location (m = 2): a byte flipped in its data part.
    let mut corrupted = 0;
    for f in crate::util::files_under(&env.location(4).join("logvol"))
        .iter()
        .filter(|p| p.to_string_lossy().contains("/log/"))
    {
        let mut bytes = std::fs::read(f).unwrap();
        let at = 128 + (bytes.len() - 128) / 3;
        bytes[at] ^= 0x5a;
        std::fs::write(f, bytes).unwrap();
        corrupted += 1;
    }
    assert!(corrupted > 0);
    let o = env.run(&["scrub", "--repair", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stdout));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["volumes"][0]["shards"]["missing"], removed);
    assert_eq!(v["volumes"][0]["shards"]["corrupt"], corrupted);
    assert_eq!(v["volumes"][0]["shards_repaired"], removed + corrupted);
    env.ok(&["scrub"]);
    let srv = Server::start(&env, &["--read-only"]);
    ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(srv.uri("disk")));
    srv.stop();
}

#[test]
fn metrics_count_volume_stripes_rebuilt_on_the_fly() {
    if !have("qemu-img") || !have("curl") {
        return;
    }
    let env = volume_env("16M");
    let img = env.write("img.raw", &data(10 << 20, 22));
    let srv = Server::start(&env, &[]);
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(srv.uri("disk")));
    srv.stop();
    // One shard of every stripe lost (those that are data shards make reads rebuild their stripe).
    let lost: Vec<PathBuf> = crate::util::files_under(&env.location(2).join("logvol"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/log/"))
        .collect();
    assert!(lost.len() >= 3, "10 MiB in stripes of 4 MiB: {lost:?}");
    lost.iter().for_each(|f| std::fs::remove_file(f).unwrap());
    let srv = Server::start(&env, &["--read-only", "--metrics-listen", "127.0.0.1:0"]);
    let url = crate::mount::metrics_url(&env.log_tail()).expect("no metrics address in the log");
    let scrape = || ok(Command::new("curl").args(["-sf", &url]));
    let missing = |t: &str| crate::serve::sample(t, "bf_read_shard_failures_total{reason=\"missing\"}");
    let before = scrape();
    assert_eq!(missing(&before), Some(0), "{before}");
    assert_eq!(crate::mount::metric(&before, "bf_read_stripes_rebuilt_total"), Some(0), "{before}");
    ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(srv.uri("disk")));
    let after = scrape();
    let rebuilt = crate::mount::metric(&after, "bf_read_stripes_rebuilt_total").unwrap_or(0);
    // Three stripes in a row place a data shard on any one location at least once; each read of blocks in the
    // lost shard rebuilds the stripe (finding that one shard missing).
    assert!(rebuilt >= 1, "{after}");
    assert_eq!(missing(&after), Some(rebuilt), "{after}");
    assert_eq!(crate::mount::metric(&after, "bf_read_stripes_lost_total"), Some(0), "{after}");
    assert!(after.contains("# TYPE bf_scrub_last_timestamp_seconds gauge"), "{after}");
    srv.stop();
}

/// xfstests' fsx and fsstress (built by `scripts/test` from `../shared/third_party/fs-exercisers`) on ext4 over a
/// log volume, through nbdfuse and a loop device, with a real tree copied in first; then, after a server
/// restart, `e2fsck -fn` is clean and the tree reads back equal.
#[test]
fn fsx_and_fsstress_on_ext4_over_a_volume() {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/fs-exercisers");
    let (fsx, fsstress) = (tools.join("fsx"), tools.join("fsstress"));
    if !have("nbdfuse") || !have("losetup") || !have("mkfs.ext4") || !crate::util::is_root() {
        eprintln!("skipped: needs root, nbdfuse, losetup and mkfs.ext4");
        return;
    }
    let exercisers = fsx.exists() && fsstress.exists();
    if !exercisers {
        eprintln!("fsx and fsstress skipped: scripts/test builds them into target/tools when ../shared has them");
    }
    let env = volume_env("256M");
    // A real tree (this crate's sources) is copied in first and compared after the restart.
    let tree = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (fuse, mnt) = (env.path("fuse"), env.path("mnt"));
    std::fs::create_dir_all(&fuse).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let run = |srv: &Server, f: &dyn Fn(&str)| {
        let mut nbdfuse = Command::new("nbdfuse").arg(&fuse).arg(srv.uri("disk")).spawn().unwrap();
        let file = fuse.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        let loopdev = ok(Command::new("losetup").args(["--find", "--show"]).arg(&file)).trim().to_string();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&loopdev)));
        let _ = Command::new("umount").arg(&mnt).status();
        let _ = Command::new("losetup").args(["-d", &loopdev]).status();
        // The loop device lets go of the nbdfuse file asynchronously: until it has, the unmount is refused
        // (busy). Retry, then detach lazily; never wait on nbdfuse for ever.
        let unmounted = (0..50).any(|_| {
            let done = Command::new("fusermount3").arg("-u").arg(&fuse).status().is_ok_and(|s| s.success());
            if !done {
                std::thread::sleep(Duration::from_millis(200));
            }
            done
        });
        if !unmounted {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&fuse).status();
        }
        let _ = wait_within(&mut nbdfuse, Duration::from_secs(30));
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    };
    let srv = Server::start(&env, &[]);
    run(&srv, &|dev| {
        ok(Command::new("mkfs.ext4").args(["-q", "-F", dev]));
        ok(Command::new("mount").arg(dev).arg(&mnt));
        ok(Command::new("cp").arg("-a").arg(&tree).arg(mnt.join("tree")));
        if exercisers {
            ok(Command::new(&fsstress).arg("-d").arg(mnt.join("stress")).args(["-n", "1500", "-p", "4", "-s", "7"]));
            ok(Command::new(&fsx).args(["-N", "3000", "-S", "11", "-q"]).arg(mnt.join("fsx.file")));
        }
        ok(Command::new("umount").arg(&mnt));
    });
    srv.stop();
    let srv = Server::start(&env, &["--read-only"]);
    run(&srv, &|dev| {
        ok(Command::new("e2fsck").args(["-fn", dev]));
        ok(Command::new("mount").args(["-o", "ro,noload"]).arg(dev).arg(&mnt));
        ok(Command::new("diff").arg("-r").arg(&tree).arg(mnt.join("tree")));
        ok(Command::new("umount").arg(&mnt));
    });
    srv.stop();
}

/// A child waited for at most `limit`; killed (and `None` returned) when it takes longer.
fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with its output captured, killed after `limit`: (exit 0, stdout and stderr).
fn run_within(cmd: &mut Command, limit: Duration) -> (bool, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_within(&mut child, limit);
    let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    match status {
        Some(s) => (s.success(), format!("{s}\n{text}")),
        None => (false, format!("timed out after {limit:?}, killed\n{text}")),
    }
}

/// [`run_within`] that must succeed; the failure message has the output and the server log.
fn must(env: &Env, cmd: &mut Command, limit: Duration) -> String {
    let (success, text) = run_within(cmd, limit);
    assert!(success, "{cmd:?} failed: {text}\nserver log:\n{}", env.log_tail());
    text
}

/// A volume's export as a block device: nbdfuse's file behind a loop device, ext4 mounted (or not) at `mnt`.
/// Tearing down never hangs when the server is gone: lazy unmounts, then nbdfuse is killed if it does not exit,
/// which aborts its FUSE connection (so does `/sys/fs/fuse/connections/N/abort`, when fusectl is mounted), so
/// every request blocked on the dead device fails.
struct Disk {
    nbdfuse: Child,
    dev: String,
    fuse: PathBuf,
    mnt: PathBuf,
    conn: PathBuf,
    down: bool,
}

impl Disk {
    fn attach(env: &Env, srv: &Server, fuse: &std::path::Path, mnt: &std::path::Path) -> Disk {
        use std::os::unix::fs::MetadataExt;
        let root_dev = std::fs::metadata(fuse).unwrap().dev();
        let mut nbdfuse = Command::new("nbdfuse")
            .arg(fuse)
            .arg(srv.uri("disk"))
            .stdin(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(env.path("nbdfuse.log")).unwrap())
            .spawn()
            .unwrap();
        let file = fuse.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            if let Some(status) = nbdfuse.try_wait().unwrap() {
                panic!("nbdfuse exited with {status}\nserver log:\n{}", env.log_tail());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not mount\nserver log:\n{}", env.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        // The FUSE connection's directory is named by the kernel dev_t (major << 20 | minor) of the mount.
        let d = std::fs::metadata(fuse).unwrap().dev();
        assert_ne!(d, root_dev, "nbdfuse file visible but {} is not a mount", fuse.display());
        let conn = PathBuf::from(format!("/sys/fs/fuse/connections/{}", (libc::major(d) << 20) | libc::minor(d)));
        let mut disk =
            Disk { nbdfuse, dev: String::new(), fuse: fuse.to_path_buf(), mnt: mnt.to_path_buf(), conn, down: false };
        let (success, out) =
            run_within(Command::new("losetup").args(["--find", "--show"]).arg(&file), Duration::from_secs(30));
        assert!(success, "losetup: {out}");
        disk.dev = out.lines().nth(1).unwrap_or_default().trim().to_string();
        assert!(disk.dev.starts_with("/dev/loop"), "losetup printed {out}");
        disk
    }

    /// Kills nbdfuse, which aborts the FUSE connection: whatever is blocked on the loop device fails with an error.
    fn abort(&mut self) {
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
        let _ = std::fs::write(self.conn.join("abort"), "1");
    }

    /// Unmounts ext4 (lazily: its device may be dead), detaches the loop device, unmounts nbdfuse and waits for it;
    /// returns what did not go cleanly.
    fn teardown(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        if std::mem::replace(&mut self.down, true) {
            return notes;
        }
        let t = Duration::from_secs(20);
        let mounted = |p: &PathBuf| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
        };
        if mounted(&self.mnt) {
            let (success, out) = run_within(Command::new("umount").arg("-l").arg(&self.mnt), t);
            if !success {
                notes.push(format!("umount -l ext4: {out}"));
            }
        }
        if !self.dev.is_empty() {
            let (success, out) = run_within(Command::new("losetup").args(["-d", &self.dev]), t);
            if !success {
                notes.push(format!("losetup -d: {out}"));
            }
        }
        let (success, _) = run_within(Command::new("fusermount3").arg("-u").arg(&self.fuse), t);
        if !success {
            notes.push("fusermount3 -u failed (busy), unmounted lazily".into());
            let _ = run_within(Command::new("umount").arg("-l").arg(&self.fuse), t);
        }
        if wait_within(&mut self.nbdfuse, Duration::from_secs(10)).is_none() {
            notes.push("nbdfuse did not exit within 10 s, killed".into());
        }
        if self.conn.exists() {
            let _ = std::fs::write(self.conn.join("abort"), "1");
        }
        // The loop device is released once the (lazily unmounted) ext4 instance lets go of it.
        if let Some(name) = self.dev.strip_prefix("/dev/") {
            let attached = PathBuf::from(format!("/sys/block/{name}/loop"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while attached.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if attached.exists() {
                notes.push(format!("{} still attached 30 s after losetup -d", self.dev));
            }
        }
        notes
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// xorshift64: the crash loop's kill moments and workload choices, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The ext4 crash loop's workload, in `dir` on the volume: creates files, replaces some (a temporary file renamed
/// over them) and deletes some, each made durable with fsync of the file and of the directory. Only after that
/// returns is the operation appended to `log` (outside the volume, fsynced): `+ NAME LEN HASH` (the file has
/// exactly this content) or `- NAME` (it is gone). Before a rename or an unlink, `? NAME LEN HASH` / `? NAME -`
/// records the state it may leave if the crash comes before the `+`/`-` line. Runs until an operation fails (the
/// server was killed) or `stop`; returns the operations logged and what stopped it.
fn ext4_workload(
    dir: PathBuf,
    log: PathBuf,
    seed: u64,
    it: u64,
    mut live: Vec<String>,
    stop: &AtomicBool,
) -> (u64, String) {
    use std::io::Write;
    let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("workload log");
    let mut note = |line: String| {
        logf.write_all(line.as_bytes()).expect("writing the workload log");
        logf.sync_all().expect("fsync of the workload log");
    };
    let mut rng = Rng((seed ^ it.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
    let sync_dir = |d: &std::path::Path| std::fs::File::open(d)?.sync_all();
    let write_durably = |path: &std::path::Path, bytes: &[u8]| -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    let mut ops = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            return (ops, "stopped".into());
        }
        let r = rng.next();
        let len = match r % 4 {
            0 => (r >> 8) & 4095,
            1 => (r >> 8) & 65535,
            _ => (r >> 8) & 262143,
        } as usize;
        let bytes = data(len, rng.next());
        let hash = blake3::hash(&bytes).to_hex();
        let choice = (r >> 40) & 15;
        let result = if live.len() < 4 || (choice < 10 && live.len() < 300) {
            let name = format!("i{it}-{ops}");
            write_durably(&dir.join(&name), &bytes).and_then(|_| sync_dir(&dir)).map(|_| {
                note(format!("+ {name} {len} {hash}\n"));
                live.push(name);
            })
        } else if choice < 14 {
            let name = live[(r >> 20) as usize % live.len()].clone();
            let tmp = dir.join(format!("{name}.tmp"));
            write_durably(&tmp, &bytes)
                .map(|_| note(format!("? {name} {len} {hash}\n")))
                .and_then(|_| std::fs::rename(&tmp, dir.join(&name)))
                .and_then(|_| sync_dir(&dir))
                .map(|_| note(format!("+ {name} {len} {hash}\n")))
        } else {
            let name = live.swap_remove((r >> 20) as usize % live.len());
            note(format!("? {name} -\n"));
            std::fs::remove_file(dir.join(&name)).and_then(|_| sync_dir(&dir)).map(|_| note(format!("- {name}\n")))
        };
        if let Err(e) = result {
            return (ops, e.to_string());
        }
        ops += 1;
    }
}

/// Checks every file the workload log names against the files in `dir`: exactly the logged content (or the
/// logged state of an operation that was under way at the crash), deleted ones absent. Records what an
/// interrupted operation left (it is durable now) and returns the files that exist.
fn check_ext4_log(env: &Env, dir: &std::path::Path, log: &std::path::Path, what: &str) -> Vec<String> {
    use std::collections::BTreeMap;
    type State = Option<(usize, String)>;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut want: BTreeMap<String, (State, Option<State>)> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let state =
            |i: usize| -> State { (f.get(i) != Some(&"-")).then(|| (f[i].parse().unwrap(), f[i + 1].to_string())) };
        match f[0] {
            "+" => {
                want.insert(f[1].to_string(), (state(2), None));
            }
            "-" => {
                want.insert(f[1].to_string(), (None, None));
            }
            "?" => want.entry(f[1].to_string()).or_insert((None, None)).1 = Some(state(2)),
            _ => panic!("bad workload log line {line:?}"),
        }
    }
    let mut bad = Vec::new();
    let mut resolved = String::new();
    let mut live = Vec::new();
    for (name, (committed, pending)) in &want {
        let found: State = match std::fs::read(dir.join(name)) {
            Ok(b) => Some((b.len(), blake3::hash(&b).to_hex().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                bad.push(format!("{name}: read error {e}"));
                continue;
            }
        };
        let show = |s: &State| match s {
            Some((len, hash)) => format!("{len} bytes {}", &hash[..16]),
            None => "absent".into(),
        };
        if found != *committed && pending.as_ref() != Some(&found) {
            let zeros = std::fs::read(dir.join(name)).is_ok_and(|b| !b.is_empty() && b.iter().all(|x| *x == 0));
            bad.push(format!(
                "{name}: logged {}{}, found {}{}",
                show(committed),
                pending.as_ref().map(|p| format!(" (or {})", show(p))).unwrap_or_default(),
                show(&found),
                if zeros { " (all zeros)" } else { "" }
            ));
            continue;
        }
        if pending.is_some() {
            resolved += &match &found {
                Some((len, hash)) => format!("+ {name} {len} {hash}\n"),
                None => format!("- {name}\n"),
            };
        }
        if found.is_some() {
            live.push(name.clone());
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} logged files wrong:\n{}\nworkload log tail:\n{}\nserver log:\n{}",
        bad.len(),
        want.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
        lines[lines.len().saturating_sub(12)..].join("\n"),
        env.log_tail()
    );
    if !resolved.is_empty() {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        f.write_all(resolved.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    live
}

/// kill -9 of the server while a filesystem workload runs: ext4 on a volume (nbdfuse + loop), a thread creating,
/// replacing and deleting files with fsync, logging each operation outside the volume once it is durable. After
/// each kill: tear down (the loop device and nbdfuse see errors), restart the server, mount (which replays the
/// journal), every logged file must have exactly its logged content, and after umount `e2fsck -fn` must be clean.
/// The filesystem carries over from one iteration to the next, so every check covers all earlier ones too.
/// `BF_CRASH_ITERATIONS_EXT4` (default 3) sets the number of crashes; soak runs use 20 or more:
/// `BF_CRASH_ITERATIONS_EXT4=20 cargo test -p bf --test e2e ext4_crash -- --nocapture`. `BF_CRASH_SEED_EXT4`
/// (decimal) changes the seed of the kill moments and of the workload. This kills the process, not the machine:
/// what the server wrote to its locations but did not sync yet survives in the page cache, so lost syncs (power
/// loss) are not tested here; lost, unsealed or unreplayed writes are.
#[test]
fn ext4_crash_loop_keeps_every_fsynced_file() {
    if !crate::util::is_root()
        || !have("nbdfuse")
        || !have("losetup")
        || !have("fusermount3")
        || !have("mkfs.ext4")
        || !have("e2fsck")
    {
        eprintln!("skipped: needs root, nbdfuse, losetup, fusermount3, mkfs.ext4 and e2fsck");
        return;
    }
    let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let iterations = var("BF_CRASH_ITERATIONS_EXT4", 3).max(1);
    let seed = var("BF_CRASH_SEED_EXT4", 1_592_648_820);
    eprintln!("ext4 crash loop: {iterations} crashes, BF_CRASH_SEED_EXT4={seed}");
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let env = volume_env("256M");
    let (fuse, mnt) = (env.path("fuse"), env.path("mnt"));
    std::fs::create_dir_all(&fuse).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let (log, dir) = (env.path("ext4-workload.log"), mnt.join("w"));
    let minute = Duration::from_secs(60);
    let mut live = Vec::new();
    let started = Instant::now();
    for it in 0..=iterations {
        let round = Instant::now();
        let srv = Server::start(&env, &[]);
        let mut disk = Disk::attach(&env, &srv, &fuse, &mnt);
        if it == 0 {
            must(&env, Command::new("mkfs.ext4").args(["-q", "-F", &disk.dev]), minute);
            must(&env, Command::new("mount").arg(&disk.dev).arg(&mnt), minute);
            std::fs::create_dir(&dir).unwrap();
            std::fs::File::open(&dir).unwrap().sync_all().unwrap();
            std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
        } else {
            // Mounting replays the journal left by the crash.
            must(&env, Command::new("mount").arg(&disk.dev).arg(&mnt), minute);
            live = check_ext4_log(&env, &dir, &log, &format!("after crash {it} (BF_CRASH_SEED_EXT4={seed})"));
            must(&env, Command::new("umount").arg(&mnt), minute);
            must(&env, Command::new("e2fsck").args(["-fn", &disk.dev]), 2 * minute);
            eprintln!(
                "ext4 crash {it}: {} files as logged, e2fsck clean ({:.1} s)",
                live.len(),
                round.elapsed().as_secs_f64()
            );
            if it == iterations {
                let notes = disk.teardown();
                assert!(notes.is_empty(), "teardown with the server up: {notes:?}");
                srv.stop();
                break;
            }
            must(&env, Command::new("mount").arg(&disk.dev).arg(&mnt), minute);
        }
        let delay = Duration::from_millis(200 + rng.next() % 1301);
        let stop = Arc::new(AtomicBool::new(false));
        let (d, l, s, files) = (dir.clone(), log.clone(), stop.clone(), live.clone());
        let worker = std::thread::spawn(move || ext4_workload(d, l, seed, it, files, &s));
        std::thread::sleep(delay);
        assert!(
            !worker.is_finished(),
            "crash {}: the workload stopped before the kill: {:?}\nserver log:\n{}",
            it + 1,
            worker.join().unwrap(),
            env.log_tail()
        );
        srv.kill9();
        let logged =
            || std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| !l.starts_with('?')).count();
        let logged_at_kill = logged();
        let wait = |w: &std::thread::JoinHandle<(u64, String)>, limit: Duration| {
            let deadline = Instant::now() + limit;
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            w.is_finished()
        };
        // The dead server's errors stop the workload; the flag and the abort are only there so that nothing hangs.
        if !wait(&worker, Duration::from_secs(10)) {
            eprintln!("ext4 crash {}: workload still running 10 s after the kill; stopping it", it + 1);
            stop.store(true, Ordering::SeqCst);
            if !wait(&worker, Duration::from_secs(20)) {
                eprintln!("ext4 crash {}: workload blocked 30 s after the kill; aborting the FUSE connection", it + 1);
                disk.abort();
                assert!(
                    wait(&worker, Duration::from_secs(30)),
                    "workload blocked 60 s after the kill, through an abort"
                );
            }
        }
        let (ops, why) = worker.join().unwrap();
        let notes = disk.teardown();
        eprintln!(
            "ext4 crash {}: killed after {} ms, {ops} operations logged ({} after the kill), workload stopped by: {why}{}",
            it + 1,
            delay.as_millis(),
            logged() - logged_at_kill,
            if notes.is_empty() { String::new() } else { format!("; teardown: {}", notes.join("; ")) }
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.lines().any(|l| l.starts_with('+')), "the workload never logged a file: the test checked nothing");
    eprintln!("ext4 crash loop: {iterations} crashes in {:.1} s", started.elapsed().as_secs_f64());
}
