//! The listener: accepts connections up to a limit, does the TLS handshake within the header timeout, and
//! serves HTTP/1.1 on each with hyper (header read timeout, header size cap, inactivity deadline); on
//! shutdown it stops accepting and lets connections finish their current response for a grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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

use blockframe::metrics::store::StoreMetrics;
use blockframe::store::Store;

use crate::auth::{self, TokenSet};
use crate::error::ServeError;
use crate::handler::{self, State};
use crate::io::Deadline;
use crate::metrics::Metrics;
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
    /// CA certificates (PEM) that client certificates must chain to: with it, a client without such a
    /// certificate fails the TLS handshake. Needs `tls`. Counts as authentication for the exposure rule; with
    /// `tokens` too, a client needs both.
    pub tls_client_ca: Option<PathBuf>,
    /// Accepted bearer tokens; `None` serves without authentication (loopback only, unless `insecure`).
    pub tokens: Option<TokenSet>,
    /// Serve a non-loopback address without tokens.
    pub insecure: bool,
    /// Serve `PUT` and `DELETE`.
    pub writable: bool,
    /// Where to serve `/metrics` (Prometheus text, no authentication: loopback only unless `insecure`).
    pub metrics_listen: Option<SocketAddr>,
    /// The limits.
    pub limits: Limits,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    limits: Limits,
}

impl Server {
    /// Checks the configuration (the exposure rule, TLS files, limits) and binds the listener.
    pub async fn bind(store: Arc<Store>, config: Config) -> Result<Server, ServeError> {
        let tls = check(&config)?;
        let listener = bind(config.listen).await?;
        Server::on(store, config, listener, tls).await
    }

    /// A server on a listening TCP socket passed by the service manager (socket activation, see
    /// [`blockframe::activation`]): like [`Server::bind`], with the socket's own address as `config.listen`
    /// (the exposure rule applies to it). Must be called within a tokio runtime.
    pub async fn from_passed(
        store: Arc<Store>,
        mut config: Config,
        listener: std::net::TcpListener,
    ) -> Result<Server, ServeError> {
        config.listen = listener.local_addr().map_err(ServeError::Passed)?;
        let tls = check(&config)?;
        let listener = TcpListener::from_std(listener).map_err(ServeError::Passed)?;
        Server::on(store, config, listener, tls).await
    }

    /// The server on a bound `listener`, the configuration checked; binds the metrics listener.
    async fn on(
        store: Arc<Store>,
        config: Config,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    ) -> Result<Server, ServeError> {
        let metrics_listener = match config.metrics_listen {
            Some(m) => Some(bind_metrics(m, config.insecure).await?),
            None => None,
        };
        let l = &config.limits;
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(State {
            catalog: Catalog::new(store.clone(), l.catalog_max_age),
            store,
            pool: SegmentPool::with_metrics(l.segment_buffers, metrics.clone()),
            metrics,
            tokens: config.tokens,
            send_timeout: l.idle_timeout,
            writable: config.writable,
            commits: tokio::sync::Semaphore::new(1),
        });
        Ok(Server { listener, metrics_listener, addr: config.listen, tls, state, limits: config.limits })
    }

    /// The address actually bound (a port of 0 picks one).
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|source| ServeError::Bind { addr: self.addr, source })
    }

    /// The address `/metrics` is served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then gives open connections the grace period to finish.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let tracker = TaskTracker::new();
        if let Some(l) = self.metrics_listener.take() {
            let state = self.state.clone();
            let store_metrics = StoreMetrics::default();
            let render: RenderMetrics = Arc::new(move || {
                let in_use = state.pool.buffers() - state.pool.available();
                let mut text = state.metrics.render(in_use, state.pool.buffers());
                store_metrics.render(&state.store, &mut text);
                text
            });
            tracker.spawn(serve_metrics(l, render, shutdown.clone()));
        }
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
                self.state.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            };
            let conn =
                Connection { state: self.state.clone(), tls: self.tls.clone(), limits: self.limits.clone(), peer };
            let stop = shutdown.clone();
            let metrics = self.state.metrics.clone();
            tracker.spawn(async move {
                metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                conn.serve(tcp, stop).await;
                metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
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

/// Checks a configuration before anything is bound: the limits, the exposure rule of both listeners, the TLS
/// files; returns the TLS acceptor when TLS is on.
fn check(config: &Config) -> Result<Option<TlsAcceptor>, ServeError> {
    let l = &config.limits;
    if l.max_connections == 0 || l.segment_buffers == 0 || l.header_timeout.is_zero() || l.idle_timeout.is_zero() {
        return Err(ServeError::Limit("connections, segment buffers and timeouts must be more than 0"));
    }
    if l.max_header_bytes < 8192 {
        return Err(ServeError::Limit("the header size cap must be at least 8 KiB"));
    }
    let authenticated = config.tokens.is_some() || config.tls_client_ca.is_some();
    auth::check_exposure(config.listen, authenticated, config.insecure)?;
    if let Some(m) = config.metrics_listen {
        auth::check_exposure(m, false, config.insecure)?;
    }
    match (&config.tls, &config.tls_client_ca) {
        (Some((cert, key)), ca) => Ok(Some(crate::tls::acceptor(cert, key, ca.as_deref())?)),
        (None, Some(_)) => Err(crate::tls::TlsError::ClientCaWithoutTls.into()),
        (None, None) => Ok(None),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// What renders the metrics text for [`serve_metrics`] (called once per scrape).
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds a `--metrics-listen` address: the endpoint has no authentication, so only a loopback address is
/// accepted unless `insecure`.
pub async fn bind_metrics(addr: SocketAddr, insecure: bool) -> Result<TcpListener, ServeError> {
    auth::check_exposure(addr, false, insecure)?;
    bind(addr).await
}

/// Serves `GET /metrics` (Prometheus text from `render`) on its own listener, a few connections at a time, with
/// the default header and idle timeouts, until `stop`. Used by `bf serve`, `bf nbd serve` and `bf mount`.
pub async fn serve_metrics(listener: TcpListener, render: RenderMetrics, stop: CancellationToken) {
    let limits = Limits::default();
    let slots = Arc::new(Semaphore::new(8));
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let (render, limits) = (render.clone(), limits.clone());
        tokio::spawn(async move {
            let io = TokioIo::new(Deadline::new(tcp, limits.idle_timeout));
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(metrics_response(&*render, req.uri().path())) }
            });
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let _ = builder.serve_connection(io, service).await;
            drop(permit);
        });
    }
}

fn metrics_response(render: &(dyn Fn() -> String + Send + Sync), path: &str) -> http::Response<crate::body::Body> {
    if path != "/metrics" {
        return handler::text(http::StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    let mut r = handler::text(http::StatusCode::OK, &render());
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
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
