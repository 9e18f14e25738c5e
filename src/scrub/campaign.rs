//! Fault-injection campaigns over in-memory stores: seeded faults, then scrub, repair, scrub again and read
//! back. Replay one seed with `BF_FAULT_SEED=<seed> cargo test -p blockframe campaign`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::files::commit::{commit, CommitRequest};
use crate::files::read::{read_to, OpenFile};
use crate::location::Location;
use crate::location::LocationExt;
use crate::store::MIN_SEGMENT_SIZE;
use crate::testing;
use crate::testing::fault::{self, FaultyLocation, Inventory, PlanOptions, ShardId};

const SEG: usize = MIN_SEGMENT_SIZE as usize;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// A scratch directory for the on-disk part of a store (descriptor, key, lock, scrub state), on tmpfs when there
/// is one: those files are fsynced, and the campaign creates hundreds of stores.
fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn put_file(store: &Store, name: &str, bytes: &[u8]) {
    let req = CommitRequest { name: name.into(), mode: 0o644, workers: 1, size: None, ..Default::default() };
    commit(store, &mut Cursor::new(bytes), &req, &|_| {}).unwrap();
}

fn get_file(store: &Store, name: &str) -> Result<Vec<u8>> {
    let e = catalog::find(store, name)?;
    let f = OpenFile::new(store, &e)?;
    let mut out = Vec::new();
    read_to(store, &f, &mut out, 2, &|_| {})?;
    Ok(out)
}

fn scrub(store: &Store, repair: bool) -> ScrubReport {
    let opts = ScrubOptions { repair, workers: 2, ..ScrubOptions::default() };
    let ctl = RunControl { max_duration: None, total: None, progress: &|_| {} };
    let (report, warning) = run(store, &opts, Selection::All, &ctl).unwrap();
    assert!(warning.is_none(), "{warning:?}");
    report
}

fn raw_inventory(locs: &[Arc<FaultyLocation>]) -> Inventory {
    let raw: Vec<&dyn Location> = locs.iter().map(|l| l.inner().as_ref()).collect();
    fault::inventory(&raw).unwrap()
}

fn reported_bad(report: &ScrubReport) -> BTreeSet<ShardId> {
    let mut out = BTreeSet::new();
    for f in &report.files {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&f.file_id, &mut id).unwrap();
        for i in &f.issues {
            out.insert((id, i.segment, i.shard));
        }
    }
    out
}

/// One seed of the repairable campaign: at most m bad shards per segment, at least one good manifest copy.
fn repairable_case(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (k, m) = [(2u16, 1u16), (3, 2), (4, 2), (2, 2)][rng.gen_range(0..4)];
    let n = (k + m) as usize + rng.gen_range(0..2);
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), k, m, n, MIN_SEGMENT_SIZE).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..rng.gen_range(1..4))
        .map(|i| (format!("f{i}"), data(rng.gen_range(0..2 * SEG + 100), seed * 10 + i)))
        .collect();
    for (name, bytes) in &files {
        put_file(&store, name, bytes);
    }
    let inv = raw_inventory(&locs);
    let opts = PlanOptions {
        faults: rng.gen_range(1..10),
        max_bad_per_segment: m as usize,
        min_good_manifests: 1,
        location_faults: true,
        read_only: true,
    };
    let plan = fault::plan(seed, &inv, &opts);
    let damage = fault::apply(&plan, &inv, locs.as_slice()).unwrap();
    let ctx = format!("seed {seed} (k={k} m={m} n={n}) plan {:?}", plan.faults);

    // 1. Detection: exactly the damaged shards are reported, per segment at-risk counts match.
    let found = scrub(&store, false);
    let damaged: BTreeSet<ShardId> = damage.shards.iter().map(|(_, id)| *id).collect();
    assert_eq!(reported_bad(&found), damaged, "{ctx}");
    let per_segment = damage.per_segment();
    let at_risk: usize = found.files.iter().map(|f| f.segments_at_risk.len()).sum();
    let k_good = per_segment.values().filter(|b| b.len() == m as usize).count();
    assert_eq!(at_risk, k_good, "{ctx}");
    assert!(found.files.iter().all(|f| f.segments_lost.is_empty()), "{ctx}");
    let live_manifest_damage = damage.manifests.iter().filter(|(l, _)| !damage.dead.contains(l)).count() as u64;
    let reported_manifest: u64 =
        found.files.iter().map(|f| f.manifests.missing + f.manifests.corrupt).sum::<u64>() + found.catalog.bad();
    assert_eq!(reported_manifest, live_manifest_damage, "{ctx}");
    for &d in &damage.dead {
        assert_ne!(found.locations[d].state, LocationState::Ok, "{ctx}: dead location {d} not reported");
    }
    let any = !damaged.is_empty() || live_manifest_damage > 0 || !damage.dead.is_empty();
    assert_eq!(found.health(), if any { Health::Degraded } else { Health::Healthy }, "{ctx}");

    // 2. Repair: everything rebuilt; rebuilt shards leave home only when home cannot be written.
    let repaired = scrub(&store, true);
    assert_eq!(reported_bad(&repaired), damaged, "{ctx}: repair run saw different damage");
    for f in &repaired.files {
        assert!(f.repair_errors.is_empty(), "{ctx}: {:?}", f.repair_errors);
        for i in &f.issues {
            let to = i.repaired_to.unwrap_or_else(|| panic!("{ctx}: not repaired: {i:?}"));
            if to != i.location {
                assert!(
                    damage.read_only.contains(&i.location) || locs[i.location].probe().is_err(),
                    "{ctx}: {i:?} moved away from a writable home"
                );
            }
        }
    }
    let removed: BTreeSet<usize> = (0..n).filter(|&i| locs[i].probe().is_err()).collect();
    // With a location gone or read-only, a rebuilt shard may have had to share a location with another of its
    // segment: that stays reported (degraded, crowded) until home can be written again.
    let crowding = !removed.is_empty() || !damage.read_only.is_empty();
    let want_after = if removed.is_empty() { Health::Healthy } else { Health::Degraded };
    let crowded_after = repaired.files.iter().any(|f| !f.segments_crowded_left.is_empty());
    assert!(!crowded_after || crowding, "{ctx}: crowded with every home writable");
    let want_after = if crowded_after { Health::Degraded } else { want_after };
    assert_eq!(repaired.health_after(), want_after, "{ctx}");

    // 3. A second scrub is clean (a removed location stays reported, a crowded segment too, nothing else).
    let after = scrub(&store, false);
    for f in &after.files {
        let crowded_only = f.shards.bad() == 0 && !f.segments_crowded.is_empty() && f.segments_lost.is_empty();
        assert!(f.health() == Health::Healthy || (crowding && crowded_only), "{ctx}: {f:?}");
    }
    for (i, l) in after.locations.iter().enumerate() {
        let want_ok = !removed.contains(&i);
        assert_eq!(l.state == LocationState::Ok, want_ok, "{ctx}: location {i}: {:?}", l.state);
    }
    assert_eq!(after.health(), want_after, "{ctx}");

    // 4. Every file reads back byte-exact.
    for (name, bytes) in &files {
        assert_eq!(&get_file(&store, name).unwrap(), bytes, "{ctx}: {name}");
    }
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("BF_FAULT_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => default.collect(),
    }
}

#[test]
fn campaign_repairable_faults_are_all_found_and_fixed() {
    for seed in seeds(0..200) {
        let r = std::panic::catch_unwind(|| repairable_case(seed));
        if r.is_err() {
            panic!("campaign failed at seed {seed}; replay with BF_FAULT_SEED={seed}");
        }
    }
}

/// Beyond m bad shards in one segment: reported lost by file and segment, nothing else harmed, no panic.
fn lost_case(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (k, m) = [(2u16, 1u16), (3, 2), (4, 2)][rng.gen_range(0..3)];
    let n = (k + m) as usize;
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), k, m, n, MIN_SEGMENT_SIZE).unwrap();
    let a = data(2 * SEG + 7, seed);
    let b = data(SEG + 3, seed + 1);
    put_file(&store, "a", &a);
    put_file(&store, "b", &b);
    let inv = raw_inventory(&locs);
    let victim = inv.shards[rng.gen_range(0..inv.shards.len())].id;
    // Damage m+1 shards of the victim segment, and one shard of every other segment of both files.
    let mut by_segment: BTreeMap<([u8; 16], u64), Vec<&fault::ShardObject>> = BTreeMap::new();
    for s in &inv.shards {
        by_segment.entry((s.id.0, s.id.1)).or_default().push(s);
    }
    let mut survivors = Vec::new();
    for ((f, seg), shards) in &by_segment {
        let hit = if (*f, *seg) == (victim.0, victim.1) { m as usize + 1 } else { 1 };
        for (j, s) in shards.iter().enumerate() {
            let loc = locs[s.location].inner();
            if j < hit {
                if rng.gen_bool(0.5) {
                    loc.delete(&s.key).unwrap();
                } else {
                    let mut b = loc.get(&s.key).unwrap();
                    let at = rng.gen_range(0..b.len());
                    b[at] ^= 1 << rng.gen_range(0..8);
                    loc.put(&s.key, &[&b]).unwrap();
                }
            } else if (*f, *seg) == (victim.0, victim.1) {
                survivors.push((s.location, s.key.clone(), loc.get(&s.key).unwrap()));
            }
        }
    }
    let ctx = format!("seed {seed} (k={k} m={m}) victim {victim:?}");
    let report = scrub(&store, true);
    assert_eq!(report.health(), Health::Lost, "{ctx}");
    assert_eq!(report.health_after(), Health::Lost, "{ctx}");
    let victim_hex = hex::encode(victim.0);
    for f in &report.files {
        if f.file_id == victim_hex {
            assert_eq!(f.segments_lost, vec![victim.1], "{ctx}");
            assert!(f.label.starts_with('a') || f.label.starts_with('b'), "{ctx}: label {}", f.label);
            for i in &f.issues {
                assert_eq!(i.repaired_to.is_some(), i.segment != victim.1, "{ctx}: {i:?}");
            }
        } else {
            assert!(f.segments_lost.is_empty(), "{ctx}");
            assert!(f.issues.iter().all(|i| i.repaired_to.is_some()), "{ctx}");
        }
    }
    // The lost segment's surviving shards were not touched.
    for (l, key, bytes) in survivors {
        assert_eq!(locs[l].inner().get(&key).unwrap(), bytes, "{ctx}");
    }
    let names = [("a", &a), ("b", &b)];
    for (name, bytes) in names {
        let id = catalog::find(&store, name).unwrap().manifest.body.file_id;
        match get_file(&store, name) {
            Ok(back) => {
                assert_ne!(id, victim.0, "{ctx}: lost file read back");
                assert_eq!(&back, bytes, "{ctx}");
            }
            Err(Error::TooManyLost { file, segment, .. }) => {
                assert_eq!((id, segment), (victim.0, victim.1), "{ctx}");
                assert_eq!(file, name, "{ctx}");
            }
            Err(e) => panic!("{ctx}: {e}"),
        }
    }
    let again = scrub(&store, false);
    assert_eq!(again.files.iter().map(|f| f.segments_lost.len()).sum::<usize>(), 1, "{ctx}");
    assert_eq!(again.files.iter().map(|f| f.shards.bad()).sum::<u64>(), m as u64 + 1, "{ctx}");
}

#[test]
fn campaign_beyond_m_is_reported_lost_and_harms_nothing_else() {
    for seed in seeds(0..30) {
        if std::panic::catch_unwind(|| lost_case(seed)).is_err() {
            panic!("lost campaign failed at seed {seed}; replay with BF_FAULT_SEED={seed}");
        }
    }
}

#[test]
fn keyless_scrub_repairs_and_labels_by_root() {
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), 3, 2, 5, MIN_SEGMENT_SIZE).unwrap();
    let bytes = data(4 * SEG, 3);
    put_file(&store, "secret-name", &bytes);
    let mut keyless = Store::open(dir.path()).unwrap();
    keyless.set_locations(store.locations().to_vec()).unwrap();
    let inv = raw_inventory(&locs);
    for s in inv.shards.iter().filter(|s| s.location == 1) {
        locs[1].inner().delete(&s.key).unwrap();
    }
    let m = inv.manifests.iter().find(|m| m.location == 3).unwrap();
    locs[3].inner().put(&m.key, &[b"BFMANIF\0junk"]).unwrap();
    let r = scrub(&keyless, true);
    assert_eq!(r.health(), Health::Degraded);
    assert_eq!(r.health_after(), Health::Healthy);
    let root = catalog::find(&store, "secret-name").unwrap().manifest.body.root_hex();
    assert_eq!(r.files[0].label, format!("root:{root}"));
    assert_eq!(r.catalog.copies.repaired, 1);
    assert_eq!(scrub(&keyless, false).health(), Health::Healthy);
    assert_eq!(get_file(&store, "secret-name").unwrap(), bytes);
}

#[test]
fn read_only_home_gets_its_shard_rebuilt_on_a_free_location() {
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), 2, 1, 4, MIN_SEGMENT_SIZE).unwrap();
    let bytes = data(SEG / 2, 9);
    put_file(&store, "f", &bytes);
    let inv = raw_inventory(&locs);
    let s = &inv.shards[0];
    let mut b = locs[s.location].inner().get(&s.key).unwrap();
    b[200] ^= 0xff;
    locs[s.location].inner().put(&s.key, &[&b]).unwrap();
    locs[s.location].set_read_only(true);
    let r = scrub(&store, true);
    let issue = &r.files[0].issues[0];
    let to = issue.repaired_to.unwrap();
    assert_ne!(to, s.location);
    // The only location holding no shard of the segment.
    let used: BTreeSet<usize> = inv.shards.iter().map(|x| x.location).collect();
    assert!(!used.contains(&to), "{to} already held a shard");
    let again = scrub(&store, false);
    assert_eq!(again.health(), Health::Healthy);
    assert_eq!(again.files[0].shards.relocated, 1);
    assert_eq!(get_file(&store, "f").unwrap(), bytes);
}

#[test]
fn interrupted_runs_resume_where_they_stopped() {
    let dir = scratch();
    let store = testing::mem_store(dir.path(), 2, 1, 3, MIN_SEGMENT_SIZE).unwrap().store;
    for i in 0..4 {
        put_file(&store, &format!("f{i}"), &data(SEG, i));
    }
    let opts = ScrubOptions::default();
    let one_file = RunControl { max_duration: Some(Duration::ZERO), total: None, progress: &|_| {} };
    let (r, _) = run(&store, &opts, Selection::All, &one_file).unwrap();
    assert!(!r.complete);
    assert_eq!(r.files.len(), 1);
    let st = state::ScrubState::load(dir.path(), &store.descriptor().store_id).unwrap().unwrap();
    assert_eq!(st.running.as_ref().unwrap().summary.files, 1);
    assert!(st.last.is_none());
    let mut seen: BTreeSet<String> = r.files.iter().map(|f| f.file_id.clone()).collect();
    for round in 0..3 {
        let (r, _) = run(&store, &opts, Selection::Resume, &one_file).unwrap();
        assert_eq!(r.files_resumed, round + 1);
        assert!(seen.insert(r.files[0].file_id.clone()), "file checked twice");
        assert_eq!(r.complete, round == 2);
    }
    let st = state::ScrubState::load(dir.path(), &store.descriptor().store_id).unwrap().unwrap();
    assert!(st.running.is_none());
    let last = st.last.unwrap();
    assert_eq!((last.files, last.health), (4, Health::Healthy));
    assert_eq!(st.files.len(), 4);
    // Resume with nothing interrupted is a full run.
    let ctl = RunControl { max_duration: None, total: None, progress: &|_| {} };
    let (r, _) = run(&store, &opts, Selection::Resume, &ctl).unwrap();
    assert_eq!((r.files.len(), r.files_resumed, r.complete), (4, 0, true));
}

#[test]
fn orphans_are_deleted_only_after_the_grace_period() {
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, mem } =
        testing::mem_store(dir.path(), 2, 1, 3, MIN_SEGMENT_SIZE).unwrap();
    put_file(&store, "kept", &data(SEG, 1));
    // A crashed commit: shards of an id that no manifest names.
    let orphan = "0123456789abcdef0123456789abcdef";
    for l in &locs {
        l.put(&format!("shards/{orphan}/0000000000.000"), &[b"partial"]).unwrap();
    }
    let r = scrub(&store, true);
    assert_eq!(r.orphans.len(), 1);
    assert_eq!(r.orphans[0].file_id, orphan);
    assert!(!r.orphans[0].deleted, "a fresh orphan may be a commit in progress");
    assert_eq!(r.health(), Health::Healthy);
    // Make everything a day and an hour old.
    for l in &mem {
        l.age_all(Duration::from_secs(25 * 3600)).unwrap();
    }
    let r = scrub(&store, true);
    assert!(r.orphans[0].deleted);
    assert!(scrub(&store, false).orphans.is_empty());
    assert_eq!(get_file(&store, "kept").unwrap(), data(SEG, 1));
}

#[test]
fn write_policy_tolerates_failed_locations_and_scrub_fills_the_shortfall() {
    let dir = scratch();
    let testing::MemStore { mut store, faulty: locs, .. } =
        testing::mem_store(dir.path(), 3, 2, 5, MIN_SEGMENT_SIZE).unwrap();
    assert_eq!(store.min_shards_written(), 4);
    assert!(store.set_min_shards_written(2).is_err() && store.set_min_shards_written(6).is_err());
    let bytes = data(3 * SEG + 77, 5);
    let req = CommitRequest { name: "f".into(), mode: 0o644, workers: 2, size: None, ..Default::default() };
    // Two of five locations refuse writes: k+1 = 4 shards per stripe cannot be met, so the commit fails whole.
    locs[1].set_read_only(true);
    locs[3].set_read_only(true);
    let err = commit(&store, &mut Cursor::new(&bytes), &req, &|_| {}).unwrap_err();
    assert!(matches!(err, Error::WriteQuorum { ok: 3, need: 4, .. }), "{err}");
    assert!(catalog::find(&store, "f").is_err());
    assert!(raw_inventory(&locs).shards.is_empty(), "a failed commit leaves no shards");
    // With min_shards_written = k the same commit succeeds, reports the shortfall and reads back.
    store.set_min_shards_written(3).unwrap();
    let r = commit(&store, &mut Cursor::new(&bytes), &req, &|_| {}).unwrap();
    assert_eq!(r.shards_not_stored, 4 * 2, "two shards of each of 4 segments");
    assert_eq!(r.failed_locations.len(), 2);
    assert_eq!(get_file(&store, "f").unwrap(), bytes);
    // The shortfall is recorded on the locations; a check-only scrub leaves the record alone.
    let pending = crate::pending::list(&store);
    assert_eq!(pending.values().map(|p| p.shards).collect::<Vec<_>>(), [8]);
    assert_eq!(scrub(&store, false).pending_found, 1);
    assert_eq!(crate::pending::list(&store).len(), 1);
    // Once the locations are back, a repairing scrub stores every missing shard at home and clears the record.
    locs[1].set_read_only(false);
    locs[3].set_read_only(false);
    let rep = scrub(&store, true);
    assert_eq!((rep.health(), rep.health_after()), (Health::Degraded, Health::Healthy));
    assert_eq!((rep.pending_found, rep.pending_cleared), (1, 1));
    assert!(crate::pending::list(&store).is_empty());
    assert_eq!(rep.files[0].issues.iter().filter(|i| i.repaired_to == Some(i.location)).count(), 8);
    assert_eq!(scrub(&store, false).health(), Health::Healthy);
    assert_eq!(raw_inventory(&locs).shards.len(), 4 * 5);
}

/// A file removed while a scrub runs (its catalog entry, then its shards) is neither damage nor loss: the run
/// says healthy, counts it as removed, and no location reports missing shards.
#[test]
fn a_file_removed_during_the_scrub_is_not_reported_lost() {
    let dir = scratch();
    let store = testing::mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap().store;
    put_file(&store, "a", &data(6 * SEG, 1));
    put_file(&store, "b", &data(6 * SEG, 2));
    let removed = std::sync::Once::new();
    let progress = |_: u64| {
        removed.call_once(|| {
            // While the first file is being checked, the other one goes.
            for name in ["a", "b"] {
                let e = catalog::find(&store, name).unwrap();
                catalog::remove(&store, &e).unwrap();
            }
        })
    };
    let opts = ScrubOptions { workers: 2, ..ScrubOptions::default() };
    let ctl = RunControl { max_duration: None, total: None, progress: &progress };
    let (report, _) = run(&store, &opts, Selection::All, &ctl).unwrap();
    assert!(removed.is_completed());
    assert_eq!(report.health(), Health::Healthy, "{report:#?}");
    assert_eq!(report.files_removed, 2);
    assert!(report.locations.iter().all(|l| l.shards.missing == 0 && l.shards.corrupt == 0), "{report:#?}");
}

/// A repair that had to put a shard on a location already holding one of the segment (home read-only, no free
/// location) leaves the data short of tolerating m lost locations: scrub reports it (degraded, segment crowded)
/// until a repair moves the shard home once home is writable; after that, losing m locations loses nothing.
#[test]
fn shards_sharing_a_location_are_reported_and_moved_home() {
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap();
    let bytes = data(3 * SEG, 11);
    put_file(&store, "f", &bytes);
    let inv = raw_inventory(&locs);
    let s = inv.shards.iter().find(|s| s.id.1 == 1).unwrap().clone();
    locs[s.location].inner().delete(&s.key).unwrap();
    locs[s.location].set_read_only(true);
    let r = scrub(&store, true);
    let to = r.files[0].issues[0].repaired_to.expect("rebuilt elsewhere");
    assert_ne!(to, s.location);
    let found = scrub(&store, false);
    assert_eq!(found.health(), Health::Degraded, "a crowded segment is not healthy: {:#?}", found.files[0]);
    assert_eq!(found.files[0].segments_crowded, vec![1]);
    // Home back: the repair moves the shard home and deletes the foreign copy.
    locs[s.location].set_read_only(false);
    let moved = scrub(&store, true);
    assert_eq!((moved.files[0].shards_moved, moved.health_after()), (1, Health::Healthy), "{:#?}", moved.files[0]);
    assert!(locs[s.location].inner().get(&s.key).is_ok(), "the shard is home");
    assert!(locs[to].inner().get(&s.key).is_err(), "the foreign copy is gone");
    assert_eq!(scrub(&store, false).health(), Health::Healthy);
    // Any m locations may now go.
    for l in [to, (to + 1) % 6] {
        locs[l].set_gone(true);
    }
    assert_eq!(get_file(&store, "f").unwrap(), bytes);
}

/// `rm` with a location read-only: the removal holds (one catalog record, written to a quorum), a repairing
/// scrub after the location is back does not bring the file back, and the shards left behind are orphans.
#[test]
fn a_removal_with_a_location_read_only_is_not_undone_by_repair() {
    let dir = scratch();
    let testing::MemStore { store, faulty: locs, .. } =
        testing::mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap();
    put_file(&store, "gone", &data(2 * SEG, 1));
    put_file(&store, "kept", &data(2 * SEG, 2));
    locs[2].set_read_only(true);
    catalog::remove(&store, &catalog::find(&store, "gone").unwrap()).unwrap();
    locs[2].set_read_only(false);
    let r = scrub(&store, true);
    assert!(catalog::find(&store, "gone").is_err(), "the removed file came back");
    assert_eq!(r.files.len(), 1);
    assert_eq!(r.orphans.iter().map(|o| o.shards).sum::<u64>(), 2, "its shards on the read-only location");
    assert_eq!(get_file(&store, "kept").unwrap(), data(2 * SEG, 2));
    assert!(catalog::find(&store, "gone").is_err());
}
