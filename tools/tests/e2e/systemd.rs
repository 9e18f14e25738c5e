//! The service units in `scripts/systemd/`: `systemd-analyze verify` of every unit, the command lines they
//! start parse, and `bf nbd serve` under socket activation (a listening socket passed as fd 3 with
//! `LISTEN_FDS=1` and `LISTEN_PID`, as systemd passes it), talked to with nbdinfo and nbdcopy.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nbd::{have, ok};
use crate::util::{data, Env};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd")
}

fn unit_files() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(units_dir())
        .expect("scripts/systemd")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "service" || x == "socket" || x == "timer"))
        .collect();
    units.sort();
    units
}

/// The `ExecStart=` command of a unit's text, split on blanks (the units use no quoting).
fn exec_start(text: &str) -> Option<Vec<String>> {
    let line = text.lines().find_map(|l| l.strip_prefix("ExecStart="))?;
    Some(line.split_whitespace().map(str::to_string).collect())
}

#[test]
fn unit_files_verify_and_their_commands_parse() {
    let units = unit_files();
    let names: Vec<String> = units.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into()).collect();
    for want in [
        "bf-nbd.service",
        "bf-nbd.socket",
        "bf-serve.service",
        "bf-serve.socket",
        "bf-mount.service",
        "bf-scrub.service",
    ] {
        assert!(names.iter().any(|n| n == want), "scripts/systemd has no {want}: {names:?}");
    }
    // The servers tell systemd when they are ready (sd_notify).
    for server in ["bf-nbd.service", "bf-serve.service", "bf-mount.service"] {
        let text = std::fs::read_to_string(units_dir().join(server)).expect("unit file");
        assert!(text.lines().any(|l| l == "Type=notify"), "{server} is not Type=notify");
    }
    let bf = env!("CARGO_BIN_EXE_bf");
    let dir = tempfile::tempdir().expect("tempdir");
    for u in &units {
        let text = std::fs::read_to_string(u).expect("unit file");
        if let Some(cmd) = exec_start(&text) {
            assert_eq!(cmd[0], "/usr/local/bin/bf", "{}", u.display());
            // Every option named parses: clap stops at --help only after the arguments before it.
            let out = Command::new(bf).args(&cmd[1..]).arg("--help").output().expect("bf --help");
            assert!(
                out.status.success(),
                "{}: bf {:?} does not parse: {}",
                u.display(),
                &cmd[1..],
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // systemd-analyze checks that the binary exists: point the copies at the one just built.
        let name = u.file_name().expect("unit name");
        std::fs::write(dir.path().join(name), text.replace("/usr/local/bin/bf", bf)).expect("unit copy");
    }
    if !have("systemd-analyze") {
        return;
    }
    let copies: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
    let out = Command::new("systemd-analyze").arg("verify").args(&copies).output().expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are only warnings (exit 0): any line naming one of our units is a failure.
    let ours: Vec<&str> = err.lines().filter(|l| names.iter().any(|n| l.contains(n.as_str()))).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{err}");
}

/// `bf ARGS...` with `fd` as its fd 3 and `LISTEN_FDS=1`, `LISTEN_PID` = its own pid, as systemd starts a
/// socket-activated service (`sh` sets `LISTEN_PID=$$` and `exec`s bf, keeping the pid).
fn start_activated(env: &Env, fd: i32, args: &[&str]) -> Child {
    let bf = env.bf();
    let mut c = Command::new("sh");
    c.env_clear();
    for (k, v) in bf.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c.current_dir(env.dir.path())
        .env("BF_LOG", "info")
        .args(["-c", r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#, env!("CARGO_BIN_EXE_bf")])
        .args(args)
        .stderr(env.log_file());
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2 and fcntl, which are
    // async-signal-safe; it touches no memory of the parent but the integer `fd`.
    unsafe {
        c.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().expect("starting bf")
}

fn stop(mut child: Child, env: &Env) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().expect("waiting for bf");
    assert!(status.success(), "bf exit status {status}:\n{}", env.log_tail());
}

/// Waits for `child` to exit within `secs`; returns its output.
fn wait_output(child: Child, secs: u64, what: &str) -> std::process::Output {
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.expect(what),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            panic!("{what} did not finish within {secs} s");
        }
    }
}

#[test]
fn nbd_serve_takes_a_tcp_socket_passed_by_socket_activation() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    env.ok(&["volume", "create", "disk", "--size", "8M"]);
    // The test plays the service manager: it binds the socket and keeps it across server restarts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let uri = format!("nbd://127.0.0.1:{port}/disk");

    let server = start_activated(&env, listener.as_raw_fd(), &["nbd", "serve", "--metrics-listen", "127.0.0.1:0"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.log_tail().contains("passed by socket activation") {
        assert!(Instant::now() < deadline, "bf nbd serve did not start:\n{}", env.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(env.log_tail().contains(&format!("nbd://127.0.0.1:{port} (passed by socket activation)")));
    let info: serde_json::Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &uri]))).expect("nbdinfo --json");
    assert_eq!(info["exports"][0]["export-size"], 8u64 << 20, "{info}");
    let bytes = data(3 << 20, 11);
    let src = env.write("in.img", &bytes);
    ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    if have("curl") {
        let url = crate::mount::metrics_url(&env.log_tail()).expect("no metrics address in the log");
        let text = ok(Command::new("curl").args(["-sf", &url]));
        let written = crate::mount::metric(&text, "bf_nbd_written_bytes_total").unwrap_or(0);
        // nbdcopy writes the 8 MiB image (zeros as WRITE_ZEROES or TRIM where it detects them).
        assert!(written >= bytes.len() as u64, "{text}");
        assert!(text.lines().any(|l| l.starts_with("bf_nbd_requests_total{command=\"write\"} ") && !l.ends_with(" 0")));
        assert!(text.contains("bf_nbd_request_duration_seconds_bucket{command=\"flush\",le=\"+Inf\"}"), "{text}");
        assert!(crate::mount::metric(&text, "bf_nbd_connections_total").unwrap_or(0) >= 2, "{text}");
        // The clients have disconnected: the gauge comes back to 0 once the server has seen them go.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = ok(Command::new("curl").args(["-sf", &url]));
            if crate::mount::metric(&text, "bf_nbd_connections_open") == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "connections still counted open:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop(server, &env);

    // A client that connects while no server runs waits in the socket's queue, and is served by the next one.
    let out = env.path("out.img");
    let client = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdcopy");
    std::thread::sleep(Duration::from_millis(300));
    let server = start_activated(&env, listener.as_raw_fd(), &["nbd", "serve"]);
    let o = wait_output(client, 60, "nbdcopy from the restarted server");
    assert!(o.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&o.stderr));
    let got = std::fs::read(&out).expect("copied image");
    assert_eq!(got.len(), 8 << 20);
    assert!(got[..bytes.len()] == bytes[..], "what was written before the restart reads back");
    assert!(got[bytes.len()..].iter().all(|&b| b == 0));
    stop(server, &env);

    // An explicit address conflicts with a passed socket.
    let child = start_activated(&env, listener.as_raw_fd(), &["nbd", "serve", "--listen", "127.0.0.1:0"]);
    let o = wait_output(child, 30, "bf nbd serve --listen under activation");
    assert!(!o.status.success());
    assert!(env.log_tail().contains("leave out --listen and --socket"), "{}", env.log_tail());
}

#[test]
fn nbd_serve_under_systemd_socket_activate_on_a_unix_socket() {
    if !have("systemd-socket-activate") || !have("nbdinfo") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    env.ok(&["volume", "create", "disk", "--size", "4M"]);
    let socket = env.path("nbd.sock");
    let mut c = Command::new("systemd-socket-activate");
    c.arg("-l").arg(&socket);
    // It passes only the variables named with -E to the service.
    for (k, v) in env.bf().get_envs() {
        if let Some(v) = v {
            c.arg(format!("-E{}={}", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    c.arg("-EBF_LOG=info").args([env!("CARGO_BIN_EXE_bf"), "nbd", "serve", "--volume", "disk"]);
    let mut activator = c.stdout(env.log_file()).stderr(env.log_file()).spawn().expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen:\n{}", env.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts bf, which takes the socket.
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let info: serde_json::Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &uri]))).expect("nbdinfo --json");
    assert_eq!(info["exports"][0]["export-size"], 4u64 << 20, "{info}");
    assert!(env.log_tail().contains("(passed by socket activation)"), "{}", env.log_tail());
    // systemd-socket-activate execs the service in its own process: SIGTERM reaches bf.
    let _ = Command::new("kill").arg(activator.id().to_string()).status();
    let status = activator.wait().expect("waiting");
    assert!(status.success(), "bf nbd serve exit status {status}:\n{}", env.log_tail());
}

/// Waits until `log` (the servers' log) contains `what`.
fn wait_for_log(env: &Env, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.log_tail().contains(what) {
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{}", env.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_takes_a_tcp_socket_passed_by_socket_activation() {
    if !have("curl") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(300_000, 12);
    env.commit_file("f.bin", &bytes);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let server = start_activated(&env, listener.as_raw_fd(), &["serve"]);
    wait_for_log(&env, "passed by socket activation");
    assert!(env.log_tail().contains(&format!("http://127.0.0.1:{port}/ (passed by socket activation)")));
    let out = env.path("f.out");
    ok(Command::new("curl").args(["-sf", "-o"]).arg(&out).arg(format!("http://127.0.0.1:{port}/f.bin")));
    assert!(std::fs::read(&out).expect("downloaded") == bytes);
    stop(server, &env);

    // An explicit address conflicts with a passed socket; a Unix socket is refused (HTTP is served on TCP).
    let child = start_activated(&env, listener.as_raw_fd(), &["serve", "--listen", "127.0.0.1:0"]);
    let o = wait_output(child, 30, "bf serve --listen under activation");
    assert!(!o.status.success());
    assert!(env.log_tail().contains("leave out --listen"), "{}", env.log_tail());
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("bind unix");
    let o = wait_output(start_activated(&env, unix.as_raw_fd(), &["serve"]), 30, "bf serve on a Unix socket");
    assert!(!o.status.success());
    assert!(env.log_tail().contains("bf serve listens on TCP"), "{}", env.log_tail());
    // A passed socket on every address is held to the exposure rule, as --listen is.
    let open = std::net::TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0");
    let o = wait_output(start_activated(&env, open.as_raw_fd(), &["serve"]), 30, "bf serve on 0.0.0.0");
    assert!(!o.status.success());
    assert!(env.log_tail().contains("refusing to listen on 0.0.0.0:"), "{}", env.log_tail());
}

#[test]
fn serve_under_systemd_socket_activate() {
    if !have("systemd-socket-activate") || !have("curl") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(200_000, 13);
    env.commit_file("videos/clip.bin", &bytes);
    // A free port: bound and let go (systemd-socket-activate binds it again at once).
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = Command::new("systemd-socket-activate");
    c.arg("-l").arg(&addr);
    // It passes only the variables named with -E to the service.
    for (k, v) in env.bf().get_envs() {
        if let Some(v) = v {
            c.arg(format!("-E{}={}", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    c.arg("-EBF_LOG=info").args([env!("CARGO_BIN_EXE_bf"), "serve"]);
    let mut activator = c.stdout(env.log_file()).stderr(env.log_file()).spawn().expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen:\n{}", env.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection started bf, which takes the socket and answers.
    let out = env.path("clip.out");
    ok(Command::new("curl")
        .args(["-sf", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(format!("http://{addr}/videos/clip.bin")));
    assert!(std::fs::read(&out).expect("downloaded") == bytes);
    assert!(env.log_tail().contains("(passed by socket activation)"), "{}", env.log_tail());
    let _ = Command::new("kill").arg(activator.id().to_string()).status();
    let status = activator.wait().expect("waiting");
    assert!(status.success(), "bf serve exit status {status}:\n{}", env.log_tail());
}

/// A datagram socket standing in for the service manager's notification socket (`NOTIFY_SOCKET`).
struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(env: &Env) -> NotifySocket {
        let path = env.path("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("binding the notification socket");
        // A bound on the wait for a notice that never comes, not a measurement.
        sock.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
        NotifySocket { sock, path }
    }

    /// Reads notices until one has the line `line`; returns that notice.
    fn wait_for(&self, line: &str, env: &Env) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {line} ({e}):\n{}", env.log_tail()));
            let notice = String::from_utf8_lossy(&buf[..n]).into_owned();
            if notice.lines().any(|l| l == line) {
                return notice;
            }
        }
    }
}

/// The value of `STATUS=` in a notice.
fn status_of(notice: &str) -> &str {
    notice.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("no STATUS= in {notice:?}"))
}

/// SIGTERM to `child`; STOPPING=1 must arrive, then a clean exit.
fn stop_notified(mut child: Child, notify: &NotifySocket, env: &Env) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    notify.wait_for("STOPPING=1", env);
    let status = child.wait().expect("waiting for bf");
    assert!(status.success(), "bf exit status {status}:\n{}", env.log_tail());
}

#[test]
fn servers_notify_the_service_manager_when_ready_and_when_stopping() {
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(150_000, 14);
    env.commit_file("f.bin", &bytes);
    env.ok(&["volume", "create", "disk", "--size", "4M"]);
    let notify = NotifySocket::bind(&env);
    let spawn = |args: &[&str]| {
        env.bf()
            .env("NOTIFY_SOCKET", &notify.path)
            .env("BF_LOG", "info")
            .args(args)
            .stderr(env.log_file())
            .spawn()
            .expect("starting bf")
    };

    // bf serve: once READY=1 has arrived, a request is answered without waiting.
    let child = spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let ready = notify.wait_for("READY=1", &env);
    let status = status_of(&ready);
    let url = status.strip_prefix("serving files on ").and_then(|s| s.split_whitespace().next());
    let url = url.unwrap_or_else(|| panic!("STATUS={status}"));
    let out = env.path("f.out");
    if have("curl") {
        ok(Command::new("curl").args(["-sf", "-o"]).arg(&out).arg(format!("{url}f.bin")));
        assert!(std::fs::read(&out).expect("downloaded") == bytes);
    }
    stop_notified(child, &notify, &env);

    // bf nbd serve: the socket accepts once READY=1 has arrived.
    let socket = env.path("nbd.sock");
    let child = spawn(&["nbd", "serve", "--socket", socket.to_str().expect("utf-8 path")]);
    let ready = notify.wait_for("READY=1", &env);
    assert!(status_of(&ready).contains("over NBD on unix socket"), "{ready}");
    std::os::unix::net::UnixStream::connect(&socket).expect("the NBD socket accepts once ready");
    stop_notified(child, &notify, &env);

    // bf mount --foreground: mounted once READY=1 has arrived; unmounting from outside says STOPPING=1.
    if !crate::mount::fuse_usable() {
        return;
    }
    env.set_var("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8 path"));
    let m = crate::mount::Mounted::start(&env, &[]);
    let ready = notify.wait_for("READY=1", &env);
    assert!(status_of(&ready).starts_with("mounted "), "{ready}");
    assert!(std::fs::read(m.p("f.bin")).expect("read through the mount") == bytes);
    m.unmount(&env);
    notify.wait_for("STOPPING=1", &env);
}
