//! Shared helpers for the integration tests: an in-process server on a Unix
//! socket in a temporary directory, and detection/installation of the
//! external NBD clients the tests drive.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nbd_server::{
    serve_with_config, BlockBackend, CancellationToken, Listener, MemBackend, ServerConfig, SimpleRegistry,
};

/// A server running on its own tokio runtime in a background thread.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub token: CancellationToken,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Serve `exports` (name, description, backend); the first is the default.
    pub fn start(exports: Vec<(&str, &str, Arc<dyn BlockBackend>)>) -> Self {
        Self::start_with_config(exports, ServerConfig::default())
    }

    /// Like [`start`](Self::start) with a custom configuration.
    pub fn start_with_config(exports: Vec<(&str, &str, Arc<dyn BlockBackend>)>, config: ServerConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let mut reg = SimpleRegistry::new();
        for (name, desc, b) in exports {
            reg = reg.with_export(name, desc, b);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let token = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sock2 = sock.clone();
        let token2 = token.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let listener = Listener::bind_unix(&sock2)?;
                let _ = ready_tx.send(());
                serve_with_config(listener, Arc::new(reg), token2, config).await
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("server did not start");
        TestServer { dir, sock, token, thread: Some(thread) }
    }

    /// A single writable [`MemBackend`] export named `name`.
    pub fn mem(name: &str, size: u64) -> (Self, Arc<MemBackend>) {
        let m = Arc::new(MemBackend::new(size));
        let s = Self::start(vec![(name, "test export", m.clone() as Arc<dyn BlockBackend>)]);
        (s, m)
    }

    /// A raw client connection that has read the 18-byte newstyle greeting (reads time out after 10 s).
    pub fn greeted(&self) -> std::os::unix::net::UnixStream {
        use std::io::Read;
        let mut c = std::os::unix::net::UnixStream::connect(&self.sock).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut g = [0u8; 18];
        c.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        c
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.sock.display())
    }

    /// Cancel the shutdown token and wait (bounded) for `serve` to return.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !t.is_finished() {
                assert!(std::time::Instant::now() < deadline, "server did not shut down within 30 s");
                std::thread::sleep(Duration::from_millis(10));
            }
            return t.join().expect("server thread panicked");
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            let _ = self.stop_inner();
        } else {
            self.token.cancel();
        }
    }
}

fn on_path(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// Whether `tool` is available, installing Debian package `pkg` with
/// apt-get if it is missing (when running as root and not disabled by
/// `NBD_TESTS_NO_INSTALL`). Prints a SKIP message when it stays missing.
pub fn have_tool(tool: &str, pkg: &str) -> bool {
    let _g = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if on_path(tool) {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root && std::env::var_os("NBD_TESTS_NO_INSTALL").is_none() {
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-q", "-o", "DPkg::Lock::Timeout=300"]).output();
            install();
        }
        if on_path(tool) {
            return true;
        }
    }
    eprintln!("SKIP: `{tool}` (Debian package {pkg}) is not installed and could not be installed");
    false
}

/// Whether the libnbd Python bindings can be imported by Debian's python.
pub fn have_nbdsh() -> bool {
    if !have_tool("nbdsh", "libnbd-bin") {
        return false;
    }
    let ok = |()| nbdsh_cmd().args(["-n", "-c", "import nbd"]).output().map(|o| o.status.success()).unwrap_or(false);
    if ok(()) {
        return true;
    }
    if have_tool("nbdsh", "python3-libnbd") && ok(()) {
        return true;
    }
    let _g = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "python3-libnbd"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    drop(_g);
    if ok(()) {
        return true;
    }
    eprintln!("SKIP: nbdsh / python3-libnbd not usable");
    false
}

/// `nbdsh` run with Debian's python first on PATH (a pyenv python may lack
/// the `nbd` module).
pub fn nbdsh_cmd() -> Command {
    let mut c = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c
}

/// Run a command, returning its output; panics with context if it cannot be
/// started.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

/// Run and require success, returning stdout as a string.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let mut shown = format!("{cmd:?}");
        if shown.len() > 300 {
            let mut cut = 300;
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            shown.push_str("...");
        }
        panic!("command {shown} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    }
    stdout
}
