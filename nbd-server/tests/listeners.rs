//! TCP listener, `serve_blocking`, the `memserve` example binary, and the
//! shutdown grace period for clients that stop reading.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd_server::{
    serve, serve_blocking, BlockBackend, CancellationToken, ListenAddr, Listener, MemBackend, ServerConfig,
    SimpleRegistry,
};

fn registry(m: Arc<MemBackend>) -> Arc<SimpleRegistry> {
    Arc::new(SimpleRegistry::new().with_export("disk", "tcp test", m as Arc<dyn BlockBackend>))
}

#[test]
fn tcp_listener_with_qemu_io_and_nbdinfo() {
    let m = Arc::new(MemBackend::new(4 << 20));
    let token = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let t2 = token.clone();
    let reg = registry(m.clone());
    let th = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let l = Listener::bind_tcp("127.0.0.1:0").await?;
            let _ = tx.send(l.local_addr_string());
            serve(l, reg, t2).await
        })
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).expect("listening");
    let uri = format!("nbd://{addr}/disk");
    if have_tool("qemu-io", "qemu-utils") {
        let out = run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 12345 6789",
            "-c",
            "read -P 0x61 12345 6789",
            &uri,
        ]));
        assert!(!out.contains("failed"), "{out}");
        let mut b = vec![0u8; 6789];
        m.read(12345, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 0x61));
    }
    if have_tool("nbdinfo", "libnbd-bin") {
        let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(out.trim(), (4u64 << 20).to_string());
    }
    token.cancel();
    th.join().expect("thread").expect("serve ok");
}

#[test]
fn serve_blocking_stops_on_cancel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let m = Arc::new(MemBackend::new(1 << 20));
    let token = CancellationToken::new();
    let t2 = token.clone();
    let reg = registry(m.clone());
    let s2 = sock.clone();
    let th = std::thread::spawn(move || serve_blocking(ListenAddr::Unix(s2), reg, t2));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    let mut g = [0u8; 18];
    c.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    token.cancel();
    th.join().expect("thread").expect("serve_blocking ok");
    // The negotiating connection was closed by the shutdown.
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn shutdown_grace_bounds_stuck_clients() {
    let m = Arc::new(MemBackend::new(64 << 20));
    let config = ServerConfig { shutdown_grace: Duration::from_millis(500), ..ServerConfig::default() };
    let s = TestServer::start_with_config(vec![("d", "", m as Arc<dyn BlockBackend>)], config);
    let mut c = s.greeted();
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.push(b'd');
    c.write_all(&b).expect("export name");
    let mut r = [0u8; 10];
    c.read_exact(&mut r).expect("export reply");
    // 48 reads of 1 MiB, and never read the replies: the reply writer
    // blocks on the full socket.
    for i in 0..48u64 {
        let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
        q.extend_from_slice(&[0, 0, 0, 0]);
        q.extend_from_slice(&i.to_be_bytes());
        q.extend_from_slice(&(i << 20).to_be_bytes());
        q.extend_from_slice(&(1u32 << 20).to_be_bytes());
        c.write_all(&q).expect("request");
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    s.stop().expect("serve ok");
    assert!(t.elapsed() < Duration::from_secs(10), "shutdown took {:?}", t.elapsed());
}

/// Path of the `memserve` example, which `cargo test` builds alongside the
/// integration tests (target/<profile>/examples/memserve).
fn memserve_path() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let p = profile_dir.join("examples").join("memserve");
    p.exists().then_some(p)
}

#[test]
fn memserve_example_serves_and_stops_on_sigterm() {
    let Some(bin) = memserve_path() else {
        eprintln!("SKIP: memserve example binary not built");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("m.sock");
    let mut child = Command::new(&bin)
        .args([
            "--unix",
            sock.to_str().expect("utf8"),
            "--size",
            "2M",
            "--name",
            "demo",
            "--description",
            "demo export",
            "--extra",
            "other:1M:ro",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn memserve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    assert!(line.starts_with("ready "), "{line}");
    if have_tool("nbdinfo", "libnbd-bin") {
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let names: Vec<&str> =
            v["exports"].as_array().expect("exports").iter().filter_map(|e| e["export-name"].as_str()).collect();
        assert_eq!(names, vec!["demo", "other"]);
        assert_eq!(v["exports"][0]["description"], "demo export");
        assert_eq!(v["exports"][0]["export-size"], 2 << 20);
        assert_eq!(v["exports"][1]["is_read_only"], true);
    }
    // SIGTERM: graceful shutdown, exit status 0, socket removed.
    let rc = send_sigterm(child.id());
    assert!(rc, "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "memserve did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "memserve exit status {status}");
    assert!(!sock.exists(), "socket file removed");
}

fn send_sigterm(pid: u32) -> bool {
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false)
}
