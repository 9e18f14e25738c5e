//! `bf serve`: the files of a BlockFrame store over HTTP/1.1 (optionally TLS); read-only unless writes
//! (`PUT` of a whole file, `DELETE`, see [`writes`]) are enabled.
//!
//! Reads go through the store's verified, repairing read path (the one `bf get` uses): a byte range fetches
//! only the segments it touches, every shard is checked against its Merkle leaf and rebuilt from parity when
//! missing or corrupt, and every segment is authenticated before a byte of it is sent. A segment beyond repair
//! in the middle of a response aborts the connection (the client sees a truncated body and an error, never
//! padding or unverified bytes).
//!
//! Layout: pure logic in [`range`] (Range headers), [`conditional`] (preconditions), [`names`] (URL paths and
//! escaping), [`listing`] (HTML/JSON directory pages) and [`auth`] (token hashes, the exposure rule); I/O in
//! [`tree`] (catalog snapshots), [`segments`] (the bounded pool of segment buffers), [`stream`] (the body
//! producer), [`handler`] (requests to responses) and [`server`] (listener, TLS, limits).

pub mod auth;
pub mod body;
pub mod conditional;
pub mod error;
pub mod handler;
pub mod io;
pub mod listing;
pub mod metrics;
pub mod names;
pub mod range;
pub mod segments;
pub mod server;
pub mod stream;
pub mod tls;
pub mod tree;
pub mod writes;

pub use auth::{new_token, TokenSet};
pub use error::ServeError;
pub use server::{bind_metrics, serve_metrics, Config, Limits, RenderMetrics, Server};
pub use tokio_util::sync::CancellationToken;
