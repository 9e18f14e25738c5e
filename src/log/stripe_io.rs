//! Log stripes on the locations: sealing one (erasure-code it, write its k+m shard objects in one parallel
//! round), reading its record, and reading blocks back verified (one ranged read of the data shard that holds
//! them; the whole stripe, rebuilt from parity, when that shard is missing or wrong).

use std::ops::Range;

use crate::codec::erasure::Codec;
use crate::error::{Error, LocationFailure, Result};
use crate::format::log::*;
use crate::format::shard::{ShardHeader, HEADER_LEN};
use crate::location::LocationExt;
use crate::metrics::reads::ShardFailure;
use crate::store::Store;

/// Where a volume's stripes live.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub(crate) vol_id: [u8; 16],
    pub(crate) k: u16,
    pub(crate) m: u16,
}

impl Layout {
    fn width(&self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Location index of shard `i` of stripe `seq`.
    pub(crate) fn home(&self, store: &Store, seq: u64, i: usize) -> usize {
        store.home(&self.vol_id, seq, i)
    }

    /// Runs `read` on shard `i` of stripe `seq` on its home location, then, while the shard is not found there,
    /// on each other location (a repair may have put it elsewhere, or a layout change left it where it was, until
    /// a rebalance moves it home). Returns the first success, else the first error other than "not found", else
    /// "not found".
    pub(crate) fn on_holders<T>(
        &self,
        store: &Store,
        seq: u64,
        i: usize,
        read: impl FnMut(&dyn crate::location::Location) -> Result<T>,
    ) -> Result<T> {
        store.from_holders(self.home(store, seq, i), read)
    }
}

/// The blocks of a stripe being filled or written: ciphertext by slot, and what they mean.
#[derive(Default)]
pub(super) struct StripeData {
    /// Ciphertext blocks, back to back, by slot.
    pub(super) data: Vec<u8>,
    /// The logical blocks written, in order.
    pub(super) extents: Vec<Extent>,
    /// Hash of each block, by slot.
    pub(super) hashes: Vec<BlockHash>,
}

impl StripeData {
    /// Data blocks held.
    pub(super) fn blocks(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// True when nothing was appended.
    pub(super) fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The ciphertext of `slot`.
    pub(super) fn block(&self, slot: u32) -> Option<&[u8]> {
        let at = slot as usize * BLOCK;
        self.data.get(at..at + BLOCK)
    }
}

/// Erasure-codes `stripe` as log stripe `seq` and writes its k+m shards, each durably, in parallel. Succeeds when
/// at least the store's `min_shards_written` are stored; returns the record and its encoded length.
pub(super) fn write_stripe(
    store: &Store,
    codec: &mut Codec,
    layout: &Layout,
    seq: u64,
    stripe: &StripeData,
) -> Result<(RecordBody, u32)> {
    let (k, m) = (layout.k as usize, layout.m as usize);
    let bps = blocks_per_shard(stripe.blocks(), layout.k);
    let sl = bps * BLOCK;
    let mut shards = vec![0u8; (k + m) * sl];
    shards[..stripe.data.len()].copy_from_slice(&stripe.data);
    if sl > 0 {
        let (data, parity) = shards.split_at_mut(k * sl);
        codec.encode_with(data, sl, |p| {
            for (j, s) in p.iter().enumerate() {
                parity[j * sl..(j + 1) * sl].copy_from_slice(s);
            }
        })?;
    }
    let parts: Vec<&[u8]> = if sl > 0 { shards.chunks_exact(sl).collect() } else { vec![&[][..]; k + m] };
    let record = RecordBody {
        store_id: store.descriptor().store_id,
        vol_id: layout.vol_id,
        seq,
        k: layout.k,
        m: layout.m,
        blocks: stripe.blocks(),
        extents: stripe.extents.clone(),
        block_hashes: stripe.hashes.clone(),
        shard_hashes: parts.iter().map(|p| *blake3::hash(p).as_bytes()).collect(),
    };
    let record_bytes = encode_record(&record, store.key()?)?;
    let outcomes = put_shards(store, layout, seq, &parts, &record_bytes);
    let failures: Vec<LocationFailure> = outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.err().map(|e| (i, e)))
        .map(|(i, e)| LocationFailure::new(store.locations()[layout.home(store, seq, i)].name(), e))
        .collect();
    let stored = k + m - failures.len();
    let need = store.min_shards_written().min(k + m);
    if stored < need {
        return Err(Error::write_quorum(format!("log stripe {seq}"), stored, need, failures));
    }
    for f in &failures {
        tracing::warn!(seq, location = %f.location, error = %f.error, "log shard not stored; left for scrub --repair");
    }
    Ok((record, record_bytes.len() as u32))
}

/// Writes every shard of a stripe, each followed by a sync of its location, all in parallel.
fn put_shards(store: &Store, layout: &Layout, seq: u64, parts: &[&[u8]], record: &[u8]) -> Vec<Result<()>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, data)| s.spawn(move || put_shard(store, layout, seq, i, data, record)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("shard writer panicked"))))
            .collect()
    })
}

/// Writes shard `i` of stripe `seq` (header, data part, record, record length) to its home location, durably.
pub(crate) fn put_shard(store: &Store, layout: &Layout, seq: u64, i: usize, data: &[u8], record: &[u8]) -> Result<()> {
    let len = (record.len() as u32).to_le_bytes();
    let mut h = blake3::Hasher::new();
    h.update(data);
    h.update(record);
    h.update(&len);
    let header = ShardHeader {
        store_id: store.descriptor().store_id,
        file_id: layout.vol_id,
        segment: seq,
        shard: i as u16,
        k: layout.k,
        m: layout.m,
        payload_len: (data.len() + record.len() + 4) as u32,
        payload_hash: *h.finalize().as_bytes(),
    };
    let loc = &store.locations()[layout.home(store, seq, i)];
    loc.put_deferred(&stripe_key(&layout.vol_id, seq, i), &[&header.encode(), data, record, &len])
        .and_then(|_| loc.sync())
}

/// Byte range of a stripe's record within each of its shard objects.
fn record_range(info: &StripeInfo, k: u16) -> Range<u64> {
    let start = (HEADER_LEN + blocks_per_shard(info.blocks, k) * BLOCK) as u64;
    start..start + info.record_len as u64
}

/// Reads the record of stripe `info.seq` from the first of its shards that yields a valid one.
pub(super) fn fetch_record(store: &Store, layout: &Layout, info: &StripeInfo) -> Result<RecordBody> {
    let range = record_range(info, layout.k);
    let what = format!("record of log stripe {}", info.seq);
    let mut first_err = None;
    for i in 0..layout.width() {
        let key = stripe_key(&layout.vol_id, info.seq, i);
        let got = layout
            .on_holders(store, info.seq, i, |loc| loc.get_range(&key, range.start, info.record_len as usize))
            .and_then(|b| decode_record(&b, Some(store.key()?), &what));
        match got {
            Ok(r) if r.seq == info.seq && r.vol_id == layout.vol_id && r.blocks == info.blocks => return Ok(r),
            Ok(_) => first_err = first_err.or(Some(Error::corrupt(&what, "record of another stripe"))),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    Err(first_err.unwrap_or_else(|| Error::corrupt(&what, "no shard")))
}

/// Reads the record of stripe `seq` when the stripe table does not know it yet (replay): from the first shard
/// whose header, record length and record check out, with three small ranged reads; returns it with its encoded
/// length. `None` when no shard yields a valid record.
pub(super) fn fetch_record_any(store: &Store, layout: &Layout, seq: u64) -> Option<(RecordBody, u32)> {
    let what = format!("record of log stripe {seq}");
    let key = store.key().ok()?;
    let unusable = || Error::corrupt(&what, "no valid record");
    (0..layout.width()).find_map(|i| {
        let name = stripe_key(&layout.vol_id, seq, i);
        layout
            .on_holders(store, seq, i, |loc| {
                let header = ShardHeader::decode(&loc.get_range(&name, 0, HEADER_LEN)?)?;
                let end = HEADER_LEN as u64 + header.payload_len as u64;
                let len_at = end.checked_sub(4).ok_or_else(unusable)?;
                let len_bytes: [u8; 4] = loc.get_range(&name, len_at, 4)?.try_into().map_err(|_| unusable())?;
                let record_len = u32::from_le_bytes(len_bytes) as u64;
                let start = end.checked_sub(4 + record_len).filter(|s| *s >= HEADER_LEN as u64).ok_or_else(unusable)?;
                let r = decode_record(&loc.get_range(&name, start, record_len as usize)?, Some(key), &what)?;
                Ok((r, record_len as u32))
            })
            .ok()
            .filter(|(r, _)| r.seq == seq && r.vol_id == layout.vol_id)
    })
}

/// Reads `out.len() / BLOCK` blocks from slot `first` of the stripe `rec` describes, verified against their
/// hashes; falls back to rebuilding the stripe from any k good shards.
pub(super) fn read_blocks(
    store: &Store,
    codec: &mut Codec,
    layout: &Layout,
    rec: &RecordBody,
    first: u32,
    out: &mut [u8],
) -> Result<()> {
    let n = (out.len() / BLOCK) as u32;
    if ranged_read(store, layout, rec, first, out).is_ok() {
        return Ok(());
    }
    tracing::debug!(seq = rec.seq, first, n, "log blocks unreadable from their shard; rebuilding the stripe");
    let data = rebuild(store, codec, layout, rec)?;
    let at = first as usize * BLOCK;
    out.copy_from_slice(data.get(at..at + out.len()).ok_or_else(|| Error::internal("slot beyond the stripe"))?);
    verify_blocks(rec, first, out)
}

/// The normal case: the blocks' own data shard(s), one ranged read per shard touched.
fn ranged_read(store: &Store, layout: &Layout, rec: &RecordBody, first: u32, out: &mut [u8]) -> Result<()> {
    let bps = rec.blocks_per_shard();
    let mut slot = first as usize;
    for chunk in split_by_shard(first as usize, out.len() / BLOCK, bps) {
        let shard = slot / bps;
        let off = (HEADER_LEN + (slot % bps) * BLOCK) as u64;
        let dst = &mut out[(slot - first as usize) * BLOCK..(slot - first as usize + chunk) * BLOCK];
        let key = stripe_key(&layout.vol_id, rec.seq, shard);
        let got = layout.on_holders(store, rec.seq, shard, |loc| loc.get_range(&key, off, dst.len()))?;
        if got.len() != dst.len() {
            return Err(Error::corrupt(format!("log stripe {} shard {shard}", rec.seq), "short read"));
        }
        dst.copy_from_slice(&got);
        slot += chunk;
    }
    verify_blocks(rec, first, out)
}

/// Lengths of the runs of `n` slots from `first` that fall in one data shard each.
fn split_by_shard(first: usize, n: usize, bps: usize) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut slot, end) = (first, first + n);
    while slot < end {
        let run = (bps - slot % bps).min(end - slot);
        runs.push(run);
        slot += run;
    }
    runs
}

/// Checks blocks against the record's hashes.
fn verify_blocks(rec: &RecordBody, first: u32, blocks: &[u8]) -> Result<()> {
    for (i, b) in blocks.chunks_exact(BLOCK).enumerate() {
        let slot = first as usize + i;
        if rec.block_hashes.get(slot) != Some(&block_hash(b)) {
            return Err(Error::corrupt(format!("log stripe {} slot {slot}", rec.seq), "block hash mismatch"));
        }
    }
    Ok(())
}

/// Reads whole shards until k verify against the record, and rebuilds the k data parts (`k x bps x 4096` bytes).
/// Counts the shards it could not use and the stripe, rebuilt or lost, in the store's read counters.
fn rebuild(store: &Store, codec: &mut Codec, layout: &Layout, rec: &RecordBody) -> Result<Vec<u8>> {
    let (k, m) = (layout.k as usize, layout.m as usize);
    let sl = rec.blocks_per_shard() * BLOCK;
    let mut data = vec![0u8; k * sl];
    let mut parity = vec![0u8; m * sl];
    let mut have = vec![false; k + m];
    let mut bad = Vec::new();
    let stats = store.read_stats();
    for i in 0..k + m {
        if have.iter().filter(|h| **h).count() == k {
            break;
        }
        match fetch_shard_data(store, layout, rec, i) {
            Ok(part) => {
                let dst =
                    if i < k { &mut data[i * sl..(i + 1) * sl] } else { &mut parity[(i - k) * sl..(i - k + 1) * sl] };
                dst.copy_from_slice(&part);
                have[i] = true;
            }
            Err(e) => {
                stats.shard_failed(failure_of(&e));
                bad.push(format!("{i}: {e}"));
            }
        }
    }
    let good = have.iter().filter(|h| **h).count();
    if good < k {
        stats.stripe_lost();
        let file = format!("log stripe {} of volume {}", rec.seq, hex::encode(layout.vol_id));
        return Err(Error::TooManyLost { file, segment: rec.seq, have: good, need: k, bad: bad.join("; ") });
    }
    let parity_ok = (0..m).filter(|j| have[k + j]).map(|j| (j, &parity[j * sl..(j + 1) * sl]));
    codec.reconstruct(&mut data, sl, &have[..k], parity_ok)?;
    if have[..k].contains(&false) {
        stats.stripe_rebuilt();
    }
    Ok(data)
}

/// The reason the read path's counters file a shard under, from the error fetching it.
fn failure_of(e: &Error) -> ShardFailure {
    match e {
        e if e.is_not_found() => ShardFailure::Missing,
        Error::Corrupt { .. } => ShardFailure::Corrupt,
        _ => ShardFailure::Unreadable,
    }
}

/// The data part of shard `i`, verified against its header and the record.
fn fetch_shard_data(store: &Store, layout: &Layout, rec: &RecordBody, i: usize) -> Result<Vec<u8>> {
    let what = format!("log stripe {} shard {i}", rec.seq);
    let key = stripe_key(&layout.vol_id, rec.seq, i);
    let bytes = layout.on_holders(store, rec.seq, i, |loc| loc.get(&key))?;
    let header = ShardHeader::decode(&bytes)?;
    let payload = bytes.get(HEADER_LEN..).ok_or_else(|| Error::corrupt(&what, "truncated"))?;
    if header.payload_hash != *blake3::hash(payload).as_bytes() {
        return Err(Error::corrupt(&what, "payload hash mismatch"));
    }
    let (data, _) = split_shard_payload(payload, &what)?;
    if rec.shard_hashes.get(i) != Some(blake3::hash(data).as_bytes()) {
        return Err(Error::corrupt(&what, "data differs from the record"));
    }
    Ok(data.to_vec())
}

/// The data part of every shard of the stripe `rec` describes, read whole and checked against its header and
/// the record; `None` where a shard is missing or bad.
pub(super) fn shard_parts(store: &Store, layout: &Layout, rec: &RecordBody) -> Vec<Option<Vec<u8>>> {
    (0..layout.width()).map(|i| fetch_shard_data(store, layout, rec, i).ok()).collect()
}

/// Fills every missing part from k good ones (data rebuilt, parity re-encoded) and checks each against the
/// record before it may be written.
pub(crate) fn complete_parts(codec: &mut Codec, rec: &RecordBody, parts: &mut [Option<Vec<u8>>]) -> Result<()> {
    let (k, m) = (rec.k as usize, rec.m as usize);
    let sl = rec.blocks_per_shard() * BLOCK;
    if sl > 0 {
        let mut data = vec![0u8; k * sl];
        let mut have = vec![false; k];
        for i in 0..k {
            if let Some(p) = &parts[i] {
                data[i * sl..(i + 1) * sl].copy_from_slice(p);
                have[i] = true;
            }
        }
        let parity: Vec<(usize, &[u8])> = (0..m).filter_map(|j| parts[k + j].as_deref().map(|p| (j, p))).collect();
        codec.reconstruct(&mut data, sl, &have, parity)?;
        let mut fresh = Vec::new();
        codec.encode(&data, sl, &mut fresh)?;
        for (i, chunk) in data.chunks_exact(sl).chain(fresh.chunks_exact(sl)).enumerate() {
            parts[i].get_or_insert_with(|| chunk.to_vec());
        }
    } else {
        parts.iter_mut().for_each(|p| {
            p.get_or_insert_with(Vec::new);
        });
    }
    for (i, p) in parts.iter().enumerate() {
        let ok = p.as_ref().is_some_and(|p| rec.shard_hashes[i] == *blake3::hash(p).as_bytes());
        if !ok {
            return Err(Error::corrupt(
                format!("log stripe {} shard {i}", rec.seq),
                "rebuilt shard differs from the record",
            ));
        }
    }
    Ok(())
}

/// Rewrites the shards of a stripe that `parts` (from [`shard_parts`]) lacks, rebuilt from k good ones (a
/// stripe a crash left with fewer than k+m shards, found by replay); returns how many could not be written.
pub(super) fn restore(
    store: &Store,
    codec: &mut Codec,
    layout: &Layout,
    rec: &RecordBody,
    mut parts: Vec<Option<Vec<u8>>>,
) -> Result<usize> {
    let bad: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].is_none()).collect();
    if bad.is_empty() {
        return Ok(0);
    }
    complete_parts(codec, rec, &mut parts)?;
    let record = encode_record(rec, store.key()?)?;
    let mut failed = 0;
    for i in bad {
        let part = parts[i].as_deref().unwrap_or_default();
        if let Err(e) = put_shard(store, layout, rec.seq, i, part, &record) {
            tracing::warn!(seq = rec.seq, shard = i, error = %e, "could not restore a log shard; left for scrub");
            failed += 1;
        }
    }
    Ok(failed)
}

/// Deletes every shard object of stripe `seq` (best effort), wherever it is: at home, or on another location
/// where a repair or a layout change left it.
pub(super) fn delete_stripe(store: &Store, layout: &Layout, seq: u64) {
    for i in 0..layout.width() {
        let key = stripe_key(&layout.vol_id, seq, i);
        for loc in store.locations() {
            match loc.delete(&key) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(seq, shard = i, error = %e, "could not delete a dead log stripe shard"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_by_shard;

    #[test]
    fn runs_split_at_shard_boundaries() {
        assert_eq!(split_by_shard(0, 3, 4), vec![3]);
        assert_eq!(split_by_shard(2, 5, 4), vec![2, 3]);
        assert_eq!(split_by_shard(3, 9, 4), vec![1, 4, 4]);
    }
}
