//! Locations on Garage, a real distributed S3-compatible object store: six independent single-node servers as the
//! six locations of a 4+2 store. Commit, get, mount and NBD with two servers killed or stopped (SIGSTOP), then
//! restarted; a repairing scrub after they return.
//!
//! The binary is built once by scripts/test (`cargo install garage` into target/tools/garage, about 8 minutes
//! on 2 cores); where it is missing the test says so and skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{data, Env};

/// Garage's access key ids are `GK` and 24 hex digits; secrets 64 hex digits.
const ACCESS: &str = "GK0b1f0c4e5a6d7e8f9a0b1c2d";
const SECRET: &str = "5e3c1f0a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e";

/// The garage binary: $GARAGE, else target/tools/garage/bin/garage (where scripts/test builds it), else PATH.
fn garage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE") {
        return Some(p.into());
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/garage/bin/garage");
    if local.is_file() {
        return Some(local);
    }
    let on_path = Command::new("sh").args(["-c", "command -v garage"]).output().ok()?;
    on_path.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One single-node Garage server holding one bucket.
struct Garage {
    bin: PathBuf,
    child: Option<Child>,
    config: PathBuf,
    rpc: u16,
    s3_port: u16,
    bucket: String,
}

impl Garage {
    /// Starts a new node in `root`, gives it a role, and creates `bucket` with the test key allowed on it.
    fn start(bin: &Path, root: PathBuf, bucket: &str) -> Garage {
        let rpc = free_port();
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + rpc as usize) % 256)).collect();
        let g = Garage::node(bin, root, rpc, &secret, 1, bucket);
        g.cli(&["layout", "assign", "-z", "z1", "-c", "1G", &g.id()]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.allow(bucket);
        g
    }

    /// Starts a node of a cluster (`replication` copies of each object; nodes of one cluster share `secret`)
    /// with its RPC on port `rpc`; `bucket` is the bucket its location uses.
    fn node(bin: &Path, root: PathBuf, rpc: u16, secret: &str, replication: usize, bucket: &str) -> Garage {
        std::fs::create_dir_all(&root).unwrap();
        let s3_port = free_port();
        let config = root.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{root}/meta\"\ndata_dir = \"{root}/data\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = {replication}\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \
                 \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                root = root.display()
            ),
        )
        .unwrap();
        let mut g = Garage { bin: bin.into(), child: None, config, rpc, s3_port, bucket: bucket.into() };
        g.spawn();
        g
    }

    /// This node's id.
    fn id(&self) -> String {
        self.cli(&["node", "id", "-q"]).trim().split('@').next().unwrap().to_string()
    }

    /// Creates `bucket` and lets the test key read and write it (the key is imported first when needed).
    fn allow(&self, bucket: &str) {
        self.cli(&["bucket", "create", bucket]);
        if !self.cli(&["key", "list"]).contains(ACCESS) {
            self.cli(&["key", "import", "--yes", ACCESS, SECRET]);
        }
        self.cli(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", ACCESS]);
    }

    /// Runs a garage admin command against this node; returns its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = Command::new(&self.bin).arg("-c").arg(&self.config).args(args).output().expect("garage");
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            // Just started: the RPC side may not answer yet.
            assert!(Instant::now() < deadline, "garage {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("starting garage");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            assert!(Instant::now() < deadline, "garage did not start on port {}", self.s3_port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log (its stderr), appended to across restarts.
    fn log(&self) -> std::fs::File {
        let path = self.config.with_file_name("server.log");
        std::fs::OpenOptions::new().create(true).append(true).open(path).expect("garage log")
    }

    /// The end of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.config.with_file_name("server.log")).unwrap_or_default();
        let quiet =
            |l: &&str| !l.contains("Sync error") && !l.contains("Failed to sync") && !l.contains("Error in worker");
        log.lines().filter(quiet).take(30).collect::<Vec<_>>().join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// The `[[locations]]` settings Garage needs: its endpoint (path-style addressing is the default) and its
    /// region name.
    fn table(&self) -> String {
        format!(
            "[[locations]]\nurl = \"s3://{}/store\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"garage\"\n\
             access_key_id = \"{ACCESS}\"\nsecret_access_key = \"{SECRET}\"\ntimeout_secs = 3\n\
             connect_timeout_secs = 1\nmax_retries = 1\n\n",
            self.bucket, self.s3_port
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill();
    }
}

fn get_eq(env: &Env, name: &str, want: &[u8]) {
    let o = env.run(&["get", name, "-o", "-"]);
    assert!(o.status.success(), "bf get {name}: {}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == want, "{name} differs");
}

#[test]
fn six_garage_servers_commit_get_mount_and_nbd_with_two_down_then_repair() {
    let Some(bin) = garage() else {
        eprintln!("SKIP: garage is not built (scripts/test builds it into target/tools/garage)");
        return;
    };
    let env = Env::new();
    let mut servers: Vec<Garage> =
        (0..6).map(|i| Garage::start(&bin, env.path(&format!("garage/{i}")), &format!("loc{i}"))).collect();
    let cfg = env.path("config.toml");
    std::fs::write(&cfg, servers.iter().map(Garage::table).collect::<String>()).unwrap();
    env.set_var("BF_CONFIG", cfg.to_str().unwrap());
    env.ok(&["init", "-k", "4", "-m", "2", "--segment-size-mb", "0.0625"]);
    let files: Vec<(String, Vec<u8>)> = [(0usize, 1u64), (1, 2), (700_000, 3), (5 * 65536 + 17, 4), (3000, 5)]
        .iter()
        .map(|&(n, s)| (format!("f{s}"), data(n, s)))
        .collect();
    for (name, bytes) in &files {
        let p = env.write(name, bytes);
        env.ok(&["commit", p.to_str().unwrap(), "--name", name]);
    }
    for (name, bytes) in &files {
        get_eq(&env, name, bytes);
    }
    env.ok(&["scrub"]);

    // A volume written over NBD while all six answer.
    let nbd = crate::nbd::have("qemu-io");
    if nbd {
        env.ok(&["volume", "create", "disk", "--size", "8M", "--stripe-size", "64K"]);
        let srv = crate::nbd::Server::start(&env, &[]);
        let out = crate::nbd::ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x33 3000000 70000",
            "-c",
            "flush",
            &srv.uri("disk"),
        ]));
        assert!(!out.contains("failed"), "{out}");
        srv.stop();
    }

    // Two servers killed: get, the mount and the NBD server still read every byte.
    servers[1].kill();
    servers[4].kill();
    for (name, bytes) in &files {
        get_eq(&env, name, bytes);
    }
    if crate::mount::fuse_usable() {
        let m = crate::mount::Mounted::start(&env, &["--read-only"]);
        for (name, bytes) in &files {
            assert!(std::fs::read(m.p(name)).unwrap() == *bytes, "{name} through the mount");
        }
        m.unmount(&env);
    }
    let read_volume = |env: &Env| {
        let srv = crate::nbd::Server::start(env, &["--read-only"]);
        let out = crate::nbd::ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x33 3000000 70000",
            "-c",
            "read -P 0 1M 1M",
            &srv.uri("disk"),
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        srv.stop();
    };
    if nbd {
        read_volume(&env);
    }
    // Both back, another stopped (it accepts connections and never answers): reads finish in bounded time, and
    // a commit succeeds on the five that answer (the policy's k+1), saying one shard per stripe is missing.
    servers[1].restart();
    servers[4].restart();
    servers[2].signal("-STOP");
    let t = Instant::now();
    get_eq(&env, "f3", &files[2].1);
    let late = data(200_000, 77);
    let p = env.write("late", &late);
    let o = env.run(&["commit", p.to_str().unwrap(), "--name", "late"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(90), "a stopped server stalled bf for {:?}", t.elapsed());
    servers[2].signal("-CONT");
    // All back: one repairing scrub, then a clean one; then any two others lost.
    assert_eq!(env.run(&["scrub", "--repair"]).status.code(), Some(3));
    env.ok(&["scrub"]);
    servers[0].kill();
    servers[5].kill();
    for (name, bytes) in files.iter().chain([("late".to_string(), late.clone())].iter()) {
        get_eq(&env, name, bytes);
    }
    if nbd {
        read_volume(&env);
    }
}

/// Three Garage nodes in one cluster, one per zone, each object on all three (replication factor 3, write and
/// read quorums of 2); `buckets` are created in it. Returns the nodes, node `i` being the endpoint of bucket `i`.
fn cluster(bin: &Path, env: &Env, buckets: &[&str]) -> Vec<Garage> {
    let rpcs: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let secret: String = (0..32).map(|i| format!("{:02x}", (i * 53 + 7) % 256)).collect();
    let nodes: Vec<Garage> =
        (0..3).map(|i| Garage::node(bin, env.path(&format!("cluster/{i}")), rpcs[i], &secret, 3, buckets[i])).collect();
    wait_healthy(&nodes);
    let ids: Vec<String> = nodes.iter().map(Garage::id).collect();
    for (i, id) in ids.iter().enumerate() {
        nodes[0].cli(&["layout", "assign", "-z", &format!("zone-{i}"), "-c", "1G", id]);
    }
    nodes[0].cli(&["layout", "apply", "--version", "1"]);
    // Every node must see the new layout before the buckets are made through node 0.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| n.cli(&["status"]).matches("zone-").count() == 3) {
        assert!(Instant::now() < deadline, "the cluster did not settle");
        std::thread::sleep(Duration::from_millis(200));
    }
    for b in buckets {
        nodes[0].allow(b);
    }
    nodes
}

/// Waits until node 0 sees all three nodes of the cluster healthy (a restarted node reconnects on its own, in a
/// few seconds).
fn wait_healthy(nodes: &[Garage]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addrs: Vec<String> = nodes.iter().map(|n| format!("{}@127.0.0.1:{}", n.id(), n.rpc)).collect();
    loop {
        // A node that restarted reconnects to its peers by itself, but only after a while: ask it to now.
        for a in &addrs[1..] {
            let _ = Command::new(&nodes[0].bin).arg("-c").arg(&nodes[0].config).args(["node", "connect", a]).output();
        }
        let status = nodes[0].cli(&["status"]);
        let healthy = status.split("==== FAILED NODES ====").next().unwrap_or("").matches("127.0.0.1:").count();
        if healthy == nodes.len() {
            return;
        }
        let logs: Vec<String> = nodes.iter().map(Garage::log_tail).collect();
        assert!(Instant::now() < deadline, "the cluster did not heal: {status}\n{}", logs.join("\n---\n"));
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_garage_cluster_node_killed_during_a_commit_and_a_volume_flush_loses_nothing_acknowledged() {
    let Some(bin) = garage() else {
        eprintln!("SKIP: garage is not built (scripts/test builds it into target/tools/garage)");
        return;
    };
    let env = Env::new();
    // Locations 0-2: three buckets of one three-node cluster, each reached through a different node; 3-5:
    // directories.
    let mut nodes = cluster(&bin, &env, &["loc0", "loc1", "loc2"]);
    let cfg: String = nodes.iter().map(Garage::table).collect();
    std::fs::write(env.path("config.toml"), cfg).unwrap();
    env.set_var("BF_CONFIG", env.path("config.toml").to_str().unwrap());
    let mut init = vec!["init", "-k", "4", "-m", "2", "--segment-size-mb", "0.0625"];
    let dirs: Vec<String> = (0..3).map(|i| env.path(&format!("dir{i}")).display().to_string()).collect();
    let urls: Vec<String> = (0..3).map(|i| format!("s3://loc{i}/store")).collect();
    for l in urls.iter().chain(&dirs) {
        init.extend(["--location", l]);
    }
    env.ok(&init);
    let before = data(300_000, 1);
    let p = env.write("before", &before);
    env.ok(&["commit", p.to_str().unwrap(), "--name", "before"]);

    // Node 1 killed while a 6 MB commit runs: the commit either fails (nothing published) or is acknowledged,
    // and then reads back byte-exact.
    let big = data(6 << 20, 2);
    let p = env.write("big", &big);
    let mut commit = env.bf().args(["commit", p.to_str().unwrap(), "--name", "big"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    nodes[1].kill();
    let status = commit.wait().unwrap();
    let acknowledged = status.success() || status.code() == Some(3);
    get_eq(&env, "before", &before);
    if acknowledged {
        get_eq(&env, "big", &big);
    } else {
        assert!(!env.ok(&["ls"]).contains("big"), "a failed commit was published");
    }

    // Node 2 killed during a volume's flush: a flush that returned holds every byte it covered.
    let nbd = crate::nbd::have("qemu-io");
    if nbd {
        nodes[1].restart();
        wait_healthy(&nodes);
        env.ok(&["volume", "create", "disk", "--size", "8M", "--stripe-size", "64K"]);
        let srv = crate::nbd::Server::start(&env, &[]);
        let uri = srv.uri("disk");
        crate::nbd::ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x21 0 2M", "-c", "flush", &uri]));
        let writer = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 2M 4M", "-c", "flush", &uri])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        nodes[2].kill();
        let out = writer.wait_with_output().unwrap();
        let flushed = out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed");
        srv.stop();
        let srv = crate::nbd::Server::start(&env, &["--read-only"]);
        let mut check = vec!["-f", "raw", "-r", "-c", "read -P 0x21 0 2M"];
        if flushed {
            check.extend(["-c", "read -P 0x42 2M 4M"]);
        }
        let uri = srv.uri("disk");
        check.push(&uri);
        let out = Command::new("qemu-io").args(&check).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!out.contains("Pattern verification failed"), "flushed={flushed}: {out}\n{}", env.log_tail());
        srv.stop();
    }

    // Every node back: one repairing scrub, then a clean one, and everything acknowledged reads back.
    for n in nodes.iter_mut() {
        n.restart();
    }
    wait_healthy(&nodes);
    // The nodes answer S3 (503 until their tables have synced) before the repair, as an operator would wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env.run(&["location", "ls"]).status.success() {
        assert!(Instant::now() < deadline, "the cluster's buckets never answered again");
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = env.run(&["scrub", "--repair"]);
    assert!(matches!(r.status.code(), Some(0 | 3)), "{}", String::from_utf8_lossy(&r.stderr));
    let again = env.run(&["scrub"]);
    assert!(
        again.status.success(),
        "not clean after the repair:\n{}\n{}\nrepair:\n{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr),
        String::from_utf8_lossy(&r.stdout)
    );
    get_eq(&env, "before", &before);
    if acknowledged {
        get_eq(&env, "big", &big);
    }
}
