//! The header that prefixes every shard file, and shard verification against a Merkle leaf.
//!
//! Fixed 128-byte layout (little endian):
//! `magic[8] | version u16 | shard u16 | k u16 | m u16 | store_id[16] | file_id[16] | segment u64 |
//! payload_len u32 | reserved u32 | blake3(payload)[32] | blake3(bytes 0..96)[32]`.
//! The shard carries the file id rather than the file root because the root is only known once the whole file
//! has been streamed; the manifest ties the id to the root, and the Merkle leaf ties the shard to both.

use crate::codec::merkle::{leaf_hash, Hash};
use crate::error::{Error, Result};
use crate::format::FORMAT_VERSION;

/// Magic of a shard file.
pub const MAGIC_SHARD: [u8; 8] = *b"BFSHARD\0";
/// Size of the shard header.
pub const HEADER_LEN: usize = 128;
const CHECKED_LEN: usize = 96;
const _: () = assert!(CHECKED_LEN + 32 == HEADER_LEN);

/// Where a shard belongs and what it must contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    /// Store the shard belongs to.
    pub store_id: [u8; 16],
    /// File (or volume) the shard belongs to.
    pub file_id: [u8; 16],
    /// Segment (stripe) index within the file.
    pub segment: u64,
    /// Shard index within the segment: `0..k` data, `k..k+m` parity.
    pub shard: u16,
    /// Data shard count of the segment.
    pub k: u16,
    /// Parity shard count of the segment.
    pub m: u16,
    /// Payload bytes following the header.
    pub payload_len: u32,
    /// BLAKE3 of the payload.
    pub payload_hash: Hash,
}

impl ShardHeader {
    /// The header of shard `shard` of `segment` holding `payload` (length and BLAKE3 computed here).
    pub fn for_payload(
        store_id: [u8; 16],
        file_id: [u8; 16],
        segment: u64,
        shard: u16,
        (k, m): (u16, u16),
        payload: &[u8],
    ) -> Self {
        ShardHeader {
            store_id,
            file_id,
            segment,
            shard,
            k,
            m,
            payload_len: payload.len() as u32,
            payload_hash: *blake3::hash(payload).as_bytes(),
        }
    }

    /// Serialises the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC_SHARD);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&self.shard.to_le_bytes());
        b[12..14].copy_from_slice(&self.k.to_le_bytes());
        b[14..16].copy_from_slice(&self.m.to_le_bytes());
        b[16..32].copy_from_slice(&self.store_id);
        b[32..48].copy_from_slice(&self.file_id);
        b[48..56].copy_from_slice(&self.segment.to_le_bytes());
        b[56..60].copy_from_slice(&self.payload_len.to_le_bytes());
        b[64..96].copy_from_slice(&self.payload_hash);
        let sum = blake3::hash(&b[..CHECKED_LEN]);
        b[96..128].copy_from_slice(sum.as_bytes());
        b
    }

    /// Parses and checks magic, version and checksum. Never panics.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |d: &str| Error::corrupt("shard header", d);
        if b.len() < HEADER_LEN {
            return Err(bad("truncated"));
        }
        if b[0..8] != MAGIC_SHARD {
            return Err(bad("bad magic"));
        }
        if blake3::hash(&b[..CHECKED_LEN]).as_bytes() != &b[96..128] {
            return Err(bad("checksum mismatch"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        if u16_at(8) != FORMAT_VERSION {
            return Err(bad("unsupported version"));
        }
        let mut h = ShardHeader {
            store_id: [0; 16],
            file_id: [0; 16],
            segment: u64::from_le_bytes(b[48..56].try_into().map_err(|_| bad("segment"))?),
            shard: u16_at(10),
            k: u16_at(12),
            m: u16_at(14),
            payload_len: u32::from_le_bytes(b[56..60].try_into().map_err(|_| bad("length"))?),
            payload_hash: [0; 32],
        };
        h.store_id.copy_from_slice(&b[16..32]);
        h.file_id.copy_from_slice(&b[32..48]);
        h.payload_hash.copy_from_slice(&b[64..96]);
        Ok(h)
    }

    /// The Merkle leaf this header claims.
    pub fn leaf(&self) -> Hash {
        leaf_hash(&self.file_id, self.segment, self.shard, self.payload_len, &self.payload_hash)
    }
}

/// Why a shard did not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardFault {
    /// Header unreadable (bad magic, checksum, truncated).
    BadHeader(String),
    /// Header names another store, file, segment or shard: a misdirected write.
    Misplaced(String),
    /// Payload length differs from the header or the manifest.
    BadLength,
    /// Payload bytes do not hash to the header's or the Merkle leaf's value.
    BadPayload,
}

impl std::fmt::Display for ShardFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardFault::BadHeader(d) => write!(f, "bad header ({d})"),
            ShardFault::Misplaced(d) => write!(f, "misplaced shard ({d})"),
            ShardFault::BadLength => f.write_str("wrong length"),
            ShardFault::BadPayload => f.write_str("payload hash mismatch"),
        }
    }
}

/// What a shard is expected to be, from the manifest.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// Store id.
    pub store_id: &'a [u8; 16],
    /// File id.
    pub file_id: &'a [u8; 16],
    /// Segment index.
    pub segment: u64,
    /// Shard index.
    pub shard: u16,
    /// Payload length.
    pub len: u32,
    /// Merkle leaf of the shard.
    pub leaf: &'a Hash,
}

/// Checks a whole shard file (header + payload) against what the manifest expects; returns the payload.
/// Needs no key: this is what scrub runs on untrusted nodes.
pub fn verify<'b>(bytes: &'b [u8], want: &Expected<'_>) -> std::result::Result<&'b [u8], ShardFault> {
    let (head, payload) = bytes.split_at(HEADER_LEN.min(bytes.len()));
    verify_split(head, payload, want)?;
    Ok(payload)
}

/// [`verify`] of a shard read as its header and its payload apart.
pub fn verify_split(head: &[u8], payload: &[u8], want: &Expected<'_>) -> std::result::Result<(), ShardFault> {
    let h = verify_header(head, payload.len(), want)?;
    if *blake3::hash(payload).as_bytes() != h.payload_hash {
        return Err(ShardFault::BadPayload);
    }
    Ok(())
}

/// The part of [`verify_split`] that does not read the payload: the header names this store, file, stripe and
/// shard, says the payload's length (`payload_len`, what was read), and records the payload hash whose leaf the
/// manifest holds. A reader that authenticates the payload some other way (a segment's AES-GCM tag covers its
/// data shards) needs no more; bit rot inside the payload is then caught by that check instead.
pub fn verify_header(
    head: &[u8],
    payload_len: usize,
    want: &Expected<'_>,
) -> std::result::Result<ShardHeader, ShardFault> {
    let h = ShardHeader::decode(head).map_err(|e| ShardFault::BadHeader(e.to_string()))?;
    if &h.store_id != want.store_id || &h.file_id != want.file_id {
        return Err(ShardFault::Misplaced("belongs to another store or file".into()));
    }
    if h.segment != want.segment || h.shard != want.shard {
        return Err(ShardFault::Misplaced(format!("holds segment {} shard {}", h.segment, h.shard)));
    }
    if h.payload_len != want.len || payload_len != want.len as usize {
        return Err(ShardFault::BadLength);
    }
    if leaf_hash(want.file_id, want.segment, want.shard, want.len, &h.payload_hash) != *want.leaf {
        return Err(ShardFault::BadPayload);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: &[u8]) -> (ShardHeader, Vec<u8>) {
        let h = ShardHeader {
            store_id: [1; 16],
            file_id: [2; 16],
            segment: 3,
            shard: 4,
            k: 4,
            m: 2,
            payload_len: payload.len() as u32,
            payload_hash: *blake3::hash(payload).as_bytes(),
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(payload);
        (h, bytes)
    }

    #[test]
    fn verifies_good_and_rejects_every_flipped_bit() {
        let (h, bytes) = sample(b"some shard payload");
        let leaf = h.leaf();
        let want = Expected { store_id: &[1; 16], file_id: &[2; 16], segment: 3, shard: 4, len: 18, leaf: &leaf };
        assert_eq!(verify(&bytes, &want).unwrap(), b"some shard payload");
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            // Reserved bytes 60..64 are not interpreted, but they are under the checksum.
            assert!(verify(&b, &want).is_err(), "bit {bit}");
        }
        assert!(verify(&bytes[..bytes.len() - 1], &want).is_err());
        let other = Expected { shard: 5, ..want };
        assert!(matches!(verify(&bytes, &other), Err(ShardFault::Misplaced(_))));
    }

    proptest! {
        #[test]
        fn decode_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ShardHeader::decode(&b);
        }
    }
}
