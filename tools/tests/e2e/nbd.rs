//! `bf volume` + `bf nbd serve` driven by real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio,
//! nbdfuse + mkfs.ext4/e2fsck, and a kill -9 crash loop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
        let child = env
            .bf()
            .args(["nbd", "serve", "--socket", socket.to_str().unwrap()])
            .args(extra)
            .env("BF_LOG", "info")
            .stderr(env.log_file())
            .spawn()
            .expect("starting bf nbd serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "server did not start");
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

    fn kill9(mut self) {
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

#[test]
fn fio_random_read_write_with_verify() {
    if !have("fio") {
        return;
    }
    let env = volume_env("64M");
    let srv = Server::start(&env, &[]);
    let out = ok(Command::new("fio").current_dir(env.dir.path()).args([
        "--name=bfverify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
        "--rw=randrw",
        "--bs=4k",
        "--size=16M",
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

/// `bf scrub` walks volumes too: damage on one location is found (exit 3), repaired, and a second scrub is clean;
/// the data served afterwards is unchanged.
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
    let o = env.run(&["scrub", "--repair", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stdout));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["volumes"][0]["shards"]["missing"], removed);
    assert_eq!(v["volumes"][0]["shards_repaired"], removed);
    env.ok(&["scrub"]);
    let srv = Server::start(&env, &["--read-only"]);
    ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(srv.uri("disk")));
    srv.stop();
}

/// xfstests' fsx and fsstress (built by `scripts/test` from `../shared/third_party/fs-exercisers`) on ext4 over a
/// log volume, through nbdfuse and a loop device; then `e2fsck -fn` is clean after a server restart.
#[test]
fn fsx_and_fsstress_on_ext4_over_a_volume() {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/fs-exercisers");
    let (fsx, fsstress) = (tools.join("fsx"), tools.join("fsstress"));
    if !fsx.exists() || !fsstress.exists() || !have("nbdfuse") || !have("losetup") || !crate::util::is_root() {
        eprintln!("skipped: needs root, nbdfuse, losetup and the fs exercisers in target/tools");
        return;
    }
    let env = volume_env("256M");
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
        let _ = Command::new("fusermount3").arg("-u").arg(&fuse).status();
        let _ = nbdfuse.wait();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    };
    let srv = Server::start(&env, &[]);
    run(&srv, &|dev| {
        ok(Command::new("mkfs.ext4").args(["-q", "-F", dev]));
        ok(Command::new("mount").arg(dev).arg(&mnt));
        ok(Command::new(&fsstress).arg("-d").arg(mnt.join("stress")).args(["-n", "1500", "-p", "4", "-s", "7"]));
        ok(Command::new(&fsx).args(["-N", "3000", "-S", "11", "-q"]).arg(mnt.join("fsx.file")));
        ok(Command::new("umount").arg(&mnt));
    });
    srv.stop();
    let srv = Server::start(&env, &["--read-only"]);
    run(&srv, &|dev| {
        ok(Command::new("e2fsck").args(["-fn", dev]));
    });
    srv.stop();
}
