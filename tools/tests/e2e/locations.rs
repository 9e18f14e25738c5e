//! Locations that change: `bf location add`, `bf rebalance` and `bf location remove` while commits and an NBD
//! workload run, then the loss of any m locations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::nbd::{have, ok, Server};
use crate::util::{data, Env};

/// `bf` on the store at `store` (what [`Env::bf`] does, for threads: an `Env` stays on its thread).
fn bf(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bf"));
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("BF_STORE", dir.join("store"))
        .env("BF_LOG", "error");
    c
}

/// Commits `bytes` as `name` from a thread.
fn commit(dir: &Path, name: &str, bytes: &[u8]) {
    let src = dir.join(format!("{name}.src"));
    std::fs::write(&src, bytes).unwrap();
    ok(bf(dir).args(["commit", src.to_str().unwrap(), "--name", name]));
}

/// Commits files one after another, with pauses, until `stop`; returns what was committed.
fn commit_loop(dir: &Path, prefix: &str, stop: &AtomicBool) -> Vec<(String, Vec<u8>)> {
    let mut done = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (name, bytes) = (format!("{prefix}-{i}"), data(1000 + (i as usize * 37_000) % 300_000, 100 + i));
        commit(dir, &name, &bytes);
        done.push((name, bytes));
        i += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    done
}

/// Writes 64 KiB patterns through qemu-io at `uri` into the upper half of the image, updating `image`, until
/// `stop`; each write is flushed before it counts.
fn nbd_loop(uri: &str, image: &Mutex<Vec<u8>>, stop: &AtomicBool) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let off = (8 << 20) + (i * 7 % 96) * (64 << 10);
        let pattern = (i % 250 + 1) as u8;
        ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {off} 64k"),
            "-c",
            "flush",
            uri,
        ]));
        image.lock().unwrap()[off..off + (64 << 10)].fill(pattern);
        i += 1;
    }
}

/// What the rebalance report says, as JSON.
fn rebalance_json(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["rebalance", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&env.ok(&args)).expect("rebalance JSON")
}

/// Every file and the volume read back byte-exact with the locations `lost` moved away.
fn check_without(env: &Env, lost: &[PathBuf], files: &[(String, Vec<u8>)], image: &[u8]) {
    let aside: Vec<PathBuf> = lost.iter().map(|p| p.with_extension("aside")).collect();
    for (p, a) in lost.iter().zip(&aside) {
        std::fs::rename(p, a).unwrap();
    }
    for (name, bytes) in files {
        let o = env.run(&["get", name, "-o", "-"]);
        assert!(o.status.success(), "get {name} without {lost:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout == *bytes, "{name} differs without {lost:?}");
    }
    let srv = Server::start(env, &["--read-only"]);
    let out = env.path("disk.out");
    ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &srv.uri("disk")]).arg(&out));
    srv.stop();
    assert!(std::fs::read(&out).unwrap() == image, "the volume differs without {lost:?}");
    for (p, a) in lost.iter().zip(&aside) {
        std::fs::rename(a, p).unwrap();
    }
}

/// The locations' directories as `bf location ls --json` lists them, in order.
fn location_dirs(env: &Env) -> Vec<PathBuf> {
    let ls: serde_json::Value = serde_json::from_str(&env.ok(&["location", "ls", "--json"])).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let spec = PathBuf::from(l["spec"].as_str().unwrap());
            if spec.is_absolute() {
                spec
            } else {
                env.store().join(spec)
            }
        })
        .collect()
}

#[test]
fn locations_added_and_removed_beside_commits_and_nbd_writes_lose_nothing_with_any_m_gone() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let env = Env::new();
    env.init(4, 2);
    env.ok(&["volume", "create", "disk", "--size", "16M", "--stripe-size", "64K"]);
    let dir = env.dir.path().to_path_buf();
    let mut files: Vec<(String, Vec<u8>)> = [300_000, 1_000, 50_000, 0]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("before-{i}"), data(*n, i as u64)))
        .collect();
    for (name, bytes) in &files {
        commit(&dir, name, bytes);
    }
    let mut first = data(8 << 20, 3);
    first.resize(16 << 20, 0);
    let image = Mutex::new(first);
    let img = env.write("img.raw", &image.lock().unwrap()[..8 << 20]);
    let srv = Server::start(&env, &[]);
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(srv.uri("disk")));

    // A layout change needs the store to itself: refused while the NBD server has it open.
    let new = env.path("new-location");
    let err = env.fails(&["location", "add", new.to_str().unwrap(), "--no-rebalance"], 1);
    assert!(err.contains("in use"), "{err}");
    srv.stop();
    env.ok(&["location", "add", new.to_str().unwrap(), "--no-rebalance"]);
    let away = rebalance_json(&env, &["--dry-run"]);
    assert!(away["moved"].as_u64().unwrap() > 0, "no shard away from its home after the add: {away}");

    // The rebalance runs beside commits and NBD writes.
    let srv = Server::start(&env, &[]);
    let stop = AtomicBool::new(false);
    let uri = srv.uri("disk");
    let during = std::thread::scope(|s| {
        let commits = s.spawn(|| commit_loop(&dir, "during-add", &stop));
        let writes = s.spawn(|| nbd_loop(&uri, &image, &stop));
        std::thread::sleep(Duration::from_millis(500));
        let r = rebalance_json(&env, &["--rate", "20", "--movers", "2"]);
        stop.store(true, Ordering::Relaxed);
        writes.join().unwrap();
        assert_eq!(r["left"], 0, "{r}");
        assert!(r["moved"].as_u64().unwrap() > 0, "{r}");
        commits.join().unwrap()
    });
    assert!(!during.is_empty());
    files.extend(during);
    srv.stop();
    let after = rebalance_json(&env, &["--dry-run"]);
    assert_eq!(after["moved"], 0, "shards still away from home: {after}");
    assert!(std::fs::read_dir(new.join("shards")).unwrap().count() > 0, "nothing moved onto the new location");
    // The new location lacks the replicated objects' copies until a repairing scrub (exit 3: found, repaired).
    assert_eq!(env.run(&["scrub", "--repair"]).status.code(), Some(3));
    env.ok(&["scrub"]);

    // Removed beside commits: drained, the copies restored, forgotten; nothing is left on it that is needed.
    let before = location_dirs(&env);
    let gone = before[1].clone();
    let stop = AtomicBool::new(false);
    let during = std::thread::scope(|s| {
        let commits = s.spawn(|| commit_loop(&dir, "during-remove", &stop));
        std::thread::sleep(Duration::from_millis(300));
        env.ok(&["location", "remove", "1"]);
        stop.store(true, Ordering::Relaxed);
        commits.join().unwrap()
    });
    files.extend(during);
    let now = location_dirs(&env);
    assert_eq!(now.len(), 6);
    assert!(!now.contains(&gone));
    env.ok(&["scrub"]);
    let left = blockframe::testing::files_under(&gone.join("shards"));
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::rename(&gone, env.path("removed-location")).unwrap();

    let image = image.into_inner().unwrap();
    for lost in [[0, 1], [2, 5], [3, 4], [0, 5]] {
        check_without(&env, &[now[lost[0]].clone(), now[lost[1]].clone()], &files, &image);
    }
}
