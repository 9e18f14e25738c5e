//! NBD over TLS (`NBD_OPT_STARTTLS`): real clients we did not write (nbdinfo and nbdcopy from libnbd, qemu-img
//! and qemu-io, all GnuTLS) with x509 certificates in nbdkit's and qemu's directory layout, clients that must
//! be refused (an untrusted client certificate, none, plaintext under `require`), and a hand-written client on
//! the wire for what the real ones never do (options before STARTTLS, state carried across it, a second
//! STARTTLS, bytes sent before the TLS handshake).
//!
//! The certificates are made for each test by `openssl` (EC P-256, about 0.5 s).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{have_tool, run, run_ok, TestServer};
use nbd_server::{BlockBackend, MemBackend, ServerConfig, TlsConfig, TlsError, TlsMode};

const SIZE: u64 = 4 << 20;

/// Makes a CA, a server certificate for `localhost`, a client certificate, and a second ("rogue") CA with a
/// client certificate of its own, then lays them out as the server and each client expects them.
const MAKE_CERTS: &str = include_str!("common/make-test-certs.sh");

/// The certificate directories: `server` (for the server), `client` (a trusted client certificate), `nocert`
/// (only the CA), `intruder` (a client certificate from another CA), `distrust` (a CA that did not sign the
/// server's certificate).
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// `None` (the test skips) when openssl is missing and cannot be installed.
    fn make() -> Option<Certs> {
        if !have_tool("openssl", "openssl") {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        run_ok(Command::new("sh").arg("-c").arg(MAKE_CERTS).current_dir(dir.path()));
        Some(Certs { dir })
    }

    fn path(&self, which: &str) -> PathBuf {
        self.dir.path().join(which)
    }
}

fn tls_server(certs: &Certs, mode: TlsMode, verify_peer: bool) -> (TestServer, Arc<MemBackend>) {
    let tls = TlsConfig::from_dir(&certs.path("server"), mode, verify_peer).expect("certificates load");
    let m = Arc::new(MemBackend::new(SIZE));
    let config = ServerConfig { tls: Some(tls), ..ServerConfig::default() };
    let s = TestServer::start_with_config(vec![("disk", "tls test", m.clone() as Arc<dyn BlockBackend>)], config);
    (s, m)
}

/// libnbd's TLS URI: `nbds+unix:///disk?socket=S&tls-certificates=DIR`.
fn nbds_uri(s: &TestServer, certs: &Certs, client: &str) -> String {
    format!("nbds+unix:///disk?socket={}&tls-certificates={}", s.sock.display(), certs.path(client).display())
}

/// qemu's options for a TLS connection to the export with the credentials in `dir` (over a Unix socket qemu
/// needs `tls-hostname` to check the server certificate against).
fn qemu_tls_args(s: &TestServer, dir: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display()),
        "--image-opts".into(),
        format!("driver=nbd,path={},export=disk,tls-creds=tls0,tls-hostname=localhost", s.sock.display()),
    ]
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} succeeded, should have been refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn libnbd_clients_with_client_certificates() {
    let Some(certs) = Certs::make() else { return };
    if !have_tool("nbdinfo", "libnbd-bin") || !have_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let (s, m) = tls_server(&certs, TlsMode::Require, true);
    let uri = nbds_uri(&s, &certs, "client");
    assert_eq!(run_ok(Command::new("nbdinfo").args(["--size", &uri])).trim(), SIZE.to_string());
    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(v["TLS"], true, "{info}");
    // nbdcopy writes 1 MiB at offset 0 and reads the whole export back, over TLS both ways.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let src = s.dir.path().join("src.img");
    std::fs::write(&src, &data).expect("write src");
    run_ok(Command::new("nbdcopy").args([src.to_str().expect("utf8"), &uri]));
    let mut b = vec![0u8; data.len()];
    m.read(0, &mut b).expect("read");
    assert!(b == data, "nbdcopy over TLS wrote other bytes");
    let back = s.dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&uri, back.to_str().expect("utf8")]));
    let back = std::fs::read(&back).expect("read back");
    assert_eq!(back.len() as u64, SIZE);
    assert!(back[..data.len()] == data[..] && back[data.len()..].iter().all(|&x| x == 0));
}

#[test]
fn qemu_img_and_qemu_io_with_client_certificates() {
    let Some(certs) = Certs::make() else { return };
    if !have_tool("qemu-img", "qemu-utils") || !have_tool("qemu-io", "qemu-utils") {
        return;
    }
    let (s, m) = tls_server(&certs, TlsMode::Require, true);
    let args = qemu_tls_args(&s, &certs.path("client"));
    let info = run_ok(Command::new("qemu-img").arg("info").args(&args));
    assert!(info.contains(&format!("virtual size: 4 MiB ({SIZE} bytes)")), "{info}");
    let out = run_ok(Command::new("qemu-io").args(&args).args([
        "-c",
        "write -P 0x5a 12345 67890",
        "-c",
        "read -P 0x5a 12345 67890",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("fail"), "{out}");
    let mut b = vec![0u8; 67890];
    m.read(12345, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0x5a));
}

#[test]
fn untrusted_missing_and_plaintext_clients_are_refused() {
    let Some(certs) = Certs::make() else { return };
    let (s, m) = tls_server(&certs, TlsMode::Require, true);
    if have_tool("nbdinfo", "libnbd-bin") {
        // A client certificate signed by another CA, and none at all: the TLS handshake fails.
        fails(Command::new("nbdinfo").args(["--size", &nbds_uri(&s, &certs, "intruder")]));
        fails(Command::new("nbdinfo").args(["--size", &nbds_uri(&s, &certs, "nocert")]));
        // Plaintext: every option is answered "TLS required".
        let err = fails(Command::new("nbdinfo").args(["--size", &s.uri("disk")]));
        assert!(err.to_lowercase().contains("tls"), "{err}");
    }
    if have_tool("qemu-img", "qemu-utils") {
        fails(Command::new("qemu-img").arg("info").args(qemu_tls_args(&s, &certs.path("intruder"))));
        // qemu checks the server's certificate against its CA (libnbd 1.14 does not over a Unix socket).
        fails(Command::new("qemu-img").arg("info").args(qemu_tls_args(&s, &certs.path("distrust"))));
        let plain = format!("driver=nbd,path={},export=disk", s.sock.display());
        let err = fails(Command::new("qemu-img").args(["info", "--image-opts", &plain]));
        assert!(err.to_lowercase().contains("tls"), "{err}");
    }
    // Nobody got to write; the server still serves a trusted client.
    if have_tool("nbdinfo", "libnbd-bin") {
        assert_eq!(run_ok(Command::new("nbdinfo").args(["--size", &nbds_uri(&s, &certs, "client")])).trim(), "4194304");
    }
    let mut b = vec![1u8; 4096];
    m.read(0, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn tls_on_serves_both_plaintext_and_tls_clients() {
    let Some(certs) = Certs::make() else { return };
    if !have_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    // Without --tls-verify-peer no client certificate is asked for.
    let (s, _) = tls_server(&certs, TlsMode::On, false);
    for (uri, tls) in [(nbds_uri(&s, &certs, "nocert"), true), (s.uri("disk"), false)] {
        let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
        let v: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(v["TLS"], tls, "{info}");
    }
}

#[test]
fn a_bad_certificates_directory_is_an_error_naming_the_file() {
    let Some(certs) = Certs::make() else { return };
    let missing = certs.path("nowhere");
    let e = TlsConfig::from_dir(&missing, TlsMode::Require, false).expect_err("missing directory");
    assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
    // A key that does not belong to the certificate.
    let mismatched = certs.path("mismatched");
    std::fs::create_dir(&mismatched).expect("mkdir");
    std::fs::copy(certs.path("server-cert.pem"), mismatched.join("server-cert.pem")).expect("cp");
    std::fs::copy(certs.path("client-key.pem"), mismatched.join("server-key.pem")).expect("cp");
    let e = TlsConfig::from_dir(&mismatched, TlsMode::On, false).expect_err("mismatched key");
    assert!(matches!(e, TlsError::ServerCertificate { .. }), "{e:?}");
    // --tls-verify-peer needs the CA.
    let no_ca = certs.path("no-ca");
    std::fs::create_dir(&no_ca).expect("mkdir");
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(certs.path(f), no_ca.join(f)).expect("cp");
    }
    TlsConfig::from_dir(&no_ca, TlsMode::On, false).expect("no CA needed without --tls-verify-peer");
    let e = TlsConfig::from_dir(&no_ca, TlsMode::On, true).expect_err("verify-peer without a CA");
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}

// The wire, with a hand-written client (rustls for the TLS part).

const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_POLICY: u32 = 0x8000_0002;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_TLS_REQD: u32 = 0x8000_0005;

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Sends one option and reads its reply: (option, reply type, data).
fn ask<S: Read + Write>(s: &mut S, opt: u32, data: &[u8]) -> (u32, u32, Vec<u8>) {
    s.write_all(&option(opt, data)).expect("send option");
    s.flush().expect("flush");
    reply(s)
}

fn reply<S: Read>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().expect("8")), REP_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let typ = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize];
    s.read_exact(&mut data).expect("option reply data");
    (opt, typ, data)
}

fn info_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_data(name: &str, query: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(query.len() as u32).to_be_bytes());
    d.extend_from_slice(query.as_bytes());
    d
}

/// Connects, reads the greeting and sends the client flags (FIXED_NEWSTYLE | NO_ZEROES).
fn start(s: &TestServer) -> UnixStream {
    let mut c = s.greeted();
    c.write_all(&3u32.to_be_bytes()).expect("flags");
    c
}

fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

/// The rustls client side of a connection that just got STARTTLS acknowledged.
fn upgrade(certs: &Certs, c: UnixStream) -> rustls::StreamOwned<rustls::ClientConnection, UnixStream> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_file(certs.path("ca-cert.pem")).expect("ca");
    roots.add(ca).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    rustls::StreamOwned::new(conn, c)
}

#[test]
fn require_refuses_every_option_before_starttls() {
    let Some(certs) = Certs::make() else { return };
    let (s, _) = tls_server(&certs, TlsMode::Require, false);
    let mut c = start(&s);
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, info_data("disk")),
        (OPT_GO, info_data("disk")),
        (OPT_STRUCTURED_REPLY, vec![]),
        (0x4242, vec![1, 2, 3]),
    ] {
        let (o, typ, _) = ask(&mut c, opt, &data);
        assert_eq!((o, typ), (opt, ERR_TLS_REQD), "option {opt}");
    }
    // STARTTLS with data is still malformed.
    assert_eq!(ask(&mut c, OPT_STARTTLS, &[0]).1, ERR_INVALID);
    // ABORT is answered.
    assert_eq!(ask(&mut c, OPT_ABORT, &[]).1, REP_ACK);
    // EXPORT_NAME cannot be refused, so it ends the connection.
    let mut c = start(&s);
    c.write_all(&option(OPT_EXPORT_NAME, b"disk")).expect("send");
    assert!(closed(&mut c), "EXPORT_NAME without TLS was served");
    // A client without fixed newstyle can never do TLS: dropped at once.
    let mut c = UnixStream::connect(&s.sock).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut g = [0u8; 18];
    c.read_exact(&mut g).expect("greeting");
    c.write_all(&0u32.to_be_bytes()).expect("flags");
    assert!(closed(&mut c));
}

#[test]
fn starttls_forgets_what_was_negotiated_in_plaintext() {
    let Some(certs) = Certs::make() else { return };
    let (s, _) = tls_server(&certs, TlsMode::On, false);
    let mut c = start(&s);
    // In plaintext (allowed with `on`): structured replies, then a metadata context.
    assert_eq!(ask(&mut c, OPT_STRUCTURED_REPLY, &[]).1, REP_ACK);
    let (_, typ, _) = ask(&mut c, OPT_SET_META_CONTEXT, &meta_data("disk", "base:allocation"));
    assert_eq!(typ, 4, "NBD_REP_META_CONTEXT");
    assert_eq!(reply(&mut c).1, REP_ACK);
    assert_eq!(ask(&mut c, OPT_STARTTLS, &[]).1, REP_ACK);
    let mut t = upgrade(&certs, c);
    // Structured replies are off again (CVE-2021-3716): SET_META_CONTEXT needs them first.
    assert_eq!(ask(&mut t, OPT_SET_META_CONTEXT, &meta_data("disk", "base:allocation")).1, ERR_INVALID);
    assert_eq!(t.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    // A second STARTTLS is invalid, unknown options are still just unsupported, and GO works over TLS.
    assert_eq!(ask(&mut t, OPT_STARTTLS, &[]).1, ERR_INVALID);
    assert_eq!(ask(&mut t, 0x4242, &[]).1, ERR_UNSUP);
    t.write_all(&option(OPT_GO, &info_data("disk"))).expect("go");
    loop {
        let (_, typ, _) = reply(&mut t);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, 3, "NBD_REP_INFO");
    }
    // A simple reply to FLUSH: structured replies were not negotiated over TLS.
    let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 3]);
    q.extend_from_slice(&77u64.to_be_bytes());
    q.extend_from_slice(&[0u8; 12]);
    t.write_all(&q).expect("flush");
    let mut r = [0u8; 16];
    t.read_exact(&mut r).expect("flush reply");
    assert_eq!(&r[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
}

#[test]
fn bytes_sent_before_the_tls_handshake_end_the_connection() {
    let Some(certs) = Certs::make() else { return };
    let (s, _) = tls_server(&certs, TlsMode::Require, false);
    let mut c = start(&s);
    // STARTTLS and, in the same write, a plaintext option that someone wants taken as sent over TLS.
    let mut b = option(OPT_STARTTLS, &[]);
    b.extend_from_slice(&option(OPT_STRUCTURED_REPLY, &[]));
    c.write_all(&b).expect("send");
    let (_, typ, _) = reply(&mut c);
    assert_eq!(typ, REP_ACK);
    assert!(closed(&mut c), "the server went on after plaintext bytes following STARTTLS");
}

#[test]
fn without_tls_starttls_is_refused_by_policy() {
    let m = Arc::new(MemBackend::new(SIZE));
    let s = TestServer::start(vec![("disk", "", m as Arc<dyn BlockBackend>)]);
    let mut c = start(&s);
    assert_eq!(ask(&mut c, OPT_STARTTLS, &[]).1, ERR_POLICY);
    assert_eq!(ask(&mut c, OPT_LIST, &[]).1, 2, "NBD_REP_SERVER: the session goes on");
}
