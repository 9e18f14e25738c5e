//! Crash points: an operation is cut after its n-th change to the locations, for every n from the first change
//! to the last; the store, reopened as a new process would, then holds the operation entirely or not at all,
//! nothing committed before is lost, and a repairing scrub leaves it healthy.

use std::io::Cursor;
use std::sync::Arc;

use crate::error::Result;
use crate::files::catalog;
use crate::files::commit::CommitRequest;
use crate::files::read::{read_to, OpenFile};
use crate::files::session::{Session, SessionOptions};
use crate::scrub::Health;
use crate::store::{Store, MIN_SEGMENT_SIZE};
use crate::testing::fault::CrashSwitch;
use crate::testing::{mem_store, test_bytes, MemStore};

use super::tests::scrub;

const SEG: usize = MIN_SEGMENT_SIZE as usize;

/// A 4+2 store on in-memory locations whose changes count towards one crash switch.
struct Rig {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    switch: Arc<CrashSwitch>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let MemStore { store, faulty, .. } = mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap();
        let switch = CrashSwitch::counting();
        for l in &faulty {
            l.set_crash_switch(Some(switch.clone()));
        }
        Rig { dir, store: Arc::new(store), switch }
    }

    /// The store as a new process opens it after the crash: descriptor and catalog read afresh.
    fn reopen(&self) -> Arc<Store> {
        Arc::new(super::tests::reopen(self.dir.path(), &self.store))
    }
}

fn put(store: &Store, files: &[(&str, &[u8])], replace: bool) -> Result<()> {
    let mut s = Session::new(store, SessionOptions::default())?;
    for (name, bytes) in files {
        let req = CommitRequest {
            name: (*name).into(),
            mode: 0o644,
            workers: 2,
            size: Some(bytes.len() as u64),
            replace,
            ..Default::default()
        };
        s.commit(&mut Cursor::new(bytes), &req, &|_| {})?;
    }
    for r in s.flush()? {
        r?;
    }
    Ok(())
}

/// The file's bytes, `None` when the catalog has no such name.
fn get(store: &Store, name: &str) -> Option<Vec<u8>> {
    let e = catalog::find(store, name).ok()?;
    let f = OpenFile::new(store, &e).unwrap();
    let mut out = Vec::new();
    read_to(store, &f, &mut out, 2, &|_| {}).unwrap_or_else(|e| panic!("{name} is in the catalog but unreadable: {e}"));
    Some(out)
}

/// Runs `op` after `prepare` once uncut to count its changes, then once per crash point on a fresh store:
/// `check` gets the reopened store and whether `op` reported success; then a repairing scrub must leave it
/// healthy and `check` must hold again. Returns how many crash points were swept.
fn sweep(
    prepare: impl Fn(&Arc<Store>),
    op: impl Fn(&Arc<Store>) -> Result<()>,
    check: impl Fn(&Arc<Store>, bool, &str),
) -> u64 {
    let rig = Rig::new();
    prepare(&rig.store);
    rig.switch.disarm();
    op(&rig.store).unwrap();
    let total = rig.switch.changes();
    assert!(total > 0, "the operation changed nothing");
    for n in 0..total {
        let rig = Rig::new();
        prepare(&rig.store);
        rig.switch.arm(n);
        let ok = op(&rig.store).is_ok();
        assert!(rig.switch.crashed() || ok, "crash point {n} of {total}: not reached, yet the operation failed");
        rig.switch.disarm();
        let store = rig.reopen();
        let ctx = format!("crash after change {n} of {total}");
        check(&store, ok, &ctx);
        let r = scrub(&store, true);
        assert_ne!(r.health_after(), Health::Lost, "{ctx}: {r:#?}");
        let again = scrub(&store, false);
        assert_eq!(again.health(), Health::Healthy, "{ctx}: after repair: {again:#?}");
        check(&store, ok, &format!("{ctx}, after repair"));
    }
    total
}

#[test]
fn a_commit_cut_anywhere_is_all_or_nothing() {
    let old = test_bytes(3 * SEG, 1);
    let new = test_bytes(5 * SEG + 7, 2);
    let n = sweep(
        |s| put(s, &[("old", &old)], false).unwrap(),
        |s| put(s, &[("new", &new)], false),
        |s, ok, ctx| {
            assert_eq!(get(s, "old").as_ref(), Some(&old), "{ctx}: an earlier file changed");
            match get(s, "new") {
                Some(b) => assert!(b == new, "{ctx}: the new file is wrong"),
                None => assert!(!ok, "{ctx}: the commit returned success, but the file is not there"),
            }
        },
    );
    assert!(n > 30, "{n} crash points");
}

#[test]
fn a_replace_cut_anywhere_leaves_the_old_or_the_new_version() {
    let old = test_bytes(4 * SEG, 3);
    let new = test_bytes(2 * SEG + 99, 4);
    sweep(
        |s| put(s, &[("f", &old)], false).unwrap(),
        |s| put(s, &[("f", &new)], true),
        |s, ok, ctx| {
            let b = get(s, "f").unwrap_or_else(|| panic!("{ctx}: the file vanished"));
            assert!(b == new || (b == old && !ok), "{ctx}: neither version (or the old one after success)");
        },
    );
}

#[test]
fn a_batch_of_small_files_cut_anywhere_is_all_or_nothing() {
    let files: Vec<(String, Vec<u8>)> =
        (0..12).map(|i| (format!("s/{i}"), test_bytes(100 + 300 * i, i as u64))).collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    sweep(
        |_| {},
        |s| put(s, &refs, false),
        |s, ok, ctx| {
            let present: Vec<bool> = files.iter().map(|(n, b)| get(s, n).is_some_and(|g| g == *b)).collect();
            let all = present.iter().all(|p| *p);
            assert!(all || (!ok && present.iter().all(|p| !p)), "{ctx}: partly there: {present:?}");
        },
    );
}

#[test]
fn a_removal_cut_anywhere_removes_entirely_or_not_at_all() {
    let gone = test_bytes(3 * SEG, 5);
    let kept = test_bytes(2 * SEG, 6);
    sweep(
        |s| put(s, &[("gone", &gone), ("kept", &kept)], false).unwrap(),
        |s| catalog::remove(s, &catalog::find(s, "gone")?),
        |s, ok, ctx| {
            assert_eq!(get(s, "kept").as_ref(), Some(&kept), "{ctx}: another file changed");
            if let Some(b) = get(s, "gone") {
                assert!(b == gone && !ok, "{ctx}: still there after the removal returned success");
            }
        },
    );
}

#[test]
fn a_repair_cut_anywhere_loses_nothing_and_a_later_repair_finishes_it() {
    let a = test_bytes(4 * SEG, 7);
    let b = test_bytes(SEG / 3, 8);
    sweep(
        |s| {
            put(s, &[("a", &a), ("b", &b)], false).unwrap();
            // Location 1 loses everything it had, but stays (empty): a repair rebuilds onto it.
            let loc = &s.locations()[1];
            for key in loc.list("shards").unwrap() {
                loc.delete_prefix(&format!("shards/{key}")).unwrap();
            }
        },
        |s| {
            let r = scrub(s, true);
            match r.health_after() {
                Health::Healthy => Ok(()),
                h => Err(crate::Error::internal(format!("repair left {h:?}"))),
            }
        },
        |s, _, ctx| {
            assert_eq!(get(s, "a").as_ref(), Some(&a), "{ctx}");
            assert_eq!(get(s, "b").as_ref(), Some(&b), "{ctx}");
        },
    );
}

#[test]
fn a_volume_flush_cut_anywhere_keeps_what_an_earlier_flush_made_durable() {
    use crate::volume::{self, Volume, VolumeOptions};
    const BLOCK: usize = 4096;
    let old = test_bytes(1 << 20, 9);
    let new = test_bytes(1 << 20, 10);
    let at = 512 << 10;
    sweep(
        |s| {
            volume::create(s, "v", 8 << 20, 256 << 10).unwrap();
            let v = Volume::open(s.clone(), "v", VolumeOptions::default()).unwrap();
            v.write(0, &old, false).unwrap();
            v.flush().unwrap();
        },
        |s| {
            let v = Volume::open(s.clone(), "v", VolumeOptions::default())?;
            v.write(at as u64, &new, false)?;
            v.flush()
        },
        |s, ok, ctx| {
            let v = Volume::open(s.clone(), "v", VolumeOptions::default()).unwrap();
            let mut back = vec![0u8; at + new.len()];
            v.read(0, &mut back).unwrap();
            assert!(back[..at] == old[..at], "{ctx}: flushed data before the write changed");
            let was = |i: usize| if i < old.len() { &old[i..i + BLOCK] } else { &[0u8; BLOCK][..] };
            for b in (at..back.len()).step_by(BLOCK) {
                let got = &back[b..b + BLOCK];
                let wrote = &new[b - at..b - at + BLOCK];
                // After a flush that returned, the new data; otherwise each block is old or new, never other.
                assert!(got == wrote || (!ok && got == was(b)), "{ctx}: block at {b}");
            }
        },
    );
}

/// `bf location replace` of location 1 by an empty location, then the repairing scrub that rebuilds onto it
/// (shards and catalog copies), cut after every change to the locations (the new location's marker is the
/// first): reopened as a new process would (the descriptor names the old or the new location), every file reads
/// back exact, and a repair (after doing the replacement again when it was cut) leaves the store healthy.
#[test]
fn a_location_replace_and_its_rebuild_cut_anywhere_lose_nothing() {
    use crate::location::Location;
    use crate::testing::fault::FaultyLocation;
    use crate::testing::MemLocation;
    let a = test_bytes(4 * SEG + 5, 9);
    let b = test_bytes(SEG / 2, 10);
    let run = |cut: Option<u64>| -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let MemStore { mut store, faulty, .. } = mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap();
        put(&store, &[("a", &a), ("b", &b)], false).unwrap();
        let switch = CrashSwitch::counting();
        let fresh = Arc::new(FaultyLocation::new(Arc::new(MemLocation::new("mem-new")) as Arc<dyn Location>));
        for l in faulty.iter().chain([&fresh]) {
            l.set_crash_switch(Some(switch.clone()));
        }
        let spec = dir.path().join("new-location").display().to_string();
        if let Some(n) = cut {
            switch.arm(n);
        }
        let replaced = store.replace_location_with(1, spec.clone(), fresh.clone()).is_ok();
        let repaired = replaced && scrub(&store, true).health_after() == Health::Healthy;
        let ctx = format!("crash after change {cut:?} of the replacement and its repair");
        assert!(switch.crashed() || repaired, "{ctx}: not reached, yet it failed");
        let changes = switch.changes();
        switch.disarm();
        // A new process: the descriptor on disk says which location is number 1.
        let mut reopened = Store::open(dir.path()).unwrap();
        let now_new = reopened.descriptor().locations[1] == spec;
        assert!(now_new || !replaced, "{ctx}: the replacement returned success but the descriptor is old");
        let mut locs: Vec<Arc<dyn Location>> = faulty.iter().map(|l| l.clone() as Arc<dyn Location>).collect();
        if now_new {
            locs[1] = fresh.clone();
        }
        reopened.set_locations(locs).unwrap();
        reopened.unlock(store.key().unwrap().clone()).unwrap();
        assert_eq!(get(&reopened, "a").as_ref(), Some(&a), "{ctx}");
        assert_eq!(get(&reopened, "b").as_ref(), Some(&b), "{ctx}");
        if !now_new {
            reopened
                .replace_location_with(1, spec.clone(), fresh.clone())
                .unwrap_or_else(|e| panic!("{ctx}: again: {e}"));
        }
        let r = scrub(&reopened, true);
        assert_eq!(r.health_after(), Health::Healthy, "{ctx}: {r:#?}");
        assert_eq!(scrub(&reopened, false).health(), Health::Healthy, "{ctx}");
        assert_eq!(get(&reopened, "a").as_ref(), Some(&a), "{ctx}, after repair");
        assert_eq!(get(&reopened, "b").as_ref(), Some(&b), "{ctx}, after repair");
        assert!(!fresh.inner().list("shards").unwrap().is_empty(), "{ctx}: nothing was rebuilt onto the new location");
        changes
    };
    let total = run(None);
    assert!(total > 10, "{total} changes");
    for n in 0..total {
        run(Some(n));
    }
}
