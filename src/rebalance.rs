//! Rebalance: moving every shard to its home under the current layout of locations.
//!
//! A shard's home follows from its name alone ([`Store::home`]: the file, pack or volume id, the stripe and the
//! shard number, over the active locations), so a rebalance needs no key and no catalog: it lists each
//! location's shard objects and moves the ones that are not at home. That covers a location added (shards move
//! onto it), a location being drained by `bf location remove` (every shard moves off it) and shards a repair
//! had to put on a foreign location while their home was away.
//!
//! A move copies the shard, checked against its own header (store, id, stripe, shard number, payload hash), to
//! its home, makes it durable and reads it back, then deletes the copy it came from. A damaged shard is left
//! where it is for `bf scrub --repair`. Reads look at home first and then everywhere else
//! ([`Store::from_holders`], [`crate::stripe`]), so a shard is readable at every moment of its move. When the
//! source disappears during the copy (its file was removed or its log stripe cleaned meanwhile), the copy made
//! at home is deleted again. A rebalance is idempotent: cut it at any point and run it again.
//!
//! Replicated objects (manifests, catalog records, checkpoints, map pages) are not moved: every active location
//! holds them, and `bf scrub --repair` writes the copies a new location lacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::format::log::{log_prefix, parse_stripe_name};
use crate::format::shard::{ShardHeader, HEADER_LEN};
use crate::format::volume::{parse_shard_name as parse_cow_name, volume_prefix};
use crate::location::LocationExt;
use crate::scrub::Throttle;
use crate::store::{parse_shard_dir, parse_shard_name, shard_prefix, Store, SHARDS_DIR};

/// How a rebalance runs.
#[derive(Clone, Debug)]
pub struct RebalanceOptions {
    /// Shards moved in parallel.
    pub workers: usize,
    /// Throttle, in shard bytes moved per second.
    pub rate_bytes_per_sec: Option<u64>,
    /// Only count what would move.
    pub dry_run: bool,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        RebalanceOptions { workers: 4, rate_bytes_per_sec: None, dry_run: false }
    }
}

/// What a rebalance did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RebalanceReport {
    /// Shard objects looked at.
    pub shards_seen: u64,
    /// Shards moved home (or that would move, in a dry run).
    pub moved: u64,
    /// Their bytes.
    pub bytes_moved: u64,
    /// Away copies deleted because home already held a good copy.
    pub duplicates_dropped: u64,
    /// Shards left where they are: damaged, or home could not take them (see `errors`).
    pub left: u64,
    /// What went wrong, one line each.
    pub errors: Vec<String>,
    /// Seconds taken.
    pub seconds: f64,
}

/// The kinds of striped objects, by where their shards live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `shards/<id>/<segment>.<shard>`: files and packs.
    File,
    /// `logvol/<id>/log/<dir>/<seq>.<shard>`: log-structured volumes.
    Log,
    /// `volumes/<id>/s/<dir>/<stripe>-<gen>.<shard>`: copy-on-write volumes.
    Cow,
}

/// One shard object found on a location.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    key: String,
    id: [u8; 16],
    stripe: u64,
    shard: usize,
    kind: Kind,
}

impl Found {
    fn home(&self, store: &Store) -> usize {
        match self.kind {
            Kind::File | Kind::Log => store.home(&self.id, self.stripe, self.shard),
            Kind::Cow => store.cow_home(&self.id, self.stripe, self.shard),
        }
    }
}

/// Parses the id of a directory named by its hex id.
fn parse_id(name: &str) -> Option<[u8; 16]> {
    parse_shard_dir(name)
}

/// Moves every shard of the store to its home location; `progress` is called after each batch.
pub fn rebalance(
    store: &Store,
    opts: &RebalanceOptions,
    progress: &(dyn Fn(&RebalanceReport) + Sync),
) -> Result<RebalanceReport> {
    let start = Instant::now();
    let mut report = RebalanceReport::default();
    let throttle = Throttle { rate: opts.rate_bytes_per_sec, start, done: AtomicU64::new(0) };
    for from in 0..store.locations().len() {
        for batch in Batches::new(store, from)? {
            let batch = batch?;
            report.shards_seen += batch.len() as u64;
            let away: Vec<Found> = batch.into_iter().filter(|f| f.home(store) != from).collect();
            if opts.dry_run {
                report.moved += away.len() as u64;
                continue;
            }
            let outcomes = move_all(store, from, &away, opts.workers.max(1), &throttle);
            for (f, o) in away.iter().zip(outcomes) {
                match o {
                    Ok(Moved::Copied(bytes)) => {
                        report.moved += 1;
                        report.bytes_moved += bytes;
                    }
                    Ok(Moved::Duplicate) => report.duplicates_dropped += 1,
                    Ok(Moved::Vanished) => {}
                    Err(e) => {
                        report.left += 1;
                        report.errors.push(format!("{} on {}: {e}", f.key, store.locations()[from].name()));
                    }
                }
            }
            report.seconds = start.elapsed().as_secs_f64();
            progress(&report);
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The shard objects on location `from` that are not at home (a check for `bf location remove` before it
/// forgets a drained location: nothing may be left on it).
pub fn shards_on(store: &Store, from: usize) -> Result<u64> {
    let mut n = 0;
    for batch in Batches::new(store, from)? {
        n += batch?.len() as u64;
    }
    Ok(n)
}

/// The shard objects of one location, one object directory (a file's shards, 4096 log stripes, 1024 volume
/// stripes) at a time, so memory stays bounded by the largest directory.
struct Batches<'a> {
    store: &'a Store,
    from: usize,
    /// Directories still to list, with what they hold.
    dirs: Vec<(String, [u8; 16], Kind)>,
}

impl<'a> Batches<'a> {
    fn new(store: &'a Store, from: usize) -> Result<Self> {
        let loc = &store.locations()[from];
        let mut dirs = Vec::new();
        for name in loc.list(SHARDS_DIR)? {
            if let Some(id) = parse_id(&name) {
                dirs.push((shard_prefix(&id), id, Kind::File));
            }
        }
        for name in loc.list("logvol")? {
            let Some(id) = parse_id(&name) else { continue };
            let base = format!("{}/log", log_prefix(&id));
            for d in loc.list(&base)? {
                dirs.push((format!("{base}/{d}"), id, Kind::Log));
            }
        }
        for name in loc.list("volumes")? {
            let Some(id) = parse_id(&name) else { continue };
            let base = format!("{}/s", volume_prefix(&id));
            for d in loc.list(&base)? {
                dirs.push((format!("{base}/{d}"), id, Kind::Cow));
            }
        }
        dirs.reverse();
        Ok(Batches { store, from, dirs })
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Vec<Found>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (dir, id, kind) = self.dirs.pop()?;
        let names = match self.store.locations()[self.from].list(&dir) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(names.iter().filter_map(|name| parse_found(&dir, name, id, kind)).collect()))
    }
}

/// The shard an object name in `dir` stands for, if it is one.
fn parse_found(dir: &str, name: &str, id: [u8; 16], kind: Kind) -> Option<Found> {
    let (stripe, shard) = match kind {
        Kind::File => parse_shard_name(name).map(|(s, i)| (s, i as usize))?,
        Kind::Log => parse_stripe_name(name)?,
        Kind::Cow => parse_cow_name(name).map(|(s, _, i)| (s, i))?,
    };
    Some(Found { key: format!("{dir}/{name}"), id, stripe, shard, kind })
}

/// What moving one shard came to.
enum Moved {
    /// Copied home and deleted where it was; its size.
    Copied(u64),
    /// Home already had a good copy: the away copy was deleted.
    Duplicate,
    /// The shard was deleted (by a removal or a cleaner) while it was being moved; nothing is left of it.
    Vanished,
}

/// Moves `shards` off location `from`, `workers` at a time; one outcome per shard, in order.
fn move_all(store: &Store, from: usize, shards: &[Found], workers: usize, throttle: &Throttle) -> Vec<Result<Moved>> {
    let next = AtomicU64::new(0);
    let outcomes: Mutex<Vec<Option<Result<Moved>>>> = Mutex::new((0..shards.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.min(shards.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(f) = shards.get(i) else { break };
                let r = move_one(store, from, f, throttle);
                if let Ok(mut o) = outcomes.lock() {
                    o[i] = Some(r);
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_default();
    outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(Error::internal("shard mover stopped")))).collect()
}

/// Moves one shard home: checked copy, durable write, read back, then the away copy deleted.
fn move_one(store: &Store, from: usize, f: &Found, throttle: &Throttle) -> Result<Moved> {
    let locs = store.locations();
    let (src, dst) = (&locs[from], &locs[f.home(store)]);
    let bytes = match src.get(&f.key) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(Moved::Vanished),
        Err(e) => return Err(e),
    };
    check_shard(store, f, &bytes)?;
    let home_good = dst.get(&f.key).is_ok_and(|b| b == bytes);
    if !home_good {
        throttle.consume(bytes.len() as u64);
        dst.put(&f.key, &[&bytes])?;
        dst.sync()?;
        if dst.get(&f.key)? != bytes {
            return Err(Error::corrupt(format!("{} moved to {}", f.key, dst.name()), "read back wrong"));
        }
        // Deleted while it was copied (a removal or the log cleaner went past home before the copy landed):
        // the copy must not outlive it.
        if matches!(src.get_range(&f.key, 0, 1), Err(e) if e.is_not_found()) {
            dst.delete(&f.key)?;
            return Ok(Moved::Vanished);
        }
    }
    match src.delete(&f.key) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    src.sync()?;
    Ok(if home_good { Moved::Duplicate } else { Moved::Copied(bytes.len() as u64) })
}

/// Checks a shard object against its own header: this store, the id, stripe and shard its name gives, and the
/// payload's length and hash. No key or catalog is needed.
fn check_shard(store: &Store, f: &Found, bytes: &[u8]) -> Result<()> {
    let what = || format!("shard {}", f.key);
    let h = ShardHeader::decode(bytes)?;
    let payload = &bytes[HEADER_LEN.min(bytes.len())..];
    let names_it = h.store_id == store.descriptor().store_id
        && h.file_id == f.id
        && h.segment == f.stripe
        && h.shard as usize == f.shard;
    if !names_it {
        return Err(Error::corrupt(what(), "its header names another shard"));
    }
    if payload.len() != h.payload_len as usize || h.payload_hash != *blake3::hash(payload).as_bytes() {
        return Err(Error::corrupt(what(), "payload does not match its header"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::commit::CommitRequest;
    use crate::files::session::{Session, SessionOptions};
    use crate::location::Location;
    use crate::log::{BlockLog, LogOptions, NewLog};
    use crate::testing::{mem_store, test_bytes, MemLocation};
    use std::io::Cursor;
    use std::sync::Arc;

    const VOL: [u8; 16] = [9; 16];
    const BLOCK: usize = crate::format::log::BLOCK;

    fn scrub_repair(store: &Store) {
        let opts = crate::scrub::ScrubOptions { repair: true, ..Default::default() };
        let ctl = crate::scrub::RunControl { max_duration: None, total: None, progress: &|_| {} };
        let r = crate::scrub::run(store, &opts, crate::scrub::Selection::All, &ctl).unwrap().0;
        assert_eq!(r.health_after(), crate::scrub::Health::Healthy, "{r:#?}");
    }

    /// Files (one of several segments, small packed ones) and an empty log volume.
    fn fill(store: &Store) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        let mut s = Session::new(store, SessionOptions::default()).unwrap();
        for (i, len) in [3 * (256 << 10), 1000, 20_000, 0, 77].into_iter().enumerate() {
            let (name, bytes) = (format!("f{i}"), test_bytes(len, i as u64));
            let req = CommitRequest { name: name.clone(), size: Some(len as u64), workers: 2, ..Default::default() };
            s.commit(&mut Cursor::new(&bytes), &req, &|_| {}).unwrap();
            files.push((name, bytes));
        }
        for r in s.flush().unwrap() {
            r.unwrap();
        }
        let new = NewLog {
            vol_id: VOL,
            name_tag: [1; 32],
            size: 256 * BLOCK as u64,
            stripe_blocks: 16,
            sealed_meta: (&[], [0; 12]),
        };
        BlockLog::create(store, &new).unwrap();
        files
    }

    /// Writes the volume's blocks through a fresh open and returns them.
    fn write_volume(store: Arc<Store>) -> Vec<u8> {
        let log = BlockLog::open(store, &VOL, LogOptions::default()).unwrap();
        let bytes = test_bytes(200 * BLOCK, 42);
        log.write(0, &bytes, false).unwrap();
        log.flush().unwrap();
        bytes
    }

    fn read_volume(store: Arc<Store>) -> Vec<u8> {
        let log = BlockLog::open(store, &VOL, LogOptions::default()).unwrap();
        let mut out = vec![0u8; 200 * BLOCK];
        log.read(0, &mut out).unwrap();
        out
    }

    /// Every shard object of the store is on its home location.
    fn all_home(store: &Store) -> bool {
        let dry = RebalanceOptions { dry_run: true, ..Default::default() };
        rebalance(store, &dry, &|_| {}).unwrap().moved == 0
    }

    fn check_all(store: &Store, files: &[(String, Vec<u8>)], volume: &[u8]) {
        for (name, bytes) in files {
            assert_eq!(&crate::tests::get(store, name).unwrap(), bytes, "{name}");
        }
        assert!(read_volume(Arc::new(reopen(store))) == volume, "volume differs");
    }

    fn reopen(store: &Store) -> Store {
        let mut s = Store::open(store.dir()).unwrap();
        s.set_locations(store.locations().to_vec()).unwrap();
        s.unlock(store.key().unwrap().clone()).unwrap();
        s.set_min_shards_written(store.min_shards_written()).unwrap();
        s
    }

    /// The store with `lost` locations failing every operation.
    fn without(store: &Store, lost: &[usize]) -> Store {
        let mut s = reopen(store);
        let locs = (0..store.locations().len())
            .map(|i| {
                if lost.contains(&i) {
                    let gone =
                        crate::testing::fault::FaultyLocation::new(Arc::new(MemLocation::new(format!("lost-{i}"))));
                    gone.set_gone(true);
                    Arc::new(gone) as Arc<dyn Location>
                } else {
                    store.locations()[i].clone()
                }
            })
            .collect();
        s.set_locations(locs).unwrap();
        // Opening the volume writes (its journal is replayed into a stripe): as a user would with m locations
        // gone, accept writes of k shards.
        s.set_min_shards_written(s.descriptor().k as usize).unwrap();
        s
    }

    #[test]
    fn a_location_added_then_one_removed_leaves_every_shard_at_home_and_any_m_losable() {
        let dir = tempfile::tempdir().unwrap();
        let mut ms = mem_store(dir.path(), 4, 2, 6, crate::store::MIN_SEGMENT_SIZE).unwrap();
        let files = fill(&ms.store);
        let volume = write_volume(Arc::new(reopen(&ms.store)));
        assert!(all_home(&ms.store));

        // Added: most homes change; the shards are still read where they are, then moved.
        let fresh = Arc::new(MemLocation::new("mem-06"));
        let index = ms.store.add_location_with("mem-06".into(), "", fresh.clone()).unwrap();
        assert_eq!((index, ms.store.descriptor().ids.clone()), (6, (0..7).collect::<Vec<u32>>()));
        assert!(!all_home(&ms.store));
        check_all(&ms.store, &files, &volume);
        let r = rebalance(&ms.store, &RebalanceOptions::default(), &|_| {}).unwrap();
        assert!(r.moved > 0 && r.left == 0 && r.errors.is_empty(), "{r:?}");
        assert!(all_home(&ms.store));
        assert!(shards_on(&ms.store, 6).unwrap() > 0, "nothing moved onto the new location");
        // The volume's metadata copies for the new location come from a repairing scrub.
        scrub_repair(&ms.store);
        check_all(&ms.store, &files, &volume);

        // Removed: drained (nothing is its home any more), checked empty, forgotten.
        ms.store.start_draining(1).unwrap();
        assert!(!all_home(&ms.store));
        let more = write_volume(Arc::new(reopen(&ms.store)));
        assert_eq!(more, volume);
        rebalance(&ms.store, &RebalanceOptions::default(), &|_| {}).unwrap();
        assert_eq!(shards_on(&ms.store, 1).unwrap(), 0);
        scrub_repair(&ms.store);
        ms.store.exclusively(|st| st.forget_location(1)).unwrap();
        assert_eq!(ms.store.descriptor().ids, vec![0, 2, 3, 4, 5, 6]);
        assert!(all_home(&ms.store));
        // Written while it drained: nothing of it went to the draining location.
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.descriptor(), ms.store.descriptor(), "the descriptor read back differs");

        for lost in [[0, 1], [2, 5], [4, 3]] {
            check_all(&without(&ms.store, &lost), &files, &volume);
            // Opening the volume without them stored a stripe of k shards: rebuilt before the next loss.
            scrub_repair(&ms.store);
        }
        ms.mem.clear();
    }

    /// The indices of the locations in `zone`.
    fn in_zone(store: &Store, zone: &str) -> Vec<usize> {
        (0..store.locations().len()).filter(|&i| store.descriptor().zones[i] == zone).collect()
    }

    #[test]
    fn with_zones_a_location_added_and_one_removed_leave_a_whole_zone_losable() {
        let dir = tempfile::tempdir().unwrap();
        let mut ms = mem_store(dir.path(), 4, 2, 6, crate::store::MIN_SEGMENT_SIZE).unwrap();
        // Three zones of two locations: every stripe has 2 shards in each.
        for (i, z) in ["a", "a", "b", "b", "c", "c"].into_iter().enumerate() {
            ms.store.set_zone(i, z).unwrap();
        }
        assert_eq!(ms.store.zone_tolerance().tolerance, 1);
        let files = fill(&ms.store);
        let volume = write_volume(Arc::new(reopen(&ms.store)));

        // A fourth zone's location added, then moved into the spread order and the shards to their homes.
        let fresh = Arc::new(MemLocation::new("mem-06"));
        ms.store.add_location_with("mem-06".into(), "d", fresh).unwrap();
        // The spread order interleaves the zones (a, b, c, d, a, b, c): no two neighbours share one.
        ms.store.spread_zones().unwrap();
        let order: Vec<String> = ms.store.descriptor().zones.clone();
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
        rebalance(&ms.store, &RebalanceOptions::default(), &|_| {}).unwrap();
        scrub_repair(&ms.store);
        assert!(all_home(&ms.store));
        assert_eq!(ms.store.zone_tolerance().tolerance, 1);
        check_all(&without(&ms.store, &in_zone(&ms.store, "b")), &files, &volume);
        scrub_repair(&ms.store);

        // One of zone a's locations removed: drained, moved, forgotten; zone c may still go whole.
        let a = in_zone(&ms.store, "a")[0];
        ms.store.start_draining(a).unwrap();
        rebalance(&ms.store, &RebalanceOptions::default(), &|_| {}).unwrap();
        scrub_repair(&ms.store);
        ms.store.exclusively(|st| st.forget_location(a)).unwrap();
        assert_eq!(ms.store.locations().len(), 6);
        assert_eq!(ms.store.zone_tolerance().tolerance, 1, "{:?}", ms.store.descriptor().zones);
        assert!(all_home(&ms.store));
        check_all(&without(&ms.store, &in_zone(&ms.store, "c")), &files, &volume);
        ms.mem.clear();
    }

    #[test]
    fn object_names_parse_into_the_shards_they_hold() {
        let id = [7u8; 16];
        let f = parse_found("shards/x", "0000000003.005", id, Kind::File).unwrap();
        assert_eq!((f.stripe, f.shard, f.key.as_str()), (3, 5, "shards/x/0000000003.005"));
        let f = parse_found("d", "00000000000000ff.01", id, Kind::Log).unwrap();
        assert_eq!((f.stripe, f.shard), (255, 1));
        let f = parse_found("d", "0000000009-0000000000000002.004", id, Kind::Cow).unwrap();
        assert_eq!((f.stripe, f.shard), (9, 4));
        assert!(parse_found("d", "journal", id, Kind::Log).is_none());
        assert!(parse_found("d", ".tmp-123", id, Kind::File).is_none());
    }
}
