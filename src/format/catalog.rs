//! The catalog log's records: batches of catalog changes chained by hash, and checkpoints that hold the whole
//! catalog in parts (see `docs/FORMAT.md`, "Catalog log").
//!
//! Every object is an envelope around `(body bytes, MAC)`; the MAC is keyed BLAKE3 under the catalog MAC key,
//! checked whenever the key is loaded. Keyless readers (scrub) check the envelope checksum and the structure.
//! Object names carry a prefix of the BLAKE3 of the body, so two different records written under the same
//! sequence number (a fork left by a crash while locations were away) are told apart by listing alone.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::MasterKey;
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::format;

/// Magic of a catalog record.
pub const MAGIC_CATALOG_RECORD: [u8; 8] = *b"BFCATRC\0";
/// Magic of a catalog checkpoint.
pub const MAGIC_CATALOG_CHECKPOINT: [u8; 8] = *b"BFCATCP\0";
/// Magic of one part of a catalog checkpoint.
pub const MAGIC_CATALOG_PART: [u8; 8] = *b"BFCATPT\0";
/// Folder of the catalog objects on every location.
pub const CATALOG_DIR: &str = "catalog";

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogOp {
    /// Adds (or rewrites, same name tag and file id) an entry: the bytes of a manifest copy.
    Put(Vec<u8>),
    /// Removes the entry `(name tag, file id)`.
    Remove {
        /// Name tag of the entry.
        name_tag: Hash,
        /// File id of the entry.
        file_id: [u8; 16],
    },
}

/// A group of changes applied together, the `seq`-th since the store was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Store the record belongs to.
    pub store_id: [u8; 16],
    /// Position in the chain (1, 2, ...).
    pub seq: u64,
    /// BLAKE3 of the body of record `seq - 1` (all zeros for the first).
    pub prev: Hash,
    /// When it was written, nanoseconds since the epoch.
    pub written_unix_ns: u64,
    /// The changes, applied in order.
    pub ops: Vec<CatalogOp>,
}

/// Where one part of a checkpoint is and what it must hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// Entries in the part.
    pub entries: u32,
    /// BLAKE3 of the part object.
    pub hash: Hash,
}

/// The whole catalog as of record `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// Store the checkpoint belongs to.
    pub store_id: [u8; 16],
    /// Generation (1, 2, ...): the highest valid one wins.
    pub generation: u64,
    /// Every record up to this one is reflected.
    pub seq: u64,
    /// BLAKE3 of the body of record `seq` (zeros when `seq` is 0): the next record's `prev`.
    pub last: Hash,
    /// The parts, in order.
    pub parts: Vec<PartRef>,
}

/// One part of a checkpoint: manifest copies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartBody {
    /// Store the part belongs to.
    pub store_id: [u8; 16],
    /// Generation of its checkpoint.
    pub generation: u64,
    /// Position among the checkpoint's parts.
    pub index: u32,
    /// The entries: bytes of manifest copies.
    pub manifests: Vec<Vec<u8>>,
}

/// Frames a MACed body: the object bytes and the BLAKE3 of the body.
pub fn seal<T: Serialize>(magic: [u8; 8], body: &T, key: &MasterKey) -> Result<(Vec<u8>, Hash)> {
    let bytes = postcard::to_allocvec(body).map_err(|e| Error::internal(format!("encoding a catalog object: {e}")))?;
    let mac = key.catalog_mac(&bytes);
    let hash = *blake3::hash(&bytes).as_bytes();
    Ok((format::seal(magic, &(&bytes, &mac)), hash))
}

/// Opens a MACed object (checking the MAC when `key` is given); returns the body and the BLAKE3 of its bytes.
pub fn open<T: serde::de::DeserializeOwned>(
    magic: [u8; 8],
    bytes: &[u8],
    key: Option<&MasterKey>,
    what: &str,
) -> Result<(T, Hash)> {
    let (body, mac): (Vec<u8>, Hash) = format::open(magic, what, bytes)?;
    if let Some(key) = key {
        if key.catalog_mac(&body) != mac {
            return Err(Error::corrupt(what, "MAC mismatch (tampered, or written with another key)"));
        }
    }
    let value = postcard::from_bytes(&body).map_err(|e| Error::corrupt(what, format!("undecodable body: {e}")))?;
    Ok((value, *blake3::hash(&body).as_bytes()))
}

/// Object key of record `seq` whose body hashes to `hash`.
pub fn record_key(seq: u64, hash: &Hash) -> String {
    format!("{CATALOG_DIR}/rec-{seq:016x}-{}", hex::encode(&hash[..8]))
}

/// Object key of checkpoint `generation` whose body hashes to `hash`.
pub fn checkpoint_key(generation: u64, hash: &Hash) -> String {
    format!("{CATALOG_DIR}/ckpt-{generation:016x}-{}", hex::encode(&hash[..8]))
}

/// Object key of part `index` of checkpoint `generation`.
pub fn part_key(generation: u64, index: u32) -> String {
    format!("{CATALOG_DIR}/part-{generation:016x}-{index:06}")
}

/// What a name in the catalog folder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CatalogName {
    /// A record: sequence number and the first 8 bytes of its body hash.
    Record(u64, [u8; 8]),
    /// A checkpoint: generation and hash prefix.
    Checkpoint(u64, [u8; 8]),
    /// A checkpoint part: generation and index.
    Part(u64, u32),
}

/// Parses a name listed under [`CATALOG_DIR`].
pub fn parse_name(name: &str) -> Option<CatalogName> {
    let num_hash = |s: &str| -> Option<(u64, [u8; 8])> {
        let (n, h) = s.split_once('-')?;
        let mut b = [0u8; 8];
        hex::decode_to_slice(h, &mut b).ok()?;
        (n.len() == 16).then_some(())?;
        Some((u64::from_str_radix(n, 16).ok()?, b))
    };
    if let Some(rest) = name.strip_prefix("rec-") {
        let (n, h) = num_hash(rest)?;
        return Some(CatalogName::Record(n, h));
    }
    if let Some(rest) = name.strip_prefix("ckpt-") {
        let (n, h) = num_hash(rest)?;
        return Some(CatalogName::Checkpoint(n, h));
    }
    let rest = name.strip_prefix("part-")?;
    let (g, i) = rest.split_once('-')?;
    if g.len() != 16 || i.len() != 6 {
        return None;
    }
    Some(CatalogName::Part(u64::from_str_radix(g, 16).ok()?, i.parse().ok()?))
}

/// The object key of a parsed name.
pub fn key_of(name: &CatalogName) -> String {
    match name {
        CatalogName::Record(s, h) => format!("{CATALOG_DIR}/rec-{s:016x}-{}", hex::encode(h)),
        CatalogName::Checkpoint(g, h) => format!("{CATALOG_DIR}/ckpt-{g:016x}-{}", hex::encode(h)),
        CatalogName::Part(g, i) => part_key(*g, *i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> RecordBody {
        RecordBody {
            store_id: [1; 16],
            seq: 7,
            prev: [2; 32],
            written_unix_ns: 3,
            ops: vec![CatalogOp::Put(vec![1, 2, 3]), CatalogOp::Remove { name_tag: [4; 32], file_id: [5; 16] }],
        }
    }

    #[test]
    fn records_round_trip_and_are_authenticated() {
        let key = MasterKey::from_bytes([9; 32]);
        let (bytes, hash) = seal(MAGIC_CATALOG_RECORD, &record(), &key).unwrap();
        let (back, h2): (RecordBody, Hash) = open(MAGIC_CATALOG_RECORD, &bytes, Some(&key), "t").unwrap();
        assert_eq!((back, h2), (record(), hash));
        let other = MasterKey::from_bytes([8; 32]);
        assert!(open::<RecordBody>(MAGIC_CATALOG_RECORD, &bytes, Some(&other), "t").is_err());
        assert!(open::<RecordBody>(MAGIC_CATALOG_RECORD, &bytes, None, "t").is_ok());
        assert!(open::<RecordBody>(MAGIC_CATALOG_CHECKPOINT, &bytes, None, "t").is_err());
    }

    #[test]
    fn names_round_trip() {
        let h = [0xab; 32];
        for key in [record_key(5, &h), checkpoint_key(9, &h), part_key(9, 3)] {
            let name = key.strip_prefix("catalog/").unwrap();
            let parsed = parse_name(name).unwrap();
            assert_eq!(key_of(&parsed), key);
        }
        assert_eq!(parse_name("rec-12-00"), None);
        assert_eq!(parse_name("junk"), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = open::<RecordBody>(MAGIC_CATALOG_RECORD, &b, None, "t");
            let _ = open::<CheckpointBody>(MAGIC_CATALOG_CHECKPOINT, &b, None, "t");
        }
    }
}
