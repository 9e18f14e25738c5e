//! The [`Location`] contract as one executable suite. Every backend (local directories with either I/O engine,
//! the in-memory and fault-injecting test locations, S3 object stores) runs it, so the store above can rely on
//! the same behaviour everywhere. Test support: failures panic with the backend's name and the broken rule.

use crate::location::{Location, LocationExt};
use crate::testing::test_bytes;

/// Options for [`check`].
pub struct Options {
    /// Size of the large-object round trip (pick it above an object store's multipart threshold).
    pub large_object: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { large_object: 3 << 20 }
    }
}

/// Runs the whole suite on an empty location. Uses keys under `conformance/`.
pub fn check(loc: &dyn Location, opts: &Options) {
    let who = loc.name().to_string();
    let fail = |rule: &str| -> ! { panic!("{who}: {rule}") };
    loc.probe().unwrap_or_else(|e| fail(&format!("probe of a present location failed: {e}")));

    // put / get: parts are concatenated; a second put replaces the object.
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

    // Deferred puts are readable at once and durable after sync.
    loc.put_deferred("conformance/d/x", &[b"deferred"]).unwrap();
    loc.sync().unwrap();
    assert_eq!(loc.get("conformance/d/x").unwrap(), b"deferred", "{who}: deferred put");

    // A large object, written in several parts, round-trips.
    let big = test_bytes(opts.large_object, 9);
    let third = big.len() / 3;
    loc.put("conformance/big", &[&big[..third], &big[third..]]).unwrap_or_else(|e| fail(&format!("large put: {e}")));
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

    // Keys that could escape the location are refused.
    for bad in ["../x", "a//b", "a/./b", ""] {
        assert!(loc.put(bad, &[b"x"]).is_err(), "{who}: key {bad:?} must be refused");
    }
    loc.delete_prefix("conformance").unwrap();
    loc.sync().unwrap();
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
