//! The flush journal: short flushes write no stripe, survive crashes and the loss of m locations, are recovered
//! once, wrap around the ring, and serve concurrent flushers together.

use std::sync::Arc;

use super::tests::*;
use super::*;
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
