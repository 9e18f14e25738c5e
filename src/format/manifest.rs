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

/// Where a file's data is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    /// In its own segments, `k + m` shards each (every file of format version 1).
    #[default]
    Segments,
    /// Its one segment's ciphertext (encrypted as segment 0 of the file, `plain_len + 16` bytes) lies inside a
    /// pack; the file has no shards of its own and no leaves.
    Packed {
        /// File id of the pack.
        pack: [u8; 16],
        /// Byte offset of the ciphertext in the pack's data.
        offset: u64,
        /// BLAKE3 of the ciphertext (what the root commits to).
        cipher_hash: Hash,
    },
    /// A pack: one segment of raw bytes (the packed files' ciphertexts, back to back, not encrypted again)
    /// erasure-coded like any segment. Its name tag is [`PACK_NAME_TAG`].
    Pack,
}

/// Name tag of every pack (no name hashes to all zeros).
pub const PACK_NAME_TAG: Hash = [0; 32];

/// Root of a packed file: binds its id and its ciphertext, not where the ciphertext lies (so moving it to another
/// pack keeps the file's identity).
pub fn packed_root(file_id: &[u8; 16], cipher_len: u64, cipher_hash: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0x02]);
    h.update(file_id);
    h.update(&cipher_len.to_le_bytes());
    h.update(cipher_hash);
    *h.finalize().as_bytes()
}

/// The public part of a format version 1 manifest (before [`Data`]).
#[derive(Deserialize)]
struct BodyV1 {
    store_id: [u8; 16],
    file_id: [u8; 16],
    name_tag: Hash,
    committed_unix_ns: u64,
    k: u16,
    m: u16,
    segment_size: u64,
    placement_start: u32,
    segments: Vec<SegmentEntry>,
    leaves: Vec<Hash>,
    root: Hash,
    meta_nonce: [u8; 12],
    sealed_meta: Vec<u8>,
}

impl From<BodyV1> for ManifestBody {
    fn from(b: BodyV1) -> Self {
        ManifestBody {
            store_id: b.store_id,
            file_id: b.file_id,
            name_tag: b.name_tag,
            committed_unix_ns: b.committed_unix_ns,
            k: b.k,
            m: b.m,
            segment_size: b.segment_size,
            placement_start: b.placement_start,
            segments: b.segments,
            leaves: b.leaves,
            root: b.root,
            meta_nonce: b.meta_nonce,
            sealed_meta: b.sealed_meta,
            data: Data::Segments,
        }
    }
}

/// Format version of manifests written now. Version 1 (without [`Data`]) and 2 (whose sealed metadata has no
/// kind, owner, atime or ctime) are still read.
pub const MANIFEST_VERSION: u16 = 3;

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
    /// [`FileMeta`] encrypted and authenticated with the file's metadata key (empty for a pack).
    pub sealed_meta: Vec<u8>,
    /// Where the data is.
    pub data: Data,
}

/// What a catalog entry is. Directories and symbolic links are entries without data (an empty packed file),
/// so that a mount keeps what users set on them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    #[default]
    File,
    /// A directory (its files are named below it; the entry keeps its mode, owner and times).
    Dir,
    /// A symbolic link to `target` (stored as given, never followed by the store).
    Symlink {
        /// What the link points to.
        target: String,
    },
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
    /// File, directory or symbolic link (manifest format 3; older ones are files).
    pub kind: EntryKind,
    /// Owner and group, when recorded (format 3; `None` shows as the mounting user).
    pub owner: Option<(u32, u32)>,
    /// Last access, nanoseconds since the epoch (format 3; older ones read as `mtime_unix_ns`).
    pub atime_unix_ns: i64,
    /// Last change of the entry's metadata, nanoseconds since the epoch (format 3; older: `mtime_unix_ns`).
    pub ctime_unix_ns: i64,
}

/// [`FileMeta`] of manifest formats 1 and 2.
#[derive(Deserialize)]
struct FileMetaV1 {
    name: String,
    size: u64,
    mtime_unix_ns: i64,
    mode: u32,
}

impl FileMeta {
    /// Metadata of a regular file with no recorded owner, accessed and changed when modified.
    pub fn file(name: String, size: u64, mtime_unix_ns: i64, mode: u32) -> Self {
        FileMeta {
            name,
            size,
            mtime_unix_ns,
            mode,
            kind: EntryKind::File,
            owner: None,
            atime_unix_ns: mtime_unix_ns,
            ctime_unix_ns: mtime_unix_ns,
        }
    }

    /// Length of [`FileMeta::seal`]'s sealed bytes.
    pub fn sealed_len(&self) -> usize {
        postcard::experimental::serialized_size(self).map_or(usize::MAX / 4, |n| n + TAG_LEN)
    }

    /// Encrypts the metadata for a manifest of `file_id` (in the current format): the sealed bytes and their
    /// nonce.
    pub fn seal(&self, key: &MasterKey, file_id: &[u8; 16]) -> Result<(Vec<u8>, [u8; 12])> {
        let bytes = postcard::to_allocvec(self).map_err(|e| Error::internal(format!("encoding file metadata: {e}")))?;
        key.seal_metadata(file_id, &bytes)
    }

    /// Decodes metadata sealed by a manifest of format `version`.
    fn decode(version: u16, plain: &[u8]) -> Result<Self> {
        let bad = |e: postcard::Error| Error::corrupt("file metadata", e.to_string());
        if version >= 3 {
            return postcard::from_bytes(plain).map_err(bad);
        }
        let v1: FileMetaV1 = postcard::from_bytes(plain).map_err(bad)?;
        Ok(FileMeta::file(v1.name, v1.size, v1.mtime_unix_ns, v1.mode))
    }
}

/// A decoded manifest copy: the body and its MAC (checked when a key is available).
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Public part.
    pub body: ManifestBody,
    version: u16,
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

    /// True for a pack (not a file: it has no name).
    pub fn is_pack(&self) -> bool {
        self.data == Data::Pack
    }

    /// Checks every structural invariant (no key needed): counts, lengths, and that the root matches the leaves.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |d: String| Err(Error::corrupt(what, d));
        if (self.name_tag == PACK_NAME_TAG) != self.is_pack() {
            return bad("name tag and kind disagree".into());
        }
        if let Data::Packed { offset, cipher_hash, .. } = &self.data {
            let [s] = self.segments.as_slice() else { return bad("a packed file has one segment".into()) };
            if s.shard_len != 0 || !self.leaves.is_empty() || s.plain_len > self.segment_size {
                return bad("a packed file has no shards of its own".into());
            }
            let len = s.plain_len + TAG_LEN as u64;
            if offset.checked_add(len).is_none() || packed_root(&self.file_id, len, cipher_hash) != self.root {
                return bad("root does not match the packed data".into());
            }
            return Ok(());
        }
        let tag = if self.is_pack() { 0 } else { TAG_LEN as u64 };
        if self.is_pack() && self.segments.len() != 1 {
            return bad("a pack has one segment".into());
        }
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
            let expect = erasure::shard_len(s.plain_len + tag, self.k as usize);
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
        Manifest { body, version: MANIFEST_VERSION, body_bytes, mac }
    }

    /// A manifest of `body`, which keeps this one's sealed metadata (a packed file moved by compaction): in this
    /// one's format version, which says how that metadata is encoded (a version 2 file stays version 2).
    pub fn rebuilt(&self, body: ManifestBody, key: &MasterKey) -> Self {
        let m = Manifest::new(body, key);
        if m.body.sealed_meta != self.body.sealed_meta {
            return m;
        }
        let version = self.version.max(2); // version 1 has no `data`: a rebuilt body needs version 2 at least
        Manifest { version, ..m }
    }

    /// The bytes of one manifest copy (in the format version it was read in).
    pub fn encode(&self) -> Vec<u8> {
        let payload = postcard::to_allocvec(&(&self.body_bytes, &self.mac)).expect("byte strings are serialisable");
        format::seal_bytes_version(MAGIC_MANIFEST, self.version, &payload)
    }

    /// Decodes a copy, checking envelope and structure; with a key also the MAC. Never panics.
    pub fn decode(bytes: &[u8], key: Option<&MasterKey>, what: &str) -> Result<Self> {
        let (version, payload) = format::open_bytes_version(MAGIC_MANIFEST, what, bytes, 1..=MANIFEST_VERSION)?;
        let (body_bytes, mac): (Vec<u8>, Hash) =
            postcard::from_bytes(payload).map_err(|e| Error::corrupt(what, format!("undecodable payload: {e}")))?;
        if let Some(key) = key {
            if key.manifest_mac(&body_bytes) != mac {
                return Err(Error::corrupt(what, "MAC mismatch (tampered, or written with another key)"));
            }
        }
        let undecodable = |e: postcard::Error| Error::corrupt(what, format!("undecodable body: {e}"));
        let body: ManifestBody = if version == 1 {
            postcard::from_bytes::<BodyV1>(&body_bytes).map_err(undecodable)?.into()
        } else {
            postcard::from_bytes(&body_bytes).map_err(undecodable)?
        };
        body.validate(what)?;
        Ok(Manifest { body, version, body_bytes, mac })
    }

    /// Decrypts the private metadata.
    pub fn meta(&self, key: &MasterKey) -> Result<FileMeta> {
        let plain = key.open_metadata(&self.body.file_id, &self.body.meta_nonce, &self.body.sealed_meta)?;
        FileMeta::decode(self.version, &plain)
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
            .seal_metadata(&[4; 16], &postcard::to_allocvec(&FileMeta::file("a".into(), 10, 0, 0o644)).unwrap())
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
            data: Data::Segments,
        }
    }

    #[test]
    fn version_1_copies_are_read_and_kept_byte_for_byte() {
        let key = MasterKey::from_bytes([1; 32]);
        let b = sample_body(&key);
        let v1 = (
            b.store_id,
            b.file_id,
            b.name_tag,
            b.committed_unix_ns,
            b.k,
            b.m,
            b.segment_size,
            b.placement_start,
            b.segments.clone(),
            b.leaves.clone(),
            b.root,
            b.meta_nonce,
            b.sealed_meta.clone(),
        );
        let body_bytes = postcard::to_allocvec(&v1).unwrap();
        let mac = key.manifest_mac(&body_bytes);
        let payload = postcard::to_allocvec(&(&body_bytes, &mac)).unwrap();
        let bytes = format::seal_bytes_version(MAGIC_MANIFEST, 1, &payload);
        let m = Manifest::decode(&bytes, Some(&key), "t").unwrap();
        assert_eq!(m.body, b);
        assert_eq!(m.encode(), bytes);
    }

    /// A format version 2 manifest of "a/b", whose sealed metadata has the four fields of formats 1 and 2.
    fn version_2_manifest(key: &MasterKey) -> Manifest {
        let mut body = sample_body(key);
        let old_meta = postcard::to_allocvec(&("a/b", 10u64, 77i64, 0o640u32)).unwrap();
        (body.sealed_meta, body.meta_nonce) = key.seal_metadata(&body.file_id, &old_meta).unwrap();
        let body_bytes = postcard::to_allocvec(&body).unwrap();
        let mac = key.manifest_mac(&body_bytes);
        Manifest { body, version: 2, body_bytes, mac }
    }

    #[test]
    fn metadata_of_older_formats_reads_as_a_file_without_owner() {
        let key = MasterKey::from_bytes([1; 32]);
        let v2 = version_2_manifest(&key);
        let back = Manifest::decode(&v2.encode(), Some(&key), "t").unwrap();
        let meta = back.meta(&key).unwrap();
        assert_eq!(meta, FileMeta::file("a/b".into(), 10, 77, 0o640));
        assert_eq!((meta.kind, meta.owner, meta.atime_unix_ns, meta.ctime_unix_ns), (EntryKind::File, None, 77, 77));
    }

    #[test]
    fn a_version_2_manifest_rebuilt_like_compaction_keeps_readable_metadata() {
        let key = MasterKey::from_bytes([1; 32]);
        let v2 = version_2_manifest(&key);
        assert_eq!(v2.meta(&key).unwrap().name, "a/b");
        // What files::compact does to a packed file it moves: the same body (sealed metadata included), only
        // `data` changed: rebuilt in the version that says how the metadata is encoded.
        let moved = v2.rebuilt(ManifestBody { placement_start: 9, ..v2.body.clone() }, &key);
        let back = Manifest::decode(&moved.encode(), Some(&key), "t").unwrap();
        assert_eq!(back.meta(&key).unwrap().name, "a/b", "metadata of a compacted version 2 file is unreadable");
        assert_eq!(back.body.placement_start, 9);
        // New metadata: the current version.
        let mut body = v2.body.clone();
        (body.sealed_meta, body.meta_nonce) =
            FileMeta::file("c".into(), 10, 1, 0o600).seal(&key, &body.file_id).unwrap();
        let resealed = Manifest::decode(&v2.rebuilt(body, &key).encode(), Some(&key), "t").unwrap();
        assert_eq!(resealed.meta(&key).unwrap().name, "c");
    }

    #[test]
    fn directories_and_links_keep_owner_and_times() {
        let key = MasterKey::from_bytes([1; 32]);
        let mut body = sample_body(&key);
        let meta = FileMeta {
            kind: EntryKind::Symlink { target: "../x".into() },
            owner: Some((1000, 100)),
            atime_unix_ns: 5,
            ctime_unix_ns: 6,
            ..FileMeta::file("l".into(), 10, 4, 0o777)
        };
        (body.sealed_meta, body.meta_nonce) = meta.seal(&key, &body.file_id).unwrap();
        let m = Manifest::new(body, &key);
        let back = Manifest::decode(&m.encode(), Some(&key), "t").unwrap();
        assert_eq!(back.meta(&key).unwrap(), meta);
    }

    #[test]
    fn packed_files_are_checked_against_their_root() {
        let key = MasterKey::from_bytes([1; 32]);
        let mut b = sample_body(&key);
        let cipher_hash = [7; 32];
        b.segments[0].shard_len = 0;
        b.leaves.clear();
        b.data = Data::Packed { pack: [8; 16], offset: 100, cipher_hash };
        b.root = packed_root(&b.file_id, 26, &cipher_hash);
        assert!(b.validate("t").is_ok());
        // Moved to another pack and offset: the same file.
        b.data = Data::Packed { pack: [9; 16], offset: 4000, cipher_hash };
        assert!(b.validate("t").is_ok());
        b.data = Data::Packed { pack: [9; 16], offset: 4000, cipher_hash: [6; 32] };
        assert!(b.validate("t").is_err());
        b.data = Data::Packed { pack: [9; 16], offset: u64::MAX - 3, cipher_hash };
        assert!(b.validate("t").is_err());
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
