//! Intent markers: how a scrub tells the leftovers of a cut operation from a file the catalog lost.
//!
//! Shards no catalog entry names are either what a crash left behind (a commit cut before its record, a removal
//! cut after its record and before its shards were deleted) or the data of a file whose catalog entry was lost
//! (damage: kept, reported, and restorable with the key by `bf lost-found`). A marker object in the shard folder
//! says which:
//!
//! - `commit-intent` is written on every location before a commit's (or pack's) first shard and deleted once the
//!   record naming it is durable;
//! - `remove-intent` is written, durably on at least m+1 locations, before the record that removes a file, and
//!   goes with its shards.
//!
//! A shard set with a marker on any location is a leftover (deleted after the grace period); one without is
//! damage when it looks whole (every segment has k shards), and a fragment otherwise. Shards are deleted one
//! location after another, so a removal cut while deleting leaves either a marker or fewer than k shards of a
//! segment.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::{self, MAGIC_INTENT};
use crate::store::{shard_prefix, Store};

/// Name of the marker of a commit in progress.
pub const COMMIT_INTENT: &str = "commit-intent";
/// Name of the marker of a removal in progress.
pub const REMOVE_INTENT: &str = "remove-intent";

/// What a marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Shards are being written; no record names them yet.
    Commit,
    /// A record removing the file is being written.
    Remove,
}

/// The marker's body (the name says as much; the body makes it a checked record like every other).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentMarker {
    /// What is in progress.
    pub intent: Intent,
    /// Store id.
    pub store_id: [u8; 16],
    /// File (or pack) id.
    pub file_id: [u8; 16],
    /// When it was written, nanoseconds since the epoch.
    pub written_unix_ns: u64,
}

impl Intent {
    fn name(self) -> &'static str {
        match self {
            Intent::Commit => COMMIT_INTENT,
            Intent::Remove => REMOVE_INTENT,
        }
    }
}

/// True for the name of a marker (as listed in a shard folder).
pub fn is_marker(name: &str) -> bool {
    name == COMMIT_INTENT || name == REMOVE_INTENT
}

fn key(id: &[u8; 16], intent: Intent) -> String {
    format!("{}/{}", shard_prefix(id), intent.name())
}

fn encode(store: &Store, id: &[u8; 16], intent: Intent) -> Vec<u8> {
    let m = IntentMarker {
        intent,
        store_id: store.descriptor().store_id,
        file_id: *id,
        written_unix_ns: crate::clock::unix_ns(),
    };
    format::seal(MAGIC_INTENT, &m)
}

/// Decodes a marker's bytes.
pub fn decode(bytes: &[u8]) -> Result<IntentMarker> {
    format::open(MAGIC_INTENT, "intent marker", bytes)
}

/// Marks `id` as being committed, before its first shard is written (deferred like the shards: the locations
/// are synced before any record names them). Best effort: without a marker, a crash leftover that looks whole
/// is reported as damage and kept, which loses nothing.
pub fn mark_commit(store: &Store, id: &[u8; 16]) {
    let bytes = encode(store, id, Intent::Commit);
    let k = key(id, Intent::Commit);
    let failed = store.locations().iter().filter(|l| l.put_deferred(&k, &[&bytes]).is_err()).count();
    if failed == store.locations().len() {
        tracing::warn!(file_id = %hex::encode(id), "no location took the commit marker");
    }
}

/// Drops the commit markers of files whose record is durable (best effort: a marker left beside a catalogued
/// file is harmless).
pub fn clear_commit(store: &Store, ids: &[[u8; 16]]) {
    drop_markers(store, ids, Intent::Commit);
}

/// Drops removal markers of a removal whose record was not written (best effort).
pub fn clear_removal(store: &Store, ids: &[[u8; 16]]) {
    drop_markers(store, ids, Intent::Remove);
    if !ids.is_empty() {
        store.locations().iter().for_each(|l| drop(l.sync()));
    }
}

fn drop_markers(store: &Store, ids: &[[u8; 16]], intent: Intent) {
    for loc in store.locations() {
        for id in ids {
            if let Err(e) = loc.delete(&key(id, intent)) {
                tracing::debug!(location = loc.name(), error = %e, ?intent, "could not drop an intent marker");
            }
        }
    }
}

/// Marks `ids` as being removed, durably on at least m+1 locations (all, when fewer), before the record that
/// removes them. Fails with [`Error::WriteQuorum`] otherwise (the markers written are then left: they only say
/// what a removal would have said).
pub fn mark_removal(store: &Store, ids: &[[u8; 16]]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let markers: Vec<(String, Vec<u8>)> =
        ids.iter().map(|id| (key(id, Intent::Remove), encode(store, id, Intent::Remove))).collect();
    store.on_every_location("the removal markers", &|l| {
        markers.iter().try_for_each(|(k, b)| l.put_deferred(k, &[b]))?;
        l.sync()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_checked_records_whose_names_are_never_shard_names() {
        let dir = tempfile::tempdir().unwrap();
        let ms = crate::testing::mem_store(dir.path(), 2, 1, 3, crate::store::MIN_SEGMENT_SIZE).unwrap();
        let bytes = encode(&ms.store, &[7; 16], Intent::Remove);
        let m = decode(&bytes).unwrap();
        assert_eq!((m.intent, m.file_id), (Intent::Remove, [7; 16]));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode(&bad).is_err());
        for name in [COMMIT_INTENT, REMOVE_INTENT] {
            assert!(is_marker(name));
            assert_eq!(crate::store::parse_shard_name(name), None);
        }
        assert!(!is_marker("0000000000.000"));
    }
}
