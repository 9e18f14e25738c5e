//! `bf serve`: the store's files over HTTP (the `http-server` crate), and `bf serve token new`.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use blockframe::activation::PassedListener;
use http_server::{CancellationToken, Config, Limits, Server, TokenSet};

use crate::cli::{HttpServeAction, HttpServeArgs, TokenCommand};
use crate::open::open_keyed;
use crate::settings::Settings;
use crate::units::parse_duration;
use crate::EXIT_OK;

/// `bf serve ...`.
pub(crate) fn serve_cmd(a: &HttpServeArgs, s: &Settings) -> Result<u8> {
    match &a.action {
        Some(HttpServeAction::Token(TokenCommand::New { add_to })) => token_new(add_to.as_deref()),
        None => serve(a, s),
    }
}

fn token_new(add_to: Option<&Path>) -> Result<u8> {
    let (token, line) = http_server::new_token()?;
    match add_to {
        None => {
            out!("{token}")?;
            out!("{line}")?;
            eprintln!("bf: give the first line to the client (Authorization: Bearer <token>); add the second to the tokens file");
        }
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{line}").and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
            out!("{token}")?;
            eprintln!("bf: added its hash to {} (a running bf serve reads it at start)", path.display());
        }
    }
    Ok(EXIT_OK)
}

fn serve(a: &HttpServeArgs, s: &Settings) -> Result<u8> {
    // First, before any thread starts: taking the socket edits the environment.
    let passed = passed_listener()?;
    if passed.is_some() && a.listen.is_some() {
        bail!("a socket was passed by socket activation (LISTEN_FDS): leave out --listen");
    }
    let config = config(a)?;
    let st = Arc::new(open_keyed(s)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let auth = match (config.tokens.is_some(), config.tls_client_ca.is_some()) {
            (true, true) => "client certificates and bearer tokens required",
            (true, false) => "bearer tokens required",
            (false, true) => "client certificates required",
            (false, false) => "no authentication",
        };
        let mode = if config.writable { "PUT and DELETE allowed" } else { "read-only" };
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        let (server, passed_note) = match passed {
            Some(l) => (Server::from_passed(st, config, l).await?, " (passed by socket activation)"),
            None => (Server::bind(st, config).await?, ""),
        };
        let addr = server.local_addr()?;
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down: finishing the responses in progress");
            crate::notify::stopping();
            t.cancel();
        });
        if let Some(m) = server.metrics_addr() {
            eprintln!("bf: metrics on http://{m}/metrics");
        }
        let serving = format!("serving files on {scheme}://{addr}/{passed_note} ({auth}, {mode})");
        eprintln!("bf: {serving}");
        crate::notify::ready(&serving);
        server.run(token).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(EXIT_OK)
}

/// Where `bf serve` listens without --listen or socket activation.
const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

/// The TCP socket passed by socket activation, if any (a Unix socket is refused: HTTP is served on TCP).
fn passed_listener() -> Result<Option<std::net::TcpListener>> {
    match blockframe::activation::take_listener().context("socket activation")? {
        None => Ok(None),
        Some(PassedListener::Tcp(l)) => Ok(Some(l)),
        Some(PassedListener::Unix(_)) => {
            bail!("socket activation passed a Unix socket; bf serve listens on TCP (ListenStream=HOST:PORT)")
        }
    }
}

/// The server configuration from the command line.
fn config(a: &HttpServeArgs) -> Result<Config> {
    let listen = resolve(a.listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN))?;
    let tokens = a.token_file.as_deref().map(TokenSet::load).transpose()?;
    let limits = Limits {
        max_connections: a.max_connections,
        header_timeout: parse_duration(&a.header_timeout).context("--header-timeout")?,
        idle_timeout: parse_duration(&a.idle_timeout).context("--idle-timeout")?,
        segment_buffers: a.segment_buffers,
        ..Limits::default()
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let metrics_listen = a.metrics_listen.as_deref().map(resolve).transpose()?;
    Ok(Config {
        listen,
        tls,
        tls_client_ca: a.tls_client_ca.clone(),
        tokens,
        insecure: a.insecure,
        writable: a.writable && !a.read_only,
        metrics_listen,
        limits,
    })
}

/// `host:port` to one socket address (the first the name resolves to).
pub(crate) fn resolve(listen: &str) -> Result<SocketAddr> {
    if let Ok(a) = listen.parse() {
        return Ok(a);
    }
    listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {listen}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--listen {listen}: the name resolves to no address"))
}
