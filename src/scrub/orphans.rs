//! Orphans: shard sets of a file id that no manifest names (left by a crashed commit), deleted by a repairing
//! scrub once older than the grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::files::catalog;
use crate::store::{parse_shard_dir, shard_prefix, SHARDS_DIR};

use super::policy::orphan_due;
use super::report::{LocationState, OrphanReport};
use super::Scrubber;

impl Scrubber<'_> {
    /// Finds orphaned shard sets; with repair deletes those older than the grace period (`first_seen` gives the
    /// age when the backend keeps no times, and is updated with newly seen orphans).
    pub fn orphans(&self, first_seen: &mut BTreeMap<[u8; 16], u64>) -> Result<Vec<OrphanReport>> {
        let known: BTreeSet<[u8; 16]> = catalog::scan(self.store)?.into_iter().map(|f| f.file_id).collect();
        let mut found: BTreeMap<[u8; 16], (Vec<usize>, u64, Option<SystemTime>)> = BTreeMap::new();
        for (i, loc) in self.store.locations().iter().enumerate() {
            if matches!(self.states[i], LocationState::Gone(_) | LocationState::Foreign(_)) {
                continue;
            }
            for dir in loc.list(SHARDS_DIR)? {
                let Some(id) = parse_shard_dir(&dir).filter(|id| !known.contains(id)) else { continue };
                let prefix = shard_prefix(&id);
                let count = loc.list(&prefix)?.len() as u64;
                let changed = loc.modified(&prefix).ok().flatten();
                let e = found.entry(id).or_default();
                e.0.push(i);
                e.1 += count;
                e.2 = e.2.max(changed);
            }
        }
        let now = SystemTime::now();
        let now_unix = crate::clock::secs_of(now);
        first_seen.retain(|id, _| found.contains_key(id));
        let mut out = Vec::new();
        for (id, (locations, shards, changed)) in found {
            let seen = *first_seen.entry(id).or_insert(now_unix);
            let since = changed.unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(seen));
            let age_secs = now.duration_since(since).ok().map(|d| d.as_secs());
            let mut report = OrphanReport { file_id: hex::encode(id), locations, shards, age_secs, deleted: false };
            if self.opts.repair && orphan_due(since, now, self.opts.orphan_grace) {
                report.deleted = self.delete_orphan(&id)?;
            }
            out.push(report);
        }
        Ok(out)
    }

    /// Deletes an orphan's shards under the catalog lock, after checking again that no manifest names it.
    fn delete_orphan(&self, id: &[u8; 16]) -> Result<bool> {
        let _lock = self.store.lock_catalog()?;
        if catalog::scan(self.store)?.iter().any(|f| &f.file_id == id) {
            return Ok(false);
        }
        let prefix = crate::store::shard_prefix(id);
        for (i, loc) in self.store.locations().iter().enumerate() {
            if self.writable[i] {
                loc.delete_prefix(&prefix).and_then(|_| loc.sync())?;
            }
        }
        tracing::info!(file_id = %hex::encode(id), "deleted orphaned shards");
        Ok(true)
    }
}
