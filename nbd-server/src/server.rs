//! Accept loop, listeners, configuration and graceful shutdown.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use blockframe::activation::PassedListener;

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
    Unix {
        /// The socket.
        listener: UnixListener,
        /// The socket file to remove when the listener is dropped ([`Listener::bind_unix`] sets it; a listener
        /// the caller bound itself has none).
        file: Option<SocketFile>,
    },
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix { listener: l, file: None }
    }
}

impl Listener {
    /// Bind a TCP listener. Must be called within a tokio runtime.
    pub async fn bind_tcp(addr: &str) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Bind a Unix socket listener at `path`; the socket file is removed again when the listener is dropped
    /// (when [`serve`] stops accepting). Must be called within a tokio runtime.
    ///
    /// A socket file left behind by a server that died (nothing accepts on it: connecting fails with
    /// `ECONNREFUSED`) is replaced. Refused, leaving the path alone: a socket a server still listens on
    /// ([`io::ErrorKind::AddrInUse`]), and a path that is not a socket ([`io::ErrorKind::AlreadyExists`]).
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        let file = SocketFile::new(path)?;
        Ok(Listener::Unix { listener, file: Some(file) })
    }

    /// The listener for a socket passed by the service manager ([`blockframe::activation::take_listener`]).
    /// Must be called within a tokio runtime. A Unix socket's file belongs to the service manager and is left
    /// alone.
    pub fn from_passed(passed: PassedListener) -> io::Result<Self> {
        Ok(match passed {
            PassedListener::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            PassedListener::Unix(l) => Listener::Unix { listener: UnixListener::from_std(l)?, file: None },
        })
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
            Listener::Unix { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_default(),
        }
    }
}

/// One open connection in the metrics' gauge: decremented on drop.
struct OpenConnection(Option<Arc<crate::metrics::NbdMetrics>>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.connections_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A Unix socket file this process bound: removed on drop if the path still names that same socket (a newer
/// server may have replaced it meanwhile).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<Self> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(Self { path: path.to_owned(), dev: m.dev(), ino: m.ino() })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if !ours {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => debug!(path = %self.path.display(), "removed the socket file"),
            Err(e) => warn!(path = %self.path.display(), error = %e, "cannot remove the socket file"),
        }
    }
}

/// Removes a socket file nobody listens on any more; refuses a live socket and anything that is not a socket.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; not replacing it", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is already listening on {}", path.display()),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path)?;
            info!(path = %path.display(), "removed a stale socket file nobody listened on");
            Ok(())
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{} exists and cannot be probed: {e}", path.display()))),
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
                drop(listener);
                sessions.close();
                stop.cancel();
                sessions.wait().await;
                return Err(e);
            }
        };
        let metrics = config.metrics.clone();
        if sessions.len() >= config.max_connections {
            warn!(%peer, limit = config.max_connections, "too many connections; closing the new one");
            if let Some(m) = &metrics {
                blockframe::metrics::add(&m.connections_refused, 1);
            }
            drop(stream);
            continue;
        }
        if let Some(m) = &metrics {
            blockframe::metrics::add(&m.connections_total, 1);
            m.connections_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Counts the connection as closed when its session task ends, however it ends.
        let open = OpenConnection(metrics);
        next_id += 1;
        let peer = format!("{peer}#{next_id}");
        debug!(%peer, "accepted connection");
        let registry = Arc::clone(&registry);
        let config = Arc::clone(&config);
        let token = stop.clone();
        match stream {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                sessions.spawn(async move {
                    run_session(s, registry, config, token, peer).await;
                    drop(open);
                });
            }
            Stream::Unix(s) => {
                sessions.spawn(async move {
                    run_session(s, registry, config, token, peer).await;
                    drop(open);
                });
            }
        }
    }
    // Stop accepting at once: new clients get ECONNREFUSED instead of waiting in the backlog, and the Unix
    // socket file is gone before the process exits.
    drop(listener);
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
        Listener::Unix { listener, .. } => {
            let (s, _) = listener.accept().await?;
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
