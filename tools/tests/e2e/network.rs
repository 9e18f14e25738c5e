//! Locations on other hosts: six S3 servers, each in its own network namespace joined to this one by a veth
//! pair, reached through a fault-injecting TCP proxy (the kernel here has no `netem`): added latency, a stalled
//! server, and one partitioned away in the middle of a commit and of an NBD write. Commit, get and NBD flush
//! must take bounded time, lose nothing acknowledged, and take the degraded path.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{data, Env};

/// What the proxy does to the traffic through it.
#[derive(Default)]
struct Faults {
    /// Added delay per forwarded chunk, each way, in milliseconds.
    delay_ms: AtomicU64,
    /// Forward nothing (connections stay open; the server seems to hang).
    stall: AtomicBool,
    /// Partitioned: every connection is cut and new ones are closed at once.
    cut: AtomicBool,
}

/// A TCP proxy from a loopback port to `target`, applying [`Faults`].
struct Proxy {
    port: u16,
    faults: Arc<Faults>,
    /// Open connections (both sockets), to cut them.
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (f, c) = (faults.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if f.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                if let Ok(mut all) = c.lock() {
                    all.extend(client.try_clone());
                    all.extend(server.try_clone());
                }
                let (f1, f2) = (f.clone(), f.clone());
                std::thread::spawn(move || pump(client, s2, &f1));
                std::thread::spawn(move || pump(server, c2, &f2));
            }
        });
        Proxy { port, faults, conns }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn delay(&self, ms: u64) {
        self.faults.delay_ms.store(ms, Ordering::SeqCst);
    }

    fn stall(&self, on: bool) {
        self.faults.stall.store(on, Ordering::SeqCst);
    }

    /// Partitions the server away (`true`) or heals the partition.
    fn cut(&self, on: bool) {
        self.faults.cut.store(on, Ordering::SeqCst);
        if on {
            if let Ok(mut all) = self.conns.lock() {
                for s in all.drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Copies `from` to `to` chunk by chunk with the proxy's faults, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, f: &Faults) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while f.stall.load(Ordering::SeqCst) && !f.cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let d = f.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        if f.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A network namespace with a veth pair to this one: the host `10.77.<i>.2`, reached from `10.77.<i>.1`.
struct Host {
    ns: String,
    veth: String,
    addr: String,
}

impl Host {
    fn create(i: usize) -> Option<Host> {
        let tag = std::process::id() % 10_000;
        let (ns, veth) = (format!("bf{tag}h{i}"), format!("bf{tag}v{i}"));
        let addr = format!("10.77.{i}.2");
        let peer = format!("{veth}p");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.clone()],
            vec![
                "link".into(),
                "add".into(),
                veth.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer.clone(),
            ],
            vec!["link".into(), "set".into(), peer.clone(), "netns".into(), ns.clone()],
            vec!["addr".into(), "add".into(), format!("10.77.{i}.1/24"), "dev".into(), veth.clone()],
            vec!["link".into(), "set".into(), veth.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{addr}/24"),
                "dev".into(),
                peer.clone(),
            ],
            vec!["-n".into(), ns.clone(), "link".into(), "set".into(), peer, "up".into()],
            vec!["-n".into(), ns.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
        ];
        let host = Host { ns, veth, addr };
        for s in steps {
            let ok = Command::new("ip").args(&s).stderr(Stdio::null()).status().is_ok_and(|st| st.success());
            if !ok {
                return None;
            }
        }
        Some(host)
    }

    /// Starts `cmd` inside the namespace.
    fn spawn(&self, cmd: &mut Command) -> Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(cmd.get_program()).args(cmd.get_args());
        c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting a server in its namespace")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.veth]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).stderr(Stdio::null()).status();
    }
}

/// One s3s-fs server on its own host, behind its proxy.
struct Remote {
    child: Child,
    proxy: Proxy,
    _host: Host,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_remote(env: &Env, i: usize) -> Option<Remote> {
    let host = Host::create(i)?;
    let root = env.path(&format!("s3/{i}"));
    std::fs::create_dir_all(root.join(format!("loc{i}"))).unwrap();
    let mut cmd = Command::new(crate::s3::s3s_fs());
    cmd.args(["--host", &host.addr, "--port", "9000", "--access-key", "bfnet", "--secret-key", "bfnetsecret"])
        .arg(&root);
    let child = host.spawn(&mut cmd);
    let target = format!("{}:9000", host.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&target).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start on {target}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Remote { child, proxy: Proxy::start(target), _host: host })
}

fn config(remotes: &[Remote]) -> String {
    remotes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "[[locations]]\nurl = \"s3://loc{i}/store\"\nendpoint = \"{}\"\naccess_key_id = \"bfnet\"\n\
                 secret_access_key = \"bfnetsecret\"\ntimeout_secs = 3\nconnect_timeout_secs = 1\nmax_retries = 1\n\n",
                r.proxy.endpoint()
            )
        })
        .collect()
}

/// Runs `bf args` and returns its exit code and how long it took.
fn timed(env: &Env, args: &[&str]) -> (Option<i32>, Duration, String) {
    let t = Instant::now();
    let o = env.run(args);
    (o.status.code(), t.elapsed(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn get_eq(env: &Env, name: &str, want: &[u8]) -> Duration {
    let t = Instant::now();
    let o = env.run(&["get", name, "-o", "-"]);
    assert!(o.status.success(), "get {name}: {}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == want, "{name} differs");
    t.elapsed()
}

#[test]
fn servers_on_other_hosts_with_latency_and_a_partition_mid_write() {
    if !crate::util::is_root() || !crate::nbd::have("ip") {
        eprintln!("SKIP: network namespaces need root and iproute2");
        return;
    }
    let env = Env::new();
    let remotes: Vec<Remote> = (0..6).map_while(|i| start_remote(&env, i)).collect();
    if remotes.len() < 6 {
        eprintln!("SKIP: could not create network namespaces with veth pairs here");
        return;
    }
    let cfg = env.path("config.toml");
    std::fs::write(&cfg, config(&remotes)).unwrap();
    env.set_var("BF_CONFIG", cfg.to_str().unwrap());
    env.ok(&["init", "-k", "4", "-m", "2", "--segment-size-mb", "0.25"]);
    let qemu = crate::nbd::have("qemu-io");
    if qemu {
        env.ok(&["volume", "create", "disk", "--size", "8M", "--stripe-size", "64K"]);
    }
    let mut files = Vec::new();

    // Added latency on every server: everything still works, in time that grows with it but stays bounded.
    for (round, ms) in [(0u64, 0u64), (1, 20), (2, 100)] {
        for r in &remotes {
            r.proxy.delay(ms);
        }
        let (name, bytes) = (format!("lat{ms}"), data(1 << 20, 10 + round));
        let p = env.write(&name, &bytes);
        let (code, took, err) = timed(&env, &["commit", p.to_str().unwrap(), "--name", &name]);
        assert_eq!(code, Some(0), "commit at {ms} ms: {err}");
        let got = get_eq(&env, &name, &bytes);
        eprintln!("latency {ms} ms: commit 1 MiB {took:?}, get {got:?}");
        assert!(took < Duration::from_secs(60) && got < Duration::from_secs(60), "{ms} ms: {took:?} / {got:?}");
        files.push((name, bytes));
        // The NBD server's open and close take some dozens of round trips: at 20 ms, not 100 (test time).
        if qemu && ms <= 20 {
            let srv = crate::nbd::Server::start(&env, &[]);
            let t = Instant::now();
            let pattern = format!("write -P {} {} 64k", round + 1, round * 65536);
            crate::nbd::ok(Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                &pattern,
                "-c",
                "flush",
                &srv.uri("disk"),
            ]));
            eprintln!("latency {ms} ms: NBD 64 KiB write + flush {:?}", t.elapsed());
            srv.stop();
        }
    }
    for r in &remotes {
        r.proxy.delay(20);
    }

    // One server partitioned away in the middle of a commit: the commit finishes on the other five (k+1 shards
    // of every stripe: acknowledged, exit 3, the missing shards named), in bounded time.
    let big = data(6 << 20, 40);
    let p = env.write("big", &big);
    let started = Instant::now();
    let child = env.bf().args(["commit", p.to_str().unwrap(), "--name", "big"]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    remotes[2].proxy.cut(true);
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 3)), "commit with a partition: {err}");
    assert!(took < Duration::from_secs(90), "the partition stalled the commit for {took:?}");
    eprintln!("partition mid-commit: exit {:?} in {took:?}", out.status.code());
    files.push(("big".into(), big));
    for r in &remotes {
        r.proxy.delay(0);
    }
    for (name, bytes) in &files {
        get_eq(&env, name, bytes);
    }
    // A stalled server (accepts, never answers) on top: reads still finish from the other four.
    remotes[4].proxy.stall(true);
    let got = get_eq(&env, "big", &files.last().unwrap().1);
    assert!(got < Duration::from_secs(90), "a stalled server stalled get for {got:?}");
    remotes[4].proxy.stall(false);

    // NBD: a write and flush while the partition lasts succeed on five servers and read back.
    if qemu {
        let srv = crate::nbd::Server::start(&env, &[]);
        let t = Instant::now();
        crate::nbd::ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 1M",
            "-c",
            "flush",
            &srv.uri("disk"),
        ]));
        assert!(t.elapsed() < Duration::from_secs(90), "flush with a partition took {:?}", t.elapsed());
        srv.stop();
    }

    // Healed: a repairing scrub restores every shard, then a clean scrub; everything reads back.
    remotes[2].proxy.cut(false);
    let (code, _, err) = timed(&env, &["scrub", "--repair"]);
    assert_eq!(code, Some(3), "{err}");
    env.ok(&["scrub"]);
    for (name, bytes) in &files {
        get_eq(&env, name, bytes);
    }
    if qemu {
        let srv = crate::nbd::Server::start(&env, &["--read-only"]);
        let out = crate::nbd::ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 1 0 64k",
            "-c",
            "read -P 2 64k 64k",
            "-c",
            "read -P 0x77 1M 1M",
            &srv.uri("disk"),
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        srv.stop();
    }
}
