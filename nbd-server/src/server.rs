//! Accept loop, listeners, configuration and graceful shutdown.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::ExportRegistry;
pub use crate::config::ServerConfig;
use crate::session::run_session;

/// Where to listen, for [`Listener::bind`] and [`serve_blocking`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address such as `"127.0.0.1:10809"` or `"[::1]:10809"`.
    Tcp(String),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

/// A bound listening socket the server accepts NBD clients on.
#[derive(Debug)]
pub enum Listener {
    /// TCP listener (`nbd://host:port/export`).
    Tcp(TcpListener),
    /// Unix domain socket listener (`nbd+unix:///export?socket=path`).
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl Listener {
    /// Bind a TCP listener. Must be called within a tokio runtime.
    pub async fn bind_tcp(addr: &str) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Bind a Unix socket listener at `path` (which must not exist). Must be
    /// called within a tokio runtime.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// Bind according to `addr`. Must be called within a tokio runtime.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Self::bind_tcp(a).await,
            ListenAddr::Unix(p) => Self::bind_unix(p),
        }
    }

    /// Human readable local address.
    pub fn local_addr_string(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(l) => {
                l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string())).unwrap_or_default()
            }
        }
    }
}

/// Serve NBD clients on `listener` until `shutdown` is cancelled, with the
/// default [`ServerConfig`]. See [`serve_with_config`].
pub async fn serve(
    listener: Listener,
    registry: Arc<dyn ExportRegistry>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_config(listener, registry, shutdown, ServerConfig::default()).await
}

/// Serve NBD clients on `listener` until `shutdown` is cancelled.
///
/// Each connection runs as its own task; a failure or malformed input on one
/// connection never affects the others. On shutdown the server stops
/// accepting, closes connections that are still negotiating, stops reading
/// new requests on connections in transmission, lets every in-flight request
/// finish and send its reply, calls [`flush`](crate::BlockBackend::flush) on
/// each open export, closes the connections and returns `Ok(())`.
///
/// Returns an error only if accepting fails in a way that cannot be retried.
pub async fn serve_with_config(
    listener: Listener,
    registry: Arc<dyn ExportRegistry>,
    shutdown: CancellationToken,
    config: ServerConfig,
) -> io::Result<()> {
    let config = Arc::new(config);
    let sessions = TaskTracker::new();
    let mut next_id: u64 = 0;
    // Sessions watch a child token so a fatal accept error can stop them
    // without cancelling the caller's token.
    let stop = shutdown.child_token();
    info!(addr = %listener.local_addr_string(), "NBD server listening");
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) if is_transient_accept_error(&e) => {
                warn!(error = %e, "accept failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "accept failed; stopping");
                sessions.close();
                stop.cancel();
                sessions.wait().await;
                return Err(e);
            }
        };
        if sessions.len() >= config.max_connections {
            warn!(%peer, "too many connections; refusing");
            drop(stream);
            continue;
        }
        next_id += 1;
        let peer = format!("{peer}#{next_id}");
        debug!(%peer, "accepted connection");
        let registry = Arc::clone(&registry);
        let config = Arc::clone(&config);
        let token = stop.clone();
        match stream {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                sessions.spawn(run_session(s, registry, config, token, peer));
            }
            Stream::Unix(s) => {
                sessions.spawn(run_session(s, registry, config, token, peer));
            }
        }
    }
    info!(open = sessions.len(), "NBD server shutting down");
    stop.cancel();
    sessions.close();
    sessions.wait().await;
    info!("NBD server stopped");
    Ok(())
}

/// Convenience wrapper: build a multi-threaded tokio runtime, bind `addr`
/// and run [`serve`] until `shutdown` is cancelled (e.g. from another thread
/// or a signal handler).
pub fn serve_blocking(
    addr: ListenAddr,
    registry: Arc<dyn ExportRegistry>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = Listener::bind(&addr).await?;
        serve(listener, registry, shutdown).await
    })
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Ok((Stream::Tcp(s), a.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix".to_owned()))
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::EPROTO)
            | Some(libc::EPERM)
    )
}

/// Run the NBD protocol on one already-accepted connection (any async byte
/// stream, e.g. a TLS stream or an in-memory pipe) until the client
/// disconnects or `shutdown` is cancelled; then flush the export.
pub async fn serve_connection<S>(
    stream: S,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    run_session(stream, registry, Arc::new(config), shutdown, "stream".to_owned()).await
}
