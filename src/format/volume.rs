//! On-disk records of a block volume: the superblock (the volume's authenticated root, replicated on every
//! location) and map pages (stripe → generation and Merkle leaves of its current shards).
//!
//! The volume's hash tree has three levels: the superblock MAC covers the page table, whose entries carry the
//! BLAKE3 of each map page object, whose entries carry the leaves of each stripe's shards. A reader (or a keyless
//! scrub) can therefore check any shard from the superblock down.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::MasterKey;
use crate::codec::erasure;
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::format;

/// Magic of a volume superblock copy.
pub const MAGIC_SUPERBLOCK: [u8; 8] = *b"BFVOLSB\0";
/// Magic of a volume map page.
pub const MAGIC_MAP_PAGE: [u8; 8] = *b"BFVMAPP\0";

/// Current shards of one stripe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEntry {
    /// Generation of its shards; 0 = never written or trimmed (reads as zeros, costs nothing).
    pub gen: u64,
    /// Merkle leaves of its k+m shards (empty for a hole).
    pub leaves: Vec<Hash>,
}

/// A page of the stripe map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapPage {
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Page index.
    pub page: u32,
    /// Generation of this page object.
    pub gen: u64,
    /// One entry per stripe of the page.
    pub entries: Vec<StripeEntry>,
}

/// Reference from the superblock to a map page object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// Generation of the page object; 0 = every stripe of the page is a hole (no object).
    pub gen: u64,
    /// BLAKE3 of the page object's bytes.
    pub hash: Hash,
}

/// Public, keyless part of a superblock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuperBody {
    /// Store id.
    pub store_id: [u8; 16],
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Keyed hash of the volume name.
    pub name_tag: Hash,
    /// Commit generation of this superblock (the highest valid one wins).
    pub generation: u64,
    /// Next generation number for shards and map pages; everything at or above it is uncommitted garbage.
    pub next_gen: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Bytes per stripe.
    pub stripe_size: u32,
    /// Data shards per stripe.
    pub k: u16,
    /// Parity shards per stripe.
    pub m: u16,
    /// Stripes per map page.
    pub entries_per_page: u32,
    /// Placement rotation start.
    pub placement_start: u32,
    /// Map page table.
    pub pages: Vec<PageRef>,
    /// Nonce of `sealed_meta`.
    pub meta_nonce: [u8; 12],
    /// Encrypted [`VolumeMeta`].
    pub sealed_meta: Vec<u8>,
}

/// Private volume metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Volume name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

impl VolumeMeta {
    /// The metadata of a volume called `name` created now.
    pub fn new(name: &str) -> Self {
        VolumeMeta { name: name.into(), created_unix: crate::clock::unix_secs() }
    }

    /// Encrypts it under the volume's metadata key: `(sealed bytes, nonce)`, as superblocks and checkpoints keep it.
    pub fn seal(&self, key: &MasterKey, vol_id: &[u8; 16]) -> Result<(Vec<u8>, [u8; 12])> {
        let plain =
            postcard::to_allocvec(self).map_err(|e| Error::internal(format!("encoding volume metadata: {e}")))?;
        key.seal_metadata(vol_id, &plain)
    }

    /// Decrypts what [`VolumeMeta::seal`] sealed.
    pub fn open(key: &MasterKey, vol_id: &[u8; 16], nonce: &[u8; 12], sealed: &[u8]) -> Result<Self> {
        let plain = key.open_metadata(vol_id, nonce, sealed)?;
        postcard::from_bytes(&plain).map_err(|e| Error::corrupt("volume metadata", e.to_string()))
    }
}

impl SuperBody {
    /// Number of stripes.
    pub fn stripes(&self) -> u64 {
        self.size.div_ceil(self.stripe_size as u64)
    }

    /// Bytes per shard.
    pub fn shard_len(&self) -> usize {
        erasure::shard_len(self.stripe_size as u64, self.k as usize)
    }

    /// Structural checks (no key needed).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |d: &str| Err(Error::corrupt(what, d));
        if erasure::validate(self.k as usize, self.m as usize).is_err() {
            return bad("invalid k/m");
        }
        if self.stripe_size == 0 || !(self.stripe_size as usize).is_multiple_of(crate::codec::xts::SECTOR) {
            return bad("stripe size is not a multiple of 4 KiB");
        }
        if self.size == 0 || !self.size.is_multiple_of(crate::codec::xts::SECTOR as u64) {
            return bad("volume size is not a positive multiple of 4 KiB");
        }
        if self.entries_per_page == 0 {
            return bad("zero entries per page");
        }
        if self.pages.len() as u64 != self.stripes().div_ceil(self.entries_per_page as u64) {
            return bad("page table length does not match the volume size");
        }
        if self.pages.iter().any(|p| p.gen >= self.next_gen) {
            return bad("page generation beyond next_gen");
        }
        Ok(())
    }
}

/// A decoded superblock copy.
#[derive(Clone, Debug)]
pub struct Superblock {
    /// Public part.
    pub body: SuperBody,
}

impl Superblock {
    /// The bytes of one copy, MACed with the key.
    pub fn encode(body: &SuperBody, key: &MasterKey) -> Vec<u8> {
        let body_bytes = postcard::to_allocvec(body).expect("superblock is serialisable");
        let mac = key.volume_mac(&body_bytes);
        format::seal(MAGIC_SUPERBLOCK, &(&body_bytes, &mac))
    }

    /// Decodes a copy; checks the MAC when a key is given. Never panics.
    pub fn decode(bytes: &[u8], key: Option<&MasterKey>, what: &str) -> Result<Self> {
        let (body_bytes, mac): (Vec<u8>, Hash) = format::open(MAGIC_SUPERBLOCK, what, bytes)?;
        if let Some(key) = key {
            if key.volume_mac(&body_bytes) != mac {
                return Err(Error::corrupt(what, "MAC mismatch (tampered, or written with another key)"));
            }
        }
        let body: SuperBody =
            postcard::from_bytes(&body_bytes).map_err(|e| Error::corrupt(what, format!("undecodable: {e}")))?;
        body.validate(what)?;
        Ok(Superblock { body })
    }

    /// Decrypts the metadata.
    pub fn meta(&self, key: &MasterKey) -> Result<VolumeMeta> {
        VolumeMeta::open(key, &self.body.vol_id, &self.body.meta_nonce, &self.body.sealed_meta)
    }
}

impl MapPage {
    /// An all-hole page.
    pub fn empty(vol_id: [u8; 16], page: u32, entries: u32) -> Self {
        MapPage { vol_id, page, gen: 0, entries: vec![StripeEntry::default(); entries as usize] }
    }

    /// Encoded object bytes.
    pub fn encode(&self) -> Vec<u8> {
        format::seal(MAGIC_MAP_PAGE, self)
    }

    /// Decodes a page object and checks it against its reference and the volume's shape.
    pub fn decode(bytes: &[u8], r: &PageRef, sb: &SuperBody, page: u32, what: &str) -> Result<Self> {
        if blake3::hash(bytes).as_bytes() != &r.hash {
            return Err(Error::corrupt(what, "hash differs from the superblock's page table"));
        }
        let p: MapPage = format::open(MAGIC_MAP_PAGE, what, bytes)?;
        let width = sb.k as usize + sb.m as usize;
        if p.vol_id != sb.vol_id || p.page != page || p.gen != r.gen {
            return Err(Error::corrupt(what, "page belongs elsewhere"));
        }
        if p.entries.len() != sb.entries_per_page as usize
            || p.entries.iter().any(|e| (e.gen == 0) != e.leaves.is_empty() || (e.gen != 0 && e.leaves.len() != width))
        {
            return Err(Error::corrupt(what, "malformed entries"));
        }
        Ok(p)
    }
}

/// Object key prefix of everything belonging to a volume.
pub fn volume_prefix(vol_id: &[u8; 16]) -> String {
    format!("volumes/{}", hex::encode(vol_id))
}

/// Object key of the superblock.
pub fn superblock_key(vol_id: &[u8; 16]) -> String {
    format!("{}/superblock", volume_prefix(vol_id))
}

/// Object key of a map page object.
pub fn page_key(vol_id: &[u8; 16], page: u32, gen: u64) -> String {
    format!("{}/map/{page:08}-{gen:016}", volume_prefix(vol_id))
}

/// Directory (prefix) holding the shards of stripes `stripe & !1023 ..`.
pub fn shard_dir(vol_id: &[u8; 16], stripe: u64) -> String {
    format!("{}/s/{:07}", volume_prefix(vol_id), stripe >> 10)
}

/// Object key of shard `i` of generation `gen` of a stripe.
pub fn stripe_shard_key(vol_id: &[u8; 16], stripe: u64, gen: u64, i: usize) -> String {
    format!("{}/{stripe:010}-{gen:016}.{i:03}", shard_dir(vol_id, stripe))
}

/// Parses a shard object name (`<stripe>-<gen>.<shard>`).
pub fn parse_shard_name(name: &str) -> Option<(u64, u64, usize)> {
    let (sg, i) = name.split_once('.')?;
    let (s, g) = sg.split_once('-')?;
    Some((s.parse().ok()?, g.parse().ok()?, i.parse().ok()?))
}

/// Parses a page object name (`<page>-<gen>`).
pub fn parse_page_name(name: &str) -> Option<(u32, u64)> {
    let (p, g) = name.split_once('-')?;
    Some((p.parse().ok()?, g.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body() -> SuperBody {
        SuperBody {
            store_id: [1; 16],
            vol_id: [2; 16],
            name_tag: [3; 32],
            generation: 1,
            next_gen: 1,
            size: 8 << 20,
            stripe_size: 1 << 20,
            k: 4,
            m: 2,
            entries_per_page: 4,
            placement_start: 0,
            pages: vec![PageRef::default(); 2],
            meta_nonce: [0; 12],
            sealed_meta: vec![],
        }
    }

    #[test]
    fn superblock_round_trip_and_mac() {
        let key = MasterKey::from_bytes([9; 32]);
        let bytes = Superblock::encode(&body(), &key);
        assert_eq!(Superblock::decode(&bytes, Some(&key), "t").unwrap().body, body());
        assert!(Superblock::decode(&bytes, Some(&MasterKey::from_bytes([8; 32])), "t").is_err());
        let mut b = body();
        b.pages.pop();
        assert!(Superblock::decode(&Superblock::encode(&b, &key), None, "t").is_err());
    }

    #[test]
    fn page_checked_against_reference() {
        let sb = body();
        let mut p = MapPage::empty(sb.vol_id, 1, 4);
        p.gen = 7;
        p.entries[2] = StripeEntry { gen: 5, leaves: vec![[0; 32]; 6] };
        let bytes = p.encode();
        let r = PageRef { gen: 7, hash: *blake3::hash(&bytes).as_bytes() };
        assert_eq!(MapPage::decode(&bytes, &r, &sb, 1, "t").unwrap(), p);
        assert!(MapPage::decode(&bytes, &r, &sb, 0, "t").is_err());
        assert!(MapPage::decode(&bytes, &PageRef { gen: 7, hash: [0; 32] }, &sb, 1, "t").is_err());
    }

    #[test]
    fn names_parse() {
        let k = stripe_shard_key(&[0; 16], 12345, 77, 3);
        assert_eq!(parse_shard_name(k.rsplit('/').next().unwrap()), Some((12345, 77, 3)));
        let k = page_key(&[0; 16], 9, 4);
        assert_eq!(parse_page_name(k.rsplit('/').next().unwrap()), Some((9, 4)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Superblock::decode(&b, None, "t");
            let _ = MapPage::decode(&b, &PageRef::default(), &body(), 0, "t");
        }
    }
}
