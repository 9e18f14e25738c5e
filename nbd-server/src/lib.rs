//! A Network Block Device (NBD) protocol server.
//!
//! Implements the fixed newstyle handshake and the transmission phase of the
//! NBD protocol (as specified by the NBD project's `doc/proto.md`) on top of
//! a small, synchronous storage abstraction:
//!
//! * [`BlockBackend`] is one export (a byte-addressable device);
//!   [`ExportRegistry`] names the exports clients can choose from
//!   ([`SimpleRegistry`] is a ready-made table).
//! * [`serve`] runs the server on a TCP or Unix [`Listener`] until a
//!   [`CancellationToken`] is cancelled,
//!   then shuts down gracefully.
//! * [`MemBackend`] is a sparse in-memory backend for tests and demos.
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT`
//! (`base:allocation`); commands READ, WRITE (FUA), FLUSH, TRIM,
//! WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE, DISC and BLOCK_STATUS, with
//! simple or structured replies. `NBD_OPT_STARTTLS` upgrades to TLS (rustls) with x509 certificates and
//! optional client-certificate verification when [`ServerConfig::tls`] is set ([`tls`]).
//!
//! The wire format code ([`handshake`], [`request`], [`reply`]) is pure and
//! independent of sockets.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{serve, Listener, MemBackend, SimpleRegistry};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> std::io::Result<()> {
//! let registry = SimpleRegistry::new()
//!     .with_export("disk", "scratch disk", Arc::new(MemBackend::new(64 << 20)));
//! let listener = Listener::bind_unix("/tmp/nbd.sock")?;
//! let shutdown = CancellationToken::new();
//! serve(listener, Arc::new(registry), shutdown).await
//! # }
//! ```

#![warn(missing_docs)]

pub mod backend;
mod config;
mod conn;
pub mod handshake;
pub mod mem;
pub mod metrics;
mod negotiation;
pub mod proto;
pub mod reply;
pub mod request;
mod server;
mod session;
pub mod store_backend;
pub mod tls;

pub use backend::{errno_for, BlockBackend, ExportInfo, ExportRegistry, Extent, SimpleRegistry};
pub use blockframe::activation::{ActivationError, PassedListener};
pub use mem::{MemBackend, MEM_CHUNK_SIZE};
pub use metrics::NbdMetrics;
pub use negotiation::MAX_OPTION_LEN;
pub use server::{
    serve, serve_blocking, serve_connection, serve_with_config, ListenAddr, Listener, ServerConfig, SocketFile,
};
pub use store_backend::{StoreRegistry, VolumeBackend};
pub use tls::{TlsConfig, TlsError, TlsMode};
/// Re-export of the cancellation token type used for shutdown.
pub use tokio_util::sync::CancellationToken;
