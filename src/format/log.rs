//! On-disk records of the log-structured block store ([`crate::log`]): log stripes, their records, map pages
//! and the checkpoint.
//!
//! A *log stripe* holds up to a stripe's worth of 4 KiB blocks appended in write order, erasure-coded into k
//! data + m parity shards, each shard one object on its own location:
//!
//! ```text
//! shard object = ShardHeader (128 B) | data part (bps x 4096 B) | record | record_len (u32 LE)
//! ```
//!
//! where `bps` (blocks per shard) is `ceil(blocks / k)`: block slot `s` lives in data shard `s / bps` at offset
//! `(s % bps) x 4096` of the data part, so one block is one ranged read. The shard header's payload hash covers
//! the data part, the record and its length (a keyless scrub checks it); every shard carries the same record,
//! so any one shard tells what the stripe holds.
//!
//! The *record* ([`RecordBody`]) says which logical blocks the stripe writes (extents of slots, or zeros for a
//! trim), the BLAKE3 (first 16 bytes) of each ciphertext block, and the BLAKE3 of each shard's data part; it is
//! MACed with the volume key. Replaying the records of the stripes written after the last checkpoint, in
//! sequence order, rebuilds the block map after a crash.
//!
//! The *checkpoint* ([`CheckpointBody`], replicated on every location, MACed) names the last stripe whose
//! effects are in the map pages it references, the map page table and the table of live stripes.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::MasterKey;
use crate::codec::erasure;
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::format;

pub use crate::format::volume::PageRef;

/// Magic of a log stripe record.
pub const MAGIC_LOG_RECORD: [u8; 8] = *b"BFLOGRC\0";
/// Magic of a log checkpoint copy.
pub const MAGIC_CHECKPOINT: [u8; 8] = *b"BFLOGCP\0";
/// Magic of a log map page.
pub const MAGIC_LOG_MAP: [u8; 8] = *b"BFLOGMP\0";
/// Bytes per block.
pub const BLOCK: usize = 4096;
/// Bytes of a block hash kept in a record (a BLAKE3 prefix).
pub const BLOCK_HASH_LEN: usize = 16;
/// The `slot` of an extent that writes zeros (a trim): no data in the stripe.
pub const ZERO_SLOT: u32 = u32::MAX;
/// Log stripes per listing directory (keeps directories small and lets replay list only the recent ones).
pub const STRIPES_PER_DIR: u64 = 4096;

/// A block hash as records keep it.
pub type BlockHash = [u8; BLOCK_HASH_LEN];

/// The hash of one ciphertext block.
pub fn block_hash(block: &[u8]) -> BlockHash {
    let mut h = [0u8; BLOCK_HASH_LEN];
    h.copy_from_slice(&blake3::hash(block).as_bytes()[..BLOCK_HASH_LEN]);
    h
}

/// A run of logical blocks a stripe writes: `len` blocks from `lba`, held in slots `slot..slot+len` of the
/// stripe, or zeros when `slot` is [`ZERO_SLOT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First logical block.
    pub lba: u64,
    /// Blocks in the run (at least 1).
    pub len: u32,
    /// First slot in the stripe, or [`ZERO_SLOT`].
    pub slot: u32,
}

impl Extent {
    /// True for a run of zeros (a trim).
    pub fn is_zero(&self) -> bool {
        self.slot == ZERO_SLOT
    }
}

/// What a log stripe holds: its authenticated record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Store id.
    pub store_id: [u8; 16],
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Sequence number of the stripe (1, 2, ...; replay order).
    pub seq: u64,
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Data blocks in the stripe (slots `0..blocks`).
    pub blocks: u32,
    /// The logical blocks written, in write order.
    pub extents: Vec<Extent>,
    /// Hash of each ciphertext block, by slot.
    pub block_hashes: Vec<BlockHash>,
    /// BLAKE3 of each shard's data part (k data, then m parity).
    pub shard_hashes: Vec<Hash>,
}

impl RecordBody {
    /// Blocks per data shard.
    pub fn blocks_per_shard(&self) -> usize {
        blocks_per_shard(self.blocks, self.k)
    }

    /// Structural checks (no key needed).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |d: &str| Err(Error::corrupt(what, d));
        if erasure::validate(self.k as usize, self.m as usize).is_err() {
            return bad("invalid k/m");
        }
        if self.block_hashes.len() != self.blocks as usize {
            return bad("block hash count differs from the block count");
        }
        if self.shard_hashes.len() != self.k as usize + self.m as usize {
            return bad("shard hash count differs from k+m");
        }
        for e in &self.extents {
            let in_stripe = e.is_zero() || (e.slot as u64 + e.len as u64) <= self.blocks as u64;
            if e.len == 0 || !in_stripe || e.lba.checked_add(e.len as u64).is_none() {
                return bad("extent outside the stripe");
            }
        }
        Ok(())
    }
}

/// Blocks per data shard of a stripe of `blocks` blocks over `k` data shards.
pub fn blocks_per_shard(blocks: u32, k: u16) -> usize {
    (blocks as usize).div_ceil(k.max(1) as usize)
}

/// Seals `body` in an envelope as `(postcard(body), MAC)` with the log MAC key.
pub(crate) fn seal_maced<T: Serialize>(magic: [u8; 8], body: &T, key: &MasterKey) -> Result<Vec<u8>> {
    let body_bytes = postcard::to_allocvec(body).map_err(|e| Error::internal(format!("encoding a record: {e}")))?;
    let mac = key.log_mac(&body_bytes);
    Ok(format::seal(magic, &(&body_bytes, &mac)))
}

/// Opens what [`seal_maced`] sealed; checks the MAC when a key is given. Never panics.
pub(crate) fn open_maced<T: serde::de::DeserializeOwned>(
    magic: [u8; 8],
    bytes: &[u8],
    key: Option<&MasterKey>,
    what: &str,
) -> Result<T> {
    let (body_bytes, mac): (Vec<u8>, Hash) = format::open(magic, what, bytes)?;
    if key.is_some_and(|k| k.log_mac(&body_bytes) != mac) {
        return Err(Error::corrupt(what, "MAC mismatch (tampered, or written with another key)"));
    }
    postcard::from_bytes(&body_bytes).map_err(|e| Error::corrupt(what, format!("undecodable: {e}")))
}

/// Encodes a record, MACed with the volume key.
pub fn encode_record(body: &RecordBody, key: &MasterKey) -> Result<Vec<u8>> {
    seal_maced(MAGIC_LOG_RECORD, body, key)
}

/// Decodes a record; checks the MAC when a key is given. Never panics.
pub fn decode_record(bytes: &[u8], key: Option<&MasterKey>, what: &str) -> Result<RecordBody> {
    let body: RecordBody = open_maced(MAGIC_LOG_RECORD, bytes, key, what)?;
    body.validate(what)?;
    Ok(body)
}

/// Splits a log shard's payload (after the shard header) into its data part and its record bytes.
pub fn split_shard_payload<'a>(payload: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8])> {
    let Some(len_at) = payload.len().checked_sub(4) else {
        return Err(Error::corrupt(what, "truncated"));
    };
    let record_len =
        u32::from_le_bytes([payload[len_at], payload[len_at + 1], payload[len_at + 2], payload[len_at + 3]]);
    let Some(data_len) = len_at.checked_sub(record_len as usize) else {
        return Err(Error::corrupt(what, "record length beyond the shard"));
    };
    Ok((&payload[..data_len], &payload[data_len..len_at]))
}

/// One entry of the block map: where a logical block lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntry {
    /// Log stripe holding the block; 0 = never written or trimmed (reads as zeros).
    pub seq: u64,
    /// Slot within the stripe.
    pub slot: u32,
}

impl MapEntry {
    /// The entry of an unwritten block.
    pub const HOLE: MapEntry = MapEntry { seq: 0, slot: 0 };

    /// True when the block reads as zeros.
    pub fn is_hole(&self) -> bool {
        self.seq == 0
    }
}

/// A page of the block map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMapPage {
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Page index.
    pub page: u32,
    /// Generation of this page object.
    pub gen: u64,
    /// One entry per block of the page.
    pub entries: Vec<MapEntry>,
}

impl LogMapPage {
    /// Encoded object bytes.
    pub fn encode(&self) -> Vec<u8> {
        format::seal(MAGIC_LOG_MAP, self)
    }

    /// Decodes a page object and checks it against its reference.
    pub fn decode(bytes: &[u8], r: &PageRef, vol_id: &[u8; 16], page: u32, entries: u32, what: &str) -> Result<Self> {
        if blake3::hash(bytes).as_bytes() != &r.hash {
            return Err(Error::corrupt(what, "hash differs from the checkpoint's page table"));
        }
        let p: LogMapPage = format::open(MAGIC_LOG_MAP, what, bytes)?;
        if &p.vol_id != vol_id || p.page != page || p.gen != r.gen || p.entries.len() != entries as usize {
            return Err(Error::corrupt(what, "page belongs elsewhere"));
        }
        Ok(p)
    }
}

/// A live log stripe, as the checkpoint lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeInfo {
    /// Sequence number.
    pub seq: u64,
    /// Data blocks in the stripe.
    pub blocks: u32,
    /// Bytes of its record.
    pub record_len: u32,
    /// Blocks of the stripe the map still points at.
    pub live: u32,
}

/// The checkpoint: the log's authenticated root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// Store id.
    pub store_id: [u8; 16],
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Keyed hash of the volume name.
    pub name_tag: Hash,
    /// Checkpoint generation (the highest valid copy wins).
    pub generation: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Data shards per stripe.
    pub k: u16,
    /// Parity shards per stripe.
    pub m: u16,
    /// Most data blocks in one stripe.
    pub stripe_blocks: u32,
    /// Placement rotation start.
    pub placement_start: u32,
    /// Every stripe up to this sequence number is reflected in the map pages; replay starts after it.
    pub seq: u64,
    /// Next generation number for map page objects.
    pub next_gen: u64,
    /// Blocks per map page.
    pub entries_per_page: u32,
    /// Map page table.
    pub pages: Vec<PageRef>,
    /// The live stripes up to `seq`.
    pub stripes: Vec<StripeInfo>,
    /// Nonce of `sealed_meta`.
    pub meta_nonce: [u8; 12],
    /// Encrypted volume metadata (name, creation time).
    pub sealed_meta: Vec<u8>,
}

impl CheckpointBody {
    /// Blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.size / BLOCK as u64
    }

    /// Structural checks (no key needed).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |d: &str| Err(Error::corrupt(what, d));
        if erasure::validate(self.k as usize, self.m as usize).is_err() {
            return bad("invalid k/m");
        }
        if self.size == 0 || !self.size.is_multiple_of(BLOCK as u64) {
            return bad("volume size is not a positive multiple of 4 KiB");
        }
        if self.entries_per_page == 0 || self.stripe_blocks == 0 {
            return bad("zero entries per page or blocks per stripe");
        }
        if self.pages.len() as u64 != self.blocks().div_ceil(self.entries_per_page as u64) {
            return bad("page table length does not match the volume size");
        }
        if self.pages.iter().any(|p| p.gen >= self.next_gen) {
            return bad("page generation beyond next_gen");
        }
        if self.stripes.iter().any(|s| s.seq == 0 || s.seq > self.seq || s.blocks > self.stripe_blocks) {
            return bad("stripe table entry out of range");
        }
        Ok(())
    }
}

/// Encodes a checkpoint copy, MACed with the volume key.
pub fn encode_checkpoint(body: &CheckpointBody, key: &MasterKey) -> Result<Vec<u8>> {
    seal_maced(MAGIC_CHECKPOINT, body, key)
}

/// Decodes a checkpoint copy; checks the MAC when a key is given. Never panics.
pub fn decode_checkpoint(bytes: &[u8], key: Option<&MasterKey>, what: &str) -> Result<CheckpointBody> {
    let body: CheckpointBody = open_maced(MAGIC_CHECKPOINT, bytes, key, what)?;
    body.validate(what)?;
    Ok(body)
}

/// Object key prefix of a log volume.
pub fn log_prefix(vol_id: &[u8; 16]) -> String {
    format!("logvol/{}", hex::encode(vol_id))
}

/// Object key of a log volume's checkpoint.
pub fn checkpoint_key(vol_id: &[u8; 16]) -> String {
    format!("{}/checkpoint", log_prefix(vol_id))
}

/// Object key of a map page.
pub fn log_page_key(vol_id: &[u8; 16], page: u32, gen: u64) -> String {
    format!("{}/{page:08x}-{gen:016x}", log_page_dir(vol_id))
}

/// Listing directory of a log volume's map pages.
pub fn log_page_dir(vol_id: &[u8; 16]) -> String {
    format!("{}/map", log_prefix(vol_id))
}

/// Parses a map page object's name (the last part of [`log_page_key`]) into `(page, gen)`.
pub fn parse_page_name(name: &str) -> Option<(u32, u64)> {
    let (page, gen) = name.split_once('-')?;
    if page.len() != 8 || gen.len() != 16 {
        return None;
    }
    Some((u32::from_str_radix(page, 16).ok()?, u64::from_str_radix(gen, 16).ok()?))
}

/// Listing directory of the stripes `dir * STRIPES_PER_DIR ..`.
pub fn stripe_dir(vol_id: &[u8; 16], dir: u64) -> String {
    format!("{}/log/{dir:012x}", log_prefix(vol_id))
}

/// Object key of shard `shard` of log stripe `seq`.
pub fn stripe_key(vol_id: &[u8; 16], seq: u64, shard: usize) -> String {
    format!("{}/{seq:016x}.{shard:02}", stripe_dir(vol_id, seq / STRIPES_PER_DIR))
}

/// Parses a stripe shard's name (the last part of [`stripe_key`]) into `(seq, shard)`.
pub fn parse_stripe_name(name: &str) -> Option<(u64, usize)> {
    let (seq, shard) = name.split_once('.')?;
    if seq.len() != 16 || shard.len() != 2 {
        return None;
    }
    Some((u64::from_str_radix(seq, 16).ok()?, shard.parse().ok()?))
}

/// Parses a listing directory's name (the last part of [`stripe_dir`]).
pub fn parse_stripe_dir(name: &str) -> Option<u64> {
    (name.len() == 12).then(|| u64::from_str_radix(name, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RecordBody {
        RecordBody {
            store_id: [1; 16],
            vol_id: [2; 16],
            seq: 7,
            k: 2,
            m: 1,
            blocks: 3,
            extents: vec![Extent { lba: 10, len: 3, slot: 0 }, Extent { lba: 100, len: 50, slot: ZERO_SLOT }],
            block_hashes: vec![[3; 16]; 3],
            shard_hashes: vec![[4; 32]; 3],
        }
    }

    #[test]
    fn records_round_trip_and_refuse_tampering() {
        let key = MasterKey::from_bytes([9; 32]);
        let bytes = encode_record(&record(), &key).unwrap();
        assert_eq!(decode_record(&bytes, Some(&key), "r").unwrap(), record());
        assert_eq!(decode_record(&bytes, None, "r").unwrap().blocks_per_shard(), 2);
        let other = MasterKey::from_bytes([8; 32]);
        assert!(matches!(decode_record(&bytes, Some(&other), "r"), Err(Error::Corrupt { .. })));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode_record(&b, Some(&key), "r").is_err(), "flip at {i} accepted");
        }
        let mut bad = record();
        bad.extents.push(Extent { lba: 5, len: 2, slot: 2 });
        assert!(decode_record(&encode_record(&bad, &key).unwrap(), Some(&key), "r").is_err());
    }

    #[test]
    fn page_names_parse() {
        let key = log_page_key(&[1; 16], 0x2a, 7);
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(parse_page_name(name), Some((0x2a, 7)));
        assert!(key.starts_with(&log_page_dir(&[1; 16])));
        for bad in ["", "2a-7", "0000002a-", "0000002a-000000000000000g", "0000002a_0000000000000007"] {
            assert_eq!(parse_page_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn shard_payloads_split_and_keys_parse() {
        let mut payload = vec![7u8; 8192];
        payload.extend_from_slice(b"record");
        payload.extend_from_slice(&6u32.to_le_bytes());
        let (data, rec) = split_shard_payload(&payload, "s").unwrap();
        assert_eq!((data.len(), rec), (8192, &b"record"[..]));
        assert!(split_shard_payload(&[1, 2], "s").is_err());
        assert!(split_shard_payload(&99u32.to_le_bytes(), "s").is_err());
        let key = stripe_key(&[5; 16], 0x1234_5678, 3);
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(parse_stripe_name(name), Some((0x1234_5678, 3)));
        let dir = key.rsplit('/').nth(1).unwrap();
        assert_eq!(parse_stripe_dir(dir), Some(0x1234_5678 / STRIPES_PER_DIR));
        assert_eq!(parse_stripe_name("zz.01"), None);
    }
}
