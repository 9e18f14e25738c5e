//! The flush journal: a FLUSH (or FUA write) with little new data makes it durable by appending one entry to a
//! preallocated ring replicated on m+1 locations (one in-place write and one data sync per copy, in parallel)
//! instead of sealing a short stripe into k+m new objects. The open stripe stays open and is sealed full, as
//! usual; its journal entries are dead once it is stored.
//!
//! Up to [`MAX_IN_FLIGHT`] entries are written at once; flushes that arrive while one covering them is in
//! flight wait for it (group commit), and an entry counts only once every earlier entry of its stripe is
//! durable. When the ring has no room, the new data is large, or a copy cannot be written, the flush seals the
//! open stripe instead, which is always correct. A flush also journals the rest of a full stripe still being
//! stored rather than wait for it. Records: [`crate::format::journal`].

use super::*;
use crate::codec::crypto::MasterKey;
use crate::format::journal::*;

/// Most new blocks a journal entry carries; a flush with more seals a short stripe instead (1 MiB: beyond that,
/// writing m+1 copies costs more than the k+m shards of a short stripe).
const MAX_ENTRY_BLOCKS: u32 = 256;
/// Journal size when the options leave it to the volume size: 1/128 of it, within these bounds.
const AUTO_MIN: u64 = 4 << 20;
const AUTO_MAX: u64 = 32 << 20;

/// The journal of an open log: where its copies are and which generation it writes.
pub(super) struct Journal {
    key: String,
    len: u64,
    gen: u64,
    /// Indices of the locations holding a copy.
    copies: Vec<usize>,
}

/// The journal an open found: its newest generation (0: none) and the locations holding a copy.
pub(super) struct OldJournal {
    gen: u64,
    holders: Vec<usize>,
}

/// Journal bookkeeping, under the log's state lock.
#[derive(Default)]
pub(super) struct JournalState {
    /// What the journal holds of each stripe not yet stored.
    chains: BTreeMap<u64, Chain>,
    /// Entries being written.
    in_flight: usize,
    /// A copy could not be written: flushes seal stripes from now on.
    broken: bool,
    /// Entries still needed or still being written, oldest first.
    ring: VecDeque<Slot>,
    head: u64,
}

/// How far a chain of entries reaches into its stripe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Marks {
    blocks: u32,
    extents: u32,
    /// The rest of a sealed stripe was carried: the chain holds all of it.
    last: bool,
}

impl Marks {
    /// True when these marks reach `want` (blocks and extents), or the whole stripe.
    fn reach(&self, want: Option<(u32, u32)>) -> bool {
        self.last || want.is_some_and(|(b, e)| self.blocks >= b && self.extents >= e)
    }
}

/// The entries of one stripe: those prepared, and the unbroken prefix of them that is durable. Entries may
/// finish out of order; a later one counts only once every earlier one is durable.
#[derive(Clone, Debug, Default)]
struct Chain {
    next_part: u32,
    /// Marks after the last entry prepared.
    taken: Marks,
    /// Marks after the durable prefix, which is parts `0..durable_parts`.
    durable: Marks,
    durable_parts: u32,
    /// Entries durable before an earlier one.
    early: BTreeMap<u32, Marks>,
}

impl Chain {
    fn finished(&mut self, part: u32, marks: Marks) {
        self.early.insert(part, marks);
        while let Some(m) = self.early.remove(&self.durable_parts) {
            self.durable = m;
            self.durable_parts += 1;
        }
    }
}

/// What a flush needs next.
enum Need {
    /// Everything it covers is stored or journaled.
    Done,
    /// An entry for this stripe.
    Entry(u64),
    /// Entries being written, or a stripe being stored.
    Wait,
    /// The journal cannot take it: seal the open stripe.
    Seal,
}

/// Entries written at once (later flushes do not wait for an entry in flight to start theirs).
const MAX_IN_FLIGHT: usize = 4;

/// Where an entry lies in the ring.
#[derive(Clone, Copy, Debug)]
struct Slot {
    seq: u64,
    start: u64,
    end: u64,
    /// Being written: its space is not reused even once its stripe is stored, or a late write could land
    /// over a newer entry.
    writing: bool,
}

/// An entry ready to be written at `start`.
struct Pending {
    seq: u64,
    part: u32,
    start: u64,
    bytes: Vec<u8>,
    marks: Marks,
}

impl BlockLog {
    /// Makes every write that returned before the call durable through the journal (the open stripe's new
    /// blocks, and the rest of stripes still being stored); `Ok(false)` when the journal cannot (the caller
    /// seals the open stripe instead).
    pub(super) fn journal_flush(&self, j: &Journal) -> Result<bool> {
        let mut st = self.lock()?;
        let target = (st.next_seq, st.open.blocks(), st.open.extents.len() as u32);
        loop {
            if let Some(f) = &st.failed {
                return Err(Error::ReadOnly(format!("the volume (a stripe could not be stored: {f})")));
            }
            let seq = match journal_need(&st, target) {
                Need::Done => return Ok(true),
                Need::Seal => return Ok(false),
                Need::Wait => {
                    st = self.changed.wait(st).map_err(|_| Error::internal("log state poisoned by a panic"))?;
                    continue;
                }
                Need::Entry(seq) => seq,
            };
            let Some(p) = self.prepare_entry(&mut st, j, seq)? else { return Ok(false) };
            drop(st);
            let outcome = self.write_entry(j, &p);
            st = self.lock()?;
            st.journal.in_flight -= 1;
            if let Some(slot) = st.journal.ring.iter_mut().find(|r| r.start == p.start && r.writing) {
                slot.writing = false;
            }
            self.changed.notify_all();
            match outcome {
                Ok(()) => {
                    if let Some(c) = st.journal.chains.get_mut(&p.seq) {
                        c.finished(p.part, p.marks);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the flush journal cannot be written; flushes seal stripes from now on");
                    st.journal.broken = true;
                }
            }
        }
    }

    /// Encodes the next entry of stripe `seq` (the open one, or one being stored: then all of its rest), finds
    /// room for it in the ring and takes it; `None` when the ring has no room.
    fn prepare_entry(&self, st: &mut State, j: &Journal, seq: u64) -> Result<Option<Pending>> {
        let durable = st.durable;
        let jr = &mut st.journal;
        while jr.ring.front().is_some_and(|r| r.seq <= durable && !r.writing) {
            jr.ring.pop_front();
        }
        jr.chains.retain(|s, _| *s > durable);
        let last = seq != st.next_seq;
        let Some(stripe) = (if last { st.sealing.get(&seq).map(|s| &**s) } else { Some(&st.open) }) else {
            return Ok(None);
        };
        let chain = jr.chains.entry(seq).or_default();
        let (from, to) = (chain.taken.blocks, stripe.blocks());
        let ext_from = chain.taken.extents.saturating_sub(1);
        let entry = JournalEntry {
            store_id: self.store.descriptor().store_id,
            vol_id: self.layout.vol_id,
            gen: j.gen,
            seq,
            part: chain.next_part,
            last,
            slot_from: from,
            ext_from,
            extents: stripe.extents[ext_from as usize..].to_vec(),
            block_hashes: stripe.hashes[from as usize..to as usize].to_vec(),
        };
        let data = &stripe.data[from as usize * BLOCK..to as usize * BLOCK];
        let bytes = encode_journal_entry(&entry, data, self.store.key()?)?;
        let size = bytes.len() as u64;
        let head = jr.head.max(JOURNAL_ALIGN);
        let start = if head + size <= j.len { head } else { JOURNAL_ALIGN };
        let overlaps = jr.ring.iter().any(|r| start < r.end && r.start < start + size);
        if start + size > j.len || overlaps {
            return Ok(None);
        }
        let marks = Marks { blocks: to, extents: stripe.extents.len() as u32, last };
        let part = chain.next_part;
        (chain.next_part, chain.taken) = (part + 1, marks);
        jr.head = start + size;
        jr.ring.push_back(Slot { seq, start, end: jr.head, writing: true });
        jr.in_flight += 1;
        Ok(Some(Pending { seq, part, start, bytes, marks }))
    }

    /// Writes an entry to every copy of the journal, in parallel, each durably.
    fn write_entry(&self, j: &Journal, p: &Pending) -> Result<()> {
        let locations = self.store.locations();
        let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = j
                .copies
                .iter()
                .map(|&i| s.spawn(move || locations[i].write_at(&j.key, p.start, &[&p.bytes])))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::internal("journal writer panicked"))))
                .collect()
        });
        outcomes.into_iter().collect()
    }

    /// At open, after the stripes are replayed: rebuilds from the journal what it holds of the stripes from
    /// `first_missing` (the first one not on the locations) on, and stores them as stripes. Returns true when
    /// anything was recovered, and the journal found (for [`Self::start_journal`]).
    pub(super) fn recover_journal(&self, first_missing: u64) -> Result<(bool, OldJournal)> {
        // Whatever the options say now: a journal written by an earlier open may hold acknowledged writes.
        let key = journal_key(&self.layout.vol_id);
        let (gen, holders) = self.journal_headers(&key)?;
        let recovered = gen > 0 && self.recover(&key, gen, &holders, first_missing)?;
        Ok((recovered, OldJournal { gen, holders }))
    }

    /// Starts a new journal generation on m+1 locations, which makes every entry of the old one dead: only once
    /// a checkpoint covers what [`Self::recover_journal`] stored (until then, a crash recovers it again; after
    /// it, the old entries are of stripes the checkpoint covers).
    pub(super) fn start_journal(&self, old: OldJournal) -> Result<()> {
        let key = journal_key(&self.layout.vol_id);
        let OldJournal { gen, holders } = old;
        let Some(len) = self.journal_len() else {
            // Off now: an old journal's entries are covered by the checkpoint; none may be replayed later.
            for &i in &holders {
                self.store.locations()[i].delete(&key)?;
            }
            return Ok(());
        };
        let header =
            JournalHeader { store_id: self.store.descriptor().store_id, vol_id: self.layout.vol_id, gen: gen + 1, len };
        let page = encode_journal_header(&header, self.store.key()?)?;
        let active = self.store.active();
        let n = active.len();
        let want = (self.layout.m as usize + 1).min(n);
        let mut copies = Vec::new();
        let first = crate::store::placement_start(&self.layout.vol_id, n) as usize;
        for i in (0..n).map(|i| active[(first + i) % n]) {
            let loc = &self.store.locations()[i];
            if copies.len() < want {
                match loc.preallocate(&key, len).and_then(|ok| {
                    if ok {
                        loc.write_at(&key, 0, &[&page]).map(|()| true)
                    } else {
                        Ok(false)
                    }
                }) {
                    Ok(true) => copies.push(i),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(location = loc.name(), error = %e, "cannot prepare the flush journal"),
                }
            } else if holders.contains(&i) {
                // An older copy elsewhere: mark it stale too.
                let _ = loc.write_at(&key, 0, &[&page]);
            }
        }
        if copies.len() < want {
            tracing::warn!(
                copies = copies.len(),
                want,
                "no flush journal (too few locations take one); flushes seal stripes"
            );
        } else {
            let _ = self.journal.set(Journal { key, len, gen: gen + 1, copies });
        }
        Ok(())
    }

    /// Journal size for this volume, or `None` when the journal is off.
    fn journal_len(&self) -> Option<u64> {
        let len = match self.opts.journal_bytes {
            Some(0) => return None,
            Some(n) => n,
            None => (self.size() / 128).clamp(AUTO_MIN, AUTO_MAX),
        };
        Some(align_up(len.max(2 * JOURNAL_ALIGN)))
    }

    /// The newest journal generation on any location, and which locations hold a journal of this volume. Fails
    /// when more than m locations cannot be read: every copy of the newest generation (m+1 of them) might be on
    /// those, and replaying an older one (or none) would silently drop flushed writes.
    fn journal_headers(&self, key: &str) -> Result<(u64, Vec<usize>)> {
        let (mut gen, mut holders, mut unreadable) = (0, Vec::new(), Vec::new());
        let mkey = self.store.key()?;
        for (i, loc) in self.store.locations().iter().enumerate() {
            let what = format!("journal header on {}", loc.name());
            match loc.get_range(key, 0, JOURNAL_ALIGN as usize).and_then(|p| decode_journal_header(&p, mkey, &what)) {
                Ok(h) if h.vol_id == self.layout.vol_id && h.store_id == self.store.descriptor().store_id => {
                    gen = gen.max(h.gen);
                    holders.push(i);
                }
                Ok(_) => tracing::warn!(location = loc.name(), "a journal of another volume; ignored"),
                Err(e) => {
                    if let Some(f) = super::replay::unreadable_location(loc.as_ref(), e) {
                        tracing::warn!(location = loc.name(), error = %f.error, "unreadable journal header");
                        unreadable.push(f);
                    }
                }
            }
        }
        super::replay::enough_readable(&self.store, unreadable, "the flush journal")?;
        Ok((gen, holders))
    }

    /// Rebuilds, from the journal entries of generation `gen`, the stripes from `first` on that were not
    /// stored: the unbroken chain of each, while the one before it was complete. Stores each as a stripe, in
    /// order. Returns true when the journal held anything.
    fn recover(&self, key: &str, gen: u64, holders: &[usize], first: u64) -> Result<bool> {
        let mkey = self.store.key()?;
        let mut parts: BTreeMap<(u64, u32), (JournalEntry, Vec<u8>)> = BTreeMap::new();
        let (mut read_any, mut first_err) = (false, None);
        for &i in holders {
            let loc = &self.store.locations()[i];
            let bytes = match loc.get(key) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(location = loc.name(), error = %e, "cannot read the flush journal");
                    first_err = first_err.or(Some(e));
                    continue;
                }
            };
            read_any = true;
            let what = format!("journal on {}", loc.name());
            scan(&bytes, mkey, gen, &what, |e, blocks| {
                let ours = e.seq >= first && e.vol_id == self.layout.vol_id;
                if ours && !parts.contains_key(&(e.seq, e.part)) {
                    parts.insert((e.seq, e.part), (e, blocks.to_vec()));
                }
            });
        }
        if let (false, Some(e)) = (read_any, first_err) {
            // Its header was read but no copy is: going on would start a new generation over entries that may
            // hold acknowledged writes.
            return Err(e);
        }
        let mut seq = first;
        let mut any = false;
        loop {
            let mine: BTreeMap<u32, _> =
                parts.range((seq, 0)..=(seq, u32::MAX)).map(|(k, v)| (k.1, v.clone())).collect();
            let (stripe, complete) = chain(mine, self.opts.stripe_blocks);
            if stripe.is_empty() {
                return Ok(any);
            }
            tracing::info!(stripe = seq, blocks = stripe.blocks(), "recovered flushed writes from the journal");
            self.store_recovered(stripe)?;
            any = true;
            if !complete {
                return Ok(any);
            }
            seq += 1;
        }
    }

    /// Points the map at a stripe rebuilt from the journal and stores it as the next stripe.
    fn store_recovered(&self, stripe: StripeData) -> Result<()> {
        let mut st = self.lock()?;
        let at = st.next_seq;
        st.stripes.insert(at, StripeInfo { seq: at, blocks: stripe.blocks(), record_len: 0, live: 0 });
        self.point_map(&mut st, at, &stripe.extents)?;
        st.open = stripe;
        drop(st);
        self.seal_flush()
    }
}

/// What a flush that started when the open stripe was `target = (seq, blocks, extents)` still needs: every
/// stripe before `seq` stored or wholly journaled, and stripe `seq` stored or journaled up to those marks.
fn journal_need(st: &State, target: (u64, u32, u32)) -> Need {
    let (tseq, tblocks, textents) = target;
    let jr = &st.journal;
    for seq in st.durable + 1..=tseq {
        let open = seq == st.next_seq;
        let blocks = match (open, st.sealing.get(&seq)) {
            // Stored, but after a stripe that is not: replay would stop at that one and drop this one, so it
            // counts only once every stripe before it is stored.
            _ if st.finished.contains(&seq) => return Need::Wait,
            (true, _) => st.open.blocks(),
            (false, Some(s)) => s.blocks(),
            // Neither open nor being stored nor stored: an empty open stripe that was never taken.
            (false, None) => continue,
        };
        let want = (seq == tseq).then_some((tblocks, textents));
        if want == Some((0, 0)) {
            continue;
        }
        let chain = jr.chains.get(&seq);
        let (durable, taken) = chain.map_or((Marks::default(), Marks::default()), |c| (c.durable, c.taken));
        if durable.reach(want) {
            continue;
        }
        if taken.reach(want) && !jr.broken {
            return Need::Wait;
        }
        let too_big = blocks - taken.blocks > MAX_ENTRY_BLOCKS;
        if jr.broken || too_big {
            // An open stripe is sealed instead; a stripe being stored is waited for.
            return if open { Need::Seal } else { Need::Wait };
        }
        if jr.in_flight >= MAX_IN_FLIGHT {
            return Need::Wait;
        }
        return Need::Entry(seq);
    }
    Need::Done
}

/// Calls `found` with every valid entry of generation `gen` in a journal object.
fn scan<'a>(bytes: &'a [u8], key: &MasterKey, gen: u64, what: &str, mut found: impl FnMut(JournalEntry, &'a [u8])) {
    let mut at = JOURNAL_ALIGN as usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.starts_with(&MAGIC_JOURNAL_ENTRY) {
            if let Some((e, blocks, len)) = decode_journal_entry(rest, key, gen, what) {
                found(e, blocks);
                at += align_up(len as u64) as usize;
                continue;
            }
        }
        at += JOURNAL_ALIGN as usize;
    }
}

/// The stripe that the unbroken chain of parts 0, 1, ... describes (empty when there is none), and whether the
/// chain ends with the stripe's last part.
fn chain(parts: BTreeMap<u32, (JournalEntry, Vec<u8>)>, stripe_blocks: u32) -> (StripeData, bool) {
    let mut s = StripeData::default();
    let mut complete = false;
    for (expect, (part, (e, blocks))) in parts.into_iter().enumerate() {
        let fits = s.blocks() as u64 + e.block_hashes.len() as u64 <= stripe_blocks as u64;
        let follows = e.slot_from == s.blocks() && e.ext_from as usize <= s.extents.len();
        if part as usize != expect || !follows || !fits || complete {
            break;
        }
        s.extents.truncate(e.ext_from as usize);
        s.extents.extend_from_slice(&e.extents);
        s.hashes.extend_from_slice(&e.block_hashes);
        s.data.extend_from_slice(&blocks);
        complete = e.last;
    }
    (s, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        gen: u64,
        part: u32,
        slot_from: u32,
        ext_from: u32,
        extents: Vec<Extent>,
        n: u32,
    ) -> (JournalEntry, Vec<u8>) {
        let blocks = crate::testing::test_bytes(n as usize * BLOCK, (gen << 8) + part as u64);
        let e = JournalEntry {
            store_id: [1; 16],
            vol_id: [2; 16],
            gen,
            seq: 5,
            part,
            last: false,
            slot_from,
            ext_from,
            extents,
            block_hashes: blocks.chunks_exact(BLOCK).map(block_hash).collect(),
        };
        (e, blocks)
    }

    #[test]
    fn scan_finds_the_entries_of_one_generation_between_stale_and_torn_ones() {
        let key = MasterKey::from_bytes([9; 32]);
        let mut ring = vec![0u8; JOURNAL_ALIGN as usize];
        let mut expect = Vec::new();
        for (i, gen) in [3u64, 4, 3, 4, 4].into_iter().enumerate() {
            let (e, blocks) = entry(gen, i as u32, 0, 0, vec![Extent { lba: i as u64, len: 1, slot: 0 }], 1);
            let mut bytes = encode_journal_entry(&e, &blocks, &key).unwrap();
            if i == 4 {
                let last = bytes.len() - 1;
                bytes[last] ^= 1; // torn: its block no longer matches its hash
            } else if gen == 4 {
                expect.push(e.part);
            }
            ring.extend_from_slice(&bytes);
        }
        let mut found = Vec::new();
        scan(&ring, &key, 4, "ring", |e, b| {
            assert_eq!(b.len(), BLOCK);
            found.push(e.part)
        });
        assert_eq!(found, expect);
    }

    #[test]
    fn chain_stops_at_the_first_gap_and_replaces_the_grown_last_extent() {
        let parts = |list: Vec<(JournalEntry, Vec<u8>)>| -> BTreeMap<u32, (JournalEntry, Vec<u8>)> {
            list.into_iter().map(|p| (p.0.part, p)).collect()
        };
        let p0 = entry(1, 0, 0, 0, vec![Extent { lba: 10, len: 2, slot: 0 }], 2);
        // The extent at 10 grew by one block, then a trim of 50 came.
        let p1 = entry(
            1,
            1,
            2,
            0,
            vec![Extent { lba: 10, len: 3, slot: 0 }, Extent { lba: 50, len: 4, slot: ZERO_SLOT }],
            1,
        );
        let p3 = entry(1, 3, 3, 1, vec![Extent { lba: 90, len: 1, slot: 3 }], 1);
        let (s, complete) = chain(parts(vec![p0.clone(), p1.clone(), p3]), 16);
        assert!(!complete);
        assert_eq!(s.blocks(), 3, "part 2 is missing: part 3 is not used");
        assert_eq!(s.extents, vec![Extent { lba: 10, len: 3, slot: 0 }, Extent { lba: 50, len: 4, slot: ZERO_SLOT }]);
        assert_eq!(s.data, [p0.1.clone(), p1.1.clone()].concat());
        let wrong_slot = entry(1, 1, 1, 0, vec![Extent { lba: 10, len: 2, slot: 0 }], 1);
        assert_eq!(chain(parts(vec![p0.clone(), wrong_slot]), 16).0.blocks(), 2);
        assert_eq!(chain(parts(vec![p0.clone()]), 1).0.blocks(), 0, "more blocks than a stripe holds");
        assert!(chain(parts(vec![p1.clone()]), 16).0.is_empty(), "no part 0");
        let mut fin = p1;
        fin.0.last = true;
        let (s, complete) = chain(parts(vec![p0, fin]), 16);
        assert!(complete && s.blocks() == 3, "a last part completes the stripe");
    }
}
