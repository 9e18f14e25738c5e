//! The index a pack ends with: for each packed file, what its catalog entry needs besides the pack (file id,
//! offset, ciphertext length, name tag, commit time and sealed metadata), so that with the key a pack whose
//! catalog entries were all lost gives back its files under their own names and metadata.
//!
//! Layout, right after the last file's ciphertext (the pack's zero padding follows):
//!
//! ```text
//! ciphertext of postcard(Vec<IndexEntry>) | GCM tag [16] | version u16 (1) | ciphertext length u32 | "BFPKIX01"
//! ```
//!
//! The index is encrypted as segment 0 (the last) of the pack's own id under the file segment key (packs are
//! never encrypted otherwise, so that key and nonce serve only this); the tag authenticates it. The magic ends in
//! a non-zero byte, so the end of the index is the last non-zero byte of the pack's data.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::{SegmentCipher, TAG_LEN};
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};

/// Last bytes of an index.
pub const MAGIC_PACK_INDEX: [u8; 8] = *b"BFPKIX01";
/// Version of the index layout.
pub const PACK_INDEX_VERSION: u16 = 1;
/// Bytes of an index besides the entries' ciphertext.
pub const FIXED_LEN: usize = TAG_LEN + 2 + 4 + MAGIC_PACK_INDEX.len();

/// What the catalog entry of one packed file says besides its pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// File id.
    pub file_id: [u8; 16],
    /// Offset of its ciphertext in the pack's data.
    pub offset: u64,
    /// Ciphertext and tag length (plaintext + 16).
    pub cipher_len: u64,
    /// Keyed hash of its name.
    pub name_tag: Hash,
    /// Commit time, nanoseconds since the epoch.
    pub committed_unix_ns: u64,
    /// Nonce of the sealed metadata.
    pub meta_nonce: [u8; 12],
    /// The metadata as sealed in its manifest.
    pub sealed_meta: Vec<u8>,
}

impl IndexEntry {
    /// Bytes it adds to an index (its postcard encoding; a varint of the count comes on top).
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX / 4)
    }
}

/// The index bytes to append to a pack of id `cipher`'s file id.
pub fn seal(cipher: &SegmentCipher, entries: &[IndexEntry]) -> Result<Vec<u8>> {
    let mut buf = postcard::to_allocvec(entries).map_err(|e| Error::internal(format!("encoding a pack index: {e}")))?;
    let len = buf.len();
    let len32 = u32::try_from(len).map_err(|_| Error::internal("pack index too large"))?;
    buf.resize(len + TAG_LEN, 0);
    cipher.seal_segment(0, true, &mut buf, len)?;
    buf.extend_from_slice(&PACK_INDEX_VERSION.to_le_bytes());
    buf.extend_from_slice(&len32.to_le_bytes());
    buf.extend_from_slice(&MAGIC_PACK_INDEX);
    Ok(buf)
}

/// Finds and opens the index at the end of a pack's data (zero padding after it is skipped). Returns the
/// entries and where the index starts (the end of the files' ciphertexts); `None` for a pack without an index
/// (written before indexes existed). Fails when an index is there but does not authenticate.
pub fn open(cipher: &SegmentCipher, data: &[u8]) -> Result<Option<(Vec<IndexEntry>, usize)>> {
    let bad = |d: &str| Error::corrupt("pack index", d);
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let Some(tail) = end.checked_sub(FIXED_LEN - TAG_LEN).map(|s| &data[s..end]) else { return Ok(None) };
    if tail[6..] != MAGIC_PACK_INDEX {
        return Ok(None);
    }
    if u16::from_le_bytes([tail[0], tail[1]]) != PACK_INDEX_VERSION {
        return Err(bad("unsupported version"));
    }
    let len = u32::from_le_bytes([tail[2], tail[3], tail[4], tail[5]]) as usize;
    let start = end.checked_sub(FIXED_LEN + len).ok_or_else(|| bad("longer than the pack"))?;
    let mut buf = data[start..start + len + TAG_LEN].to_vec();
    if !cipher.open_segment(0, true, &mut buf, len) {
        return Err(bad("does not authenticate with this key"));
    }
    let entries: Vec<IndexEntry> = postcard::from_bytes(&buf[..len]).map_err(|_| bad("undecodable entries"))?;
    Ok(Some((entries, start)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::crypto::MasterKey;

    fn entry(i: u8) -> IndexEntry {
        IndexEntry {
            file_id: [i; 16],
            offset: 100 * i as u64,
            cipher_len: 40,
            name_tag: [i; 32],
            committed_unix_ns: 7,
            meta_nonce: [i; 12],
            sealed_meta: vec![i; 30],
        }
    }

    #[test]
    fn an_index_is_found_behind_padding_and_only_opens_with_its_key() {
        let key = MasterKey::from_bytes([1; 32]);
        let cipher = key.segment_cipher(&[5; 16]);
        let entries = vec![entry(1), entry(2)];
        let mut data = vec![0xab; 200];
        data.extend(seal(&cipher, &entries).unwrap());
        data.extend([0; 7]);
        let (back, start) = open(&cipher, &data).unwrap().unwrap();
        assert_eq!((back, start), (entries, 200));
        assert!(open(&key.segment_cipher(&[6; 16]), &data).is_err(), "another pack's key");
        assert!(open(&MasterKey::from_bytes([2; 32]).segment_cipher(&[5; 16]), &data).is_err());
        let mut bad = data.clone();
        bad[210] ^= 1;
        assert!(open(&cipher, &bad).is_err(), "tampered");
        assert_eq!(open(&cipher, &[0xab; 300]).unwrap(), None, "an older pack has no index");
        assert_eq!(open(&cipher, &[]).unwrap(), None);
        let mut short = b"BFPKIX01".to_vec();
        short.splice(0..0, [1, 0, 0xff, 0xff, 0xff, 0x7f]);
        assert!(open(&cipher, &short).is_err(), "a length past the start");
    }
}
