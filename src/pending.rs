//! Repair to-do records: a write that stored fewer than k+m shards of some stripe (a location down, within the
//! `min_shards_written` policy) leaves a `pending/<id>` record on the locations, so `bf status` shows the reduced
//! redundancy before any scrub has run, and a repairing scrub clears the record once the file or volume is whole.
//! The records are hints: a scrub finds every missing shard by itself, and a lost record loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::{self, MAGIC_PENDING};
use crate::location::LocationExt;
use crate::store::Store;

const PREFIX: &str = "pending";

/// One repair to-do record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRepair {
    /// File or volume id.
    pub id: [u8; 16],
    /// Shards that were not stored (for a volume: counted since it was opened).
    pub shards: u64,
    /// When the shortfall was recorded, seconds since the epoch.
    pub recorded_unix: u64,
}

fn key(id: &[u8; 16]) -> String {
    format!("{PREFIX}/{}", hex::encode(id))
}

/// Records that `id` has `shards` shards to rebuild (replicated like a manifest: m+1 locations must accept it).
pub fn record(store: &Store, id: &[u8; 16], shards: u64) -> Result<()> {
    let rec = PendingRepair { id: *id, shards, recorded_unix: crate::clock::unix_secs() };
    store.put_replicated(&key(id), &format::seal(MAGIC_PENDING, &rec), "a pending-repair record")
}

/// Every record found on any reachable location (damaged copies are skipped).
pub fn list(store: &Store) -> BTreeMap<[u8; 16], PendingRepair> {
    let mut found = BTreeMap::new();
    for loc in store.locations() {
        for name in loc.list(PREFIX).unwrap_or_default() {
            let Ok(bytes) = loc.get(&format!("{PREFIX}/{name}")) else { continue };
            match format::open::<PendingRepair>(MAGIC_PENDING, "pending-repair record", &bytes) {
                Ok(r) if hex::encode(r.id) == name => {
                    found.entry(r.id).or_insert(r);
                }
                _ => tracing::debug!(location = loc.name(), %name, "skipping a damaged pending-repair record"),
            }
        }
    }
    found
}

/// Removes the record of `id` from every location (best effort: a copy left on an unreachable location is
/// cleared by a later repair).
pub fn clear(store: &Store, id: &[u8; 16]) {
    for loc in store.locations() {
        if let Err(e) = loc.delete(&key(id)).and_then(|_| loc.sync()) {
            tracing::debug!(location = loc.name(), error = %e, "could not clear a pending-repair record");
        }
    }
}
