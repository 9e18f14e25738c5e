//! BlockFrame core: an encrypted, erasure-coded, Merkle-verified stripe store.
//!
//! Layers, from the bottom up (a module only uses the ones below it):
//! - [`error`]: the typed errors every layer returns;
//! - [`codec`]: pure transforms (AES-256-GCM and AES-256-XTS, Reed-Solomon, BLAKE3 Merkle trees);
//! - [`format`]: every on-disk record (envelope, shard header, manifest, volume records);
//! - [`location`]: where objects are kept (the [`location::Location`] trait, local directories, S3, specs);
//! - [`store`]: a store's descriptor, locations, markers, placement and shard keys; `stripe` (internal) writes,
//!   reads and verifies one erasure-coded stripe over them;
//! - [`log`]: the log-structured block store (appends into stripes sealed whole; replay; checkpoints);
//! - [`files`] (commit, catalog, read) and [`volume`] (block volumes): the two kinds of data;
//! - [`metrics`]: counters and the Prometheus text format the servers' metrics endpoints share (pure, using no
//!   other module, so the read path can bump its counters, [`metrics::reads`]); [`metrics::store`], on top,
//!   renders a store's section of every endpoint (those counters and the last scrub's results);
//! - [`scrub`] (keyless check and repair), [`recover`] (rebuild a lost descriptor) and [`vfs`] (the filesystem
//!   view mount adapters use) on top.
//!
//! [`activation`] (systemd socket activation: the listening socket a service manager passes) serves the `bf`
//! servers; it uses no other module.
//!
//! [`testing`] (with the `testing` feature, and in the library's own tests) holds fault injection, an in-memory
//! location and the location conformance suite.

pub mod activation;
pub mod clock;
pub mod codec;
pub mod error;
pub mod files;
pub mod format;
pub mod location;
pub mod log;
pub mod metrics;
pub mod pending;
pub mod rebalance;
pub mod recover;
pub mod scrub;
pub mod store;
pub(crate) mod stripe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vfs;
pub mod volume;
pub mod zones;

pub use codec::{crypto, erasure, merkle};
pub use error::{Error, ErrorKind, Result};

#[cfg(test)]
mod tests;
