//! Packs: small files' ciphertexts appended back to back and stored as one erasure-coded stripe, so a small
//! file costs a slice of a shard object instead of k+m objects of its own.
//!
//! A small file is encrypted exactly as segment 0 (the last) of a file would be (AES-256-GCM under its own file
//! key, so its tag authenticates it wherever it sits); its ciphertext is appended to the open pack. Sealing the
//! pack cuts its bytes into k data shards, adds m parity shards and writes the k+m shards durably, like any
//! segment; only then are the pack's manifest and its files' manifests published (in one catalog record).
//! A pack is never rewritten: when its files are removed, the catalog drops it with its last file.

use crate::codec::crypto::{random_bytes, TAG_LEN};
use crate::codec::erasure::{self, Codec};
use crate::codec::merkle::{self, Hash};
use crate::error::{Error, Result};
use crate::format::manifest::{packed_root, Data, FileMeta, Manifest, ManifestBody, SegmentEntry, PACK_NAME_TAG};
use crate::format::pack_index::{self, IndexEntry};
use crate::store::{shard_key, Store};
use crate::stripe::{write_stripe, HomeRule, StripeAddr};

/// Most bytes in one pack (4 MiB: 1 MiB shards at k = 4), or the segment size when smaller.
pub const PACK_BYTES: u64 = 4 << 20;

/// Files up to this size are packed by default (at most a quarter of a pack). Measured on this machine (k+m =
/// 4+2, local disk): 200 files of 512 KiB in their own segments took 12.7 s, 200 files of 200 KiB packed 0.36 s;
/// reading a packed file reads only its own bytes, so packing up to the quarter of a pack costs readers nothing.
pub const DEFAULT_PACK_THRESHOLD: u64 = 1 << 20;

/// The largest file a store packs (at most a quarter of a pack, so a pack holds several).
pub fn pack_limit(store: &Store, threshold: u64) -> u64 {
    threshold.min(capacity(store) / 4)
}

fn capacity(store: &Store) -> u64 {
    PACK_BYTES.min(store.descriptor().segment_size)
}

/// A sealed pack: its manifest and the shards it could not store.
pub struct SealedPack {
    /// The pack's manifest.
    pub manifest: Manifest,
    /// Location indexes of shards not stored (the write policy allowed it).
    pub missing: Vec<usize>,
}

/// The open pack.
pub struct Packer {
    pack_id: [u8; 16],
    data: Vec<u8>,
    capacity: usize,
    /// What the index at the end of the pack will hold, and its encoded length so far.
    index: Vec<IndexEntry>,
    index_len: usize,
}

impl Packer {
    /// An empty pack.
    pub fn new(store: &Store) -> Result<Self> {
        Ok(Packer {
            pack_id: random_bytes()?,
            data: Vec::new(),
            capacity: capacity(store) as usize,
            index: Vec::new(),
            index_len: 0,
        })
    }

    /// True when a file of `len` plaintext bytes with `sealed_meta_len` bytes of sealed metadata still fits
    /// (with its entry in the index).
    pub fn fits(&self, len: usize, sealed_meta_len: usize) -> bool {
        // An entry's fixed fields take at most 96 bytes as postcard; the index's count and trailer come once.
        let entry = 96 + sealed_meta_len;
        self.data.len() + len + TAG_LEN + self.index_len + entry + pack_index::FIXED_LEN + 8 <= self.capacity
    }

    fn index_add(&mut self, body: &ManifestBody) {
        let Data::Packed { offset, .. } = body.data else { return };
        let e = IndexEntry {
            file_id: body.file_id,
            offset,
            cipher_len: body.plain_size() + TAG_LEN as u64,
            name_tag: body.name_tag,
            committed_unix_ns: body.committed_unix_ns,
            meta_nonce: body.meta_nonce,
            sealed_meta: body.sealed_meta.clone(),
        };
        self.index_push(e);
    }

    fn index_push(&mut self, e: IndexEntry) {
        self.index_len += e.encoded_len();
        self.index.push(e);
    }

    /// Id of the open pack.
    pub fn id(&self) -> [u8; 16] {
        self.pack_id
    }

    /// True when nothing was added since the last seal.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Encrypts `plain` as a new file with `meta` and appends it; returns its manifest (to publish after
    /// [`Packer::seal`]). The caller checks [`Packer::fits`] first.
    pub fn add(&mut self, store: &Store, name_tag: Hash, meta: &FileMeta, plain: &[u8]) -> Result<Manifest> {
        if !self.fits(plain.len(), meta.sealed_len()) {
            return Err(Error::internal("file does not fit the pack"));
        }
        let key = store.key()?;
        let file_id: [u8; 16] = random_bytes()?;
        let offset = self.data.len();
        self.data.extend_from_slice(plain);
        self.data.resize(offset + plain.len() + TAG_LEN, 0);
        key.segment_cipher(&file_id).seal_segment(0, true, &mut self.data[offset..], plain.len())?;
        let (sealed_meta, meta_nonce) = meta.seal(key, &file_id)?;
        let entry = IndexEntry {
            file_id,
            offset: offset as u64,
            cipher_len: (plain.len() + TAG_LEN) as u64,
            name_tag,
            committed_unix_ns: crate::clock::unix_ns(),
            meta_nonce,
            sealed_meta,
        };
        let body = packed_body(store, &entry, &self.pack_id, &self.data[offset..])?;
        self.index_push(entry);
        Ok(Manifest::new(body, key))
    }

    /// Appends a packed file's ciphertext unchanged (moved from another pack, `body` its manifest's body there);
    /// returns the body of its manifest here. The caller checks [`Packer::fits`] first.
    pub fn add_cipher(&mut self, cipher: &[u8], body: &ManifestBody) -> Result<ManifestBody> {
        let offset = self.data.len();
        self.data.extend_from_slice(cipher);
        let Data::Packed { cipher_hash, .. } = body.data else {
            return Err(Error::internal("moving a file that is not packed"));
        };
        let moved = ManifestBody {
            data: Data::Packed { pack: self.pack_id, offset: offset as u64, cipher_hash },
            ..body.clone()
        };
        moved.validate("moved packed file")?;
        self.index_add(&moved);
        Ok(moved)
    }

    /// Stores the pack's k+m shards (not yet durable: the caller syncs the locations before publishing) and
    /// returns its manifest; `None` when it is empty. A new empty pack takes its place. On failure the shards
    /// written are deleted and the pack's files are lost with it (the caller fails their commits).
    pub fn seal(&mut self, store: &Store, codec: &mut Codec) -> Result<Option<SealedPack>> {
        if self.data.is_empty() {
            return Ok(None);
        }
        let pack_id = self.pack_id;
        let mut data = std::mem::take(&mut self.data);
        let index = std::mem::take(&mut self.index);
        self.index_len = 0;
        self.pack_id = random_bytes()?;
        data.extend(pack_index::seal(&store.key()?.segment_cipher(&pack_id), &index)?);
        let r = store_pack(store, codec, &pack_id, &mut data);
        if r.is_err() {
            store.remove_shards(&pack_id);
        }
        r.map(Some)
    }
}

/// The manifest body of a packed file as its index entry `e` describes it, lying in `pack` with ciphertext
/// `cipher` (validated).
pub(crate) fn packed_body(store: &Store, e: &IndexEntry, pack: &[u8; 16], cipher: &[u8]) -> Result<ManifestBody> {
    let d = store.descriptor();
    let plain_len =
        cipher.len().checked_sub(TAG_LEN).ok_or_else(|| Error::corrupt("packed file", "shorter than its tag"))?;
    let cipher_hash = *blake3::hash(cipher).as_bytes();
    let body = ManifestBody {
        store_id: d.store_id,
        file_id: e.file_id,
        name_tag: e.name_tag,
        committed_unix_ns: e.committed_unix_ns,
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        placement_start: 0,
        segments: vec![SegmentEntry { plain_len: plain_len as u64, shard_len: 0 }],
        leaves: vec![],
        root: packed_root(&e.file_id, cipher.len() as u64, &cipher_hash),
        meta_nonce: e.meta_nonce,
        sealed_meta: e.sealed_meta.clone(),
        data: Data::Packed { pack: *pack, offset: e.offset, cipher_hash },
    };
    body.validate("packed file")?;
    Ok(body)
}

fn store_pack(store: &Store, codec: &mut Codec, pack_id: &[u8; 16], data: &mut Vec<u8>) -> Result<SealedPack> {
    let key = store.key()?;
    let d = store.descriptor();
    let k = d.k as usize;
    let len = data.len();
    let sl = erasure::shard_len(len as u64, k);
    data.resize(k * sl, 0);
    let n = store.locations().len();
    let placement_start = crate::store::placement_start(pack_id, n);
    let key_of = |i: usize| shard_key(pack_id, 0, i);
    let addr = StripeAddr {
        file_id: pack_id,
        segment: 0,
        rule: HomeRule::ById,
        shard_len: sl,
        key_of: &key_of,
        deferred: true,
    };
    crate::files::intent::mark_commit(store, pack_id);
    let written = write_stripe(store, codec, &addr, data)?;
    let missing = written.missing.iter().map(|(i, _)| addr.home(store, *i)).collect();
    let body = ManifestBody {
        store_id: d.store_id,
        file_id: *pack_id,
        name_tag: PACK_NAME_TAG,
        committed_unix_ns: crate::clock::unix_ns(),
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        placement_start,
        segments: vec![SegmentEntry { plain_len: len as u64, shard_len: sl as u32 }],
        root: merkle::root(&written.leaves),
        leaves: written.leaves,
        meta_nonce: [0; 12],
        sealed_meta: vec![],
        data: Data::Pack,
    };
    body.validate("new pack")?;
    Ok(SealedPack { manifest: Manifest::new(body, key), missing })
}
