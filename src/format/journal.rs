//! The flush journal of a log volume ([`crate::log`]): a preallocated ring object, replicated on m+1
//! locations, that makes a short FLUSH durable with one in-place write and one data sync per copy, instead of
//! sealing a short stripe into k+m new objects.
//!
//! ```text
//! journal object = header (one 4 KiB page) | ring of entries, each at a 4 KiB-aligned offset
//! entry          = envelope(JournalEntry, MAC) zero-padded to 4 KiB | blocks (n x 4096 B ciphertext)
//! ```
//!
//! The header ([`JournalHeader`], MACed) names the journal's *generation*; every open of the volume starts a
//! new one, so entries of an earlier generation are never replayed. An entry ([`JournalEntry`], MACed, its
//! blocks checked by their hashes) carries the blocks appended to the open stripe `seq` since the previous
//! entry of that stripe (`part` numbers them 0, 1, ...), with the stripe's extents from `ext_from` on; a
//! `last` entry carries the rest of a stripe that was sealed but not yet stored. Replay rebuilds, from the
//! first stripe that is not on the locations on, each stripe from the unbroken chain of its parts 0, 1, ...,
//! going on to the next stripe only after a chain that ended with its `last` entry.

use serde::{Deserialize, Serialize};

use crate::codec::crypto::MasterKey;
use crate::error::{Error, Result};
use crate::format::log::{log_prefix, open_maced, seal_maced, BlockHash, Extent, BLOCK};

/// Magic of a journal header.
pub const MAGIC_JOURNAL_HEADER: [u8; 8] = *b"BFLOGJH\0";
/// Magic of a journal entry.
pub const MAGIC_JOURNAL_ENTRY: [u8; 8] = *b"BFLOGJE\0";
/// Alignment of the header and of every entry (the page size: in-place writes never share a page).
pub const JOURNAL_ALIGN: u64 = 4096;

/// First page of a journal object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// Store id.
    pub store_id: [u8; 16],
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Generation: entries of other generations are stale.
    pub gen: u64,
    /// Length of the journal object in bytes.
    pub len: u64,
}

/// What one journal entry adds to the open stripe `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Store id.
    pub store_id: [u8; 16],
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Journal generation the entry was written in.
    pub gen: u64,
    /// The stripe being filled.
    pub seq: u64,
    /// Position of this entry in the stripe's chain (0, 1, ...).
    pub part: u32,
    /// The stripe was sealed and this entry carries the rest of it: the chain holds the whole stripe.
    pub last: bool,
    /// Slot of the first block carried (the blocks carried before, by earlier parts).
    pub slot_from: u32,
    /// The stripe's extents from this index on replace those known from earlier parts (the last one may have
    /// grown since).
    pub ext_from: u32,
    /// The stripe's extents from `ext_from` on.
    pub extents: Vec<Extent>,
    /// Hash of each block carried, in slot order.
    pub block_hashes: Vec<BlockHash>,
}

impl JournalEntry {
    /// Structural checks (no key needed).
    pub fn validate(&self, what: &str) -> Result<()> {
        let end = self.slot_from as u64 + self.block_hashes.len() as u64;
        for e in &self.extents {
            let in_stripe = e.is_zero() || (e.slot as u64 + e.len as u64) <= end;
            if e.len == 0 || !in_stripe || e.lba.checked_add(e.len as u64).is_none() {
                return Err(Error::corrupt(what, "extent outside the journaled blocks"));
            }
        }
        Ok(())
    }
}

/// `n` rounded up to the journal alignment.
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(JOURNAL_ALIGN) * JOURNAL_ALIGN
}

/// Encodes a header, MACed, padded to one page.
pub fn encode_journal_header(h: &JournalHeader, key: &MasterKey) -> Result<Vec<u8>> {
    let mut bytes = seal_maced(MAGIC_JOURNAL_HEADER, h, key)?;
    bytes.resize(align_up(bytes.len() as u64) as usize, 0);
    Ok(bytes)
}

/// Decodes the header page of a journal object; checks the MAC. Never panics.
pub fn decode_journal_header(page: &[u8], key: &MasterKey, what: &str) -> Result<JournalHeader> {
    let len = envelope_len(page).ok_or_else(|| Error::corrupt(what, "no journal header"))?;
    open_maced(MAGIC_JOURNAL_HEADER, &page[..len], Some(key), what)
}

/// Encodes an entry: its MACed envelope, zero-padded to the alignment, followed by `blocks`.
pub fn encode_journal_entry(e: &JournalEntry, blocks: &[u8], key: &MasterKey) -> Result<Vec<u8>> {
    let mut bytes = seal_maced(MAGIC_JOURNAL_ENTRY, e, key)?;
    bytes.resize(align_up(bytes.len() as u64) as usize, 0);
    bytes.extend_from_slice(blocks);
    Ok(bytes)
}

/// Decodes the entry at the start of `bytes`, when there is a valid one for `gen` (MAC checked, block hashes
/// checked): returns it, its blocks and its encoded length. Never panics.
pub fn decode_journal_entry<'a>(
    bytes: &'a [u8],
    key: &MasterKey,
    gen: u64,
    what: &str,
) -> Option<(JournalEntry, &'a [u8], usize)> {
    let len = envelope_len(bytes)?;
    // Cheap filter before the MAC: stale generations are most of a ring.
    let entry: JournalEntry = open_maced(MAGIC_JOURNAL_ENTRY, &bytes[..len], Some(key), what).ok()?;
    if entry.gen != gen || entry.validate(what).is_err() {
        return None;
    }
    let data_at = align_up(len as u64) as usize;
    let data_len = entry.block_hashes.len().checked_mul(BLOCK)?;
    let blocks = bytes.get(data_at..data_at.checked_add(data_len)?)?;
    let intact =
        blocks.chunks_exact(BLOCK).zip(&entry.block_hashes).all(|(b, h)| crate::format::log::block_hash(b) == *h);
    intact.then_some((entry, blocks, data_at + data_len))
}

/// Length of the envelope at the start of `bytes`, from its header, when it fits.
fn envelope_len(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..crate::format::ENVELOPE_HEADER_LEN)?;
    let payload = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    let len =
        crate::format::ENVELOPE_HEADER_LEN.checked_add(payload)?.checked_add(crate::format::ENVELOPE_TRAILER_LEN)?;
    (len <= bytes.len()).then_some(len)
}

/// Object key of a log volume's journal.
pub fn journal_key(vol_id: &[u8; 16]) -> String {
    format!("{}/journal", log_prefix(vol_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::log::block_hash;

    fn entry(blocks: &[u8]) -> JournalEntry {
        JournalEntry {
            store_id: [1; 16],
            vol_id: [2; 16],
            gen: 7,
            seq: 9,
            part: 0,
            last: false,
            slot_from: 0,
            ext_from: 0,
            extents: vec![Extent { lba: 40, len: 2, slot: 0 }],
            block_hashes: blocks.chunks_exact(BLOCK).map(block_hash).collect(),
        }
    }

    #[test]
    fn entries_round_trip_and_refuse_tampering_and_other_generations() {
        let key = MasterKey::from_bytes([3; 32]);
        let blocks: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
        let e = entry(&blocks);
        let mut bytes = encode_journal_entry(&e, &blocks, &key).unwrap();
        assert_eq!(bytes.len() as u64 % JOURNAL_ALIGN, 0);
        bytes.extend_from_slice(&[0xee; 100]); // whatever follows in the ring
        let (back, data, len) = decode_journal_entry(&bytes, &key, 7, "e").unwrap();
        assert_eq!((back, data, len), (e.clone(), &blocks[..], align_up(len as u64) as usize));
        assert!(decode_journal_entry(&bytes, &key, 8, "e").is_none(), "another generation");
        assert!(decode_journal_entry(&bytes, &MasterKey::from_bytes([4; 32]), 7, "e").is_none(), "another key");
        let mut torn = bytes.clone();
        torn[len - 1] ^= 1; // a block that does not match its hash
        assert!(decode_journal_entry(&torn, &key, 7, "e").is_none());
        assert!(decode_journal_entry(&bytes[..len - 1], &key, 7, "e").is_none(), "truncated");
        for cut in [0, 5, 15, 16, 40] {
            assert!(decode_journal_entry(&bytes[..cut], &key, 7, "e").is_none());
        }
    }

    #[test]
    fn headers_round_trip_in_one_page() {
        let key = MasterKey::from_bytes([3; 32]);
        let h = JournalHeader { store_id: [1; 16], vol_id: [2; 16], gen: 5, len: 1 << 20 };
        let page = encode_journal_header(&h, &key).unwrap();
        assert_eq!(page.len() as u64, JOURNAL_ALIGN);
        assert_eq!(decode_journal_header(&page, &key, "h").unwrap(), h);
        assert!(decode_journal_header(&page, &MasterKey::from_bytes([4; 32]), "h").is_err());
        assert!(decode_journal_header(&[0u8; 4096], &key, "h").is_err());
    }
}
