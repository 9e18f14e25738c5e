//! Whole-store tests of the library: commit and read back through real local locations.

use std::io::Cursor;

use crate::error::Error;
use crate::files::catalog;
use crate::files::commit::{commit, CommitRequest};
use crate::files::read::{read_to, verify_file, OpenFile};
use crate::store::{InitOptions, KeySource, Store, MIN_SEGMENT_SIZE};

pub(crate) fn new_store(dir: &std::path::Path, k: u16, m: u16) -> Store {
    Store::init(
        &dir.join("store"),
        InitOptions {
            k,
            m,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(dir.join("store/master.key")),
        },
    )
    .unwrap()
}

pub(crate) use crate::testing::test_bytes as data;

fn req(name: &str) -> CommitRequest {
    CommitRequest { name: name.into(), mode: 0o644, workers: 2, size: None, ..Default::default() }
}

/// Reads a committed file back whole.
pub(crate) fn get(store: &Store, name: &str) -> crate::Result<Vec<u8>> {
    let e = catalog::find(store, name)?;
    let f = OpenFile::new(store, &e)?;
    let mut out = Vec::new();
    read_to(store, &f, &mut out, 2, &|_| {})?;
    Ok(out)
}

#[test]
fn round_trips_edge_sizes() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 4, 2);
    let seg = MIN_SEGMENT_SIZE as usize;
    for (i, len) in [0, 1, seg - 1, seg, seg + 1, 3 * seg + 12345].into_iter().enumerate() {
        let bytes = data(len, i as u64 + 1);
        let name = format!("dir/file{i}");
        // Alternate between known and unknown input sizes: both reader paths must agree.
        let mut rq = req(&name);
        rq.size = (i % 2 == 0).then_some(len as u64);
        let r = commit(&store, &mut Cursor::new(&bytes), &rq, &|_| {}).unwrap();
        assert_eq!(r.size, len as u64);
        assert_eq!(r.segments, (len as u64).div_ceil(seg as u64).max(1));
        assert_eq!(get(&store, &name).unwrap(), bytes, "len {len}");
        // Also found by root.
        assert_eq!(catalog::find(&store, &r.root).unwrap().meta.unwrap().name, name);
    }
    let (entries, bad) = catalog::list(&store).unwrap();
    assert_eq!(entries.len(), 6);
    assert!(bad.is_empty());
}

#[test]
fn survives_losing_m_locations_and_reports_m_plus_one() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 3, 2);
    let bytes = data(5 * MIN_SEGMENT_SIZE as usize + 77, 9);
    commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).unwrap();
    let loc_dir = |i: usize| d.path().join(format!("store/locations/loc-{i:02}"));
    std::fs::remove_dir_all(loc_dir(1)).unwrap();
    std::fs::remove_dir_all(loc_dir(4)).unwrap();
    assert_eq!(get(&store, "f").unwrap(), bytes);
    std::fs::remove_dir_all(loc_dir(2)).unwrap();
    match get(&store, "f") {
        Err(Error::TooManyLost { file, have, need, .. }) => {
            assert_eq!(file, "f");
            assert_eq!(need, 3);
            assert!(have < 3);
        }
        other => panic!("expected TooManyLost, got {other:?}"),
    }
}

#[test]
fn corrupt_shards_are_rebuilt_and_verify_reports_them() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 4, 2);
    let bytes = data(2 * MIN_SEGMENT_SIZE as usize, 3);
    commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).unwrap();
    // Flip one byte in the middle of every shard file of one location.
    let loc = d.path().join("store/locations/loc-00/shards");
    let mut flipped = 0;
    for dir in std::fs::read_dir(&loc).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut b = std::fs::read(&p).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            std::fs::write(&p, b).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0);
    assert_eq!(get(&store, "f").unwrap(), bytes);
    let e = catalog::find(&store, "f").unwrap();
    let bad: usize = verify_file(&store, &e.manifest.body).iter().flatten().filter(|c| c.outcome.is_err()).count();
    assert_eq!(bad, flipped);
}

#[test]
fn reads_count_the_shards_they_could_not_use_and_the_segments_they_rebuilt() {
    use crate::location::LocationExt;
    use crate::metrics::reads::{ReadCounts, ShardFailure};
    use crate::store::shard_key;
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 4, 2);
    let bytes = data(3 * MIN_SEGMENT_SIZE as usize, 5);
    commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).unwrap();
    assert_eq!(get(&store, "f").unwrap(), bytes);
    assert_eq!(store.read_stats().counts(), ReadCounts::default(), "an intact read counts nothing");
    let body = catalog::find(&store, "f").unwrap().manifest.body;
    let shard = |segment: u64, i: usize| {
        let loc = &store.locations()[store.home(&body.file_id, segment, i)];
        (loc.clone(), shard_key(&body.file_id, segment, i))
    };
    // Segment 0 loses data shard 1; segment 1's data shard 2 has a flipped payload byte; segment 2 is intact.
    let (loc, key) = shard(0, 1);
    loc.delete(&key).unwrap();
    let (loc, key) = shard(1, 2);
    let mut b = loc.get(&key).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    loc.put(&key, &[&b]).unwrap();
    assert_eq!(get(&store, "f").unwrap(), bytes);
    let c = store.read_stats().counts();
    assert_eq!((c.shards(ShardFailure::Missing), c.shards(ShardFailure::Corrupt)), (1, 1), "{c:?}");
    assert_eq!((c.stripes_rebuilt, c.stripes_lost, c.shards(ShardFailure::Unreadable)), (2, 0, 0), "{c:?}");
    // Data shard 0 and parity shard 4 of segment 0 gone too: 3 of 6 left, beyond repair.
    for i in [0, 4] {
        let (loc, key) = shard(0, i);
        loc.delete(&key).unwrap();
    }
    assert!(matches!(get(&store, "f"), Err(Error::TooManyLost { segment: 0, .. })));
    let c = store.read_stats().counts();
    assert_eq!(c.stripes_lost, 1, "{c:?}");
    assert_eq!(c.shards(ShardFailure::Missing), 1 + 3, "shards 0, 1 and 4 of segment 0 missing: {c:?}");
}

#[test]
fn a_degraded_read_uses_parity_at_home_before_it_searches_for_a_moved_shard() {
    use crate::location::LocationExt;
    use crate::store::shard_key;
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 4, 2);
    let bytes = data(MIN_SEGMENT_SIZE as usize, 8);
    commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).unwrap();
    let body = catalog::find(&store, "f").unwrap().manifest.body;
    let home = |i: usize| store.locations()[store.home(&body.file_id, 0, i)].clone();
    // Data shard 1 moved away from home (as a repair does when home is down): a copy on parity shard 4's home.
    let key = shard_key(&body.file_id, 0, 1);
    let moved = home(1).get(&key).unwrap();
    home(4).put(&key, &[&moved]).unwrap();
    home(1).delete(&key).unwrap();
    assert_eq!(get(&store, "f").unwrap(), bytes);
    let c = store.read_stats().counts();
    assert_eq!(c.stripes_rebuilt, 1, "parity at home came first: {c:?}");
    // With both parity shards gone from home too, the moved copy is found and read as it is.
    for i in [4, 5] {
        home(i).delete(&shard_key(&body.file_id, 0, i)).unwrap();
    }
    assert_eq!(get(&store, "f").unwrap(), bytes);
    let c = store.read_stats().counts();
    assert_eq!((c.stripes_rebuilt, c.stripes_lost), (1, 0), "read without a rebuild: {c:?}");
}

#[test]
fn a_payload_damaged_under_an_intact_header_is_caught_by_the_tag_and_rebuilt_around() {
    use crate::location::LocationExt;
    use crate::metrics::reads::ShardFailure;
    use crate::store::shard_key;
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 4, 2);
    let bytes = data(2 * MIN_SEGMENT_SIZE as usize, 12);
    commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).unwrap();
    let body = catalog::find(&store, "f").unwrap().manifest.body;
    let shard = |seg: u64, i: usize| {
        (store.locations()[store.home(&body.file_id, seg, i)].clone(), shard_key(&body.file_id, seg, i))
    };
    // Segment 0: data shard 0's first payload byte flipped (the header, and so the cheap check, still agree).
    // Segment 1: data shard 3 missing and parity shard 4's payload flipped, so the first rebuild is wrong.
    let flip = |seg: u64, i: usize| {
        let (loc, key) = shard(seg, i);
        let mut b = loc.get(&key).unwrap();
        b[crate::format::shard::HEADER_LEN] ^= 0x01;
        loc.put(&key, &[&b]).unwrap();
    };
    flip(0, 0);
    let (loc, key) = shard(1, 3);
    loc.delete(&key).unwrap();
    flip(1, 4);
    assert_eq!(get(&store, "f").unwrap(), bytes);
    let c = store.read_stats().counts();
    // Each problem counted once, though each segment was read twice.
    assert_eq!((c.shards(ShardFailure::Corrupt), c.shards(ShardFailure::Missing)), (2, 1), "{c:?}");
    assert_eq!((c.stripes_rebuilt, c.stripes_lost), (2, 0), "{c:?}");
    // One more flip in segment 1 leaves 3 good shards of 6: an error naming the lost segment, not wrong bytes.
    flip(1, 0);
    assert!(matches!(get(&store, "f"), Err(Error::TooManyLost { segment: 1, .. })));
}

#[test]
fn input_changing_size_during_commit_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 2, 1);
    let seg = MIN_SEGMENT_SIZE as usize;
    for (actual, claimed) in [(3 * seg, 2 * seg), (3 * seg, 4 * seg), (10, 5)] {
        let mut rq = req("changing");
        rq.size = Some(claimed as u64);
        let e = commit(&store, &mut Cursor::new(data(actual, 1)), &rq, &|_| {}).unwrap_err();
        assert!(e.to_string().contains("while it was being committed"), "{e}");
        assert!(catalog::scan(&store).unwrap().is_empty());
    }
}

#[test]
fn duplicate_names_are_refused_unless_replaced() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 2, 1);
    commit(&store, &mut Cursor::new(b"one"), &req("n"), &|_| {}).unwrap();
    assert!(matches!(commit(&store, &mut Cursor::new(b"two"), &req("n"), &|_| {}), Err(Error::AlreadyExists(_))));
    let mut r = req("n");
    r.replace = true;
    assert!(commit(&store, &mut Cursor::new(b"two"), &r, &|_| {}).unwrap().replaced);
    assert_eq!(get(&store, "n").unwrap(), b"two");
    // One file, in one pack: the first version's pack went with it.
    assert_eq!(catalog::list(&store).unwrap().0.len(), 1);
    assert_eq!(catalog::scan(&store).unwrap().len(), 2);
}

#[test]
fn failed_commit_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 2, 1);
    // A location that vanished mid-life makes shard writes fail.
    std::fs::remove_dir_all(d.path().join("store/locations/loc-01")).unwrap();
    let bytes = data(3 * MIN_SEGMENT_SIZE as usize, 5);
    assert!(commit(&store, &mut Cursor::new(&bytes), &req("f"), &|_| {}).is_err());
    assert!(catalog::scan(&store).unwrap().is_empty());
    for i in [0, 2] {
        let shards = d.path().join(format!("store/locations/loc-{i:02}/shards"));
        let left = std::fs::read_dir(&shards).map(|r| r.count()).unwrap_or(0);
        assert_eq!(left, 0, "shards left on loc {i}");
    }
}

#[test]
fn removal_deletes_manifests_and_shards() {
    let d = tempfile::tempdir().unwrap();
    let store = new_store(d.path(), 2, 1);
    commit(&store, &mut Cursor::new(data(100_000, 1)), &req("f"), &|_| {}).unwrap();
    let e = catalog::find(&store, "f").unwrap();
    catalog::remove(&store, &e).unwrap();
    assert!(matches!(catalog::find(&store, "f"), Err(Error::NotFound(_))));
    for i in 0..3 {
        let shards = d.path().join(format!("store/locations/loc-{i:02}/shards"));
        assert_eq!(std::fs::read_dir(&shards).map(|r| r.count()).unwrap_or(0), 0);
    }
}

pub(crate) use crate::testing::files_under as all_files;

/// Number of files under `dir` whose name passes `pred`.
pub(crate) fn count_files(dir: &std::path::Path, pred: impl Fn(&str) -> bool) -> usize {
    all_files(dir).iter().filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred)).count()
}
