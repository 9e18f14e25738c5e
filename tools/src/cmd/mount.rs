//! `bf mount` and `bf umount`: the store as a FUSE filesystem (see `blockframe::vfs` and the `fs-mount` crate).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use blockframe::metrics::store::StoreMetrics;
use blockframe::vfs::{Vfs, VfsOptions};
use fs_mount::{Mount, MountOptions};

use crate::cli::{MountArgs, UmountArgs};
use crate::open::open_keyed;
use crate::settings::Settings;
use crate::EXIT_OK;

/// Default segment cache of a mount, MiB.
pub const DEFAULT_MOUNT_CACHE_MB: usize = 128;

fn check_mount_point(dir: &Path) -> Result<()> {
    let md = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {} does not exist", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("mount point {}", dir.display())),
    };
    if !md.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("reading mount point {}", dir.display()))?;
    if entries.next().is_some() {
        bail!("mount point {} is not empty", dir.display());
    }
    Ok(())
}

/// `bf mount DIR`.
pub fn mount_cmd(a: &MountArgs, s: &Settings) -> Result<u8> {
    check_mount_point(&a.dir)?;
    // Open and unlock before anything else, so a missing store or a wrong key is a one-line error here.
    let store = open_keyed(s)?;
    if !a.foreground {
        if store.descriptor().kdf.is_some() && std::env::var_os("BF_PASSPHRASE").is_none() {
            bail!("a background mount of a passphrase store needs BF_PASSPHRASE (or use --foreground)");
        }
        return background(a, s);
    }
    let cache_mb = a.cache_mb.or(s.file.mount_cache_mb).unwrap_or(DEFAULT_MOUNT_CACHE_MB);
    let opts = VfsOptions {
        read_only: a.read_only,
        cache_bytes: cache_mb << 20,
        commit_workers: s.workers.min(2),
        ..VfsOptions::default()
    };
    let vfs = Arc::new(Vfs::new(Arc::new(store), opts)?);
    if let Some(addr) = &a.metrics_listen {
        serve_metrics(super::serve::resolve(addr)?, vfs.clone())?;
    }
    let mopts = MountOptions {
        read_only: a.read_only,
        allow_other: a.allow_other,
        writeback_cache: !a.no_writeback_cache,
        ..MountOptions::default()
    };
    let mut mount =
        Mount::new(vfs.clone(), &a.dir, &mopts).with_context(|| format!("mounting on {}", a.dir.display()))?;
    let mut unmounter = mount.unmounter();
    // SIGINT/SIGTERM: commit what is written, then unmount; `run` below then returns.
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        });
        tracing::info!("signal received: committing open files and unmounting");
        crate::notify::stopping();
        for e in vfs.flush_all() {
            eprintln!("bf: commit failed: {e}");
        }
        if let Err(e) = unmounter.unmount() {
            eprintln!("bf: unmounting failed: {e}");
        }
    });
    let mounted = format!(
        "mounted {} on {}{}; unmount with `bf umount {}`",
        s.store.display(),
        a.dir.display(),
        if a.read_only { " (read-only)" } else { "" },
        a.dir.display()
    );
    eprintln!("bf: {mounted}");
    crate::notify::ready(&mounted);
    let served = mount.run();
    // Unmounted (by a signal, or by `bf umount` from outside): what is left of the shutdown is the exit.
    crate::notify::stopping();
    served.context("serving the mount")?;
    Ok(EXIT_OK)
}

/// Binds `addr` and serves the mount's metrics on it from a thread of its own (FUSE requests are served by
/// plain threads; this is the mount's only runtime besides the signal thread's).
fn serve_metrics(addr: std::net::SocketAddr, vfs: Arc<Vfs>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let listener = rt.block_on(http_server::bind_metrics(addr, false)).context("--metrics-listen")?;
    eprintln!("bf: metrics on http://{}/metrics", listener.local_addr().unwrap_or(addr));
    let store_metrics = StoreMetrics::default();
    let render: http_server::RenderMetrics = Arc::new(move || {
        let mut text = fs_mount::render_metrics(vfs.cache_stats(), vfs.segments_decoded());
        store_metrics.render(vfs.store(), &mut text);
        text
    });
    std::thread::spawn(move || {
        rt.block_on(http_server::serve_metrics(listener, render, http_server::CancellationToken::new()));
    });
    Ok(())
}

/// Runs the mount as a child (`--foreground`, in its own process group, logging to `<store>/mount.log`) and
/// returns once the filesystem is mounted, or with the child's error.
fn background(a: &MountArgs, s: &Settings) -> Result<u8> {
    let exe = std::env::current_exe().context("locating the bf executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let log_path = s.store.join("mount.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if fs_mount::is_mount_point(&a.dir) {
            eprintln!(
                "bf: mounted {} on {} (server pid {}, log {}); unmount with `bf umount {}`",
                s.store.display(),
                a.dir.display(),
                child.id(),
                log_path.display(),
                a.dir.display()
            );
            return Ok(EXIT_OK);
        }
        if let Some(status) = child.try_wait().context("waiting for the mount process")? {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log_path) {
                let _ = f.seek(SeekFrom::Start(log_start));
                let _ = f.read_to_string(&mut text);
            }
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim_start_matches("bf: ");
            bail!("mount failed ({status}): {last}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the mount did not come up within 60 s (see {})", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bf umount DIR`: unmounts, then waits for the server to commit what was written and exit, so that once it
/// returns everything written through the mount is in the store.
pub fn umount_cmd(a: &UmountArgs) -> Result<u8> {
    if !fs_mount::is_mount_point(&a.dir) {
        bail!("{} is not a mount point", a.dir.display());
    }
    let server = fs_mount::server_pid(&a.dir);
    fs_mount::unmount_dir(&a.dir, false)
        .with_context(|| format!("unmounting {} (are files open there?)", a.dir.display()))?;
    if let Some(pid) = server {
        let started = Instant::now();
        let mut told = false;
        while running(pid) {
            if !told && started.elapsed() > Duration::from_secs(2) {
                eprintln!("bf: waiting for the mount server (pid {pid}) to commit what was written");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(EXIT_OK)
}

/// True while process `pid` runs (a zombie waiting for its parent to reap it has finished).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces or parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
