//! Tunables of the server.

use std::time::Duration;

/// Tunables of the server. `ServerConfig::default()` is suitable for most
/// uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Maximum requests in flight per connection (default 64). When reached,
    /// the server stops reading from that connection until one completes.
    pub max_inflight_requests: usize,
    /// Maximum bytes of READ/WRITE buffers held per connection (default
    /// 128 MiB; never less than the 32 MiB maximum block size).
    pub max_inflight_bytes: usize,
    /// Maximum concurrent connections (default 1024); further connections
    /// are accepted and immediately closed.
    pub max_connections: usize,
    /// After shutdown is signalled, how long a connection may take to finish
    /// its in-flight requests and deliver their replies (default 30 s; a
    /// client that stops reading could otherwise stall shutdown forever).
    /// Connections still busy after that are dropped without waiting for
    /// their outstanding backend calls.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_inflight_requests: 64,
            max_inflight_bytes: 128 * 1024 * 1024,
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}
