//! Pure transforms of bytes, no I/O: encryption ([`crypto`]: AES-256-GCM segments, keys; [`xts`]: AES-256-XTS
//! sectors), Reed-Solomon erasure coding ([`erasure`]) and BLAKE3 Merkle trees ([`merkle`]).

pub mod crypto;
pub mod erasure;
pub mod merkle;
pub(crate) mod xts;

pub use xts::{Xts, SECTOR};
