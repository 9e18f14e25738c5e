//! The log-structured block store: a volume's 4 KiB blocks are appended, encrypted, to an open stripe; a stripe
//! is erasure-coded only when it is sealed (full, or by a FLUSH), as one object per location; nothing in the
//! foreground path rewrites a stripe.
//!
//! - **Writes** encrypt their blocks (AES-256-XTS, tweak = the *logical* block, so a cleaner may move
//!   ciphertext) and append them; the block map points at (open stripe, slot) at once, so reads see them.
//! - **Sealing** a full stripe is done by the writer that filled it, while others append to the next one.
//! - **FLUSH** seals the open stripe, however short (variable width), and waits until every stripe up to it is
//!   stored: one parallel round of k+m durable writes, no map or superblock write.
//! - **Recovery**: every stripe carries the map delta of its blocks in its record, so opening replays, in
//!   sequence order, the stripes written after the last checkpoint, up to the first one that is not complete
//!   (a torn tail); the first checkpoint after that covers the dropped tail.
//! - **Checkpoints** (the dirty map pages, then the checkpoint record on every location) are written by a
//!   background thread every `checkpoint_stripes` sealed stripes, off the write path; stripes with no live block
//!   left are deleted once a checkpoint covers them.
//!
//! On-disk records: [`crate::format::log`].

mod checkpoint;
mod clean;
mod journal;
mod map;
mod replay;
mod stripe_io;

pub(crate) use replay::list_stripes;
pub use replay::load_checkpoint;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::codec::erasure::Codec;
use crate::codec::merkle::Hash;
use crate::codec::xts::Xts;
use crate::error::{Error, ErrorKind, Result};
use crate::format::log::*;
use crate::location::LocationExt;
use crate::store::Store;

use map::BlockMap;
use stripe_io::StripeData;
pub(crate) use stripe_io::{complete_parts, put_shard, Layout};

/// Tuning of an open log.
#[derive(Clone, Copy, Debug)]
pub struct LogOptions {
    /// Most data blocks in one stripe (default 1024: 4 MiB of data, 1 MiB shards at k = 4).
    pub stripe_blocks: u32,
    /// Map pages kept in memory (each covers `entries_per_page` blocks; about 12 bytes per block).
    pub map_pages: usize,
    /// Stripe records kept in memory (about 24 bytes per block of the stripe).
    pub records: usize,
    /// A checkpoint is written after this many sealed stripes (or when too many map pages are dirty).
    pub checkpoint_stripes: u64,
    /// Stripes being written at once before writers wait.
    pub max_sealing: usize,
    /// Bytes of the flush journal on each of its m+1 locations: `None` sizes it by the volume (1/128 of it,
    /// 4 to 32 MiB), `Some(0)` turns it off (every FLUSH seals a stripe).
    pub journal_bytes: Option<u64>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            stripe_blocks: 1024,
            map_pages: 1024,
            records: 4096,
            checkpoint_stripes: 256,
            max_sealing: 4,
            journal_bytes: None,
        }
    }
}

/// Longest a write waits for the cleaner before it goes ahead anyway (the space bound is then exceeded for a
/// while rather than a write stalling).
const MAX_THROTTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Stripe numbers skipped at every open: more than can have been in flight (being stored) at a crash.
const SKIPPED_AT_OPEN: u64 = 64;

/// Blocks per map page of new logs: 4096 (16 MiB of volume per page).
pub const ENTRIES_PER_PAGE: u32 = 4096;

/// What a new log is made of.
pub struct NewLog<'a> {
    /// Volume id.
    pub vol_id: [u8; 16],
    /// Keyed hash of the volume name.
    pub name_tag: Hash,
    /// Size in bytes (a positive multiple of 4096).
    pub size: u64,
    /// Most data blocks per stripe.
    pub stripe_blocks: u32,
    /// Encrypted metadata and its nonce.
    pub sealed_meta: (&'a [u8], [u8; 12]),
}

/// Counters of an open log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Stripes on the locations (sealed and not yet deleted).
    pub stripes: u64,
    /// Data blocks those stripes hold.
    pub blocks: u64,
    /// Of those, the blocks the map points at.
    pub live_blocks: u64,
    /// Sequence number of the last checkpoint.
    pub checkpoint_seq: u64,
}

/// An open log-structured block volume.
pub struct BlockLog {
    store: Arc<Store>,
    layout: Layout,
    xts: Xts,
    blocks: u64,
    opts: LogOptions,
    state: Mutex<State>,
    changed: Condvar,
    codecs: Mutex<Vec<Codec>>,
    checkpoints: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
    journal: std::sync::OnceLock<journal::Journal>,
    /// The background checkpointer and cleaner, joined by [`BlockLog::close`].
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct State {
    /// The stripe being filled; it will be stripe `next_seq`.
    open: StripeData,
    next_seq: u64,
    /// Sealed stripes being written, readable from memory meanwhile.
    sealing: BTreeMap<u64, Arc<StripeData>>,
    /// Every stripe up to this one is stored.
    durable: u64,
    /// Stored stripes above `durable` (finished out of order).
    finished: BTreeSet<u64>,
    /// Set when a stripe could not be stored: the log refuses writes from then on.
    failed: Option<String>,
    map: BlockMap,
    /// Every stripe that holds or held blocks, with live counts (the open one included).
    stripes: BTreeMap<u64, StripeInfo>,
    records: HashMap<u64, Arc<RecordBody>>,
    record_order: VecDeque<u64>,
    /// The last checkpoint written.
    ckpt: CheckpointBody,
    sealed_since_ckpt: u64,
    journal: journal::JournalState,
    /// What the writers last saw of the space used.
    space_checked: Option<clean::SpaceCheck>,
}

impl BlockLog {
    /// Creates the log of a new volume: its first checkpoint, on every location.
    pub fn create(store: &Store, new: &NewLog<'_>) -> Result<()> {
        let d = store.descriptor();
        if new.size == 0 || !new.size.is_multiple_of(BLOCK as u64) {
            return Err(Error::InvalidArgument(format!(
                "volume size {} must be a positive multiple of 4096",
                new.size
            )));
        }
        if new.stripe_blocks == 0 || new.stripe_blocks > 1 << 16 {
            return Err(Error::InvalidArgument(format!("{} blocks per stripe is out of range", new.stripe_blocks)));
        }
        let pages = (new.size / BLOCK as u64).div_ceil(ENTRIES_PER_PAGE as u64) as usize;
        let n = store.locations().len();
        let body = CheckpointBody {
            store_id: d.store_id,
            vol_id: new.vol_id,
            name_tag: new.name_tag,
            generation: 1,
            size: new.size,
            k: d.k,
            m: d.m,
            stripe_blocks: new.stripe_blocks,
            placement_start: crate::store::placement_start(&new.vol_id, n),
            seq: 0,
            next_gen: 1,
            entries_per_page: ENTRIES_PER_PAGE,
            pages: vec![PageRef::default(); pages],
            stripes: vec![],
            meta_nonce: new.sealed_meta.1,
            sealed_meta: new.sealed_meta.0.to_vec(),
        };
        let bytes = encode_checkpoint(&body, store.key()?)?;
        store.put_replicated(&checkpoint_key(&new.vol_id), &bytes, "a log checkpoint")
    }

    /// Opens a log: reads the newest checkpoint, replays the stripes written after it, and starts the
    /// background checkpointer.
    pub fn open(store: Arc<Store>, vol_id: &[u8; 16], opts: LogOptions) -> Result<Arc<BlockLog>> {
        let ckpt = load_checkpoint(&store, vol_id)?;
        let layout = Layout { vol_id: *vol_id, k: ckpt.k, m: ckpt.m };
        let xts = store.key()?.volume_xts(vol_id);
        let opts = LogOptions { stripe_blocks: ckpt.stripe_blocks, ..opts };
        let state = State {
            open: StripeData::default(),
            next_seq: ckpt.seq + 1,
            sealing: BTreeMap::new(),
            durable: ckpt.seq,
            finished: BTreeSet::new(),
            failed: None,
            map: BlockMap::new(ckpt.entries_per_page, opts.map_pages),
            stripes: ckpt.stripes.iter().map(|s| (s.seq, *s)).collect(),
            records: HashMap::new(),
            record_order: VecDeque::new(),
            sealed_since_ckpt: 0,
            ckpt,
            journal: Default::default(),
            space_checked: None,
        };
        let log = Arc::new(BlockLog {
            blocks: state.ckpt.blocks(),
            store,
            layout,
            xts,
            opts,
            state: Mutex::new(state),
            changed: Condvar::new(),
            codecs: Mutex::new(Vec::new()),
            checkpoints: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            journal: std::sync::OnceLock::new(),
            background: Mutex::new(None),
        });
        let (replayed, first_missing) = log.replay()?;
        log.skip_numbers()?;
        let (recovered, old_journal) = log.recover_journal(first_missing)?;
        // Covers the skipped numbers and whatever replay and the journal found.
        log.checkpoint()?;
        if replayed || recovered {
            // After a crash: drop what the crash left half-done.
            log.collect_page_garbage()?;
        }
        log.start_journal(old_journal)?;
        let weak = Arc::downgrade(&log);
        let handle = std::thread::Builder::new()
            .name("bf-log-checkpoint".into())
            .spawn(move || checkpoint::checkpointer(weak))
            .map_err(|e| Error::io("starting the checkpoint thread", e))?;
        if let Ok(mut h) = log.background.lock() {
            *h = Some(handle);
        }
        Ok(log)
    }

    /// Moves the next stripe number past [`SKIPPED_AT_OPEN`] unused ones. A location missing at this open may
    /// hold a shard of a stripe numbered just above the ones found (written when a crash came); the numbers
    /// skipped (covered by the checkpoint written next) are never used, so such a shard can never be taken for
    /// part of a new stripe.
    fn skip_numbers(&self) -> Result<()> {
        let mut st = self.lock()?;
        st.next_seq += SKIPPED_AT_OPEN;
        st.durable = st.next_seq - 1;
        Ok(())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks * BLOCK as u64
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::internal("log state poisoned by a panic"))
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<()> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(Error::OutOfRange {
                what: "the volume".into(),
                offset: lba.saturating_mul(BLOCK as u64),
                len: blocks.saturating_mul(BLOCK as u64),
                size: self.size(),
            }),
        }
    }

    /// Writes whole blocks from `lba` (`data.len()` a multiple of 4096); with `fua`, durably before returning.
    pub fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<()> {
        if !data.len().is_multiple_of(BLOCK) {
            return Err(Error::InvalidArgument("log writes are whole 4 KiB blocks".into()));
        }
        let n = (data.len() / BLOCK) as u64;
        self.check_range(lba, n)?;
        let mut cipher = data.to_vec();
        self.xts.encrypt(&mut cipher, lba);
        let hashes: Vec<BlockHash> = cipher.chunks_exact(BLOCK).map(block_hash).collect();
        let mut done = 0usize;
        while done < n as usize {
            let mut st = self.writable()?;
            if let Some((seq, stripe)) = self.take_if_full(&mut st) {
                // Left full by an append that failed half-way (a map page that could not be read).
                drop(st);
                self.seal(seq, stripe);
                continue;
            }
            let room = (self.opts.stripe_blocks - st.open.blocks()) as usize;
            let take = room.min(n as usize - done);
            self.append(
                &mut st,
                lba + done as u64,
                &cipher[done * BLOCK..(done + take) * BLOCK],
                &hashes[done..done + take],
            )?;
            done += take;
            if st.open.blocks() >= self.opts.stripe_blocks {
                let sealed = self.take_open(&mut st);
                drop(st);
                if let Some((seq, stripe)) = sealed {
                    self.seal(seq, stripe);
                }
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `blocks` blocks from `lba` read as zeros (TRIM / WRITE_ZEROES): no data, a zero extent in the log.
    pub fn zero(&self, lba: u64, blocks: u64, fua: bool) -> Result<()> {
        self.check_range(lba, blocks)?;
        let mut st = self.writable()?;
        let mut at = lba;
        while at < lba + blocks {
            let len = (lba + blocks - at).min(u32::MAX as u64 - 1) as u32;
            let seq = st.next_seq;
            st.open.extents.push(Extent { lba: at, len, slot: ZERO_SLOT });
            st.stripes.entry(seq).or_insert(StripeInfo { seq, blocks: 0, record_len: 0, live: 0 });
            for b in at..at + len as u64 {
                self.set_entry(&mut st, b, MapEntry::HOLE)?;
            }
            at += len as u64;
        }
        drop(st);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Waits for room to write (a bounded number of stripes being sealed, and space at rest within bounds: the
    /// cleaner is woken and waited for, up to [`MAX_THROTTLE`]) and checks the log is not failed.
    fn writable(&self) -> Result<MutexGuard<'_, State>> {
        self.room(true)
    }

    /// [`Self::writable`] for the cleaner, which makes the room writers wait for: no space bound.
    fn writable_for_cleaner(&self) -> Result<MutexGuard<'_, State>> {
        self.room(false)
    }

    fn room(&self, throttle: bool) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock()?;
        let mut throttled: Option<std::time::Instant> = None;
        loop {
            if let Some(f) = &st.failed {
                return Err(Error::ReadOnly(format!("the volume (a stripe could not be stored: {f})")));
            }
            let patient = throttled.is_none_or(|t| t.elapsed() < MAX_THROTTLE);
            let over = throttle && patient && self.over_space(&mut st);
            if st.sealing.len() < self.opts.max_sealing && !over {
                return Ok(st);
            }
            let poisoned = || Error::internal("log state poisoned by a panic");
            if over {
                throttled.get_or_insert_with(std::time::Instant::now);
                self.wake.notify_all();
                let pause = std::time::Duration::from_millis(10);
                st = self.changed.wait_timeout(st, pause).map_err(|_| poisoned())?.0;
            } else {
                st = self.changed.wait(st).map_err(|_| poisoned())?;
            }
        }
    }

    /// Appends encrypted blocks to the open stripe and points the map at them.
    fn append(&self, st: &mut State, lba: u64, cipher: &[u8], hashes: &[BlockHash]) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let seq = st.next_seq;
        let first = st.open.blocks();
        let n = hashes.len() as u32;
        st.open.data.extend_from_slice(cipher);
        st.open.hashes.extend_from_slice(hashes);
        match st.open.extents.last_mut() {
            // Contiguous with the last run (sequential writes, cleaned runs): extend it.
            Some(e) if !e.is_zero() && e.lba + e.len as u64 == lba && e.slot + e.len == first => e.len += n,
            _ => st.open.extents.push(Extent { lba, len: n, slot: first }),
        }
        st.stripes.entry(seq).or_insert(StripeInfo { seq, blocks: 0, record_len: 0, live: 0 }).blocks = first + n;
        for i in 0..n {
            self.set_entry(st, lba + i as u64, MapEntry { seq, slot: first + i })?;
        }
        Ok(())
    }

    /// Points the map entry of `lba` elsewhere, keeping the stripes' live counts.
    fn set_entry(&self, st: &mut State, lba: u64, entry: MapEntry) -> Result<()> {
        self.ensure_page(st, lba)?;
        let old = st.map.set(lba, entry).ok_or_else(|| Error::internal("map page vanished"))?;
        if !old.is_hole() {
            if let Some(s) = st.stripes.get_mut(&old.seq) {
                s.live = s.live.saturating_sub(1);
            }
        }
        if !entry.is_hole() {
            if let Some(s) = st.stripes.get_mut(&entry.seq) {
                s.live += 1;
            }
        }
        Ok(())
    }

    /// Loads the map page of `lba` when it is not cached (from the current checkpoint's page table).
    fn ensure_page(&self, st: &mut State, lba: u64) -> Result<()> {
        let (page, _) = st.map.locate(lba);
        if st.map.has_page(page) {
            return Ok(());
        }
        let per_page = st.map.per_page();
        let r = *st.ckpt.pages.get(page as usize).ok_or_else(|| Error::internal("map page beyond the volume"))?;
        let entries = if r.gen == 0 {
            vec![MapEntry::HOLE; per_page as usize]
        } else {
            self.fetch_page(page, &r, per_page)?.entries
        };
        st.map.evict();
        st.map.insert_page(page, entries);
        Ok(())
    }

    fn fetch_page(&self, page: u32, r: &PageRef, per_page: u32) -> Result<LogMapPage> {
        let key = log_page_key(&self.layout.vol_id, page, r.gen);
        let what = format!("log map page {page}");
        let mut first_err = None;
        for loc in self.store.locations() {
            match loc.get(&key).and_then(|b| LogMapPage::decode(&b, r, &self.layout.vol_id, page, per_page, &what)) {
                Ok(p) => return Ok(p),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        Err(first_err.unwrap_or_else(|| Error::corrupt(&what, "no copy")))
    }

    /// Takes the open stripe out for sealing when it is full.
    fn take_if_full(&self, st: &mut State) -> Option<(u64, Arc<StripeData>)> {
        if st.open.blocks() >= self.opts.stripe_blocks {
            self.take_open(st)
        } else {
            None
        }
    }

    /// Takes the open stripe out for sealing, if it holds anything: returns its sequence number and data.
    fn take_open(&self, st: &mut State) -> Option<(u64, Arc<StripeData>)> {
        if st.open.is_empty() {
            return None;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let stripe = Arc::new(std::mem::take(&mut st.open));
        st.sealing.insert(seq, Arc::clone(&stripe));
        Some((seq, stripe))
    }

    /// Writes a sealed stripe and records the outcome (a failure turns the log read-only).
    fn seal(&self, seq: u64, stripe: Arc<StripeData>) {
        let r = self.with_codec(|c| stripe_io::write_stripe(&self.store, c, &self.layout, seq, &stripe));
        self.finish_seal(seq, r);
    }

    fn finish_seal(&self, seq: u64, outcome: Result<(RecordBody, u32)>) {
        let Ok(mut st) = self.state.lock() else { return };
        match outcome {
            Ok((record, record_len)) => {
                if let Some(s) = st.stripes.get_mut(&seq) {
                    s.record_len = record_len;
                }
                remember_record(&mut st, &self.opts, Arc::new(record));
                st.sealing.remove(&seq);
                st.finished.insert(seq);
                let st = &mut *st;
                while st.finished.remove(&(st.durable + 1)) {
                    st.durable += 1;
                }
                st.sealed_since_ckpt += 1;
                if self.checkpoint_due_in(st) {
                    self.wake.notify_all();
                }
            }
            Err(e) => {
                tracing::error!(seq, error = %e, "a log stripe could not be stored; the volume is read-only now");
                st.failed.get_or_insert(e.to_string());
            }
        }
        self.changed.notify_all();
    }

    /// Runs `f` with a coder from the pool (made when the pool is empty) and puts it back afterwards.
    fn with_codec<T>(&self, f: impl FnOnce(&mut Codec) -> Result<T>) -> Result<T> {
        let pooled = self.codecs.lock().ok().and_then(|mut p| p.pop());
        let mut codec = match pooled {
            Some(c) => c,
            None => Codec::new(self.layout.k as usize, self.layout.m as usize)?,
        };
        let r = f(&mut codec);
        if let Ok(mut pool) = self.codecs.lock() {
            pool.push(codec);
        }
        r
    }

    /// Makes every write that returned before this call durable: through the journal when it can take the new
    /// data, else by sealing the open stripe; and waits for every stripe before it.
    pub fn flush(&self) -> Result<()> {
        if let Some(j) = self.journal.get() {
            if self.journal_flush(j)? {
                return Ok(());
            }
        }
        self.seal_flush()
    }

    /// Seals the open stripe and waits for every stripe up to it.
    fn seal_flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        let sealed = self.take_open(&mut st);
        let target = st.next_seq - 1;
        drop(st);
        if let Some((seq, stripe)) = sealed {
            self.seal(seq, stripe);
        }
        self.wait_durable(target)
    }

    fn wait_durable(&self, target: u64) -> Result<()> {
        let mut st = self.lock()?;
        while st.durable < target {
            if let Some(f) = &st.failed {
                return Err(Error::ReadOnly(format!("the volume (a stripe could not be stored: {f})")));
            }
            st = self.changed.wait(st).map_err(|_| Error::internal("log state poisoned by a panic"))?;
        }
        Ok(())
    }

    /// Reads whole blocks from `lba` into `buf` (`buf.len()` a multiple of 4096); unwritten blocks read as zeros.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<()> {
        if !buf.len().is_multiple_of(BLOCK) {
            return Err(Error::InvalidArgument("log reads are whole 4 KiB blocks".into()));
        }
        self.check_range(lba, (buf.len() / BLOCK) as u64)?;
        // A stripe read from the locations may be cleaned away meanwhile; the map then points elsewhere.
        let mut attempt = 0;
        loop {
            match self.read_once(lba, buf) {
                Ok(holes) => {
                    for (i, block) in buf.chunks_exact_mut(BLOCK).enumerate() {
                        if !holes[i] {
                            self.xts.decrypt(block, lba + i as u64);
                        }
                    }
                    return Ok(());
                }
                Err(e) if attempt < 2 && (e.is_not_found() || e.kind() == ErrorKind::DataLost) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: ciphertext of every block into `buf` (zeros for holes); returns which blocks are holes.
    fn read_once(&self, lba: u64, buf: &mut [u8]) -> Result<Vec<bool>> {
        let (runs, holes) = self.resolve(lba, buf)?;
        for run in runs {
            let rec = self.record(run.seq)?;
            let out = &mut buf[run.at * BLOCK..(run.at + run.len) * BLOCK];
            self.with_codec(|c| stripe_io::read_blocks(&self.store, c, &self.layout, &rec, run.slot, out))?;
        }
        Ok(holes)
    }

    /// Fills `buf` from memory where it can (holes, open and sealing stripes) and returns the runs of blocks to
    /// read from the locations.
    fn resolve(&self, lba: u64, buf: &mut [u8]) -> Result<(Vec<Run>, Vec<bool>)> {
        let mut st = self.lock()?;
        let mut runs: Vec<Run> = Vec::new();
        let mut holes = Vec::with_capacity(buf.len() / BLOCK);
        for (i, block) in buf.chunks_exact_mut(BLOCK).enumerate() {
            self.ensure_page(&mut st, lba + i as u64)?;
            let e = st.map.get(lba + i as u64).ok_or_else(|| Error::internal("map page vanished"))?;
            let mem = if e.is_hole() {
                None
            } else if e.seq == st.next_seq {
                st.open.block(e.slot)
            } else {
                st.sealing.get(&e.seq).and_then(|s| s.block(e.slot))
            };
            holes.push(e.is_hole());
            match (e.is_hole(), mem) {
                (true, _) => block.fill(0),
                (false, Some(b)) => block.copy_from_slice(b),
                (false, None) => match runs.last_mut() {
                    Some(r) if r.seq == e.seq && r.slot + r.len as u32 == e.slot && r.at + r.len == i => r.len += 1,
                    _ => runs.push(Run { at: i, seq: e.seq, slot: e.slot, len: 1 }),
                },
            }
        }
        Ok((runs, holes))
    }

    /// The record of a stored stripe, from the cache or its shards.
    fn record(&self, seq: u64) -> Result<Arc<RecordBody>> {
        let info = {
            let st = self.lock()?;
            if let Some(r) = st.records.get(&seq) {
                return Ok(Arc::clone(r));
            }
            *st.stripes.get(&seq).ok_or_else(|| Error::object_not_found(format!("log stripe {seq}")))?
        };
        let rec = Arc::new(stripe_io::fetch_record(&self.store, &self.layout, &info)?);
        let mut st = self.lock()?;
        remember_record(&mut st, &self.opts, Arc::clone(&rec));
        Ok(rec)
    }

    /// Which blocks hold data: `(lba, blocks, allocated)` runs covering `blocks` blocks from `lba`.
    pub fn block_status(&self, lba: u64, blocks: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.check_range(lba, blocks)?;
        let mut st = self.lock()?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for b in lba..lba + blocks {
            self.ensure_page(&mut st, b)?;
            let allocated = !st.map.get(b).ok_or_else(|| Error::internal("map page vanished"))?.is_hole();
            match out.last_mut() {
                Some(last) if last.2 == allocated => last.1 += 1,
                _ => out.push((b, 1, allocated)),
            }
        }
        Ok(out)
    }

    /// Counters.
    pub fn stats(&self) -> Result<LogStats> {
        let st = self.lock()?;
        let stored = st.stripes.values().filter(|s| s.seq <= st.durable);
        let (mut stripes, mut blocks, mut live) = (0, 0, 0);
        for s in stored {
            stripes += 1;
            blocks += s.blocks as u64;
            live += s.live as u64;
        }
        Ok(LogStats { stripes, blocks, live_blocks: live, checkpoint_seq: st.ckpt.seq })
    }
}

/// A run of blocks to read from one stripe: `len` blocks at block `at` of the request, from slot `slot`.
struct Run {
    at: usize,
    seq: u64,
    slot: u32,
    len: usize,
}

fn remember_record(st: &mut State, opts: &LogOptions, rec: Arc<RecordBody>) {
    let seq = rec.seq;
    if st.records.insert(seq, rec).is_none() {
        st.record_order.push_back(seq);
    }
    while st.records.len() > opts.records.max(1) {
        match st.record_order.pop_front() {
            Some(old) => {
                st.records.remove(&old);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod journal_tests;
#[cfg(test)]
mod tests;
