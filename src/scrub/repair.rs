//! Writing a rebuilt shard: to the first of its candidate locations that accepts it, read back and verified
//! before it counts (shared by file and volume repair).

use crate::codec::merkle::Hash;
use crate::error::{Error, LocationFailure, Result};
use crate::format::shard::{self, Expected, ShardHeader};
use crate::location::LocationExt;
use crate::store::Store;

/// Writes `header` + `payload` under `key` to the first of `targets` that stores it durably and reads it back
/// matching `leaf`; returns that location's index.
pub(super) fn write_rebuilt(
    store: &Store,
    key: &str,
    header: &ShardHeader,
    payload: &[u8],
    leaf: &Hash,
    targets: &[usize],
) -> Result<usize> {
    let want = Expected {
        store_id: &header.store_id,
        file_id: &header.file_id,
        segment: header.segment,
        shard: header.shard,
        len: payload.len() as u32,
        leaf,
    };
    let head = header.encode();
    let mut failures = Vec::new();
    for &target in targets {
        let loc = &store.locations()[target];
        match loc.put(key, &[&head, payload]).and_then(|_| loc.sync()).and_then(|_| loc.get(key)) {
            // Pair assertion: the copy on disk must verify as it is read back.
            Ok(back) if shard::verify(&back, &want).is_ok() => return Ok(target),
            Ok(_) => {
                failures.push(LocationFailure::new(loc.name(), Error::corrupt("rebuilt shard", "read back wrong")))
            }
            Err(e) => failures.push(LocationFailure::new(loc.name(), e)),
        }
    }
    Err(Error::write_quorum(format!("rebuilt shard {}", header.shard), 0, 1, failures))
}

/// Rewrites the copies of a replicated object (superblock, checkpoint, map page) on the locations `bad` from the
/// bytes of a good copy, when repairing; counts the copies rewritten in `done`.
pub(super) fn rewrite_copies(
    store: &Store,
    key: &str,
    good: Option<&[u8]>,
    bad: &[usize],
    repair: bool,
    done: &mut u64,
) {
    let (true, Some(bytes)) = (repair, good) else { return };
    for &i in bad {
        let loc = &store.locations()[i];
        if loc.put(key, &[bytes]).and_then(|_| loc.sync()).is_ok() {
            *done += 1;
        }
    }
}
