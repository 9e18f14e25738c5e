//! `bf nbd serve` as an operator runs it: restarts on the same Unix socket (after SIGTERM and after kill -9),
//! TLS with client certificates driven by nbdinfo and qemu-io, and the warning for a listener other hosts can
//! reach without authentication.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::nbd::{have, ok, Server};
use crate::util::Env;

pub(crate) const MAKE_CERTS: &str = include_str!("../../../nbd-server/tests/common/make-test-certs.sh");

fn volume_env() -> Env {
    let env = Env::new();
    env.init(4, 2);
    env.ok(&["volume", "create", "disk", "--size", "8M"]);
    env
}

fn size_of(uri: &str) -> String {
    ok(Command::new("nbdinfo").args(["--size", uri])).trim().to_owned()
}

#[test]
fn nbd_serve_restarts_on_its_socket_after_sigterm_and_kill9() {
    if !have("nbdinfo") {
        return;
    }
    let env = volume_env();
    let socket = env.path("nbd.sock");
    let srv = Server::start_on(&env, socket.clone(), &[]);
    let uri = srv.uri("disk");
    assert_eq!(size_of(&uri), "8388608");
    // A second server on the live socket is refused and leaves it alone.
    let out = env.run(&["nbd", "serve", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    assert_eq!(size_of(&uri), "8388608");
    // SIGTERM removes the socket file, so systemd's restart binds again.
    srv.stop();
    assert!(!socket.exists(), "socket file left behind after SIGTERM");
    let srv = Server::start_on(&env, socket.clone(), &[]);
    assert_eq!(size_of(&uri), "8388608");
    // kill -9 leaves it behind; the next start replaces the stale file.
    srv.kill9();
    assert!(socket.exists());
    let srv = Server::start_on(&env, socket.clone(), &[]);
    assert_eq!(size_of(&uri), "8388608");
    srv.stop();
}

#[test]
fn nbd_serve_tls_require_with_client_certificates() {
    if !have("nbdinfo") || !have("qemu-io") || !have("openssl") {
        return;
    }
    let env = volume_env();
    let certs = env.path("certs");
    std::fs::create_dir(&certs).unwrap();
    ok(Command::new("sh").arg("-c").arg(MAKE_CERTS).current_dir(&certs));
    let server_dir = certs.join("server");
    let srv = Server::start_on(
        &env,
        env.path("nbd.sock"),
        &["--tls", "require", "--tls-certificates", server_dir.to_str().unwrap(), "--tls-verify-peer"],
    );
    let nbds = |client: &str| {
        format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            env.path("nbd.sock").display(),
            certs.join(client).display()
        )
    };
    assert_eq!(size_of(&nbds("client")), "8388608");
    let image =
        format!("driver=nbd,path={},export=disk,tls-creds=tls0,tls-hostname=localhost", env.path("nbd.sock").display());
    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", certs.join("client").display());
    let out = ok(Command::new("qemu-io").args(["--object", &creds, "--image-opts", &image]).args([
        "-c",
        "write -P 0x3c 4096 1000000",
        "-c",
        "read -P 0x3c 4096 1000000",
    ]));
    assert!(!out.contains("fail"), "{out}");
    // Refused: plaintext, a certificate from another CA, no certificate.
    for uri in [srv.uri("disk"), nbds("intruder"), nbds("nocert")] {
        let o = Command::new("nbdinfo").args(["--size", &uri]).output().unwrap();
        assert!(!o.status.success(), "{uri} was served");
    }
    // What qemu wrote is there after a restart without TLS, read by a plaintext client.
    srv.stop();
    let srv = Server::start_on(&env, env.path("nbd.sock"), &[]);
    let out = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 4096 1000000", &srv.uri("disk")]));
    assert!(!out.contains("fail"), "{out}");
    let log = std::fs::read_to_string(env.path("server.log")).unwrap_or_default();
    assert!(log.contains("TLS established"), "{}", env.log_tail());
    srv.stop();
}

#[test]
fn nbd_serve_warns_about_a_listener_without_authentication() {
    let env = volume_env();
    let first_lines = |extra: &[&str]| -> String {
        let mut child = env
            .bf()
            .args(["nbd", "serve"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("bf nbd serve");
        let mut err = child.stderr.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("bf: serving") && Instant::now() < deadline {
            match std::io::Read::read(&mut err, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        text
    };
    let open = first_lines(&["--listen", "0.0.0.0:0"]);
    assert!(open.contains("warning") && open.contains("without TLS"), "{open}");
    let local = first_lines(&["--listen", "127.0.0.1:0"]);
    assert!(local.contains("bf: serving") && !local.contains("warning"), "{local}");
    let out = env.run(&["nbd", "serve", "--tls", "require", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-certificates"));
}
