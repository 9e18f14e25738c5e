//! Every on-disk record (documented in `docs/FORMAT.md`): the checksummed envelope shared by small records
//! ([`envelope`], re-exported here), shard headers ([`shard`]), file manifests ([`manifest`]) and block-volume
//! records ([`volume`]).

mod envelope;
pub mod manifest;
pub mod shard;
pub mod volume;

pub use envelope::*;
