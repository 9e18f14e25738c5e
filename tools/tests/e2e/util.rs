//! Helpers for driving the real `bf` binary in temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch area with its own store; every command runs with a clean environment.
pub struct Env {
    pub dir: tempfile::TempDir,
    vars: std::cell::RefCell<Vec<(String, String)>>,
}

impl Env {
    pub fn new() -> Self {
        Env { dir: tempfile::tempdir().expect("tempdir"), vars: Default::default() }
    }

    /// Sets an environment variable for every later `bf` command of this env.
    pub fn set_var(&self, key: &str, value: &str) {
        let mut vars = self.vars.borrow_mut();
        vars.retain(|(k, _)| k != key);
        vars.push((key.into(), value.into()));
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `bf` with BF_STORE pointing at this env's store and no user config or data dirs.
    pub fn bf(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bf"));
        c.current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("BF_STORE", self.store())
            .env("BF_LOG", "error");
        for (k, v) in self.vars.borrow().iter() {
            c.env(k, v);
        }
        c
    }

    /// Runs `bf args...` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.bf().args(args).output().expect("running bf")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "bf {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs and asserts failure with the given exit code; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            o.status.code(),
            Some(code),
            "bf {args:?}: stdout {} stderr {err}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(!err.contains("panicked"), "panic: {err}");
        err
    }

    /// Initialises a store with 64 KiB segments.
    pub fn init(&self, k: u16, m: u16) {
        self.ok(&["init", "-k", &k.to_string(), "-m", &m.to_string(), "--segment-size-mb", "0.0625"]);
    }

    /// The log file servers started by the tests append their stderr to (`server.log` in the env).
    pub fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.path("server.log")).expect("server log")
    }

    /// The last lines of the servers' log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.path("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn location(&self, i: usize) -> PathBuf {
        self.store().join(format!("locations/loc-{i:02}"))
    }

    /// The shard directories (file ids, in hex) on every location of the store.
    fn shard_dirs(&self) -> std::collections::BTreeSet<String> {
        let Ok(locs) = std::fs::read_dir(self.store().join("locations")) else { return Default::default() };
        locs.flatten()
            .filter_map(|l| std::fs::read_dir(l.path().join("shards")).ok())
            .flat_map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }

    /// Commits `bytes` as `name` (larger than a pack takes, so in segments of its own) and returns its file id
    /// in hex: the name of its shard directory on each location.
    pub fn commit_file(&self, name: &str, bytes: &[u8]) -> String {
        let before = self.shard_dirs();
        let src = self.write("commit.tmp", bytes);
        self.ok(&["commit", src.to_str().unwrap(), "--name", name]);
        let new: Vec<String> = self.shard_dirs().difference(&before).cloned().collect();
        assert_eq!(new.len(), 1, "committing {name} made shard directories {new:?}");
        new[0].clone()
    }

    /// The object of shard `shard` of segment `segment` of file `id` (from [`Env::commit_file`]), on whichever
    /// location holds it.
    pub fn shard_file(&self, id: &str, segment: u64, shard: usize) -> PathBuf {
        let name = format!("shards/{id}/{segment:010}.{shard:03}");
        let locs = std::fs::read_dir(self.store().join("locations")).expect("locations");
        locs.flatten()
            .map(|l| l.path().join(&name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no location holds {name}"))
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

pub use blockframe::testing::test_bytes as data;

pub use blockframe::testing::files_under;

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

/// Mounts a tmpfs of `size` at `dir` (root only); returns false when that is impossible here.
pub fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

pub fn umount(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}
