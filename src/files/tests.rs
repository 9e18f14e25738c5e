//! Packs, sessions and the catalog log, through in-memory locations that can fail.

use std::io::Cursor;

use crate::files::catalog::{self, Batch};
use crate::files::catalog_log;
use crate::files::commit::CommitRequest;
use crate::files::session::{Session, SessionOptions};
use crate::format::catalog::{self as fmt, CatalogName, CatalogOp, RecordBody};
use crate::format::manifest::Data;
use crate::location::{Location, LocationExt};
use crate::store::{Store, MIN_SEGMENT_SIZE};
use crate::testing::{self, test_bytes as data, MemStore};
use crate::tests::get;

fn req(name: &str, len: usize) -> CommitRequest {
    CommitRequest { name: name.into(), mode: 0o644, workers: 2, size: Some(len as u64), ..Default::default() }
}

/// The store as another process opens it (a fresh catalog read), on the same locations.
pub(super) fn reopen(dir: &std::path::Path, store: &Store) -> Store {
    let mut s = Store::open(dir).unwrap();
    s.set_locations(store.locations().to_vec()).unwrap();
    s.unlock(store.key().unwrap().clone()).unwrap();
    s
}

/// A whole-store scrub.
pub(super) fn scrub(store: &Store, repair: bool) -> crate::scrub::ScrubReport {
    let opts = crate::scrub::ScrubOptions { repair, ..Default::default() };
    let ctl = crate::scrub::RunControl { max_duration: None, total: None, progress: &|_| {} };
    crate::scrub::run(store, &opts, crate::scrub::Selection::All, &ctl).unwrap().0
}

fn mem(dir: &std::path::Path, k: u16, m: u16) -> MemStore {
    testing::mem_store(dir, k, m, (k + m) as usize, 4 * MIN_SEGMENT_SIZE).unwrap()
}

/// Commits `files` (name, length) in one session; returns the contents.
fn commit_all(store: &Store, files: &[(String, usize)]) -> Vec<Vec<u8>> {
    let mut s = Session::new(store, SessionOptions::default()).unwrap();
    let mut out = Vec::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let bytes = data(*len, i as u64 + 7);
        s.commit(&mut Cursor::new(&bytes), &req(name, *len), &|_| {}).unwrap();
        out.push(bytes);
    }
    for r in s.flush().unwrap() {
        r.unwrap();
    }
    out
}

fn catalog_names(loc: &dyn Location) -> Vec<CatalogName> {
    loc.list(fmt::CATALOG_DIR).unwrap().iter().filter_map(|n| fmt::parse_name(n)).collect()
}

fn shard_dirs(loc: &dyn Location) -> usize {
    loc.list("shards").unwrap().len()
}

#[test]
fn a_session_packs_small_files_and_publishes_them_in_one_record() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 4, 2);
    // 300 files of 0..3 KiB (about 450 KiB: two packs of 256 KiB) and one large file with its own segments.
    let mut files: Vec<(String, usize)> = (0..300).map(|i| (format!("dir/f{i:03}"), (i * 11) % 3000)).collect();
    files.push(("big".into(), 600_000));
    let contents = commit_all(&store, &files);
    let records: Vec<_> =
        catalog_names(faulty[0].as_ref()).into_iter().filter(|n| matches!(n, CatalogName::Record(..))).collect();
    assert_eq!(records.len(), 1, "one record for the whole session");
    assert_eq!(shard_dirs(faulty[0].as_ref()), 3, "two packs and the large file");
    for ((name, _), bytes) in files.iter().zip(&contents) {
        assert_eq!(&get(&store, name).unwrap(), bytes, "{name}");
    }
    let e = catalog::find(&store, "dir/f007").unwrap();
    assert!(matches!(e.manifest.body.data, Data::Packed { .. }));
    // A fresh process sees the same catalog.
    let again = reopen(d.path(), &store);
    assert_eq!(catalog::list(&again).unwrap().0.len(), files.len());
}

#[test]
fn packed_files_read_around_lost_and_damaged_shards() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 4, 2);
    let files: Vec<(String, usize)> = (0..40).map(|i| (format!("f{i}"), 5000 + i * 100)).collect();
    let contents = commit_all(&store, &files);
    // Flip a byte in the middle of every data shard: the direct read fails its tag, the whole pack is rebuilt.
    let inv = testing::fault::inventory(&faulty.iter().map(|f| f.inner().as_ref()).collect::<Vec<_>>()).unwrap();
    for s in inv.shards.iter().filter(|s| s.id.2 < 2) {
        let inner = faulty[s.location].inner();
        let mut b = inner.get(&s.key).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        inner.put(&s.key, &[&b]).unwrap();
    }
    // And lose nothing else but room: with two shards corrupt, any other lost shard would be beyond m.
    for ((name, _), bytes) in files.iter().zip(&contents) {
        assert_eq!(&get(&store, name).unwrap(), bytes, "{name}");
    }
    let r = scrub(&store, true);
    assert_eq!(r.health(), crate::files::health::Health::Degraded);
    assert_eq!(r.health_after(), crate::files::health::Health::Healthy);
    // Two locations gone entirely: still every byte.
    faulty[1].set_gone(true);
    faulty[4].set_gone(true);
    for ((name, _), bytes) in files.iter().zip(&contents) {
        assert_eq!(&get(&store, name).unwrap(), bytes, "{name}");
    }
}

#[test]
fn removing_the_last_file_of_a_pack_removes_the_pack() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 2, 1);
    let files: Vec<(String, usize)> = (0..10).map(|i| (format!("f{i}"), 1000)).collect();
    commit_all(&store, &files);
    assert_eq!(shard_dirs(faulty[0].as_ref()), 1);
    let mut batch = Batch::new();
    for i in 0..9 {
        batch.remove(catalog::find(&store, &format!("f{i}")).unwrap().file);
    }
    catalog::apply(&store, batch).unwrap();
    assert_eq!(shard_dirs(faulty[0].as_ref()), 1, "the pack still holds f9");
    assert_eq!(get(&store, "f9").unwrap(), data(1000, 9 + 7));
    catalog::remove(&store, &catalog::find(&store, "f9").unwrap()).unwrap();
    assert_eq!(shard_dirs(faulty[0].as_ref()), 0);
    assert!(catalog::scan(&store).unwrap().is_empty(), "the pack left the catalog with its last file");
}

#[test]
fn names_in_one_batch_follow_the_replace_rule() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, .. } = mem(d.path(), 2, 1);
    let mut s = Session::new(&store, SessionOptions::default()).unwrap();
    s.commit(&mut Cursor::new(b"one"), &req("a", 3), &|_| {}).unwrap();
    let err = s.commit(&mut Cursor::new(b"two"), &req("a", 3), &|_| {}).unwrap_err();
    assert!(matches!(err, crate::Error::AlreadyExists(_)), "{err}");
    let mut rq = req("a", 3);
    rq.replace = true;
    s.commit(&mut Cursor::new(b"new"), &rq, &|_| {}).unwrap();
    let out = s.flush().unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(get(&store, "a").unwrap(), b"new");
    assert_eq!(catalog::list(&store).unwrap().0.len(), 1);
}

#[test]
fn checkpoints_replace_the_records_they_cover() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 2, 1);
    for i in 0..70 {
        commit_all(&store, &[(format!("f{i}"), 100)]);
    }
    let names = catalog_names(faulty[0].as_ref());
    let ckpt = names.iter().filter(|n| matches!(n, CatalogName::Checkpoint(..))).count();
    let records: Vec<u64> = names
        .iter()
        .filter_map(|n| match n {
            CatalogName::Record(s, _) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(ckpt, 1);
    assert!(records.len() < 64 && records.iter().all(|&s| s > 64), "{records:?}");
    let again = reopen(d.path(), &store);
    assert_eq!(catalog::list(&again).unwrap().0.len(), 70);
    assert_eq!(get(&again, "f3").unwrap(), data(100, 7));
}

#[test]
fn a_record_forked_while_its_locations_were_away_loses_to_the_acknowledged_one() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 2, 2);
    commit_all(&store, &[("base".into(), 10)]);
    let st = catalog_log::current(&store).unwrap();
    // A writer crashed after putting record 2 (naming a file "ghost") on location 0 only.
    let ghost = catalog::find(&store, "base").unwrap().manifest;
    let body = RecordBody {
        store_id: store.descriptor().store_id,
        seq: st.seq + 1,
        prev: st.last,
        written_unix_ns: 1,
        ops: vec![CatalogOp::Put({
            let mut b = ghost.body.clone();
            b.file_id = [9; 16];
            b.name_tag = store.key().unwrap().name_tag("ghost");
            crate::format::manifest::Manifest::new(b, store.key().unwrap()).encode()
        })],
    };
    let (bytes, hash) = fmt::seal(fmt::MAGIC_CATALOG_RECORD, &body, store.key().unwrap()).unwrap();
    let ghost_key = fmt::record_key(body.seq, &hash);
    faulty[0].inner().put(&ghost_key, &[&bytes]).unwrap();
    // Location 0 is away while the next writer appends its own record 2 on the other two.
    faulty[0].set_gone(true);
    commit_all(&store, &[("real".into(), 20)]);
    faulty[0].set_gone(false);
    // Back: both variants of record 2 are listed; the one on three locations wins for every reader.
    let fresh = reopen(d.path(), &store);
    assert!(catalog::find(&fresh, "real").is_ok());
    assert!(catalog::find(&fresh, "ghost").is_err());
    // The next writer sees both and keeps the winner; a repairing scrub deletes the loser.
    commit_all(&fresh, &[("later".into(), 30)]);
    assert!(catalog::find(&fresh, "real").is_ok() && catalog::find(&fresh, "ghost").is_err());
    let r = scrub(&fresh, true);
    assert!(r.catalog.errors.is_empty(), "{:?}", r.catalog.errors);
    assert!(faulty[0].inner().get(&ghost_key).is_err(), "the losing record is gone");
}

#[test]
fn a_writer_needs_all_but_m_locations_to_answer() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { mut store, faulty, .. } = mem(d.path(), 2, 2);
    store.set_min_shards_written(2).unwrap();
    commit_all(&store, &[("a".into(), 10)]);
    faulty[0].set_gone(true);
    commit_all(&store, &[("b".into(), 10)]);
    faulty[1].set_gone(true);
    faulty[2].set_gone(true);
    // Only one of four answers: a removal (no data to store) is refused before anything is written.
    let err = catalog::remove(&store, &catalog::find(&store, "a").unwrap()).unwrap_err();
    assert!(matches!(err, crate::Error::WriteQuorum { .. }), "{err}");
    for f in &faulty {
        f.set_gone(false);
    }
    assert!(catalog::find(&store, "a").is_ok() && catalog::find(&store, "b").is_ok());
}

#[test]
fn a_checkpoint_part_is_checked_against_its_checkpoint_and_never_rolled_back() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 2, 1);
    for i in 0..66 {
        commit_all(&store, &[(format!("f{i}"), 10)]);
    }
    let part = catalog_names(faulty[0].as_ref()).into_iter().find(|n| matches!(n, CatalogName::Part(..))).unwrap();
    let CatalogName::Part(generation, index) = part else { unreachable!() };
    // Location 0 holds a different, validly sealed part under the same name (left by an earlier attempt at the
    // same generation): readers skip it, scrub rewrites it.
    let body = fmt::PartBody { store_id: store.descriptor().store_id, generation, index, manifests: vec![] };
    let (bytes, _) = fmt::seal(fmt::MAGIC_CATALOG_PART, &body, store.key().unwrap()).unwrap();
    let key = fmt::key_of(&part);
    let good = faulty[1].inner().get(&key).unwrap();
    faulty[0].inner().put(&key, &[&bytes]).unwrap();
    let fresh = || {
        let s = reopen(d.path(), &store);
        s
    };
    assert_eq!(catalog::list(&fresh()).unwrap().0.len(), 66);
    let r = scrub(&fresh(), true);
    assert_eq!((r.catalog.copies.corrupt, r.catalog.copies.repaired), (1, 1));
    assert_eq!(faulty[0].inner().get(&key).unwrap(), good);
    // The part unreadable everywhere: an error, never an older or empty catalog.
    for f in &faulty {
        f.inner().put(&key, &[b"BFCATPT\0rot"]).unwrap();
    }
    let err = catalog::list(&fresh()).unwrap_err();
    assert!(matches!(err, crate::Error::Corrupt { .. }), "{err}");
}

#[test]
fn compaction_moves_the_live_files_of_mostly_dead_packs_and_frees_them() {
    let d = tempfile::tempdir().unwrap();
    let MemStore { store, faulty, .. } = mem(d.path(), 4, 2);
    let files: Vec<(String, usize)> = (0..120).map(|i| (format!("f{i}"), 3000 + i)).collect();
    let contents = commit_all(&store, &files);
    let packs_before = shard_dirs(faulty[0].as_ref());
    assert!(packs_before >= 2);
    let roots: Vec<String> =
        (0..120).map(|i| catalog::find(&store, &format!("f{i}")).unwrap().manifest.body.root_hex()).collect();
    let mut batch = Batch::new();
    for i in (0..120).filter(|i| i % 6 != 0) {
        batch.remove(catalog::find(&store, &format!("f{i}")).unwrap().file);
    }
    catalog::apply(&store, batch).unwrap();
    assert_eq!(shard_dirs(faulty[0].as_ref()), packs_before, "partly dead packs stay until compacted");
    let r = crate::files::compact::compact(&store, 64).unwrap();
    assert_eq!(r.packs_dropped as usize, packs_before);
    assert_eq!(r.files_moved, 20);
    assert_eq!(shard_dirs(faulty[0].as_ref()), 1, "one new pack holds the 20 live files");
    for i in (0..120).filter(|i| i % 6 == 0) {
        let e = catalog::find(&store, &format!("f{i}")).unwrap();
        assert_eq!(e.manifest.body.root_hex(), roots[i], "a moved file keeps its root");
        assert_eq!(get(&store, &format!("f{i}")).unwrap(), contents[i]);
    }
    assert_eq!(crate::files::compact::compact(&store, 64).unwrap(), Default::default());
    assert_eq!(scrub(&store, false).health(), crate::files::health::Health::Healthy);
    // A move planned before a file was removed does not bring it back.
    let e = catalog::find(&store, "f0").unwrap();
    let Data::Packed { pack, .. } = e.manifest.body.data else { panic!("f0 is packed") };
    catalog::remove(&store, &e).unwrap();
    let mut batch = Batch::new();
    batch.move_packed(e.manifest.clone(), pack);
    catalog::apply(&store, batch).unwrap();
    assert!(catalog::find(&store, "f0").is_err());
    assert_eq!(get(&store, "f6").unwrap(), contents[6]);
}

/// A commit told the input's size refuses an input that turns out longer or shorter (in the last segment, past
/// a whole segment, or empty), and stores an exact one, also one of whole segments.
#[test]
fn an_input_that_is_not_the_size_it_was_said_to_be_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = mem(d.path(), 2, 1).store;
    let seg = store.descriptor().segment_size as usize;
    let commit = |name: &str, said: usize, real: usize| {
        let bytes = data(real, 3);
        let r = req(name, said);
        crate::files::commit::commit(&store, &mut Cursor::new(&bytes), &r, &|_| {}).map(|_| bytes)
    };
    for (said, real) in [(seg, seg + 1), (2 * seg, 2 * seg + 7), (seg + 5, seg + 4), (2 * seg, seg), (3, 0), (0, 1)] {
        let e = commit("bad", said, real).map(|b| b.len()).expect_err(&format!("said {said}, was {real}"));
        assert!(matches!(e, crate::error::Error::InvalidArgument(_)), "said {said}, was {real}: {e}");
    }
    for len in [0, 5, seg, 2 * seg, 2 * seg + 9] {
        let name = format!("ok{len}");
        let bytes = commit(&name, len, len).unwrap();
        assert_eq!(get(&store, &name).unwrap(), bytes, "{name}");
    }
}

/// A location whose directory is gone lists its catalog as empty; it must not count as answering, or appends
/// could go on from a view that misses the newest records.
#[test]
fn a_location_whose_directory_is_gone_does_not_answer_the_catalog_listing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("s");
    let opts = crate::store::InitOptions {
        k: 2,
        m: 1,
        segment_size: MIN_SEGMENT_SIZE,
        locations: vec![],
        zones: vec![],
        key: crate::store::KeySource::NewKeyFile(dir.join("master.key")),
    };
    let store = Store::init(&dir, opts).unwrap();
    assert_eq!(catalog_log::list(&store).unwrap().answered, vec![0, 1, 2]);
    std::fs::rename(dir.join("locations/loc-01"), d.path().join("aside")).unwrap();
    assert_eq!(catalog_log::list(&store).unwrap().answered, vec![0, 2]);
}
