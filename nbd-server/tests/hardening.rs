//! What an unlucky operator or a hostile client meets: the Unix socket file across restarts, the handshake
//! timeout, the connection cap and the transmission idle timeout.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use nbd_server::{BlockBackend, Listener, MemBackend, ServerConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn server_with(config: ServerConfig) -> TestServer {
    let m = Arc::new(MemBackend::new(1 << 20));
    TestServer::start_with_config(vec![("disk", "", m as Arc<dyn BlockBackend>)], config)
}

/// Client flags, then NBD_OPT_EXPORT_NAME "disk" (NO_ZEROES: a 10-byte reply).
fn enter_transmission(c: &mut UnixStream) {
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&4u32.to_be_bytes());
    b.extend_from_slice(b"disk");
    c.write_all(&b).expect("export name");
    let mut r = [0u8; 10];
    c.read_exact(&mut r).expect("export reply");
}

/// A FLUSH request and its simple reply.
fn flush(c: &mut UnixStream, cookie: u64) {
    let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 3]);
    q.extend_from_slice(&cookie.to_be_bytes());
    q.extend_from_slice(&[0u8; 12]);
    c.write_all(&q).expect("flush request");
    let mut r = [0u8; 16];
    c.read_exact(&mut r).expect("flush reply");
    assert_eq!(&r[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
    assert_eq!(r[8..], cookie.to_be_bytes());
}

/// Whether the server closed `c`: EOF (or a reset) within `within`.
fn closed_within(c: &mut UnixStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

#[test]
fn the_socket_file_is_removed_at_shutdown() {
    let s = server_with(ServerConfig::default());
    let sock = s.sock.clone();
    assert!(sock.exists());
    s.stop().expect("serve ok");
    assert!(!sock.exists(), "socket file left behind after shutdown");
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_and_other_files_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let _guard = rt.enter();
    // What a killed server leaves: the socket file, nobody accepting.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let l = Listener::bind_unix(&stale).expect("a stale socket file is replaced");
    // A second server on the same path while the first listens.
    let e = Listener::bind_unix(&stale).expect_err("a live socket is refused");
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    assert!(e.to_string().contains("already listening"), "{e}");
    drop(l);
    assert!(!stale.exists(), "dropping the listener removes its socket file");
    // A regular file is never removed.
    let file = dir.path().join("data");
    std::fs::write(&file, b"keep me").expect("write");
    let e = Listener::bind_unix(&file).expect_err("a regular file is refused");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
}

#[test]
fn a_replaced_socket_file_is_left_to_its_new_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let _guard = rt.enter();
    let path = dir.path().join("s.sock");
    let first = Listener::bind_unix(&path).expect("bind");
    // Someone removes it and another server binds the path meanwhile.
    std::fs::remove_file(&path).expect("rm");
    let second = Listener::bind_unix(&path).expect("bind again");
    drop(first);
    assert!(path.exists(), "the first listener removed the second one's socket file");
    drop(second);
    assert!(!path.exists());
}

#[test]
fn a_client_that_never_finishes_the_handshake_is_closed() {
    let config = ServerConfig { handshake_timeout: Duration::from_millis(300), ..ServerConfig::default() };
    let s = server_with(config);
    // Silent after the greeting.
    let mut idle = s.greeted();
    // Sends its flags, then half an option header.
    let mut slow = s.greeted();
    slow.write_all(&3u32.to_be_bytes()).expect("flags");
    slow.write_all(b"IHAVE").expect("partial option");
    let t = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(5)), "idle connection not closed");
    assert!(closed_within(&mut slow, Duration::from_secs(5)), "slow connection not closed");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    // A client that completes the handshake in time is not affected, however long it then stays.
    let mut c = s.greeted();
    enter_transmission(&mut c);
    std::thread::sleep(Duration::from_millis(600));
    flush(&mut c, 7);
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    let config = ServerConfig { max_connections: 2, ..ServerConfig::default() };
    let s = server_with(config);
    let a = s.greeted();
    let mut b = s.greeted();
    let mut over = UnixStream::connect(&s.sock).expect("connect");
    assert!(closed_within(&mut over, Duration::from_secs(5)), "third connection got a greeting");
    // Once one leaves, a new client is served again.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = UnixStream::connect(&s.sock).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut g = [0u8; 18];
        if c.read_exact(&mut g).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed after a client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    enter_transmission(&mut b);
    flush(&mut b, 1);
}

#[test]
fn the_idle_timeout_closes_only_connections_with_nothing_to_do() {
    let config = ServerConfig { idle_timeout: Some(Duration::from_millis(400)), ..ServerConfig::default() };
    let s = server_with(config);
    let mut c = s.greeted();
    enter_transmission(&mut c);
    // Requests more often than the timeout keep it open.
    for cookie in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        flush(&mut c, cookie);
    }
    let t = Instant::now();
    assert!(closed_within(&mut c, Duration::from_secs(5)), "idle connection not closed");
    assert!(t.elapsed() >= Duration::from_millis(300), "closed after {:?}", t.elapsed());
}

#[test]
fn by_default_an_idle_connection_stays_open() {
    let s = server_with(ServerConfig::default());
    assert_eq!(ServerConfig::default().idle_timeout, None);
    let mut c = s.greeted();
    enter_transmission(&mut c);
    assert!(!closed_within(&mut c, Duration::from_millis(700)));
    flush(&mut c, 9);
}
