//! The log against a model: random I/O, reopen, crashes at random moments and after the n-th write of a flush
//! or checkpoint, lost and corrupt shards, and space reclaimed by overwrites and trims.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::location::Location;
use crate::store::read_key_file;
use crate::testing::{mem_store, test_bytes, MemLocation};

pub(super) const BLOCKS: u64 = 2048;

pub(super) fn opts() -> LogOptions {
    LogOptions {
        stripe_blocks: 16,
        map_pages: 1,
        records: 4,
        checkpoint_stripes: 6,
        max_sealing: 2,
        journal_bytes: Some(64 << 10),
    }
}

/// A store in `dir` whose locations are `locs` (the descriptor and key are the ones [`mem_store`] wrote).
pub(super) fn store_over(dir: &Path, locs: Vec<Arc<dyn Location>>) -> Arc<Store> {
    let mut st = Store::open(dir).unwrap();
    st.set_locations(locs).unwrap();
    st.unlock(read_key_file(&dir.join("master.key")).unwrap()).unwrap();
    Arc::new(st)
}

pub(super) fn new_log(dir: &Path, k: u16, m: u16, n: usize) -> Vec<Arc<MemLocation>> {
    let ms = mem_store(dir, k, m, n, crate::store::MIN_SEGMENT_SIZE).unwrap();
    let new = NewLog {
        vol_id: [7; 16],
        name_tag: [1; 32],
        size: BLOCKS * BLOCK as u64,
        stripe_blocks: opts().stripe_blocks,
        sealed_meta: (&[], [0; 12]),
    };
    BlockLog::create(&ms.store, &new).unwrap();
    ms.mem
}

pub(super) fn as_locations(mem: &[Arc<MemLocation>]) -> Vec<Arc<dyn Location>> {
    mem.iter().map(|m| m.clone() as Arc<dyn Location>).collect()
}

pub(super) fn open(dir: &Path, locs: Vec<Arc<dyn Location>>) -> Arc<BlockLog> {
    BlockLog::open(store_over(dir, locs), &[7; 16], opts()).unwrap()
}

/// The bytes every block should hold.
pub(super) struct Model {
    pub(super) blocks: Vec<Vec<u8>>,
}

impl Model {
    pub(super) fn new() -> Self {
        Model { blocks: vec![vec![0; BLOCK]; BLOCKS as usize] }
    }
}

/// One random operation, applied to the model and then the log; returns whether it was a completed flush.
/// Reads are checked against the model when `check` is set (not after a crash, when failed writes leave their
/// blocks old or new).
fn step(rng: &mut StdRng, log: &BlockLog, model: &mut Model, check: bool) -> Result<bool> {
    let lba = rng.gen_range(0..BLOCKS - 40);
    let n = rng.gen_range(1..40u64);
    match rng.gen_range(0..10) {
        0..=5 => {
            let data = test_bytes(n as usize * BLOCK, rng.gen());
            for (i, b) in data.chunks_exact(BLOCK).enumerate() {
                model.blocks[lba as usize + i] = b.to_vec();
            }
            log.write(lba, &data, rng.gen_range(0..20) == 0)?;
        }
        6 => {
            for i in 0..n {
                model.blocks[(lba + i) as usize] = vec![0; BLOCK];
            }
            log.zero(lba, n, false)?;
        }
        7 => {
            log.flush()?;
            return Ok(true);
        }
        _ if check => {
            let mut buf = vec![0u8; n as usize * BLOCK];
            log.read(lba, &mut buf)?;
            for (i, b) in buf.chunks_exact(BLOCK).enumerate() {
                assert!(b == model.blocks[lba as usize + i].as_slice(), "block {} differs", lba as usize + i);
            }
        }
        _ => {}
    }
    Ok(false)
}

pub(super) fn assert_reads(log: &BlockLog, model: &Model) {
    let mut buf = vec![0u8; BLOCKS as usize * BLOCK];
    log.read(0, &mut buf).unwrap();
    for (i, b) in buf.chunks_exact(BLOCK).enumerate() {
        assert!(b == model.blocks[i].as_slice(), "block {i} differs");
    }
}

#[test]
fn random_io_matches_the_model_across_checkpoints_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 3, 2, 5);
    let mut model = Model::new();
    let mut rng = StdRng::seed_from_u64(1);
    for round in 0..3 {
        let log = open(dir.path(), as_locations(&mem));
        for _ in 0..300 {
            step(&mut rng, &log, &mut model, true).unwrap();
        }
        assert_reads(&log, &model);
        log.checkpoint().unwrap();
        assert_reads(&log, &model);
        if round < 2 {
            log.close().unwrap();
        }
        // The last round ends without a close: the reopen below replays.
    }
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
    let s = log.stats().unwrap();
    let live = model.blocks.iter().filter(|b| b.iter().any(|x| *x != 0)).count() as u64;
    assert!(s.live_blocks >= live, "{s:?} vs {live} nonzero blocks");
}

/// Crashes (every location stops accepting anything at once) at a random moment, then reopens on the same
/// bytes: every block reads as of the last completed flush or later.
#[test]
fn a_crash_keeps_everything_flushed() {
    for seed in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let mem = new_log(dir.path(), 2, 1, 3);
        let countdowns: Vec<Arc<Countdown>> = Countdown::wrap(&mem, i64::MAX);
        let log = open(dir.path(), countdowns.iter().map(|c| c.clone() as Arc<dyn Location>).collect());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::new();
        let mut flushed = Model::new();
        let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); BLOCKS as usize];
        let crash_at = rng.gen_range(20..400);
        for i in 0..400 {
            if i == crash_at {
                Countdown::crash(&countdowns);
            }
            if let Ok(true) = step(&mut rng, &log, &mut model, i < crash_at) {
                flushed.blocks = model.blocks.clone();
                since.iter_mut().for_each(Vec::clear);
            }
            for (b, v) in model.blocks.iter().enumerate() {
                if *v != flushed.blocks[b] && since[b].last() != Some(v) {
                    since[b].push(v.clone());
                }
            }
        }
        drop(log);
        let log = open(dir.path(), as_locations(&mem));
        let mut buf = vec![0u8; BLOCKS as usize * BLOCK];
        log.read(0, &mut buf).unwrap();
        for (b, got) in buf.chunks_exact(BLOCK).enumerate() {
            let ok = got == flushed.blocks[b].as_slice() || since[b].iter().any(|v| v.as_slice() == got);
            assert!(ok, "seed {seed}: block {b} holds neither its flushed nor a later value");
        }
    }
}

/// A location that stops storing anything after a shared budget of puts (a machine losing power in the middle
/// of an operation): puts, deletes and syncs fail from then on.
#[derive(Debug)]
pub(super) struct Countdown {
    inner: Arc<MemLocation>,
    budget: Arc<AtomicI64>,
}

impl Countdown {
    pub(super) fn wrap(mem: &[Arc<MemLocation>], puts: i64) -> Vec<Arc<Countdown>> {
        let budget = Arc::new(AtomicI64::new(puts));
        mem.iter().map(|m| Arc::new(Countdown { inner: m.clone(), budget: budget.clone() })).collect()
    }

    /// Lets `puts` more puts through, from now on.
    pub(super) fn allow(all: &[Arc<Countdown>], puts: i64) {
        all[0].budget.store(puts, Ordering::SeqCst);
    }

    pub(super) fn crash(all: &[Arc<Countdown>]) {
        all[0].budget.store(0, Ordering::SeqCst);
    }

    fn spend(&self) -> Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            self.budget.store(0, Ordering::SeqCst);
            return Err(Error::io("crashed", std::io::Error::other("power lost")));
        }
        Ok(())
    }

    fn alive(&self) -> Result<()> {
        if self.budget.load(Ordering::SeqCst) <= 0 {
            return Err(Error::io("crashed", std::io::Error::other("power lost")));
        }
        Ok(())
    }
}

impl Location for Countdown {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.spend()?;
        self.inner.put(key, parts)
    }
    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.spend()?;
        self.inner.put_new(key, parts)
    }
    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        self.spend()?;
        self.inner.preallocate(key, len)
    }
    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        self.spend()?;
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
        self.alive()?;
        self.inner.delete(key)
    }
    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.alive()?;
        self.inner.delete_prefix(prefix)
    }
    fn sync(&self) -> Result<()> {
        self.alive()?;
        self.inner.sync()
    }
    fn probe(&self) -> Result<()> {
        self.inner.probe()
    }
}

/// A crash after each n-th put of a fixed workload with flushes and checkpoints: the reopened log reads as of
/// the last completed flush or later, and a second reopen reads the same.
#[test]
fn a_crash_after_every_nth_put_keeps_everything_flushed() {
    for n in 0..120i64 {
        let dir = tempfile::tempdir().unwrap();
        let mem = new_log(dir.path(), 2, 1, 3);
        let cds = Countdown::wrap(&mem, i64::MAX);
        let log = BlockLog::open(
            store_over(dir.path(), cds.iter().map(|c| c.clone() as Arc<dyn Location>).collect()),
            &[7; 16],
            LogOptions { checkpoint_stripes: u64::MAX, ..opts() },
        )
        .unwrap();
        // The budget counts from the workload on (crashes during an open have their own tests).
        Countdown::allow(&cds, n);
        let mut flushed: Vec<u8> = vec![0; BLOCKS as usize * BLOCK];
        // Every value a block was given since the last completed flush (a failed write may or may not stick).
        let mut since: Vec<Vec<u8>> = Vec::new();
        let mut latest = flushed.clone();
        for round in 0..6u64 {
            let lba = round * 24 % (BLOCKS - 40);
            let data = test_bytes(30 * BLOCK, n as u64 * 100 + round);
            latest[lba as usize * BLOCK..lba as usize * BLOCK + data.len()].copy_from_slice(&data);
            since.push(latest.clone());
            if log.write(lba, &data, false).is_err() {
                break;
            }
            if round % 2 == 1 {
                latest[(lba as usize + 3) * BLOCK..(lba as usize + 5) * BLOCK].fill(0);
                since.push(latest.clone());
                if log.zero(lba + 3, 2, false).is_err() {
                    break;
                }
            }
            // Rounds 1 and 3 end in a checkpoint, round 4 in a cleaning of the half-dead stripes and a flush,
            // round 5 in the checkpoint that deletes the cleaned stripes.
            let done = match round {
                1 | 3 | 5 => log.checkpoint(),
                4 => log.clean(u64::MAX).and_then(|_| log.flush()),
                _ => log.flush(),
            };
            if done.is_err() {
                break;
            }
            flushed = latest.clone();
            since.clear();
        }
        drop(log);
        for reopen in 0..2 {
            let log = open(dir.path(), as_locations(&mem));
            let mut buf = vec![0u8; BLOCKS as usize * BLOCK];
            log.read(0, &mut buf).unwrap();
            for b in 0..BLOCKS as usize {
                let got = &buf[b * BLOCK..(b + 1) * BLOCK];
                let range = b * BLOCK..(b + 1) * BLOCK;
                let ok = got == &flushed[range.clone()] || since.iter().any(|v| got == &v[range.clone()]);
                assert!(ok, "crash after {n} puts, reopen {reopen}: block {b} lost a flushed write");
            }
        }
    }
}

#[test]
fn reads_survive_m_lost_locations_and_corrupt_shards() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 3, 2, 5);
    let mut model = Model::new();
    let mut rng = StdRng::seed_from_u64(9);
    let log = open(dir.path(), as_locations(&mem));
    for _ in 0..200 {
        step(&mut rng, &log, &mut model, true).unwrap();
    }
    log.close().unwrap();
    drop(log);
    // Flip a byte in the data part of every shard on location 0; delete everything on location 1.
    for key in mem[0].keys().unwrap().into_iter().filter(|k| k.contains("/log/")) {
        let mut b = mem[0].get(&key).unwrap();
        if b.len() > HEADER_LEN_FOR_TESTS + 10 {
            b[HEADER_LEN_FOR_TESTS + 5] ^= 1;
            mem[0].put(&key, &[&b]).unwrap();
        }
    }
    mem[1].delete_prefix("logvol").unwrap();
    let store = store_over(dir.path(), as_locations(&mem));
    let log = BlockLog::open(store.clone(), &[7; 16], opts()).unwrap();
    assert_reads(&log, &model);
    // The reads rebuilt stripes from parity, each time finding a shard missing or corrupt, and lost none.
    let c = store.read_stats().counts();
    let (missing, corrupt) = (c.shards(ShardFailure::Missing), c.shards(ShardFailure::Corrupt));
    assert!(c.stripes_rebuilt > 0 && missing > 0 && corrupt > 0, "{c:?}");
    assert!(missing + corrupt >= c.stripes_rebuilt && c.stripes_lost == 0, "{c:?}");
    // A third loss is beyond repair for some stripe: an error, never wrong bytes.
    mem[2].delete_prefix("logvol").unwrap();
    let store = store_over(dir.path(), as_locations(&mem));
    let log2 = BlockLog::open(store.clone(), &[7; 16], opts()).unwrap();
    let mut buf = vec![0u8; BLOCKS as usize * BLOCK];
    match log2.read(0, &mut buf) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::DataLost, "{e}"),
        Ok(()) => panic!("read succeeded with three of five shards gone"),
    }
    assert!(store.read_stats().counts().stripes_lost >= 1, "the failed read counted a stripe lost");
}

use crate::metrics::reads::ShardFailure;

const HEADER_LEN_FOR_TESTS: usize = crate::format::shard::HEADER_LEN;

#[test]
fn overwrites_and_trims_give_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    let data = test_bytes(256 * BLOCK, 3);
    for _ in 0..5 {
        log.write(0, &data, false).unwrap();
    }
    log.checkpoint().unwrap();
    let s = log.stats().unwrap();
    assert_eq!(s.live_blocks, 256);
    assert_eq!(s.blocks, 256, "whole overwrites leave no dead stripe behind: {s:?}");
    log.zero(0, BLOCKS, false).unwrap();
    log.checkpoint().unwrap();
    let s = log.stats().unwrap();
    assert_eq!((s.blocks, s.live_blocks), (0, 0), "{s:?}");
    let objects: usize = mem.iter().map(|m| m.keys().unwrap().iter().filter(|k| k.contains("/log/")).count()).sum();
    assert_eq!(objects, 0, "dead stripes are deleted once a checkpoint covers them");
    let mut buf = vec![1u8; 4 * BLOCK];
    log.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(log.block_status(0, 8).unwrap(), vec![(0, 8, false)]);
}

#[test]
fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    assert_eq!(log.write(BLOCKS, &[0; BLOCK], false).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(log.write(0, &[0; 100], false).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let mut buf = [0u8; BLOCK];
    assert_eq!(log.read(u64::MAX, &mut buf).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(log.zero(BLOCKS - 1, 2, false).unwrap_err().kind(), ErrorKind::OutOfRange);
    // A wrong key cannot open the log.
    let mut st = Store::open(dir.path()).unwrap();
    st.set_locations(as_locations(&mem)).unwrap();
    assert!(st.unlock(crate::codec::crypto::MasterKey::from_bytes([3; 32])).is_err());
}

#[test]
fn the_cleaner_bounds_space_under_random_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = BlockLog::open(
        store_over(dir.path(), as_locations(&mem)),
        &[7; 16],
        LogOptions { checkpoint_stripes: u64::MAX, ..opts() },
    )
    .unwrap();
    let mut model = Model::new();
    let mut rng = StdRng::seed_from_u64(4);
    let region = 512u64;
    for round in 0..3 {
        for _ in 0..region {
            let lba = rng.gen_range(0..region);
            let data = test_bytes(BLOCK, rng.gen());
            log.write(lba, &data, false).unwrap();
            model.blocks[lba as usize] = data;
        }
        log.checkpoint().unwrap();
        let before = log.stats().unwrap();
        while log.clean(u64::MAX).unwrap() > 0 {
            log.checkpoint().unwrap();
        }
        log.checkpoint().unwrap();
        let after = log.stats().unwrap();
        assert!(after.live_blocks == before.live_blocks, "round {round}: {before:?} -> {after:?}");
        assert!(
            after.blocks <= 2 * after.live_blocks + opts().stripe_blocks as u64,
            "round {round}: the cleaner left {after:?} (before {before:?})"
        );
        assert_reads(&log, &model);
    }
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), as_locations(&mem));
    assert_reads(&log, &model);
}

/// Sustained random overwrite with no help from the caller: the background cleaner, and writers waiting for it
/// when it falls behind, keep the stripes within about twice the live blocks at every moment.
#[test]
fn writers_wait_for_the_cleaner_so_space_stays_bounded_at_all_times() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    let mut model = Model::new();
    let mut rng = StdRng::seed_from_u64(9);
    let region = 512u64;
    let stripe = opts().stripe_blocks as u64;
    let mut worst = 0.0f64;
    for i in 0..8 * region {
        let lba = rng.gen_range(0..region);
        let data = test_bytes(BLOCK, rng.gen());
        log.write(lba, &data, false).unwrap();
        model.blocks[lba as usize] = data;
        if i % 16 == 0 && i > 2 * region {
            // Every stripe, as the writers' bound counts them (stats() leaves out the ones not stored yet).
            let (blocks, live) = BlockLog::space(&log.lock().unwrap());
            // The bound writers wait at, plus the stripes being filled and stored meanwhile, plus a cleaning
            // round (its victims live on until the checkpoint after it).
            let slack = (4 + 2 + opts().max_sealing as u64) as f64 * stripe as f64;
            let bound = 1.9 * live as f64 + slack + log.clean_budget() as f64;
            worst = worst.max(blocks as f64 / live as f64);
            assert!(blocks as f64 <= bound, "write {i}: {blocks} blocks, {live} live, over {bound}");
        }
    }
    assert!(worst > 1.2, "the overwrite made garbage ({worst:.2} x live at worst)");
    assert_reads(&log, &model);
}

/// A crash that left a stripe with only k of its k+m shards: replay keeps it (it is readable) and gives it its
/// redundancy back, so losing m locations afterwards loses nothing.
#[test]
fn replay_restores_a_stripe_left_with_k_shards() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let locs = cds.iter().map(|c| c.clone() as Arc<dyn Location>).collect();
    // No journal: the two puts the budget allows are two shards of the stripe the flush seals.
    let log = BlockLog::open(store_over(dir.path(), locs), &[7; 16], LogOptions { journal_bytes: Some(0), ..opts() })
        .unwrap();
    Countdown::allow(&cds, 2);
    let data = test_bytes(16 * BLOCK, 77);
    log.write(0, &data, false).unwrap();
    assert!(log.flush().is_err(), "2 of 3 shards is below the write policy (k+1)");
    drop(log);
    let shards = |mem: &[Arc<MemLocation>]| -> usize {
        mem.iter().map(|m| m.keys().unwrap().iter().filter(|k| k.contains("/log/")).count()).sum()
    };
    assert_eq!(shards(&mem), 2);
    let log = open(dir.path(), as_locations(&mem));
    assert_eq!(shards(&mem), 3, "the missing shard was rebuilt at replay");
    drop(log);
    mem[1].delete_prefix("logvol").unwrap();
    let log = open(dir.path(), as_locations(&mem));
    let mut back = vec![0u8; data.len()];
    log.read(0, &mut back).unwrap();
    assert!(back == data);
}

/// Shards written in place can be torn by a crash (a prefix of the object, or holes after a power loss): replay
/// verifies the last stripes whole and drops one with fewer than k good shards instead of serving errors.
#[test]
fn replay_drops_a_stripe_whose_shards_are_torn() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let log = open(dir.path(), as_locations(&mem));
    let old = test_bytes(16 * BLOCK, 1);
    log.write(0, &old, true).unwrap();
    // The second stripe stands for one a crash interrupted (acknowledged here only to get it written).
    let second = log.lock().unwrap().next_seq;
    log.write(0, &test_bytes(16 * BLOCK, 2), true).unwrap();
    drop(log);
    // Tear two of the three shards of the second stripe: one truncated, one with its payload zeroed.
    let second: Vec<(usize, String)> = mem
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            m.keys().unwrap().into_iter().filter(|k| k.contains(&format!("{:016x}.", second))).map(move |k| (i, k))
        })
        .collect();
    assert_eq!(second.len(), 3);
    let (i, k) = &second[0];
    let b = mem[*i].get(k).unwrap();
    mem[*i].put(k, &[&b[..b.len() / 2]]).unwrap();
    let (i, k) = &second[1];
    let mut b = mem[*i].get(k).unwrap();
    let n = b.len();
    b[HEADER_LEN_FOR_TESTS..n - 2000].fill(0);
    mem[*i].put(k, &[&b]).unwrap();
    let log = open(dir.path(), as_locations(&mem));
    let mut back = vec![0u8; old.len()];
    log.read(0, &mut back).unwrap();
    assert!(back == old, "the torn stripe is dropped; the flushed one before it stays");
}

/// Map page copies no checkpoint references (from a checkpoint a crash interrupted) are deleted when the reopen
/// after the crash has written its checkpoint; referenced ones stay.
#[test]
fn a_reopen_after_a_crash_deletes_unreferenced_map_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_log(dir.path(), 2, 1, 3);
    let cds = Countdown::wrap(&mem, i64::MAX);
    let log = open(dir.path(), cds.iter().map(|c| c.clone() as Arc<dyn Location>).collect());
    let data = test_bytes(40 * BLOCK, 5);
    log.write(0, &data, false).unwrap();
    log.checkpoint().unwrap();
    log.write(100, &test_bytes(BLOCK, 6), true).unwrap();
    let stray = log_page_key(&[7; 16], 1, 999);
    for m in &mem {
        m.put(&stray, &[b"left by an interrupted checkpoint"]).unwrap();
    }
    Countdown::crash(&cds);
    drop(log);
    let pages = |mem: &[Arc<MemLocation>]| -> Vec<String> {
        mem.iter().flat_map(|m| m.keys().unwrap()).filter(|k| k.contains("/map/")).collect()
    };
    assert!(pages(&mem).contains(&stray));
    let log = open(dir.path(), as_locations(&mem));
    let left = pages(&mem);
    assert!(!left.contains(&stray), "{left:?}");
    assert!(!left.is_empty(), "the referenced pages stay");
    let mut back = vec![0u8; 40 * BLOCK];
    log.read(0, &mut back).unwrap();
    assert!(back == data);
}
