//! The flush journal: short flushes write no stripe, survive crashes and the loss of m locations, are recovered
//! once, wrap around the ring, and serve concurrent flushers together.

use std::path::Path;
use std::sync::Arc;

use super::tests::*;
use super::*;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::testing::{test_bytes, MemLocation};

/// The first stripe number of a new log (every open skips some).
const FIRST: u64 = 1 + super::SKIPPED_AT_OPEN;

fn stripe_shards(mem: &[Arc<MemLocation>]) -> usize {
    mem.iter().map(|m| m.keys().unwrap().iter().filter(|k| k.contains("/log/")).count()).sum()
}

fn over(cds: &[Arc<Countdown>]) -> Vec<Arc<dyn Location>> {
    cds.iter().map(|c| c.clone() as Arc<dyn Location>).collect()
}

/// Writes `data` at `lba` into the model.
fn model_put(model: &mut Model, lba: u64, data: &[u8]) {
    for (i, b) in data.chunks_exact(BLOCK).enumerate() {
        model.blocks[lba as usize + i] = b.to_vec();
    }
}

/// Writes `data` at `lba` into the log and the model.
fn put(log: &BlockLog, model: &mut Model, lba: u64, data: &[u8]) {
    model_put(model, lba, data);
    log.write(lba, data, false).unwrap();
}

#[test]
fn short_flushes_go_to_the_journal_and_survive_a_crash_and_m_lost_locations() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let log = open(dir.path(), over(&cds));
    let mut model = Model::new();
    put(&log, &mut model, 100, &test_bytes(3 * BLOCK, 1));
    log.flush().unwrap();
    put(&log, &mut model, 500, &test_bytes(2 * BLOCK, 2));
    put(&log, &mut model, 101, &test_bytes(BLOCK, 3)); // overwrites a journaled block in the same open stripe
    log.flush().unwrap();
    log.zero(100, 1, false).unwrap();
    model.blocks[100] = vec![0; BLOCK];
    log.flush().unwrap();
    put(&log, &mut model, 502, &test_bytes(4 * BLOCK, 4)); // extends the extent at 500
    log.write(1000, &test_bytes(BLOCK, 5), true).unwrap(); // FUA
    model.blocks[1000] = test_bytes(BLOCK, 5);
    assert_eq!(stripe_shards(&mem), 0, "no stripe was sealed: the journal took every flush");
    log.write(1500, &test_bytes(BLOCK, 6), false).unwrap(); // never flushed
    Countdown::crash(&cds);
    drop(log);
    // Lose the first location that holds a journal copy (m = 1), then reopen: the journal's other copy serves.
    let holder = mem.iter().position(|m| m.keys().unwrap().iter().any(|k| k.ends_with("/journal"))).unwrap();
    mem[holder].delete_prefix("logvol").unwrap();
    let log = open(dir.path(), as_locations(&mem));
    let mut b = vec![0u8; BLOCK];
    log.read(1500, &mut b).unwrap();
    assert!(b == vec![0; BLOCK] || b == test_bytes(BLOCK, 6), "an unflushed block reads old or new");
    model.blocks[1500] = b;
    assert_reads(&log, &model);
    assert_eq!(log.stats().unwrap().stripes, 1, "the journaled writes were stored as one stripe");
    drop(log);
    // Recovered once: a second reopen finds the stripe and no journal entry of the current generation.
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
    assert_eq!(log.stats().unwrap().stripes, 1);
}

#[test]
fn many_short_flushes_wrap_the_ring_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let log = open(dir.path(), over(&cds));
    let mut model = Model::new();
    // 64 KiB ring, 16-block stripes: 300 one- and two-block flushes wrap it many times and fill stripes.
    for i in 0..300u64 {
        let n = 1 + i % 2;
        put(&log, &mut model, (i * 7) % (BLOCKS - 2), &test_bytes(n as usize * BLOCK, 1000 + i));
        log.flush().unwrap();
    }
    Countdown::crash(&cds);
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
}

#[test]
fn concurrent_flushers_share_journal_entries_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 3, 2, 5);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let log = open(dir.path(), over(&cds));
    // Four writers on their own blocks, each flushing after every write; what a flush acknowledged must stay.
    let acked: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let log = &log;
                s.spawn(move || {
                    let mut done = Vec::new();
                    for i in 0..60u64 {
                        let lba = t * 400 + (i * 13) % 400;
                        let data = test_bytes(BLOCK, t * 1000 + i);
                        log.write(lba, &data, false).unwrap();
                        log.flush().unwrap();
                        done.push((lba, data));
                    }
                    done
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    Countdown::crash(&cds);
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    let mut model = Model::new();
    for (lba, data) in acked.into_iter().flatten() {
        model.blocks[lba as usize] = data;
    }
    assert_reads(&log, &model);
}

#[test]
fn entries_put_back_after_a_recovery_are_not_replayed_over_newer_data() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let log = open(dir.path(), over(&cds));
    log.write(10, &test_bytes(2 * BLOCK, 1), true).unwrap();
    Countdown::crash(&cds);
    drop(log);
    // Keep the journal as the crash left it; the reopen recovers it and starts a new generation.
    let journal_key = crate::format::journal::journal_key(&[7; 16]);
    let holder = mem.iter().position(|m| m.keys().unwrap().contains(&journal_key)).unwrap();
    let old = mem[holder].get(&journal_key).unwrap();
    let log = open(dir.path(), as_locations(&mem));
    log.write(10, &test_bytes(2 * BLOCK, 2), false).unwrap();
    log.close().unwrap();
    drop(log);
    // The recovered entries put back behind the new header page: their stripe is stored, so they are dead.
    let mut stale = mem[holder].get(&journal_key).unwrap();
    let page = crate::format::journal::JOURNAL_ALIGN as usize;
    stale[page..].copy_from_slice(&old[page..]);
    mem[holder].put(&journal_key, &[&stale]).unwrap();
    let log = open(dir.path(), as_locations(&mem));
    let mut back = vec![0u8; 2 * BLOCK];
    log.read(10, &mut back).unwrap();
    assert!(back == test_bytes(2 * BLOCK, 2), "a stale journal entry was replayed over newer data");
}

/// A release signal shared by the gates of a store: `None` while held, `Some(pass)` once released, `pass`
/// naming the one location whose held writes then succeed (the others fail).
type Release = Arc<(std::sync::Mutex<Option<Option<usize>>>, std::sync::Condvar)>;

/// A location that holds back the shard writes of one stripe (or of every stripe) until released, then lets
/// them succeed on one chosen location and fail on the others (a slow disk that then dies). With
/// `refuse_others`, every other put fails at once (a crash while the log checkpoints).
#[derive(Debug)]
struct Gate {
    inner: Arc<MemLocation>,
    index: usize,
    /// The stripe whose shards are held; `None` for every stripe.
    seq: Option<u64>,
    refuse_others: bool,
    release: Release,
}

impl Gate {
    fn pass(&self, key: &str) -> Result<()> {
        let shard = key.contains("/log/");
        if !shard {
            return if self.refuse_others {
                Err(Error::io("gate", std::io::Error::other("power lost")))
            } else {
                Ok(())
            };
        }
        if self.seq.is_some_and(|seq| !key.contains(&format!("/{seq:016x}."))) {
            return Ok(());
        }
        let (lock, cv) = &*self.release;
        let mut g = lock.lock().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while g.is_none() {
            // Not forever: a flush that waits for a held stripe fails the test instead of hanging it.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::io("gate", std::io::Error::other("held too long")));
            }
            g = cv.wait_timeout(g, left).unwrap().0;
        }
        if *g == Some(Some(self.index)) {
            Ok(())
        } else {
            Err(Error::io("gate", std::io::Error::other("disk died")))
        }
    }
}

/// Gates over every location of `mem`, sharing one release.
fn gated(mem: &[Arc<MemLocation>], seq: Option<u64>, refuse_others: bool) -> (Vec<Arc<dyn Location>>, Release) {
    let release: Release = Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new()));
    let locs = mem
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let g = Gate { inner: m.clone(), index, seq, refuse_others, release: release.clone() };
            Arc::new(g) as Arc<dyn Location>
        })
        .collect();
    (locs, release)
}

/// Lets the held writes through on location `pass` only (`None`: on none).
fn release(r: &Release, pass: Option<usize>) {
    *r.0.lock().unwrap() = Some(pass);
    r.1.notify_all();
}

/// Waits until a stripe is being stored (its writer is held at the gate).
fn until_sealing(log: &BlockLog) {
    while log.lock().unwrap().sealing.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Journals 5 blocks of the first stripe (part 0) and returns the 11 blocks at 300 that fill it, already in the
/// model: the test writes them from a thread whose seal is held at the gate.
fn journal_then_fill(log: &BlockLog, model: &mut Model) -> Vec<u8> {
    put(log, model, 100, &test_bytes(5 * BLOCK, 1));
    log.flush().unwrap();
    let full = test_bytes(11 * BLOCK, 2);
    model_put(model, 300, &full);
    full
}

fn gated_log(dir: &Path, locs: Vec<Arc<dyn Location>>) -> Arc<BlockLog> {
    let opts = LogOptions { checkpoint_stripes: u64::MAX, journal_bytes: Some(256 << 10), ..opts() };
    BlockLog::open(store_over(dir, locs), &[7; 16], opts).unwrap()
}

impl Location for Gate {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.pass(key)?;
        self.inner.put(key, parts)
    }
    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.pass(key)?;
        self.inner.put_new(key, parts)
    }
    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        self.inner.preallocate(key, len)
    }
    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        self.inner.write_at(key, offset, parts)
    }
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.get_into(key, buf)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.inner.delete_prefix(prefix)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn probe(&self) -> Result<()> {
        self.inner.probe()
    }
}

/// A flush while a full stripe is still being stored journals the rest of that stripe too, instead of waiting
/// for it; when the stripe then never reaches the locations, reopening recovers it and the open stripe after it.
#[test]
fn a_flush_does_not_wait_for_a_stripe_being_stored_and_loses_nothing_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let (locs, gate) = gated(&mem, None, false);
    let log = gated_log(dir.path(), locs);
    let mut model = Model::new();
    let full = journal_then_fill(&log, &mut model);
    std::thread::scope(|s| {
        // This write fills stripe 1; its writer seals it and is held at the gate.
        let filler = s.spawn(|| log.write(300, &full, false));
        until_sealing(&log);
        put(&log, &mut model, 700, &test_bytes(2 * BLOCK, 3));
        log.flush().unwrap(); // the rest of stripe 1 (last part), then part 0 of stripe 2
        assert_eq!(stripe_shards(&mem), 0, "the flush returned before any stripe shard was written");
        release(&gate, None);
        assert!(filler.join().unwrap().is_ok(), "the filling write itself was not a flush");
    });
    assert!(log.flush().is_err(), "stripe 1 could not be stored: the log is read-only now");
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
    assert_eq!(log.stats().unwrap().stripes, 2, "stripe 1 and the open stripe after it, recovered");
}

/// Stripe 2 is stored before stripe 1 (out of order) while stripe 1 is only journaled: a flush must not count
/// stripe 2 as done, because replay stops at the missing stripe 1 and drops stripe 2. (It waits for stripe 1
/// instead; here stripe 1 fails, so the flush fails and nothing it covered was acknowledged.)
#[test]
fn a_stripe_stored_after_one_that_is_only_journaled_is_not_counted_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let (locs, gate) = gated(&mem, Some(FIRST), false);
    let log = gated_log(dir.path(), locs);
    let mut model = Model::new();
    let full = journal_then_fill(&log, &mut model);
    let mut unacked: Vec<u64> = Vec::new();
    std::thread::scope(|s| {
        let filler = s.spawn(|| log.write(300, &full, false)); // fills stripe 1, held at the gate
        until_sealing(&log);
        put(&log, &mut model, 800, &test_bytes(16 * BLOCK, 3)); // fills stripe 2: stored at once
        assert!(log.lock().unwrap().finished.contains(&(FIRST + 1)), "stripe 2 stored before stripe 1");
        put(&log, &mut model, 700, &test_bytes(2 * BLOCK, 4)); // open stripe 3
        let flusher = s.spawn(|| log.flush());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!flusher.is_finished(), "the flush waits for stripe 1");
        release(&gate, None);
        let _ = filler.join().unwrap();
        if flusher.join().unwrap().is_err() {
            unacked.extend((300..311).chain(700..702).chain(800..816));
        }
    });
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    for b in unacked {
        // Not acknowledged: old (zeros) or new.
        let mut got = vec![0u8; BLOCK];
        log.read(b, &mut got).unwrap();
        assert!(got == vec![0; BLOCK] || got == model.blocks[b as usize], "unacknowledged block {b} is garbage");
        model.blocks[b as usize] = got;
    }
    assert_reads(&log, &model);
}

/// A torn stripe at the tail (one shard, below k) plus journal entries for it and the stripe after it: the
/// reopen recovers them as new stripes, then crashes while checkpointing. The next reopen must still have them
/// (the journal generation moves on only after that checkpoint).
#[test]
fn a_crash_while_the_reopen_checkpoints_a_recovery_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let (locs, gate) = gated(&mem, Some(FIRST), false);
    let log = gated_log(dir.path(), locs);
    let mut model = Model::new();
    let full = journal_then_fill(&log, &mut model);
    std::thread::scope(|s| {
        let filler = s.spawn(|| log.write(300, &full, false));
        until_sealing(&log);
        put(&log, &mut model, 700, &test_bytes(2 * BLOCK, 4));
        log.flush().unwrap(); // the rest of stripe 1 and part 0 of stripe 2, journaled
        release(&gate, Some(0)); // one shard of stripe 1 lands
        let _ = filler.join().unwrap();
    });
    drop(log);
    assert_eq!(stripe_shards(&mem), 1, "a torn stripe 1 (one shard) is on the locations");
    let (crashing, _) = gated(&mem, Some(u64::MAX), true);
    assert!(BlockLog::open(store_over(dir.path(), crashing), &[7; 16], opts()).is_err(), "the checkpoint failed");
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
}

/// A crash left one shard (below k) of an interrupted stripe on a location that is missing at the next open;
/// writes acknowledged then must not be confused with it when the location comes back (stripe numbers are never
/// reused).
#[test]
fn a_shard_left_on_a_location_missing_at_open_is_never_taken_for_a_new_stripe() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let (locs, gate) = gated(&mem, Some(FIRST), false);
    let log = gated_log(dir.path(), locs);
    // The location of shard 0 (whose record replay reads first).
    let a = log.layout.home(&log.store, FIRST, 0);
    std::thread::scope(|s| {
        let filler = s.spawn(|| log.write(0, &test_bytes(16 * BLOCK, 1), false));
        until_sealing(&log);
        release(&gate, Some(a)); // only location a gets its shard: the stripe is not stored
        let _ = filler.join().unwrap();
    });
    drop(log);
    // Location a is missing (an empty stand-in) at the next open; new data is acknowledged.
    let mut locs = as_locations(&mem);
    locs[a] = Arc::new(MemLocation::new("stand-in"));
    let log = BlockLog::open(store_over(dir.path(), locs), &[7; 16], opts()).unwrap();
    let new = test_bytes(16 * BLOCK, 2);
    log.write(0, &new, true).unwrap();
    drop(log);
    // Location a is back, with its old shard; the reopen after that crash reads the acknowledged data.
    let log = open(dir.path(), as_locations(&mem));
    let mut back = vec![0u8; new.len()];
    log.read(0, &mut back).unwrap();
    assert!(back == new, "the acknowledged write was lost or mixed with the interrupted stripe");
}

/// An open stripe left full by an append that failed half-way is sealed before anything else is appended
/// (never a zero-length extent, never an over-full stripe).
#[test]
fn a_full_open_stripe_is_sealed_before_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    let mut model = Model::new();
    let full = test_bytes(16 * BLOCK, 1);
    model_put(&mut model, 0, &full);
    {
        // As a write whose append filled the stripe and then failed would leave it.
        let mut st = log.lock().unwrap();
        let hashes: Vec<BlockHash> = full.chunks_exact(BLOCK).map(block_hash).collect();
        let mut cipher = full.clone();
        log.xts.encrypt(&mut cipher, 0);
        let hashes_c: Vec<BlockHash> = cipher.chunks_exact(BLOCK).map(block_hash).collect();
        assert_ne!(hashes, hashes_c);
        log.append(&mut st, 0, &cipher, &hashes_c).unwrap();
    }
    put(&log, &mut model, 100, &test_bytes(3 * BLOCK, 2));
    log.flush().unwrap();
    assert!(log.lock().unwrap().open.blocks() <= 3);
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
}

/// More than m locations unreadable at open: the newest journal and checkpoint copies may be only there, so the
/// open refuses (a clear error naming them) instead of serving an older state without the flushed writes.
#[test]
fn an_open_with_more_than_m_locations_unreadable_refuses_rather_than_serve_an_older_state() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    let mut model = Model::new();
    put(&log, &mut model, 7, &test_bytes(2 * BLOCK, 9));
    log.flush().unwrap();
    assert_eq!(stripe_shards(&mem), 0, "the flush went to the journal");
    drop(log);
    let with_gone = |gone: &[usize]| -> Vec<Arc<dyn Location>> {
        mem.iter()
            .enumerate()
            .map(|(i, m)| {
                let f = crate::testing::fault::FaultyLocation::new(m.clone() as Arc<dyn Location>);
                f.set_gone(gone.contains(&i));
                Arc::new(f) as Arc<dyn Location>
            })
            .collect()
    };
    let err = BlockLog::open(store_over(dir.path(), with_gone(&[0, 1])), &[7; 16], opts()).map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::ReadQuorum { readable: 1, need: 2, .. }), "{err}");
    // With m gone (a journal holder) the flushed writes are there: journal and checkpoint have m+1 copies.
    let holder = mem.iter().position(|m| m.keys().unwrap().iter().any(|k| k.ends_with("/journal"))).unwrap();
    {
        let gone = holder;
        // The open stores the journaled blocks as a stripe: k shards accepted, as with m locations down.
        let mut st = Store::open(dir.path()).unwrap();
        st.set_locations(with_gone(&[gone])).unwrap();
        st.unlock(crate::store::read_key_file(&dir.path().join("master.key")).unwrap()).unwrap();
        st.set_min_shards_written(2).unwrap();
        let log = BlockLog::open(Arc::new(st), &[7; 16], opts()).unwrap();
        assert_reads(&log, &model);
    }
}
