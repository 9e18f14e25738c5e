//! Every on-disk record (documented in `docs/FORMAT.md`): the checksummed envelope shared by small records
//! ([`envelope`], re-exported here), shard headers ([`shard`]), file manifests ([`manifest`]), block-volume
//! records ([`volume`]) and the log-structured block store's records ([`log`]) and flush journal ([`journal`]).

pub mod catalog;
mod envelope;
pub mod journal;
pub mod log;
pub mod manifest;
pub mod pack_index;
pub mod shard;
pub mod volume;

pub use envelope::*;
