//! Serve in-memory (sparse) exports over NBD, for tests and manual try-out.
//!
//! ```text
//! cargo run -p nbd-server --example memserve -- --unix /tmp/nbd.sock --size 64M
//! nbdinfo 'nbd+unix:///mem?socket=/tmp/nbd.sock'
//! cargo run -p nbd-server --example memserve -- --tcp 127.0.0.1:10809 --size 1G --name disk
//! qemu-io -f raw 'nbd://127.0.0.1:10809/disk'
//! ```
//!
//! Options:
//! * `--unix PATH` or `--tcp ADDR` (exactly one; a stale socket file at PATH is replaced)
//! * `--size N[K|M|G]` size of the export (default 64M)
//! * `--name NAME` export name (default `mem`; it is also the default export `""`)
//! * `--description TEXT` export description
//! * `--read-only` serve a read-only export
//! * `--min-block N` advertised minimum block size (default 512; 1 suits
//!   byte-granular clients such as `nbdfuse`)
//! * `--extra NAME:SIZE[:ro]` additional exports (repeatable)
//!
//! Stops gracefully on SIGINT or SIGTERM. Logs go to stderr (`RUST_LOG`).

use std::sync::Arc;

use nbd_server::{serve, BlockBackend, CancellationToken, Listener, MemBackend, SimpleRegistry};

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(|| format!("bad size {s:?}"))
}

struct Args {
    unix: Option<String>,
    tcp: Option<String>,
    size: u64,
    name: String,
    description: String,
    read_only: bool,
    min_block: u32,
    extra: Vec<(String, u64, bool)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        unix: None,
        tcp: None,
        size: 64 << 20,
        name: "mem".into(),
        description: "in-memory sparse export".into(),
        read_only: false,
        min_block: 512,
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--unix" => a.unix = Some(val()?),
            "--tcp" => a.tcp = Some(val()?),
            "--size" => a.size = parse_size(&val()?)?,
            "--name" => a.name = val()?,
            "--description" => a.description = val()?,
            "--read-only" => a.read_only = true,
            "--min-block" => {
                let v = val()?;
                a.min_block = v.parse().map_err(|_| format!("bad --min-block {v:?}"))?;
            }
            "--extra" => {
                let v = val()?;
                let parts: Vec<&str> = v.split(':').collect();
                match parts.as_slice() {
                    [n, s] => a.extra.push((n.to_string(), parse_size(s)?, false)),
                    [n, s, "ro"] => a.extra.push((n.to_string(), parse_size(s)?, true)),
                    _ => return Err(format!("bad --extra {v:?}, want NAME:SIZE[:ro]")),
                }
            }
            "-h" | "--help" => {
                return Err("usage: memserve (--unix PATH | --tcp ADDR) [--size N] [--name NAME] \
                     [--description TEXT] [--read-only] [--min-block N] [--extra NAME:SIZE[:ro]]..."
                    .into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.unix.is_some() == a.tcp.is_some() {
        return Err("give exactly one of --unix PATH or --tcp ADDR".into());
    }
    Ok(a)
}

fn mem(size: u64, ro: bool, min_block: u32) -> Arc<dyn BlockBackend> {
    let m = if ro { MemBackend::new_read_only(size) } else { MemBackend::new(size) };
    Arc::new(m.with_block_sizes(min_block, 4096))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("memserve: {e}");
            std::process::exit(2);
        }
    };
    let mut registry = SimpleRegistry::new().with_export(
        args.name.clone(),
        args.description.clone(),
        mem(args.size, args.read_only, args.min_block),
    );
    for (name, size, ro) in &args.extra {
        registry = registry.with_export(name.clone(), format!("extra export {name}"), mem(*size, *ro, args.min_block));
    }
    let listener = match (&args.unix, &args.tcp) {
        (Some(path), _) => {
            let _ = std::fs::remove_file(path);
            Listener::bind_unix(path)
        }
        (_, Some(addr)) => Listener::bind_tcp(addr).await,
        _ => unreachable!("checked in parse_args"),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("memserve: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
    // Tell scripts we are ready.
    println!("ready {}", listener.local_addr_string());
    let res = serve(listener, Arc::new(registry), shutdown).await;
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
    }
    if let Err(e) = res {
        eprintln!("memserve: {e}");
        std::process::exit(1);
    }
}
