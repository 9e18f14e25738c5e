//! The cleaner: copies the live blocks of mostly-dead stripes into the open stripe (their ciphertext as is: the
//! XTS tweak is the logical block, not the place), so the next checkpoint can delete the old stripes. Victims
//! are stripes a checkpoint covers, emptiest first; the work per call is bounded, and the state lock is held
//! only to look up and to append, never while reading.

use crate::error::Result;
use crate::format::log::{MapEntry, RecordBody, StripeInfo, BLOCK};

use super::{stripe_io, BlockLog, State};

/// The most blocks a cleaning round moves (64 MiB).
const MAX_CLEAN_PER_ROUND: u64 = 16384;

/// What the writers last saw of the space used.
pub(super) struct SpaceCheck {
    at: std::time::Instant,
    stripes: usize,
    over: bool,
}

/// How stale the writers' view of the space used may be.
const SPACE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// A stripe is worth cleaning when less than this share of its blocks is live (below 1 / `THROTTLE_ABOVE`, so
/// that there are always victims when writers wait).
const LIVE_BELOW: f64 = 0.6;
/// The cleaner starts when the stripes hold this many times the live blocks (plus a stripe).
const CLEAN_ABOVE: f64 = 1.75;
/// Writers wait for the cleaner when the stripes hold this many times the live blocks (plus a few stripes):
/// with k+m shards per k data, the space at rest stays within 2 x (k+m)/k of the live data.
const THROTTLE_ABOVE: f64 = 1.9;

impl BlockLog {
    /// Stored blocks and live blocks over every stripe.
    pub(super) fn space(st: &State) -> (u64, u64) {
        st.stripes.values().fold((0u64, 0u64), |(b, l), s| (b + s.blocks as u64, l + s.live as u64))
    }

    /// Most blocks the background cleaner moves between two checkpoints. Until a checkpoint deletes the
    /// victims, every moved block is stored twice, so a round stays small against the live data (1/20 of it,
    /// at least two stripes, at most 64 MiB): the space at rest overshoots the writers' bound by that much.
    pub(super) fn clean_budget(&self) -> u64 {
        let live = self.state.lock().map(|st| Self::space(&st).1).unwrap_or(0);
        (live / 20).max(2 * self.opts.stripe_blocks as u64).min(MAX_CLEAN_PER_ROUND)
    }

    /// True when the stripes hold enough garbage that the cleaner should reclaim it.
    pub(super) fn clean_due(&self) -> bool {
        self.state.lock().is_ok_and(|st| {
            let (blocks, live) = Self::space(&st);
            st.failed.is_none() && blocks as f64 > CLEAN_ABOVE * live as f64 + self.opts.stripe_blocks as f64
        })
    }

    /// True when writers should wait for the cleaner. Walking the stripe table is done again only when a
    /// stripe was added or removed since, or a few milliseconds passed.
    pub(super) fn over_space(&self, st: &mut State) -> bool {
        let now = std::time::Instant::now();
        let n = st.stripes.len();
        let stale = |c: &SpaceCheck| c.stripes != n || now.duration_since(c.at) > SPACE_CHECK_EVERY;
        if st.space_checked.as_ref().is_none_or(stale) {
            let (blocks, live) = Self::space(st);
            let slack = 4.0 * self.opts.stripe_blocks as f64;
            let over = blocks as f64 > THROTTLE_ABOVE * live as f64 + slack;
            st.space_checked = Some(SpaceCheck { at: now, stripes: n, over });
        }
        st.space_checked.as_ref().is_some_and(|c| c.over)
    }

    /// Moves the live blocks of up to `budget` blocks' worth of victim stripes into the open stripe; returns
    /// how many blocks were moved. The victims die when the moved blocks are stored and a checkpoint covers
    /// them.
    pub fn clean(&self, budget: u64) -> Result<u64> {
        let mut moved = 0;
        for victim in self.victims()? {
            if moved >= budget || self.stopping() {
                break;
            }
            match self.clean_one(&victim) {
                Ok(n) => moved += n,
                // One unreadable stripe (a scrub's business) does not stop the cleaning of the others.
                Err(e) => tracing::warn!(seq = victim.seq, error = %e, "cannot clean a log stripe; skipped"),
            }
        }
        Ok(moved)
    }

    /// Candidate stripes, emptiest first.
    fn victims(&self) -> Result<Vec<StripeInfo>> {
        let st = self.lock()?;
        let covered = st.ckpt.seq.min(st.durable);
        let mut v: Vec<StripeInfo> = st
            .stripes
            .range(..=covered)
            .map(|(_, s)| *s)
            .filter(|s| s.blocks > 0 && s.live > 0 && (s.live as f64) < LIVE_BELOW * s.blocks as f64)
            .collect();
        v.sort_by_key(|s| (s.live as u64 * 1_000_000) / s.blocks as u64);
        Ok(v)
    }

    /// Copies the live blocks of one stripe; returns how many.
    fn clean_one(&self, victim: &StripeInfo) -> Result<u64> {
        let rec = self.record(victim.seq)?;
        let live = self.live_runs(&rec)?;
        let mut moved = 0;
        for (lba, slot, n) in live {
            let mut cipher = vec![0u8; n as usize * BLOCK];
            self.with_codec(|c| stripe_io::read_blocks(&self.store, c, &self.layout, &rec, slot, &mut cipher))?;
            moved += self.move_blocks(&rec, lba, slot, &cipher)?;
        }
        Ok(moved)
    }

    /// Runs `(lba, slot, blocks)` of the stripe's blocks the map still points at.
    fn live_runs(&self, rec: &RecordBody) -> Result<Vec<(u64, u32, u32)>> {
        let mut st = self.lock()?;
        let mut runs: Vec<(u64, u32, u32)> = Vec::new();
        for e in rec.extents.iter().filter(|e| !e.is_zero()) {
            for i in 0..e.len {
                let (lba, slot) = (e.lba + i as u64, e.slot + i);
                if self.points_at(&mut st, lba, rec.seq, slot)? {
                    match runs.last_mut() {
                        Some(r) if r.0 + r.2 as u64 == lba && r.1 + r.2 == slot => r.2 += 1,
                        _ => runs.push((lba, slot, 1)),
                    }
                }
            }
        }
        Ok(runs)
    }

    fn points_at(&self, st: &mut State, lba: u64, seq: u64, slot: u32) -> Result<bool> {
        self.ensure_page(st, lba)?;
        Ok(st.map.get(lba) == Some(MapEntry { seq, slot }))
    }

    /// Appends the blocks that are still live (a write may have replaced some meanwhile) to the open stripe.
    fn move_blocks(&self, rec: &RecordBody, lba: u64, slot: u32, cipher: &[u8]) -> Result<u64> {
        let mut moved = 0;
        for (i, block) in cipher.chunks_exact(BLOCK).enumerate() {
            let mut st = self.writable_for_cleaner()?;
            if let Some((seq, stripe)) = self.take_if_full(&mut st) {
                drop(st);
                self.seal(seq, stripe);
                st = self.writable_for_cleaner()?;
            }
            if !self.points_at(&mut st, lba + i as u64, rec.seq, slot + i as u32)? {
                continue;
            }
            let hash = rec.block_hashes[(slot as usize) + i];
            self.append(&mut st, lba + i as u64, block, &[hash])?;
            moved += 1;
            if st.open.blocks() >= self.opts.stripe_blocks {
                let sealed = self.take_open(&mut st);
                drop(st);
                if let Some((seq, stripe)) = sealed {
                    self.seal(seq, stripe);
                }
            }
        }
        Ok(moved)
    }
}
