//! Checkpoints: the dirty map pages, then the checkpoint record on every location, written by a background
//! thread off the write path (and at close); a checkpoint deletes the stripes and page objects it made dead.

use std::sync::Weak;
use std::time::Duration;

use super::*;

impl BlockLog {
    /// Writes a checkpoint now: seals the open stripe, then writes the dirty map pages and the checkpoint record
    /// on every location, then deletes the stripes and page objects it made dead.
    pub fn checkpoint(&self) -> Result<()> {
        let _one = self.checkpoints.lock().map_err(|_| Error::internal("checkpoint lock poisoned"))?;
        let mut st = self.lock()?;
        let sealed = self.take_open(&mut st);
        let mut snap = snapshot(&mut st);
        drop(st);
        if let Some((seq, stripe)) = sealed {
            self.seal(seq, stripe);
        }
        self.wait_durable(snap.body.seq)?;
        self.fill_record_lens(&mut snap.body)?;
        if let Err(e) = self.write_checkpoint(&snap) {
            // Some copies may have landed: the next attempt must not reuse this generation or its page numbers.
            let mut st = self.lock()?;
            st.ckpt.generation = st.ckpt.generation.max(snap.body.generation);
            st.ckpt.next_gen = st.ckpt.next_gen.max(snap.body.next_gen);
            return Err(e);
        }
        let old = self.install(snap)?;
        for (page, gen) in old.pages {
            for loc in self.store.locations() {
                let _ = loc.delete(&log_page_key(&self.layout.vol_id, page, gen));
            }
        }
        for seq in old.stripes {
            stripe_io::delete_stripe(&self.store, &self.layout, seq);
        }
        Ok(())
    }

    /// Writes a snapshot's map pages, then its checkpoint record, each on every location (m+1 at least).
    fn write_checkpoint(&self, snap: &Snapshot) -> Result<()> {
        for (key, bytes, _, _) in &snap.pages {
            self.store.put_replicated(key, bytes, "a log map page")?;
        }
        let bytes = encode_checkpoint(&snap.body, self.store.key()?)?;
        self.store.put_replicated(&checkpoint_key(&self.layout.vol_id), &bytes, "a log checkpoint")
    }

    /// Fills in the record lengths of stripes that were still being written when the snapshot was taken.
    fn fill_record_lens(&self, body: &mut CheckpointBody) -> Result<()> {
        let st = self.lock()?;
        for s in body.stripes.iter_mut() {
            if let Some(cur) = st.stripes.get(&s.seq) {
                s.record_len = cur.record_len;
            }
            if s.record_len == 0 {
                return Err(Error::internal(format!("log stripe {} has no record length after sealing", s.seq)));
            }
        }
        Ok(())
    }

    /// Makes a written checkpoint current; returns what it superseded.
    fn install(&self, snap: Snapshot) -> Result<Superseded> {
        let mut st = self.lock()?;
        let mut old = Superseded::default();
        for (_, _, page, version) in &snap.pages {
            st.map.written(*page, *version);
            let prev = st.ckpt.pages[*page as usize].gen;
            if prev != 0 {
                old.pages.push((*page, prev));
            }
        }
        for seq in &snap.dead {
            if st.stripes.get(seq).is_some_and(|s| s.live == 0) {
                st.stripes.remove(seq);
                st.records.remove(seq);
                old.stripes.push(*seq);
            }
        }
        st.sealed_since_ckpt = 0;
        st.ckpt = snap.body;
        Ok(old)
    }

    /// The cheap part of [`Self::checkpoint_due`], checked after every seal: `checkpoint_stripes` sealed
    /// stripes, or too many dirty map pages.
    pub(super) fn checkpoint_due_in(&self, st: &State) -> bool {
        st.sealed_since_ckpt >= self.opts.checkpoint_stripes || st.map.dirty_count() > self.opts.map_pages
    }

    /// A checkpoint is due after `checkpoint_stripes` sealed stripes, when too many map pages are dirty, or
    /// when enough stripes are dead that deleting them is worth one.
    fn checkpoint_due(&self) -> bool {
        self.state.lock().is_ok_and(|st| {
            let dead = st.stripes.range(..=st.durable).filter(|(_, s)| s.live == 0).count();
            st.failed.is_none() && (self.checkpoint_due_in(&st) || dead >= DEAD_STRIPES_FOR_CHECKPOINT)
        })
    }

    /// Deletes the map page objects the current checkpoint does not reference: copies written by a checkpoint
    /// that a crash interrupted, or superseded ones a crash kept from being deleted. Called at open, once a
    /// checkpoint written then is stored (on at least m+1 locations, so no older one can be needed again).
    pub(super) fn collect_page_garbage(&self) -> Result<()> {
        let live: Vec<u64> = self.lock()?.ckpt.pages.iter().map(|p| p.gen).collect();
        let dir = log_page_dir(&self.layout.vol_id);
        for loc in self.store.locations() {
            let Ok(names) = loc.list(&dir) else { continue };
            for (page, gen) in names.iter().filter_map(|n| parse_page_name(n)) {
                if live.get(page as usize) != Some(&gen) {
                    tracing::debug!(location = loc.name(), page, gen, "deleting an unreferenced map page");
                    let _ = loc.delete(&log_page_key(&self.layout.vol_id, page, gen));
                }
            }
        }
        Ok(())
    }

    /// True when a checkpoint would give the cleaner victims or free space: stripes it does not cover yet, an
    /// open stripe with data, or dead stripes it would delete.
    fn checkpoint_helps(&self) -> bool {
        self.state.lock().is_ok_and(|mut st| {
            let dead = st.stripes.range(..=st.durable).any(|(_, s)| s.live == 0);
            // Sealing the open stripe early is worth it only when writers are waiting.
            let open = !st.open.is_empty() && self.over_space(&mut st);
            st.failed.is_none() && (st.ckpt.seq < st.durable || open || dead)
        })
    }

    /// Stops the background checkpointer and writes a last checkpoint (a clean close replays nothing).
    pub fn close(&self) -> Result<()> {
        if let Ok(mut s) = self.stop.lock() {
            *s = true;
        }
        self.wake.notify_all();
        // Nothing of the background thread may run after close (the volume lock is released next). It may be
        // the one closing (when it held the last reference): then it is already out of its loop.
        let handle = self.background.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle.filter(|h| h.thread().id() != std::thread::current().id()) {
            let _ = h.join();
        }
        self.flush()?;
        self.checkpoint()
    }

    /// True once [`Self::close`] began: background work stops early.
    pub(super) fn stopping(&self) -> bool {
        self.stop.lock().map(|s| *s).unwrap_or(true)
    }
}

/// What a checkpoint writes: page objects `(key, bytes, page, version)`, the body, and stripes it may delete.
struct Snapshot {
    pages: Vec<(String, Vec<u8>, u32, u64)>,
    body: CheckpointBody,
    dead: Vec<u64>,
}

/// What a new checkpoint superseded: page objects `(page, gen)` and dead stripes.
#[derive(Default)]
struct Superseded {
    pages: Vec<(u32, u64)>,
    stripes: Vec<u64>,
}

/// Captures, under the lock, the map and stripe table as of the last sealed stripe.
fn snapshot(st: &mut State) -> Snapshot {
    let seq = st.next_seq - 1;
    let mut body = st.ckpt.clone();
    body.generation += 1;
    body.seq = seq;
    let mut pages = Vec::new();
    for (page, version, entries) in st.map.dirty() {
        let gen = body.next_gen;
        body.next_gen += 1;
        let bytes = LogMapPage { vol_id: body.vol_id, page, gen, entries }.encode();
        body.pages[page as usize] = PageRef { gen, hash: *blake3::hash(&bytes).as_bytes() };
        pages.push((log_page_key(&body.vol_id, page, gen), bytes, page, version));
    }
    let covered = st.stripes.range(..=seq).map(|(_, s)| *s);
    let (live, dead): (Vec<StripeInfo>, Vec<StripeInfo>) = covered.partition(|s| s.live > 0);
    body.stripes = live;
    Snapshot { pages, body, dead: dead.into_iter().map(|s| s.seq).collect() }
}

/// The background checkpointer and cleaner: wakes when a checkpoint is due (or every few seconds) while the log is open.
pub(super) fn checkpointer(log: Weak<BlockLog>) {
    loop {
        let Some(l) = log.upgrade() else { return };
        if l.stop.lock().map(|s| *s).unwrap_or(true) {
            return;
        }
        let mut busy = false;
        let mut starved = false;
        if l.clean_due() {
            match l.clean(l.clean_budget()) {
                Ok(moved) => {
                    busy = moved > 0;
                    // Garbage, but no victim: a checkpoint makes some (covering new stripes, sealing the open
                    // one) or deletes dead stripes.
                    starved = moved == 0 && l.checkpoint_helps();
                }
                Err(e) => tracing::warn!(error = %e, "cleaning failed"),
            }
        }
        if busy || starved || l.checkpoint_due() {
            if let Err(e) = l.checkpoint() {
                tracing::warn!(error = %e, "background checkpoint failed (the log replays instead)");
            }
        }
        if busy {
            continue;
        }
        // Starved: look again soon (writers may be waiting), not in a tight loop.
        let pause = if starved { Duration::from_millis(20) } else { Duration::from_secs(2) };
        let Ok(guard) = l.stop.lock() else { return };
        let _ = l.wake.wait_timeout(guard, pause);
    }
}

/// Dead stripes that make a checkpoint due (it deletes them).
const DEAD_STRIPES_FOR_CHECKPOINT: usize = 8;
