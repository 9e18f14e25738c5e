//! BlockFrame core: an encrypted, erasure-coded, Merkle-verified stripe store.
//!
//! Pipeline for a file: encrypt each segment (AES-256-GCM, [`crypto`]) → cut into k data shards and compute m
//! parity shards ([`erasure`]) → hash every shard into a Merkle tree ([`merkle`]) → write each shard with a
//! self-describing header ([`shard`]) to its location ([`location`]) → publish a manifest ([`manifest`]) on
//! several locations. [`commit`], [`read`] and [`catalog`] put the pieces together over a [`store::Store`];
//! [`vfs`] presents the catalog as a filesystem for mount adapters.
//! [`scrub`] checks and repairs a store without the key, [`recover`] rebuilds a lost store descriptor from the
//! locations, and [`fault`] injects seeded faults into locations for tests.

pub mod catalog;
pub mod commit;
pub mod conformance;
pub mod crypto;
pub mod erasure;
pub mod error;
pub mod fault;
pub mod format;
pub mod location;
pub mod locspec;
pub mod manifest;
pub mod merkle;
pub mod pending;
pub mod read;
pub mod recover;
pub mod s3;
pub mod scrub;
pub mod shard;
pub mod store;
pub mod stripe;
pub mod uring;
pub mod vfs;
pub mod volume;
pub mod xts;

pub use error::{Error, Result};

#[cfg(test)]
mod tests;
