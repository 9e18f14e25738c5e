//! Tunables of the server.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::NbdMetrics;
use crate::tls::TlsConfig;

/// Tunables of the server. `ServerConfig::default()` is suitable for most
/// uses.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Maximum requests in flight per connection (default 64). When reached,
    /// the server stops reading from that connection until one completes.
    pub max_inflight_requests: usize,
    /// Maximum bytes of READ/WRITE buffers held per connection (default
    /// 128 MiB; never less than the 32 MiB maximum block size).
    pub max_inflight_bytes: usize,
    /// Maximum concurrent connections (default 128, far above what qemu's
    /// multi-conn or nbdcopy open at once); further connections are accepted
    /// and closed at once, with a log line.
    pub max_connections: usize,
    /// How long a client may take for the whole handshake, from accept until
    /// it enters the transmission phase, TLS included (default 30 s). A
    /// connection that has not chosen an export by then is closed, so idle or
    /// slow-drip connections cannot hold connection slots.
    pub handshake_timeout: Duration,
    /// In the transmission phase, close a connection that sent no request
    /// for this long while none of its requests was in flight (default
    /// `None`: never). Off by default because real clients keep idle
    /// connections for as long as they run: qemu holds its NBD connection for
    /// the life of a VM whose guest may not touch the disk for hours, and the
    /// protocol has no keep-alive request it could send meanwhile.
    pub idle_timeout: Option<Duration>,
    /// After shutdown is signalled, how long a connection may take to finish
    /// its in-flight requests and deliver their replies (default 30 s; a
    /// client that stops reading could otherwise stall shutdown forever).
    /// Connections still busy after that are dropped without waiting for
    /// their outstanding backend calls.
    pub shutdown_grace: Duration,
    /// TLS (`NBD_OPT_STARTTLS`). `None` (the default) answers STARTTLS with `NBD_REP_ERR_POLICY`; see
    /// [`TlsConfig`].
    pub tls: Option<TlsConfig>,
    /// Counters to keep (requests, bytes, latencies, connections); `None` (the default) keeps none. The
    /// caller renders them ([`NbdMetrics::render`]) where it serves metrics.
    pub metrics: Option<Arc<NbdMetrics>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_inflight_requests: 64,
            max_inflight_bytes: 128 * 1024 * 1024,
            max_connections: 128,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(30),
            tls: None,
            metrics: None,
        }
    }
}
