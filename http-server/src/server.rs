//! The listener: accepts connections up to a limit, does the TLS handshake within the header timeout, and
//! serves HTTP/1.1 on each with hyper (header read timeout, header size cap, inactivity deadline); on
//! shutdown it stops accepting and lets connections finish their current response for a grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use blockframe::store::Store;

use crate::auth::{self, TokenSet};
use crate::error::ServeError;
use crate::handler::{self, State};
use crate::io::Deadline;
use crate::segments::SegmentPool;
use crate::tree::Catalog;

/// Limits that keep one server's memory and connections bounded.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections at once; one over is closed at once (and logged).
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and to finish a TLS handshake) once it starts one.
    pub header_timeout: Duration,
    /// A connection on which nothing moves for this long is closed (idle keep-alive, a client that stopped
    /// reading).
    pub idle_timeout: Duration,
    /// Most bytes of a request head (request line and headers); more is answered 431.
    pub max_header_bytes: usize,
    /// Most segment buffers in existence across all responses (each about 1.3 segment sizes).
    pub segment_buffers: usize,
    /// How long a snapshot of the catalog is served before it is re-read.
    pub catalog_max_age: Duration,
    /// Time connections get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 16 << 10,
            segment_buffers: 4,
            catalog_max_age: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// TLS certificate chain and key (PEM), both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Accepted bearer tokens; `None` serves without authentication (loopback only, unless `insecure`).
    pub tokens: Option<TokenSet>,
    /// Serve a non-loopback address without tokens.
    pub insecure: bool,
    /// Serve `PUT` and `DELETE`.
    pub writable: bool,
    /// The limits.
    pub limits: Limits,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    limits: Limits,
}

impl Server {
    /// Checks the configuration (the exposure rule, TLS files, limits) and binds the listener.
    pub async fn bind(store: Arc<Store>, config: Config) -> Result<Server, ServeError> {
        let l = &config.limits;
        if l.max_connections == 0 || l.segment_buffers == 0 || l.header_timeout.is_zero() || l.idle_timeout.is_zero() {
            return Err(ServeError::Limit("connections, segment buffers and timeouts must be more than 0"));
        }
        if l.max_header_bytes < 8192 {
            return Err(ServeError::Limit("the header size cap must be at least 8 KiB"));
        }
        auth::check_exposure(config.listen, config.tokens.is_some(), config.insecure)?;
        let tls = match &config.tls {
            Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
        let state = Arc::new(State {
            catalog: Catalog::new(store.clone(), l.catalog_max_age),
            store,
            pool: SegmentPool::new(l.segment_buffers),
            tokens: config.tokens,
            send_timeout: l.idle_timeout,
            writable: config.writable,
            commits: tokio::sync::Semaphore::new(1),
        });
        Ok(Server { listener, addr: config.listen, tls, state, limits: config.limits })
    }

    /// The address actually bound (a port of 0 picks one).
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|source| ServeError::Bind { addr: self.addr, source })
    }

    /// Serves until `shutdown` is cancelled, then gives open connections the grace period to finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let tracker = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: wait a little instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.limits.max_connections, "connection limit reached; closing the new connection");
                drop(tcp);
                continue;
            };
            let conn =
                Connection { state: self.state.clone(), tls: self.tls.clone(), limits: self.limits.clone(), peer };
            let stop = shutdown.clone();
            tracker.spawn(async move {
                conn.serve(tcp, stop).await;
                drop(permit);
            });
        }
        tracker.close();
        if tokio::time::timeout(self.limits.shutdown_grace, tracker.wait()).await.is_err() {
            tracing::warn!("connections still open after the shutdown grace period; closing them");
        }
        Ok(())
    }
}

/// One accepted connection.
struct Connection {
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, stop: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        match self.tls.clone() {
            None => self.http(tcp, stop).await,
            Some(acceptor) => match tokio::time::timeout(self.limits.header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => self.http(tls, stop).await,
                Ok(Err(e)) => tracing::info!(peer = %self.peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(peer = %self.peer, "TLS handshake timed out"),
            },
        }
    }

    async fn http<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: T, stop: CancellationToken) {
        let io = TokioIo::new(Deadline::new(io, self.limits.idle_timeout));
        let state = self.state.clone();
        let service = service_fn(move |req| handler::handle(state.clone(), req));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::info!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}
