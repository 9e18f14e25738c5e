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
    s3_port: u16,
    bucket: String,
}

impl Garage {
    /// Starts a new node in `root`, gives it a role, and creates `bucket` with the test key allowed on it.
    fn start(bin: &Path, root: PathBuf, bucket: &str) -> Garage {
        std::fs::create_dir_all(&root).unwrap();
        let (rpc, s3_port) = (free_port(), free_port());
        let config = root.join("garage.toml");
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + rpc as usize) % 256)).collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{root}/meta\"\ndata_dir = \"{root}/data\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \
                 \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                root = root.display()
            ),
        )
        .unwrap();
        let mut g = Garage { bin: bin.into(), child: None, config, s3_port, bucket: bucket.into() };
        g.spawn();
        let id = g.cli(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "z1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", bucket]);
        g.cli(&["key", "import", "--yes", ACCESS, SECRET]);
        g.cli(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", ACCESS]);
        g
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
            .stderr(Stdio::null())
            .spawn()
            .expect("starting garage");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            assert!(Instant::now() < deadline, "garage did not start on port {}", self.s3_port);
            std::thread::sleep(Duration::from_millis(50));
        }
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
