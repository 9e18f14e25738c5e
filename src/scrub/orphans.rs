//! Orphans: shard sets of a file id that no catalog entry names. Intent markers ([`crate::files::intent`]) tell
//! a cut operation's leftovers (deleted by a repairing scrub once older than the grace period) from the data of
//! a file whose catalog entry was lost (reported as damage and never deleted: `bf lost-found` restores it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::files::{catalog, intent};
use crate::store::{parse_shard_dir, parse_shard_name, shard_prefix, Store, SHARDS_DIR};

use super::policy::{classify_orphan, orphan_due, OrphanKind};
use super::report::{LocationState, OrphanReport};
use super::Scrubber;

/// What the locations hold of one orphaned file id.
#[derive(Clone, Debug, Default)]
pub struct OrphanSurvey {
    /// Locations holding some of it.
    pub locations: Vec<usize>,
    /// `(segment, shard)` names found (on any location).
    pub shards: BTreeSet<(u64, u16)>,
    /// Shard objects (a shard on two locations counts twice).
    pub objects: u64,
    /// Some location holds an intent marker.
    pub marked: bool,
    /// Newest change, when the backend keeps times.
    pub changed: Option<SystemTime>,
}

impl OrphanSurvey {
    /// What it is, for a store of `k` data shards.
    pub fn kind(&self, k: usize) -> OrphanKind {
        classify_orphan(&self.shards, self.marked, k)
    }

    /// Segments it has shards of (up to the highest).
    pub fn segments(&self) -> u64 {
        self.shards.iter().next_back().map_or(0, |(s, _)| s + 1)
    }
}

/// Lists every shard folder no catalog entry names, on the locations `usable` allows. Ids that a second look at
/// the catalog finds (a commit published while the folders were listed) are left out.
pub fn survey(store: &Store, usable: &dyn Fn(usize) -> bool) -> Result<BTreeMap<[u8; 16], OrphanSurvey>> {
    let known = |store: &Store| -> Result<BTreeSet<[u8; 16]>> {
        Ok(catalog::scan(store)?.into_iter().map(|f| f.file_id).collect())
    };
    let before = known(store)?;
    let mut found: BTreeMap<[u8; 16], OrphanSurvey> = BTreeMap::new();
    for (i, loc) in store.locations().iter().enumerate().filter(|(i, _)| usable(*i)) {
        for dir in loc.list(SHARDS_DIR)? {
            let Some(id) = parse_shard_dir(&dir).filter(|id| !before.contains(id)) else { continue };
            let prefix = shard_prefix(&id);
            let names = loc.list(&prefix)?;
            let e = found.entry(id).or_default();
            e.locations.push(i);
            for name in &names {
                if intent::is_marker(name) {
                    e.marked = true;
                } else if let Some(s) = parse_shard_name(name) {
                    e.shards.insert(s);
                    e.objects += 1;
                }
            }
            e.changed = e.changed.max(loc.modified(&prefix).ok().flatten());
        }
    }
    if !found.is_empty() {
        let after = known(store)?;
        found.retain(|id, _| !after.contains(id));
    }
    Ok(found)
}

impl Scrubber<'_> {
    /// Finds orphaned shard sets; with repair deletes the leftovers and fragments older than the grace period
    /// (`first_seen` gives the age when the backend keeps no times, and is updated with newly seen orphans).
    /// Unreferenced whole-looking files are never deleted here.
    pub fn orphans(&self, first_seen: &mut BTreeMap<[u8; 16], u64>) -> Result<Vec<OrphanReport>> {
        let usable = |i: usize| !matches!(self.states[i], LocationState::Gone(_) | LocationState::Foreign(_));
        let found = survey(self.store, &usable)?;
        let k = self.store.descriptor().k as usize;
        let now = SystemTime::now();
        let now_unix = crate::clock::secs_of(now);
        first_seen.retain(|id, _| found.contains_key(id));
        let mut out = Vec::new();
        for (id, s) in found {
            let seen = *first_seen.entry(id).or_insert(now_unix);
            let since = s.changed.unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(seen));
            let age_secs = now.duration_since(since).ok().map(|d| d.as_secs());
            let kind = s.kind(k);
            let mut report = OrphanReport {
                file_id: hex::encode(id),
                segments: s.segments(),
                shards: s.objects,
                locations: s.locations,
                age_secs,
                kind,
                deleted: false,
            };
            if kind == OrphanKind::Unreferenced {
                tracing::error!(file_id = %report.file_id, "shards of a whole-looking file no catalog entry names");
            } else if self.opts.repair && orphan_due(since, now, self.opts.orphan_grace) {
                report.deleted = self.delete_orphan(&id)?;
            }
            out.push(report);
        }
        Ok(out)
    }

    /// Deletes an orphan's shards under the catalog lock, after checking again that no catalog entry names it.
    fn delete_orphan(&self, id: &[u8; 16]) -> Result<bool> {
        let _lock = self.store.lock_catalog()?;
        if catalog::scan(self.store)?.iter().any(|f| &f.file_id == id) {
            return Ok(false);
        }
        let prefix = shard_prefix(id);
        for (i, loc) in self.store.locations().iter().enumerate() {
            if self.writable[i] {
                loc.delete_prefix(&prefix).and_then(|_| loc.sync())?;
            }
        }
        tracing::info!(file_id = %hex::encode(id), "deleted orphaned shards");
        Ok(true)
    }
}
