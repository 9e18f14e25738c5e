//! Interoperability tests with real NBD clients we did not write: libnbd's
//! `nbdinfo`, `nbdcopy` and `nbdsh`, QEMU's `qemu-io` / `qemu-img`, and
//! `fio`'s nbd engine. Each test installs its client with apt-get when
//! missing and skips (with a SKIP message) only if that is impossible.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd_server::{BlockBackend, MemBackend};
use rand::RngCore;

const MIB: u64 = 1 << 20;

fn two_exports() -> (TestServer, Arc<MemBackend>, Arc<MemBackend>) {
    let disk = Arc::new(MemBackend::new(8 * MIB));
    let ro = Arc::new(MemBackend::from_bytes(&vec![0x5a; MIB as usize], true));
    let s = TestServer::start(vec![
        ("disk", "Primary disk", disk.clone() as Arc<dyn BlockBackend>),
        ("ro", "Read-only image", ro.clone() as Arc<dyn BlockBackend>),
    ]);
    (s, disk, ro)
}

fn json_bool(v: &serde_json::Value, key: &str) -> bool {
    v[key].as_bool().unwrap_or_else(|| panic!("missing boolean {key} in {v}"))
}

#[test]
fn nbdinfo_list_and_json() {
    if !have_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    let (s, _disk, _ro) = two_exports();

    let text = run_ok(Command::new("nbdinfo").args(["--list", &s.uri("")]));
    assert!(text.contains("export=\"disk\""), "{text}");
    assert!(text.contains("export=\"ro\""), "{text}");
    assert!(text.contains("Primary disk"), "{text}");

    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &s.uri("")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json output");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 2, "{out}");
    let disk = exports.iter().find(|e| e["export-name"] == "disk").expect("disk listed");
    let ro = exports.iter().find(|e| e["export-name"] == "ro").expect("ro listed");
    assert_eq!(disk["description"], "Primary disk");
    assert_eq!(ro["description"], "Read-only image");
    assert_eq!(disk["export-size"], 8 * MIB);
    assert_eq!(ro["export-size"], MIB);
    for e in [disk, ro] {
        assert_eq!(e["block_size_minimum"], 512);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 33_554_432);
        assert!(json_bool(e, "can_flush"));
        assert!(json_bool(e, "can_fua"));
        assert!(json_bool(e, "can_multi_conn"));
        assert!(json_bool(e, "can_cache"));
        assert!(json_bool(e, "can_df"));
        assert!(!json_bool(e, "is_rotational"));
        let ctx = e["contexts"].as_array().expect("contexts");
        assert!(ctx.iter().any(|c| c == "base:allocation"), "{e}");
    }
    assert!(!json_bool(disk, "is_read_only"));
    assert!(json_bool(disk, "can_trim"));
    assert!(json_bool(disk, "can_zero"));
    assert!(json_bool(disk, "can_fast_zero"));
    assert!(json_bool(ro, "is_read_only"));
    assert!(!json_bool(ro, "can_trim"));
    assert!(!json_bool(ro, "can_zero"));

    // Single export by name, and the default export "".
    let out = run_ok(Command::new("nbdinfo").args(["--json", &s.uri("ro")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["exports"][0]["export-name"], "ro");
    assert_eq!(v["exports"][0]["export-size"], MIB);
    let size = run_ok(Command::new("nbdinfo").args(["--size", &s.uri("")]));
    assert_eq!(size.trim(), (8 * MIB).to_string());

    // Unknown export: nbdinfo must fail (NBD_REP_ERR_UNKNOWN).
    let out = run(Command::new("nbdinfo").arg(s.uri("nope")));
    assert!(!out.status.success());
    s.stop().expect("clean shutdown");
}

fn qemu_io(uri: &str, cmds: &[&str], read_only: bool) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error") && !out.contains("Pattern verification"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

#[test]
fn qemu_io_patterns_discard_and_zero() {
    if !have_tool("qemu-io", "qemu-utils") {
        return;
    }
    let (s, disk, _ro) = two_exports();
    let uri = s.uri("disk");
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 1000 5000",
            "read -P 0xab 1000 5000",
            "read -P 0 0 1000",
            "read -P 0 6000 2192",
            // Straddle a 64 KiB allocation chunk boundary, with FUA.
            "write -f -P 0xcd 65530 20",
            "read -P 0xcd 65530 20",
            "read -P 0 65550 100",
            "flush",
        ],
        false,
    );
    assert!(out.contains("wrote 5000/5000 bytes at offset 1000"), "{out}");
    assert!(out.contains("read 5000/5000 bytes at offset 1000"), "{out}");
    // Check through the backend too.
    let mut buf = vec![0u8; 7000];
    disk.read(0, &mut buf).expect("backend read");
    assert!(buf[..1000].iter().all(|&b| b == 0));
    assert!(buf[1000..6000].iter().all(|&b| b == 0xab));
    assert!(buf[6000..].iter().all(|&b| b == 0));
    assert!(disk.flush_count() >= 1, "flush reached the backend");

    // Discard and write zeroes (with and without unmap), read back zeroes.
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "discard 0 128k",
            "read -P 0 0 128k",
            "read -P 0x11 128k 64k",
            "write -z 196608 65536",
            "write -z -u 262144 131072",
            "read -P 0 196608 196608",
            "read -P 0x11 393216 4096",
        ],
        false,
    );
    let mut buf = vec![0u8; 512 * 1024];
    disk.read(0, &mut buf).expect("backend read");
    assert!(buf[..128 * 1024].iter().all(|&b| b == 0));
    assert!(buf[128 * 1024..192 * 1024].iter().all(|&b| b == 0x11));
    assert!(buf[192 * 1024..384 * 1024].iter().all(|&b| b == 0));
    assert!(buf[384 * 1024..].iter().all(|&b| b == 0x11));

    // Read-only export: reads work, writes are refused.
    qemu_io(&s.uri("ro"), &["read -P 0x5a 0 1M"], true);
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 512", &s.uri("ro")]));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("read-only"),
        "write to read-only export did not fail: {text}"
    );
    s.stop().expect("clean shutdown");
}

#[test]
fn qemu_img_map_sees_holes() {
    if !have_tool("qemu-img", "qemu-utils") {
        return;
    }
    let (s, disk, _ro) = two_exports();
    disk.write(2 * MIB, &[1u8; 4096], false).expect("write");
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &s.uri("disk")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut data = Vec::new();
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        if e["data"] == true {
            data.push((start, len));
        }
        if start == 0 {
            assert_eq!(e["data"], false, "start of the disk is a hole: {out}");
            assert_eq!(e["zero"], true, "{out}");
        }
    }
    assert_eq!(data, vec![(2 * MIB, 64 * 1024)], "{out}");
    s.stop().expect("clean shutdown");
}

#[test]
fn nbdcopy_roundtrip() {
    if !have_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let (s, disk, _ro) = two_exports();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    // Not a multiple of 64 KiB, but a multiple of the 512-byte minimum
    // block size (nbdcopy honours it and refuses unaligned tails).
    let len = 3 * MIB as usize + 7 * 4096 + 512;
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    // Leave a zero region so nbdcopy exercises zeroing/sparseness too.
    data[MIB as usize..MIB as usize + 256 * 1024].fill(0);
    std::fs::write(&src, &data).expect("write src");

    run_ok(Command::new("nbdcopy").args(["--flush", src.to_str().expect("utf8"), &s.uri("disk")]));
    let mut back = vec![0u8; len];
    disk.read(0, &mut back).expect("backend read");
    assert!(back == data, "backend content differs from the source file");

    run_ok(Command::new("nbdcopy").args([&s.uri("disk"), dst.to_str().expect("utf8")]));
    let copied = std::fs::read(&dst).expect("read dst");
    assert_eq!(copied.len() as u64, 8 * MIB);
    assert!(copied[..len] == data[..], "round-tripped content differs");
    assert!(copied[len..].iter().all(|&b| b == 0));

    // Single connection, synchronous mode, too.
    let dst2 = dir.path().join("dst2.bin");
    run_ok(Command::new("nbdcopy").args([
        "--connections=1",
        "--synchronous",
        &s.uri("disk"),
        dst2.to_str().expect("utf8"),
    ]));
    assert!(std::fs::read(&dst2).expect("read dst2") == copied);
    s.stop().expect("clean shutdown");
}

/// nbdsh script exercising success and error paths; `STRUCTURED` selects
/// structured replies (and base:allocation) or simple replies only.
const NBDSH_SCRIPT: &str = r#"
import errno as E
import nbd

def expect_err(name, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        code = getattr(E, name)
        assert e.errno in (name, code), "%s: expected %s, got %r (%s)" % (fn.__name__, name, e.errno, e)
        return
    raise AssertionError("%s unexpectedly succeeded" % fn.__name__)

h.set_request_structured_replies(STRUCTURED)
if STRUCTURED:
    h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_structured_replies_negotiated() == STRUCTURED
assert h.can_meta_context("base:allocation") == STRUCTURED
size = h.get_size()
assert size == 8 * 1024 * 1024, size
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024

# Let requests the client library would refuse reach the server.
h.set_strict_mode(0)

# Range checks.
expect_err("EINVAL", h.pread, 1024, size - 512)
expect_err("EINVAL", h.pread, 512, size)
expect_err("ENOSPC", h.pwrite, b"x" * 1024, size - 512)
expect_err("EINVAL", h.trim, 1024, size - 512)
expect_err("EINVAL", h.cache, 1024, size - 512)
# Alignment (we negotiated the block size, so the server enforces it).
expect_err("EINVAL", h.pread, 100, 0)
expect_err("EINVAL", h.pwrite, b"y" * 512, 3)
# Flags not valid for the command.
expect_err("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect_err("EINVAL", h.pwrite, b"z" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
# READ longer than the maximum block size.
expect_err("EINVAL", h.pread, 32 * 1024 * 1024 + 512, 0)

# Normal I/O: write with FUA, read, zero-length read, flush, cache.
data = bytes(range(256)) * 16
h.pwrite(data, 1024 * 1024, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 1024 * 1024) == data
assert h.pread(0, 0) == b""
h.flush()
h.cache(65536, 0)
if STRUCTURED:
    assert h.pread(4096, 1024 * 1024, nbd.CMD_FLAG_DF) == data

# Trim and zero.
h.pwrite(b"\x55" * 131072, 2 * 1024 * 1024)
h.trim(65536, 2 * 1024 * 1024)
h.zero(4096, 2 * 1024 * 1024 + 65536, nbd.CMD_FLAG_NO_HOLE)
h.zero(8192, 2 * 1024 * 1024 + 65536 + 4096, nbd.CMD_FLAG_FAST_ZERO)
got = h.pread(131072, 2 * 1024 * 1024)
assert got[:65536 + 12288] == b"\0" * (65536 + 12288)
assert got[65536 + 12288:] == b"\x55" * (65536 - 12288)

# Many requests in flight at once; replies may come back in any order.
n = 48
cookies = []
for i in range(n):
    buf = nbd.Buffer.from_bytearray(bytearray([i]) * 4096)
    cookies.append(h.aio_pwrite(buf, 4 * 1024 * 1024 + i * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
bufs = []
for i in range(n):
    b = nbd.Buffer(4096)
    bufs.append((i, b, h.aio_pread(b, 4 * 1024 * 1024 + i * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b, c in bufs:
    assert h.aio_command_completed(c)
    assert b.to_bytearray() == bytearray([i]) * 4096, i

if STRUCTURED:
    # Holes: nothing was written in [6 MiB, 8 MiB).
    entries = []
    def cb(meta, off, ents, err):
        assert meta == "base:allocation"
        entries.append((off, list(ents)))
        return 0
    h.block_status(2 * 1024 * 1024, 6 * 1024 * 1024, cb)
    off, ents = entries[0]
    assert off == 6 * 1024 * 1024
    assert ents[1] & 1 and ents[1] & 2, ents  # hole | zero
    assert ents[0] >= 2 * 1024 * 1024, ents
    # Allocated data at 1 MiB.
    entries.clear()
    h.block_status(4096, 1024 * 1024, cb)
    assert entries[0][1][1] == 0, entries
    # REQ_ONE: exactly one extent, not longer than requested.
    entries.clear()
    h.block_status(512, 6 * 1024 * 1024, cb, nbd.CMD_FLAG_REQ_ONE)
    assert len(entries[0][1]) == 2 and entries[0][1][0] == 512, entries
    expect_err("EINVAL", h.block_status, 1024, size - 512, cb)

h.shutdown()

# Read-only export: writes, trims and zeroing are refused with EPERM.
r = nbd.NBD()
r.set_request_structured_replies(STRUCTURED)
r.connect_uri(RO_URI)
assert r.is_read_only()
r.set_strict_mode(0)
expect_err("EPERM", r.pwrite, b"w" * 512, 0)
expect_err("EPERM", r.trim, 512, 0)
expect_err("EPERM", r.zero, 512, 0)
assert r.pread(512, 0) == b"\x5a" * 512
r.shutdown()
print("ALL OK")
"#;

fn run_nbdsh_script(structured: bool) {
    if !have_nbdsh() {
        return;
    }
    let (s, disk, ro) = two_exports();
    let script = format!(
        "URI = {:?}\nRO_URI = {:?}\nSTRUCTURED = {}\n{}",
        s.uri("disk"),
        s.uri("ro"),
        if structured { "True" } else { "False" },
        NBDSH_SCRIPT
    );
    let out = run_ok(nbdsh_cmd().args(["-c", &script]));
    assert!(out.contains("ALL OK"), "{out}");
    // The EPERM/ENOSPC paths must not have reached the backends.
    let mut b = vec![0u8; 512];
    ro.read(0, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0x5a));
    disk.read(8 * MIB - 512, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0));
    s.stop().expect("clean shutdown");
}

#[test]
fn nbdsh_structured_replies() {
    run_nbdsh_script(true);
}

#[test]
fn nbdsh_simple_replies() {
    run_nbdsh_script(false);
}

#[test]
fn fio_random_rw_verify() {
    if !have_tool("fio", "fio") {
        return;
    }
    let (s, _disk, _ro) = two_exports();
    let uri = s.uri("disk");
    let common = [
        "--ioengine=nbd".to_owned(),
        format!("--uri={uri}"),
        "--size=8m".to_owned(),
        "--iodepth=16".to_owned(),
        "--verify=crc32c".to_owned(),
        "--verify_fatal=1".to_owned(),
        "--do_verify=1".to_owned(),
        "--randrepeat=0".to_owned(),
        // No verify state files left in the working tree.
        "--verify_state_save=0".to_owned(),
    ];
    // Random writes with variable block sizes, verified by reading back.
    let out =
        run_ok(Command::new("fio").arg("--name=randwrite").args(&common).args(["--rw=randwrite", "--bsrange=512-64k"]));
    assert!(out.contains("err= 0"), "{out}");
    // Mixed random read/write with verification of what was written.
    let out = run_ok(Command::new("fio").arg("--name=randrw").args(&common).args([
        "--rw=randrw",
        "--bs=4k",
        "--rwmixread=50",
    ]));
    assert!(out.contains("err= 0"), "{out}");
    s.stop().expect("clean shutdown");
}

/// Unmounts and reaps nbdfuse even if the test fails.
struct FuseMount {
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdfuse_byte_granular_file_io() {
    use std::io::{Read, Seek, SeekFrom, Write};
    if !have_tool("nbdfuse", "nbdfuse") {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is not available, cannot mount nbdfuse");
        return;
    }
    // nbdfuse does no read-modify-write itself, so advertise a minimum
    // block size of 1 for this export.
    let m = Arc::new(MemBackend::new(4 * MIB).with_block_sizes(1, 4096));
    let s = TestServer::start(vec![("fuse", "", m.clone() as Arc<dyn BlockBackend>)]);
    let mnt = s.dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let child = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(s.uri("fuse"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn nbdfuse");
    let mut guard = FuseMount { dir: mnt.clone(), child };
    let file = mnt.join("nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !file.exists() {
        if let Ok(Some(st)) = guard.child.try_wait() {
            panic!("nbdfuse exited early with {st}");
        }
        assert!(std::time::Instant::now() < deadline, "nbdfuse did not mount");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(std::fs::metadata(&file).expect("stat").len(), 4 * MIB);
    let mut data = vec![0u8; 70_000];
    rand::thread_rng().fill_bytes(&mut data);
    {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&file).expect("open");
        f.seek(SeekFrom::Start(1000)).expect("seek");
        f.write_all(b"hello").expect("write");
        f.seek(SeekFrom::Start(65_530)).expect("seek");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
        let mut back = vec![0u8; 70_000];
        f.seek(SeekFrom::Start(65_530)).expect("seek");
        f.read_exact(&mut back).expect("read");
        assert!(back == data);
    }
    let mut b = [0u8; 5];
    m.read(1000, &mut b).expect("backend read");
    assert_eq!(&b, b"hello");
    let mut back = vec![0u8; 70_000];
    m.read(65_530, &mut back).expect("backend read");
    assert!(back == data, "bytes written through FUSE reached the backend");
    drop(guard);
    s.stop().expect("clean shutdown");
}
