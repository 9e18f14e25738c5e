//! The flush journal: short flushes write no stripe, survive crashes and the loss of m locations, are recovered
//! once, wrap around the ring, and serve concurrent flushers together.

use std::sync::Arc;

use super::tests::*;
use super::*;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::testing::{test_bytes, MemLocation};

fn stripe_shards(mem: &[Arc<MemLocation>]) -> usize {
    mem.iter().map(|m| m.keys().unwrap().iter().filter(|k| k.contains("/log/")).count()).sum()
}

fn over(cds: &[Arc<Countdown>]) -> Vec<Arc<dyn Location>> {
    cds.iter().map(|c| c.clone() as Arc<dyn Location>).collect()
}

/// Writes `data` at `lba` into the log and the model.
fn put(log: &BlockLog, model: &mut Model, lba: u64, data: &[u8]) {
    for (i, b) in data.chunks_exact(BLOCK).enumerate() {
        model.blocks[lba as usize + i] = b.to_vec();
    }
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

/// Holds back, then fails, the stripe shard writes of its location (a slow disk that then dies).
#[derive(Debug)]
struct Gate {
    inner: Arc<MemLocation>,
    /// `None` while held; `Some(ok)` once released (shard writes then succeed or fail).
    open: Arc<(std::sync::Mutex<Option<bool>>, std::sync::Condvar)>,
}

impl Gate {
    fn pass(&self, key: &str) -> Result<()> {
        if !key.contains("/log/") {
            return Ok(());
        }
        let (lock, cv) = &*self.open;
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
        if *g == Some(true) {
            Ok(())
        } else {
            Err(Error::io("gate", std::io::Error::other("disk died")))
        }
    }
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
    let open_gate = Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new()));
    let gates: Vec<Arc<dyn Location>> =
        mem.iter().map(|m| Arc::new(Gate { inner: m.clone(), open: open_gate.clone() }) as Arc<dyn Location>).collect();
    let log = BlockLog::open(
        store_over(dir.path(), gates),
        &[7; 16],
        LogOptions { checkpoint_stripes: u64::MAX, journal_bytes: Some(256 << 10), ..opts() },
    )
    .unwrap();
    let mut model = Model::new();
    put(&log, &mut model, 100, &test_bytes(5 * BLOCK, 1));
    log.flush().unwrap(); // part 0 of stripe 1
    let full = test_bytes(11 * BLOCK, 2);
    for (i, b) in full.chunks_exact(BLOCK).enumerate() {
        model.blocks[300 + i] = b.to_vec();
    }
    std::thread::scope(|s| {
        // This write fills stripe 1; its writer seals it and is held at the gate.
        let filler = s.spawn(|| log.write(300, &full, false));
        while log.lock().unwrap().sealing.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        put(&log, &mut model, 700, &test_bytes(2 * BLOCK, 3));
        log.flush().unwrap(); // the rest of stripe 1 (last part), then part 0 of stripe 2
        assert_eq!(stripe_shards(&mem), 0, "the flush returned before any stripe shard was written");
        let (lock, cv) = &*open_gate;
        *lock.lock().unwrap() = Some(false);
        cv.notify_all();
        assert!(filler.join().unwrap().is_ok(), "the filling write itself was not a flush");
    });
    assert!(log.flush().is_err(), "stripe 1 could not be stored: the log is read-only now");
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
    assert_eq!(log.stats().unwrap().stripes, 2, "stripe 1 and the open stripe after it, recovered");
}
