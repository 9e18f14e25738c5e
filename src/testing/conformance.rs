//! The [`Location`] contract as one executable suite. Every backend (local directories with either I/O engine,
//! the in-memory and fault-injecting test locations, S3 object stores) runs it, so the store above can rely on
//! the same behaviour everywhere. Test support: failures panic with the backend's name and the broken rule.

use crate::error::{ErrorKind, Result};
use crate::location::{Location, LocationExt};
use crate::testing::test_bytes;

/// Options for [`check`].
pub struct Options {
    /// Size of the large-object round trip (pick it above an object store's multipart threshold).
    pub large_object: usize,
    /// Whether racing [`Location::put_new`] calls on one key must have exactly one winner. Every backend of
    /// this crate guarantees it (and so does AWS S3); test servers that check for the object before writing
    /// (s3s-fs) do not, and are held only to "every loser is refused and the object is one winner's bytes".
    pub atomic_create: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { large_object: 3 << 20, atomic_create: true }
    }
}

/// Runs the whole suite on an empty location. Uses keys under `conformance/`.
pub fn check(loc: &dyn Location, opts: &Options) {
    let who = loc.name().to_string();
    loc.probe().unwrap_or_else(|e| panic!("{who}: probe of a present location failed: {e}"));
    put_get_and_ranges(loc, &who);
    list_rename_delete(loc, &who);
    deferred_large_and_concurrent(loc, &who, opts);
    create_only(loc, &who, opts);
    // Keys that could escape the location are refused.
    for bad in ["../x", "a//b", "a/./b", ""] {
        assert!(loc.put(bad, &[b"x"]).is_err(), "{who}: key {bad:?} must be refused");
        assert!(loc.put_new(bad, &[b"x"]).is_err(), "{who}: key {bad:?} must be refused by put_new");
    }
    loc.delete_prefix("conformance").unwrap();
    loc.sync().unwrap();
}

/// put / get (parts concatenated, a second put replaces), missing objects, ranges.
fn put_get_and_ranges(loc: &dyn Location, who: &str) {
    let fail = |rule: &str| -> ! { panic!("{who}: {rule}") };
    loc.put("conformance/a/one", &[b"hello ", b"", b"world"]).unwrap_or_else(|e| fail(&format!("put: {e}")));
    loc.sync().unwrap_or_else(|e| fail(&format!("sync: {e}")));
    assert_eq!(loc.get("conformance/a/one").unwrap(), b"hello world", "{who}: get returns the put bytes");
    loc.put("conformance/a/one", &[b"new"]).unwrap();
    assert_eq!(loc.get("conformance/a/one").unwrap(), b"new", "{who}: put replaces");
    let mut buf = vec![7u8; 100];
    loc.get_into("conformance/a/one", &mut buf).unwrap();
    assert_eq!(buf, b"new", "{who}: get_into clears the buffer first");

    // Missing objects are "not found", not damage.
    match loc.get("conformance/missing") {
        Err(e) if e.is_not_found() => {}
        other => fail(&format!("get of a missing object must be not-found, got {other:?}")),
    }
    assert!(loc.get_range("conformance/missing", 0, 4).is_err_and(|e| e.is_not_found()), "{who}: range of missing");

    // Ranges: inside, past the end (shorter), starting at or past the end (empty).
    let data = test_bytes(10_000, 1);
    loc.put("conformance/a/two", &[&data[..3], &data[3..]]).unwrap();
    assert_eq!(loc.get_range("conformance/a/two", 100, 50).unwrap(), &data[100..150], "{who}: inner range");
    assert_eq!(loc.get_range("conformance/a/two", 9_990, 50).unwrap(), &data[9_990..], "{who}: range past the end");
    assert!(loc.get_range("conformance/a/two", 10_000, 5).unwrap().is_empty(), "{who}: range at the end");
    assert!(loc.get_range("conformance/a/two", 20_000, 5).unwrap().is_empty(), "{who}: range beyond the end");
}

/// Listing, timestamps, rename, delete and delete_prefix (on the objects [`put_get_and_ranges`] left).
fn list_rename_delete(loc: &dyn Location, who: &str) {
    let fail = |rule: &str| -> ! { panic!("{who}: {rule}") };
    // Listing: the direct children (objects and "directories"), sorted, once each; missing prefix is empty.
    loc.put("conformance/a/sub/x", &[b"x"]).unwrap();
    loc.put("conformance/a/sub/y", &[b"y"]).unwrap();
    loc.put("conformance/ab/z", &[b"z"]).unwrap();
    assert_eq!(loc.list("conformance/a").unwrap(), ["one", "sub", "two"], "{who}: list");
    assert_eq!(loc.list("conformance").unwrap(), ["a", "ab"], "{who}: list of directories");
    assert!(loc.list("conformance/nothing").unwrap().is_empty(), "{who}: list of a missing prefix");

    // Timestamps, where the backend has them, are recent.
    if let Some(t) = loc.modified("conformance/a/one").unwrap_or_else(|e| fail(&format!("modified: {e}"))) {
        let age = std::time::SystemTime::now().duration_since(t).unwrap_or_default();
        assert!(age.as_secs() < 600, "{who}: modified time is {age:?} old");
    }

    // Rename replaces the target and removes the source.
    loc.put("conformance/r/from", &[b"moved"]).unwrap();
    loc.put("conformance/r/to", &[b"old"]).unwrap();
    loc.rename("conformance/r/from", "conformance/r/to").unwrap_or_else(|e| fail(&format!("rename: {e}")));
    assert_eq!(loc.get("conformance/r/to").unwrap(), b"moved", "{who}: rename target");
    assert!(loc.get("conformance/r/from").is_err_and(|e| e.is_not_found()), "{who}: rename source removed");

    // Delete is idempotent.
    loc.delete("conformance/a/one").unwrap();
    loc.delete("conformance/a/one").unwrap_or_else(|e| fail(&format!("delete of a missing object: {e}")));
    assert!(loc.get("conformance/a/one").is_err_and(|e| e.is_not_found()), "{who}: deleted");

    // delete_prefix removes a whole "directory" and nothing that merely shares its name's prefix.
    loc.delete_prefix("conformance/a").unwrap_or_else(|e| fail(&format!("delete_prefix: {e}")));
    loc.sync().unwrap();
    assert!(loc.list("conformance/a").unwrap().is_empty(), "{who}: delete_prefix");
    assert_eq!(loc.get("conformance/ab/z").unwrap(), b"z", "{who}: delete_prefix spares conformance/ab");
    loc.delete_prefix("conformance/never").unwrap_or_else(|e| fail(&format!("delete_prefix of nothing: {e}")));
}

/// Deferred puts, a large object in several parts, concurrent puts of different keys.
fn deferred_large_and_concurrent(loc: &dyn Location, who: &str, opts: &Options) {
    // Deferred puts are readable at once and durable after sync.
    loc.put_deferred("conformance/d/x", &[b"deferred"]).unwrap();
    loc.sync().unwrap();
    assert_eq!(loc.get("conformance/d/x").unwrap(), b"deferred", "{who}: deferred put");

    // A large object, written in several parts, round-trips.
    let big = test_bytes(opts.large_object, 9);
    let third = big.len() / 3;
    let put = loc.put("conformance/big", &[&big[..third], &big[third..]]);
    put.unwrap_or_else(|e| panic!("{who}: large put: {e}"));
    assert!(loc.get("conformance/big").unwrap() == big, "{who}: large object round trip");
    assert_eq!(loc.get_range("conformance/big", third as u64 - 5, 10).unwrap(), &big[third - 5..third + 5]);

    // Concurrent puts of different keys all land.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            s.spawn(move || {
                for i in 0..5u8 {
                    loc.put(&format!("conformance/c/{t}-{i}"), &[&[t, i]]).unwrap();
                }
            });
        }
    });
    assert_eq!(loc.list("conformance/c").unwrap().len(), 20, "{who}: concurrent puts");
}

/// put_new: creates a new object, refuses an existing one (whoever wrote it) with `AlreadyExists` and leaves
/// it untouched, and of racing creators lets exactly one win.
fn create_only(loc: &dyn Location, who: &str, opts: &Options) {
    let refused = |key: &str, parts: &[&[u8]], rule: &str| match loc.put_new(key, parts) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        other => panic!("{who}: {rule}: put_new must fail with AlreadyExists, got {other:?}"),
    };
    loc.put_new("conformance/n/one", &[b"first ", b"bytes"]).unwrap_or_else(|e| panic!("{who}: put_new: {e}"));
    loc.sync().unwrap();
    assert_eq!(loc.get("conformance/n/one").unwrap(), b"first bytes", "{who}: put_new reads back");
    refused("conformance/n/one", &[b"second"], "over a put_new object");
    assert_eq!(loc.get("conformance/n/one").unwrap(), b"first bytes", "{who}: put_new keeps the old bytes");
    loc.put("conformance/n/two", &[b"put"]).unwrap();
    refused("conformance/n/two", &[b"other"], "over a put object");
    assert_eq!(loc.get("conformance/n/two").unwrap(), b"put", "{who}: put_new keeps a put object");
    loc.put("conformance/n/one", &[b"replaced"]).unwrap();
    assert_eq!(loc.get("conformance/n/one").unwrap(), b"replaced", "{who}: put replaces a put_new object");
    loc.delete("conformance/n/one").unwrap();
    loc.put_new("conformance/n/one", &[b"again"]).unwrap_or_else(|e| panic!("{who}: put_new after delete: {e}"));
    assert_eq!(loc.get("conformance/n/one").unwrap(), b"again", "{who}: put_new after delete");
    assert_eq!(loc.list("conformance/n").unwrap(), ["one", "two"], "{who}: put_new leaves no temporary objects");
    racing_creates(loc, who, opts);
}

/// Many threads call put_new on one key at once, each with its own bytes.
fn racing_creates(loc: &dyn Location, who: &str, opts: &Options) {
    const RACERS: usize = 8;
    let key = "conformance/n/race";
    let payloads: Vec<Vec<u8>> = (0..RACERS).map(|t| test_bytes(64 << 10, 100 + t as u64)).collect();
    let start = std::sync::Barrier::new(RACERS);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let threads: Vec<_> = payloads
            .iter()
            .map(|p| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    loc.put_new(key, &[p])
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_else(|_| panic!("{who}: a racer panicked"))).collect()
    });
    let winners: Vec<usize> = (0..RACERS).filter(|&t| results[t].is_ok()).collect();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind(), ErrorKind::AlreadyExists, "{who}: a losing racer must get AlreadyExists, got {r}");
    }
    if opts.atomic_create {
        assert_eq!(winners.len(), 1, "{who}: exactly one of {RACERS} racing put_new calls succeeds");
    } else {
        assert!(!winners.is_empty(), "{who}: one of {RACERS} racing put_new calls succeeds");
    }
    let stored = loc.get(key).unwrap();
    assert!(winners.iter().any(|&t| stored == payloads[t]), "{who}: the raced object holds a winner's bytes");
    assert_eq!(loc.list("conformance/n").unwrap(), ["one", "race", "two"], "{who}: racing leaves no temporaries");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::{IoEngine, LocalDir};
    use crate::testing::{fault::FaultyLocation, MemLocation};
    use std::sync::Arc;

    #[test]
    fn local_directories_conform() {
        let mut engines = vec![IoEngine::Std];
        if crate::location::uring::available() {
            engines.push(IoEngine::Uring);
        }
        for e in engines {
            let d = tempfile::tempdir().unwrap();
            check(&LocalDir::with_engine(d.path(), e), &Options::default());
        }
    }

    #[test]
    fn test_locations_conform() {
        check(&MemLocation::new("mem"), &Options::default());
        let inner: Arc<dyn Location> = Arc::new(MemLocation::new("mem2"));
        check(&FaultyLocation::new(inner), &Options::default());
    }
}
