//! `bf volume` (create, list, remove block volumes) and `bf nbd serve`.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use blockframe::metrics::store::StoreMetrics;
use blockframe::volume::{self, VolumeOptions};
use nbd_server::{
    CancellationToken, ListenAddr, Listener, NbdMetrics, ServerConfig, StoreRegistry, TlsConfig, TlsMode,
};

use crate::cli::{NbdCommand, ServeArgs, TlsArg, VolumeCommand};
use crate::open::open_keyed;
use crate::settings::Settings;
use crate::units::{parse_duration, parse_size};
use crate::EXIT_OK;

/// `bf volume ...`.
pub(crate) fn volume_cmd(cmd: &VolumeCommand, s: &Settings) -> Result<u8> {
    let st = open_keyed(s)?;
    match cmd {
        VolumeCommand::Create { name, size, stripe_size } => {
            let size = parse_size(size)?;
            let stripe = match stripe_size {
                Some(x) => u32::try_from(parse_size(x)?).context("stripe size too large")?,
                None => volume::DEFAULT_STRIPE_SIZE,
            };
            volume::create(&st, name, size, stripe)?;
            eprintln!("bf: created volume {name} ({size} bytes, thin-provisioned, {} KiB stripes)", stripe >> 10);
        }
        VolumeCommand::Ls { json } => {
            let vols = volume::list(&st)?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&vols)?)?;
            } else {
                for v in vols {
                    out!("{:>16}  {:>5} KiB  gen {:<6}  {}", v.size, v.stripe_size >> 10, v.generation, v.name)?;
                }
            }
        }
        VolumeCommand::Rm { name } => {
            volume::remove(&st, name)?;
            eprintln!("bf: removed volume {name}");
        }
    }
    Ok(EXIT_OK)
}

/// `bf nbd ...`.
pub(crate) fn nbd_cmd(cmd: &NbdCommand, s: &Settings) -> Result<u8> {
    match cmd {
        NbdCommand::Serve(a) => serve(a, s),
    }
}

fn serve(a: &ServeArgs, s: &Settings) -> Result<u8> {
    // First, before any thread starts: taking the socket edits the environment.
    let passed = blockframe::activation::take_listener().context("socket activation")?;
    if passed.is_some() && (a.socket.is_some() || a.listen.is_some()) {
        bail!("a socket was passed by socket activation (LISTEN_FDS): leave out --listen and --socket");
    }
    let st = Arc::new(open_keyed(s)?);
    let cache_mb = a.cache_mb.or(s.file.volume_cache_mb).unwrap_or(volume::DEFAULT_CACHE_BYTES >> 20);
    let options = VolumeOptions { cache_bytes: cache_mb << 20 };
    let registry = Arc::new(StoreRegistry::new(st.clone(), a.volume.clone(), a.read_only, options));
    if let Some(v) = &a.volume {
        registry.preopen(v).with_context(|| format!("opening volume {v}"))?;
    }
    let addr = match (&a.socket, &a.listen) {
        (Some(p), _) => ListenAddr::Unix(p.clone()),
        (None, Some(l)) => ListenAddr::Tcp(l.clone()),
        (None, None) => ListenAddr::Tcp(DEFAULT_NBD_LISTEN.into()),
    };
    let mut config = server_config(a)?;
    let metrics_listen = a.metrics_listen.as_deref().map(super::serve::resolve).transpose()?;
    let tls_note = config.tls.as_ref().map(|t| {
        let mode = if t.mode() == TlsMode::Require { "TLS required" } else { "TLS offered" };
        let peer = if t.verifies_peer() { ", client certificates verified" } else { "" };
        format!("{mode}{peer}")
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let (listener, place) = match passed {
            Some(p) => {
                let l = Listener::from_passed(p).context("the socket passed by socket activation")?;
                let place = format!("{} (passed by socket activation)", describe_listener(&l));
                (l, place)
            }
            None => {
                let l = Listener::bind(&addr).await.with_context(|| format!("listening on {}", describe(&addr)))?;
                (l, describe(&addr))
            }
        };
        if let Some(warning) = exposure_warning(&listener, &config) {
            eprintln!("bf: warning: {warning}");
        }
        let token = CancellationToken::new();
        if let Some(m) = metrics_listen {
            let l = http_server::bind_metrics(m, false).await.context("--metrics-listen")?;
            let metrics = Arc::new(NbdMetrics::default());
            config.metrics = Some(metrics.clone());
            eprintln!("bf: metrics on http://{}/metrics", l.local_addr().unwrap_or(m));
            let (store, store_metrics) = (st.clone(), StoreMetrics::default());
            let render: http_server::RenderMetrics = Arc::new(move || {
                let mut text = metrics.render();
                store_metrics.render(&store, &mut text);
                text
            });
            tokio::spawn(http_server::serve_metrics(l, render, token.clone()));
        }
        let t = token.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down: finishing in-flight requests and flushing");
            crate::notify::stopping();
            t.cancel();
        });
        let what = a.volume.as_deref().map(|v| format!("volume {v}")).unwrap_or_else(|| "all volumes".into());
        let tls = match &tls_note {
            None => String::new(),
            Some(n) => format!(" ({n})"),
        };
        let serving = format!("serving {what} over NBD on {place}{tls}");
        eprintln!("bf: {serving}");
        crate::notify::ready(&serving);
        nbd_server::serve_with_config(listener, registry.clone(), token, config).await.context("NBD server")?;
        for (name, e) in registry.flush_all() {
            eprintln!("bf: flushing volume {name} at shutdown failed: {e}");
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(EXIT_OK)
}

/// The server's tunables from the command line.
fn server_config(a: &ServeArgs) -> Result<ServerConfig> {
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let handshake_timeout = parse_duration(&a.handshake_timeout).context("--handshake-timeout")?;
    if handshake_timeout.is_zero() {
        bail!("--handshake-timeout must be more than 0");
    }
    let idle_timeout = a.idle_timeout.as_deref().map(parse_duration).transpose().context("--idle-timeout")?;
    if idle_timeout.is_some_and(|t| t.is_zero()) {
        bail!("--idle-timeout must be more than 0 (leave it out for no idle timeout)");
    }
    Ok(ServerConfig {
        max_connections: a.max_connections,
        handshake_timeout,
        idle_timeout,
        tls: tls_config(a)?,
        ..ServerConfig::default()
    })
}

/// `--tls`, `--tls-certificates` and `--tls-verify-peer`.
fn tls_config(a: &ServeArgs) -> Result<Option<TlsConfig>> {
    let mode = match a.tls {
        TlsArg::Off => {
            if a.tls_certificates.is_some() || a.tls_verify_peer {
                bail!("--tls-certificates and --tls-verify-peer need --tls on or --tls require");
            }
            return Ok(None);
        }
        TlsArg::On => TlsMode::On,
        TlsArg::Require => TlsMode::Require,
    };
    let Some(dir) = &a.tls_certificates else {
        bail!("--tls needs --tls-certificates DIR (with ca-cert.pem, server-cert.pem and server-key.pem)");
    };
    let tls = TlsConfig::from_dir(dir, mode, a.tls_verify_peer)
        .with_context(|| format!("loading the TLS certificates in {}", dir.display()))?;
    Ok(Some(tls))
}

/// What to tell the operator when a TCP listener is reachable from other hosts without TLS: NBD itself has
/// no authentication, so anyone who can connect can read and overwrite every volume served.
fn exposure_warning(listener: &Listener, config: &ServerConfig) -> Option<String> {
    let Listener::Tcp(l) = listener else { return None };
    let addr = l.local_addr().ok()?;
    if addr.ip().is_loopback() {
        return None;
    }
    let risk = "anyone who can reach it can read and overwrite the volumes served";
    match &config.tls {
        None => Some(format!(
            "listening on {addr}, which is not a loopback address, without TLS: NBD has no authentication, so \
             {risk} (use --tls require --tls-verify-peer, a loopback address or --socket)"
        )),
        Some(t) if t.mode() == TlsMode::On => Some(format!(
            "listening on {addr} with --tls on: plaintext clients are served too, so {risk} (use --tls require \
             --tls-verify-peer)"
        )),
        Some(t) if !t.verifies_peer() => Some(format!(
            "listening on {addr} without --tls-verify-peer: TLS encrypts, but any client is let in, so {risk}"
        )),
        Some(_) => None,
    }
}

/// Where `bf nbd serve` listens without --listen, --socket or socket activation.
const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

/// A bound listener as the start message names it.
fn describe_listener(l: &Listener) -> String {
    match l {
        Listener::Tcp(_) => format!("nbd://{}", l.local_addr_string()),
        Listener::Unix { .. } => format!("unix socket {}", l.local_addr_string()),
    }
}

fn describe(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(a) => format!("nbd://{a}"),
        ListenAddr::Unix(p) => format!("unix socket {}", p.display()),
    }
}
