//! File manifests: everything needed to find, verify and decrypt a committed file.
//!
//! A manifest has a public part that scrub reads without the key (ids, k, m, segment lengths, the Merkle
//! leaves and root) and private metadata (name, size, times, mode) encrypted with a key derived from the master
//! key. The whole body is authenticated with a keyed BLAKE3 MAC, and framed in a checksummed envelope.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::{MasterKey, TAG_LEN};
use crate::codec::erasure;
use crate::codec::merkle::{self, Hash};
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_MANIFEST};

/// One segment of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Plaintext bytes of the segment.
    pub plain_len: u64,
    /// Bytes of each of its shards.
    pub shard_len: u32,
}

/// The public, keyless part of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// Store the file belongs to.
    pub store_id: [u8; 16],
    /// Random id chosen at commit; names the shards and keys the cipher.
    pub file_id: [u8; 16],
    /// Keyed hash of the name (finds a name's manifests without revealing it).
    pub name_tag: Hash,
    /// Commit time, nanoseconds since the epoch (orders versions of a name).
    pub committed_unix_ns: u64,
    /// Data shards per segment.
    pub k: u16,
    /// Parity shards per segment.
    pub m: u16,
    /// Segment size the file was cut with.
    pub segment_size: u64,
    /// First location of segment 0 (placement rotates from there).
    pub placement_start: u32,
    /// Per segment lengths; the AES-GCM nonce of segment `s` is `s`.
    pub segments: Vec<SegmentEntry>,
    /// Merkle leaves, `k + m` per segment, segment-major.
    pub leaves: Vec<Hash>,
    /// Merkle root over `leaves`: the file's identity.
    pub root: Hash,
    /// Nonce of `sealed_meta`.
    pub meta_nonce: [u8; 12],
    /// [`FileMeta`] encrypted and authenticated with the file's metadata key.
    pub sealed_meta: Vec<u8>,
}

/// Private file metadata (encrypted inside the manifest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Name in the store (a relative path with `/` separators).
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u64,
    /// Modification time of the source, nanoseconds since the epoch.
    pub mtime_unix_ns: i64,
    /// Unix permission bits of the source.
    pub mode: u32,
}

/// A decoded manifest copy: the body and its MAC (checked when a key is available).
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Public part.
    pub body: ManifestBody,
    body_bytes: Vec<u8>,
    mac: Hash,
}

impl ManifestBody {
    /// Shards per segment.
    pub fn width(&self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Leaf of shard `shard` of segment `segment`.
    pub fn leaf(&self, segment: u64, shard: usize) -> Option<&Hash> {
        self.leaves.get(segment as usize * self.width() + shard)
    }

    /// Plaintext size (sum of segment lengths).
    pub fn plain_size(&self) -> u64 {
        self.segments.iter().map(|s| s.plain_len).sum()
    }

    /// Hex of the root.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root)
    }

    /// Checks every structural invariant (no key needed): counts, lengths, and that the root matches the leaves.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |d: String| Err(Error::corrupt(what, d));
        if erasure::validate(self.k as usize, self.m as usize).is_err() {
            return bad(format!("invalid k={} m={}", self.k, self.m));
        }
        if self.segments.is_empty() {
            return bad("no segments".into());
        }
        if self.segment_size == 0 {
            return bad("zero segment size".into());
        }
        if self.leaves.len() != self.segments.len() * self.width() {
            return bad(format!("{} leaves for {} segments", self.leaves.len(), self.segments.len()));
        }
        let last = self.segments.len() - 1;
        for (i, s) in self.segments.iter().enumerate() {
            let full = s.plain_len == self.segment_size;
            if s.plain_len > self.segment_size || (i < last && !full) {
                return bad(format!("segment {i} has length {}", s.plain_len));
            }
            let expect = erasure::shard_len(s.plain_len + TAG_LEN as u64, self.k as usize);
            if s.shard_len as usize != expect {
                return bad(format!("segment {i} shard length {} != {expect}", s.shard_len));
            }
        }
        if merkle::root(&self.leaves) != self.root {
            return bad("Merkle root does not match the leaves".into());
        }
        Ok(())
    }
}

impl Manifest {
    /// Seals a new manifest with the key's MAC.
    pub fn new(body: ManifestBody, key: &MasterKey) -> Self {
        let body_bytes = postcard::to_allocvec(&body).expect("manifest body is serialisable");
        let mac = key.manifest_mac(&body_bytes);
        Manifest { body, body_bytes, mac }
    }

    /// The bytes of one manifest copy.
    pub fn encode(&self) -> Vec<u8> {
        format::seal(MAGIC_MANIFEST, &(&self.body_bytes, &self.mac))
    }

    /// Decodes a copy, checking envelope and structure; with a key also the MAC. Never panics.
    pub fn decode(bytes: &[u8], key: Option<&MasterKey>, what: &str) -> Result<Self> {
        let (body_bytes, mac): (Vec<u8>, Hash) = format::open(MAGIC_MANIFEST, what, bytes)?;
        if let Some(key) = key {
            if key.manifest_mac(&body_bytes) != mac {
                return Err(Error::corrupt(what, "MAC mismatch (tampered, or written with another key)"));
            }
        }
        let body: ManifestBody =
            postcard::from_bytes(&body_bytes).map_err(|e| Error::corrupt(what, format!("undecodable body: {e}")))?;
        body.validate(what)?;
        Ok(Manifest { body, body_bytes, mac })
    }

    /// Decrypts the private metadata.
    pub fn meta(&self, key: &MasterKey) -> Result<FileMeta> {
        let plain = key.open_metadata(&self.body.file_id, &self.body.meta_nonce, &self.body.sealed_meta)?;
        postcard::from_bytes(&plain).map_err(|e| Error::corrupt("file metadata", e.to_string()))
    }
}

/// Object key of a manifest copy on a location.
pub fn manifest_key(name_tag: &Hash, file_id: &[u8; 16]) -> String {
    format!("manifests/{}-{}.bfm", hex::encode(name_tag), hex::encode(file_id))
}

/// Parses a manifest object name back into (name tag, file id).
pub fn parse_manifest_name(name: &str) -> Option<(Hash, [u8; 16])> {
    let stem = name.strip_suffix(".bfm")?;
    let (tag, id) = stem.split_once('-')?;
    let mut t = [0u8; 32];
    let mut i = [0u8; 16];
    hex::decode_to_slice(tag, &mut t).ok()?;
    hex::decode_to_slice(id, &mut i).ok()?;
    Some((t, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_body(key: &MasterKey) -> ManifestBody {
        let (k, m) = (2u16, 1u16);
        let segments = vec![SegmentEntry { plain_len: 10, shard_len: erasure::shard_len(26, 2) as u32 }];
        let leaves: Vec<Hash> = (0..3u8).map(|i| [i; 32]).collect();
        let (sealed_meta, meta_nonce) = key
            .seal_metadata(
                &[4; 16],
                &postcard::to_allocvec(&FileMeta { name: "a".into(), size: 10, mtime_unix_ns: 0, mode: 0o644 })
                    .unwrap(),
            )
            .unwrap();
        ManifestBody {
            store_id: [3; 16],
            file_id: [4; 16],
            name_tag: key.name_tag("a"),
            committed_unix_ns: 1,
            k,
            m,
            segment_size: 64,
            placement_start: 0,
            root: merkle::root(&leaves),
            segments,
            leaves,
            meta_nonce,
            sealed_meta,
        }
    }

    #[test]
    fn round_trip_and_mac() {
        let key = MasterKey::from_bytes([1; 32]);
        let m = Manifest::new(sample_body(&key), &key);
        let bytes = m.encode();
        let back = Manifest::decode(&bytes, Some(&key), "t").unwrap();
        assert_eq!(back.body, m.body);
        assert_eq!(back.meta(&key).unwrap().name, "a");
        assert!(Manifest::decode(&bytes, None, "t").is_ok());
        let other = MasterKey::from_bytes([2; 32]);
        assert!(Manifest::decode(&bytes, Some(&other), "t").is_err());
    }

    #[test]
    fn inconsistent_root_is_rejected_without_key() {
        let key = MasterKey::from_bytes([1; 32]);
        let mut body = sample_body(&key);
        body.leaves[0][0] ^= 1;
        let bytes = Manifest::new(body, &key).encode();
        assert!(Manifest::decode(&bytes, None, "t").is_err());
    }

    #[test]
    fn names_round_trip() {
        let k = manifest_key(&[0xab; 32], &[0xcd; 16]);
        let name = k.strip_prefix("manifests/").unwrap();
        assert_eq!(parse_manifest_name(name), Some(([0xab; 32], [0xcd; 16])));
        assert_eq!(parse_manifest_name("junk.bfm"), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&b, None, "t");
        }

        #[test]
        fn flipped_bits_are_rejected(bit in any::<usize>()) {
            let key = MasterKey::from_bytes([1; 32]);
            let mut bytes = Manifest::new(sample_body(&key), &key).encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Manifest::decode(&bytes, Some(&key), "t").is_err());
        }
    }
}
