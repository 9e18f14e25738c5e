//! The server's errors. Request-level failures become HTTP statuses in the handler and never cross the HTTP
//! boundary as panics; these are what setting up and running the server can fail with.

use std::net::SocketAddr;

use crate::auth::AuthError;
use crate::tls::TlsError;

/// Why the server could not start or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A store operation failed (opening a file, reading the catalog, reading a segment).
    #[error(transparent)]
    Store(#[from] blockframe::Error),
    /// A blocking task panicked or was cancelled.
    #[error("a blocking read task failed: {0}")]
    Task(String),
    /// The listening socket could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The listening socket passed by socket activation could not be used.
    #[error("the socket passed by socket activation: {0}")]
    Passed(#[source] std::io::Error),
    /// Authentication setup (tokens file, exposure rule).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A limit was set to a value that cannot work.
    #[error("invalid limit: {0}")]
    Limit(&'static str),
}

impl From<tokio::task::JoinError> for ServeError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServeError::Task(e.to_string())
    }
}
