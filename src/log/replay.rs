//! Recovery: opening a log replays, in sequence order, the stripes written after its checkpoint, up to the first
//! one that is not complete.

use super::*;
use crate::error::LocationFailure;

impl BlockLog {
    /// Rebuilds the map from the stripes written after the checkpoint. Returns whether anything was found
    /// (replayed or dropped), so that a checkpoint should cover it, and the first stripe not replayed.
    pub(super) fn replay(&self) -> Result<(bool, u64)> {
        let mut st = self.lock()?;
        let found = list_stripes(&self.store, &self.layout, st.ckpt.seq);
        let Some(&max) = found.keys().next_back() else { return Ok((false, st.ckpt.seq + 1)) };
        let width = self.layout.k as usize + self.layout.m as usize;
        let need = (self.layout.k as usize).max(1).min(width);
        // Only the last stripes can have been in flight at a crash, their shards written in place and possibly
        // torn: those are read and verified whole; earlier ones were complete when later ones began.
        let recent: BTreeSet<u64> = found.keys().rev().take(VERIFY_TAIL).copied().collect();
        let mut seq = st.ckpt.seq + 1;
        while let Some(&listed) = found.get(&seq).filter(|n| **n >= need) {
            let Some((rec, record_len)) = stripe_io::fetch_record_any(&self.store, &self.layout, seq) else { break };
            // Read whole only where it matters: a recent stripe, or one listed with shards missing.
            let parts = (recent.contains(&seq) || listed < width)
                .then(|| stripe_io::shard_parts(&self.store, &self.layout, &rec));
            let good = parts.as_ref().map_or(listed, |p| p.iter().flatten().count());
            if good < need {
                break;
            }
            if let Some(parts) = parts.filter(|_| good < width) {
                // A crash interrupted this stripe's writes after k shards: give it back its redundancy.
                self.restore(&rec, parts);
            }
            self.apply(&mut st, &rec, record_len)?;
            seq += 1;
        }
        let dropped: Vec<u64> = found.range(seq..).map(|(s, _)| *s).collect();
        if !dropped.is_empty() {
            tracing::warn!(first = seq, count = dropped.len(), "dropping incomplete log stripes at the tail");
        }
        st.next_seq = max + 1;
        st.durable = max;
        drop(st);
        for s in dropped {
            stripe_io::delete_stripe(&self.store, &self.layout, s);
        }
        Ok((true, seq))
    }

    /// Restores the missing shards of a replayed stripe (best effort: a scrub finds what stays missing).
    fn restore(&self, rec: &RecordBody, parts: Vec<Option<Vec<u8>>>) {
        let outcome = self.with_codec(|c| stripe_io::restore(&self.store, c, &self.layout, rec, parts));
        match outcome {
            Ok(0) => tracing::info!(seq = rec.seq, "restored the missing shards of an interrupted log stripe"),
            Ok(n) => {
                let _ = crate::pending::record(&self.store, &self.layout.vol_id, n as u64);
            }
            Err(e) => tracing::warn!(seq = rec.seq, error = %e, "could not restore an interrupted log stripe"),
        }
    }

    /// Applies one replayed stripe's record to the map.
    fn apply(&self, st: &mut State, rec: &RecordBody, record_len: u32) -> Result<()> {
        st.stripes.insert(rec.seq, StripeInfo { seq: rec.seq, blocks: rec.blocks, record_len, live: 0 });
        self.point_map(st, rec.seq, &rec.extents)?;
        remember_record(st, &self.opts, Arc::new(rec.clone()));
        Ok(())
    }

    /// Points the map at what stripe `seq` writes: each extent's blocks at its slots, or at nothing for a trim.
    pub(super) fn point_map(&self, st: &mut State, seq: u64, extents: &[Extent]) -> Result<()> {
        for e in extents {
            for i in 0..e.len {
                let entry = if e.is_zero() { MapEntry::HOLE } else { MapEntry { seq, slot: e.slot + i } };
                self.check_range(e.lba + i as u64, 1)?;
                self.set_entry(st, e.lba + i as u64, entry)?;
            }
        }
        Ok(())
    }
}

/// The newest valid checkpoint copy of log `id` on any location (MAC checked when the store has the key).
pub fn load_checkpoint(store: &Store, id: &[u8; 16]) -> Result<CheckpointBody> {
    let key = checkpoint_key(id);
    let mut best: Option<CheckpointBody> = None;
    let mut problems = Vec::new();
    let mut unreadable = Vec::new();
    for loc in store.locations() {
        let what = format!("checkpoint of volume {} on {}", hex::encode(id), loc.name());
        match loc.get(&key).and_then(|b| decode_checkpoint(&b, store.key_opt(), &what)) {
            Ok(c) if &c.vol_id == id && c.store_id == store.descriptor().store_id => {
                if best.as_ref().is_none_or(|b| c.generation > b.generation) {
                    best = Some(c);
                }
            }
            Ok(_) => problems.push(format!("{what}: belongs elsewhere")),
            Err(e @ Error::Corrupt { .. }) => problems.push(e.to_string()),
            Err(e) => {
                if let Some(f) = unreadable_location(loc.as_ref(), e) {
                    problems.push(f.error.to_string());
                    unreadable.push(f);
                }
            }
        }
    }
    enough_readable(store, unreadable, &format!("the checkpoint of volume {}", hex::encode(id)))?;
    best.ok_or_else(|| {
        Error::corrupt(format!("volume {}", hex::encode(id)), format!("no valid checkpoint ({})", problems.join("; ")))
    })
}

/// Why `loc` counts as unreadable after a read of it failed with `e`: `None` when the object is simply absent
/// there (a location that is itself missing, a directory gone or a bucket unreachable, answers "not found" to
/// everything, so a not-found is believed only once the location answers a probe).
pub(crate) fn unreadable_location(loc: &dyn crate::location::Location, e: Error) -> Option<LocationFailure> {
    if !e.is_not_found() {
        return Some(LocationFailure::new(loc.name(), e));
    }
    loc.probe().err().map(|p| LocationFailure::new(loc.name(), p))
}

/// Refuses to go on when more than m locations could not be read (`unreadable`) while looking for the newest
/// copy of `what`: it is written to at least m+1 locations, so with at most m unreadable one copy was seen, and
/// with more the newest might be on none of those read (using an older one would silently lose acknowledged
/// writes).
pub(crate) fn enough_readable(store: &Store, unreadable: Vec<LocationFailure>, what: &str) -> Result<()> {
    let m = store.descriptor().m as usize;
    if unreadable.len() <= m {
        return Ok(());
    }
    let readable = store.locations().len() - unreadable.len();
    let what = format!("{what} (its newest copy may be on the unreadable locations)");
    Err(Error::ReadQuorum { what, readable, need: store.locations().len() - m, failures: unreadable })
}

/// Stripes above `after` on the locations, with how many of their shards exist.
pub(crate) fn list_stripes(store: &Store, layout: &Layout, after: u64) -> BTreeMap<u64, usize> {
    let mut found: BTreeMap<u64, usize> = BTreeMap::new();
    let first_dir = (after + 1) / STRIPES_PER_DIR;
    let root = format!("{}/log", log_prefix(&layout.vol_id));
    for loc in store.locations() {
        let dirs = match loc.list(&root) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(location = loc.name(), error = %e, "cannot list log stripes");
                continue;
            }
        };
        for dir in dirs.iter().filter_map(|d| parse_stripe_dir(d)).filter(|d| *d >= first_dir) {
            let names = loc.list(&stripe_dir(&layout.vol_id, dir)).unwrap_or_else(|e| {
                tracing::warn!(location = loc.name(), error = %e, "cannot list log stripes");
                Vec::new()
            });
            for name in names {
                if let Some((seq, _)) = parse_stripe_name(&name).filter(|(s, _)| *s > after) {
                    *found.entry(seq).or_default() += 1;
                }
            }
        }
    }
    found
}

/// Stripes at the end of the log that replay verifies shard by shard (more than can be in flight at once).
const VERIFY_TAIL: usize = 16;
