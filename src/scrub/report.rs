//! What a scrub found: shard statuses and counts, per-file, per-location and per-orphan reports, and the
//! health they add up to.

use serde::{Deserialize, Serialize};

use crate::format::manifest::ManifestBody;
use crate::format::shard::ShardFault;
use crate::format::shard::HEADER_LEN;
use crate::stripe::ShardProblem;

use super::volumes;

pub use crate::files::health::Health;

/// State of one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardStatus {
    /// Verified.
    Ok,
    /// Absent from every location.
    Missing,
    /// Unreadable, or failed its header, length or hash checks.
    Corrupt,
    /// A valid header naming another shard (a misdirected write).
    Misplaced,
}

/// Classifies why a shard could not be used.
pub fn classify(problem: &ShardProblem) -> ShardStatus {
    match problem {
        ShardProblem::Missing => ShardStatus::Missing,
        ShardProblem::Fault(ShardFault::Misplaced(_)) => ShardStatus::Misplaced,
        ShardProblem::Fault(_) | ShardProblem::Unreadable(_) => ShardStatus::Corrupt,
    }
}

/// Shard counts by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Verified shards.
    pub ok: u64,
    /// Verified shards served by a location other than their home (put there by an earlier repair).
    pub relocated: u64,
    /// Corrupt shards.
    pub corrupt: u64,
    /// Missing shards.
    pub missing: u64,
    /// Misplaced shards.
    pub misplaced: u64,
}

impl Counts {
    pub(super) fn add(&mut self, s: ShardStatus) {
        match s {
            ShardStatus::Ok => self.ok += 1,
            ShardStatus::Missing => self.missing += 1,
            ShardStatus::Corrupt => self.corrupt += 1,
            ShardStatus::Misplaced => self.misplaced += 1,
        }
    }

    /// Counts one shard of the given status.
    pub fn add_status(&mut self, s: ShardStatus) {
        self.add(s);
    }

    pub(super) fn merge(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.relocated += o.relocated;
        self.corrupt += o.corrupt;
        self.missing += o.missing;
        self.misplaced += o.misplaced;
    }

    /// Shards that are not good.
    pub fn bad(&self) -> u64 {
        self.corrupt + self.missing + self.misplaced
    }
}

/// A shard that did not verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIssue {
    /// Segment index.
    pub segment: u64,
    /// Shard index.
    pub shard: u16,
    /// Home location index.
    pub location: usize,
    /// What is wrong.
    pub status: ShardStatus,
    /// Details.
    pub detail: String,
    /// Location a verified rebuilt copy was written to.
    pub repaired_to: Option<usize>,
}

/// Manifest copy counts of one file. Copies on unusable locations are not counted here (see
/// [`LocationReport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyCounts {
    /// Valid copies.
    pub ok: u64,
    /// Absent copies.
    pub missing: u64,
    /// Copies that failed their checks.
    pub corrupt: u64,
    /// Copies rewritten by this run.
    pub repaired: u64,
}

/// Result of scrubbing one file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FileReport {
    /// Name (with the key), `root:<hex>`, or `pack:<id>` for a pack of small files.
    pub label: String,
    /// A pack of small files (not a file of its own).
    #[serde(default)]
    pub pack: bool,
    /// Merkle root, hex (empty when no manifest copy is valid).
    pub root: String,
    /// File id, hex.
    pub file_id: String,
    /// Segment count.
    pub segments: u64,
    /// Shards by status.
    pub shards: Counts,
    /// Segments with exactly k good shards: one more loss loses data.
    pub segments_at_risk: Vec<u64>,
    /// Segments with fewer than k good shards.
    pub segments_lost: Vec<u64>,
    /// Segments whose good shards share locations so that losing m locations (fewer, with shards missing)
    /// would lose them, though their shards on distinct locations would survive it: placement took tolerance.
    #[serde(default)]
    pub segments_crowded: Vec<u64>,
    /// Of those, the ones this run could not spread out again (with repair: home still unwritable).
    #[serde(default)]
    pub segments_crowded_left: Vec<u64>,
    /// Good shards this run moved back to their home location (or away from a crowded one).
    #[serde(default)]
    pub shards_moved: u64,
    /// Plaintext bytes in at-risk segments.
    pub bytes_at_risk: u64,
    /// Plaintext bytes in lost segments.
    pub bytes_lost: u64,
    /// Every bad shard.
    pub issues: Vec<ShardIssue>,
    /// Shards rebuilt, verified and written.
    pub shards_repaired: u64,
    /// Manifest copies.
    pub manifests: CopyCounts,
    /// Repairs that were needed but failed.
    pub repair_errors: Vec<String>,
    /// Shard bytes read and verified.
    pub bytes_verified: u64,
}

impl FileReport {
    /// Health as found (before any repair of this run).
    pub fn health(&self) -> Health {
        if !self.segments_lost.is_empty() || self.root.is_empty() {
            Health::Lost
        } else if self.shards.bad() > 0
            || self.manifests.missing + self.manifests.corrupt > 0
            || !self.segments_crowded.is_empty()
        {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    /// Health after this run's repairs.
    pub fn health_after(&self) -> Health {
        match self.health() {
            Health::Degraded
                if self.issues.iter().all(|i| i.repaired_to.is_some())
                    && self.manifests.repaired == self.manifests.missing + self.manifests.corrupt
                    && self.segments_crowded_left.is_empty() =>
            {
                Health::Healthy
            }
            h => h,
        }
    }

    /// Plaintext bytes still at risk after this run (at-risk segments that were not fully repaired).
    pub fn bytes_at_risk_after(&self) -> u64 {
        if self.health_after() == Health::Healthy {
            0
        } else {
            self.bytes_at_risk
        }
    }
}

/// State of a location as seen by scrub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum LocationState {
    /// Present, with a matching marker.
    Ok,
    /// Present but its marker was missing or damaged; repair rewrote it.
    MarkerRestored,
    /// Present but its marker is missing or damaged (repair rewrites it).
    MarkerMissing(String),
    /// Its marker names another store or position: never written to.
    Foreign(String),
    /// Not reachable (unmounted, deleted, I/O errors).
    Gone(String),
}

impl LocationState {
    /// Whether repair may write here.
    pub fn writable(&self) -> bool {
        matches!(self, LocationState::Ok | LocationState::MarkerRestored)
    }
}

/// Per-location results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocationReport {
    /// Name (path).
    pub name: String,
    /// State.
    pub state: LocationState,
    /// Shards whose home this location is, by status.
    pub shards: Counts,
    /// Missing or corrupt manifest copies here.
    pub manifests_bad: u64,
    /// Shards and manifest copies written here by repair.
    pub written: u64,
}

/// Shards of a file id that no manifest names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrphanReport {
    /// File id, hex.
    pub file_id: String,
    /// Locations holding some of its shards.
    pub locations: Vec<usize>,
    /// Shard objects.
    pub shards: u64,
    /// Segments it has shards of (up to the highest).
    #[serde(default)]
    pub segments: u64,
    /// Seconds since the newest of them changed (or since first seen), when known.
    pub age_secs: Option<u64>,
    /// A cut operation's leftover, a fragment, or a file the catalog lost.
    #[serde(default)]
    pub kind: super::policy::OrphanKind,
    /// Whether repair deleted them.
    pub deleted: bool,
}

impl OrphanReport {
    /// Damage: a whole-looking file no catalog entry names (kept until restored or discarded).
    pub fn is_lost_entry(&self) -> bool {
        self.kind == super::policy::OrphanKind::Unreferenced
    }
}

/// Result of a scrub run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Files checked by this invocation.
    pub files: Vec<FileReport>,
    /// Per-location results.
    pub locations: Vec<LocationReport>,
    /// Orphaned shard sets.
    pub orphans: Vec<OrphanReport>,
    /// Whether repair was requested.
    pub repair: bool,
    /// False when the run stopped early (time budget); continue with a resumed run.
    pub complete: bool,
    /// Files skipped because an interrupted run had already checked them.
    pub files_resumed: u64,
    /// Files removed while this run checked them (not reported, not damage).
    #[serde(default)]
    pub files_removed: u64,
    /// Shard bytes verified.
    pub bytes_verified: u64,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
    /// Block volumes checked (whole-store runs only).
    #[serde(default, skip_deserializing)]
    pub volumes: Vec<volumes::VolumeReport>,
    /// Pending-repair records (writes stored short) found at the start of the run.
    #[serde(default)]
    pub pending_found: u64,
    /// Pending-repair records cleared because their file or volume is whole again (or gone).
    #[serde(default)]
    pub pending_cleared: u64,
    /// The catalog log's copies (whole-store runs).
    #[serde(default)]
    pub catalog: super::CatalogReport,
}

impl ScrubReport {
    /// Health as found.
    pub fn health(&self) -> Health {
        let files = self.files.iter().map(FileReport::health).max().unwrap_or_default();
        let vols = self.volumes.iter().map(volumes::VolumeReport::health).max().unwrap_or_default();
        let catalog = if self.catalog.bad() > 0 { Health::Degraded } else { Health::Healthy };
        let lost =
            if self.catalog.objects == 0 && !self.catalog.errors.is_empty() { Health::Lost } else { Health::Healthy };
        files.max(vols).max(self.location_health()).max(catalog).max(lost).max(self.orphan_health())
    }

    /// Health after repairs (unusable locations keep the store degraded: a disk needs attention).
    pub fn health_after(&self) -> Health {
        let files = self.files.iter().map(FileReport::health_after).max().unwrap_or_default();
        let vols = self.volumes.iter().map(volumes::VolumeReport::health_after).max().unwrap_or_default();
        let catalog = match self.catalog.bad() {
            0 if self.catalog.errors.is_empty() => Health::Healthy,
            _ if self.catalog.repaired_all() => Health::Healthy,
            _ if self.catalog.objects == 0 => Health::Lost,
            _ => Health::Degraded,
        };
        files.max(vols).max(self.location_health_after()).max(catalog).max(self.orphan_health())
    }

    /// Lost while some file's data is there but no catalog entry names it (until `bf lost-found` restores it).
    pub fn orphan_health(&self) -> Health {
        if self.orphans.iter().any(OrphanReport::is_lost_entry) {
            Health::Lost
        } else {
            Health::Healthy
        }
    }

    /// Degraded when some location is unusable after this run (gone, foreign, marker not restored).
    pub fn location_health_after(&self) -> Health {
        if self.locations.iter().all(|l| l.state.writable()) {
            Health::Healthy
        } else {
            Health::Degraded
        }
    }

    /// Degraded when some location was not fine at the start of this run.
    pub fn location_health(&self) -> Health {
        if self.locations.iter().all(|l| l.state == LocationState::Ok) {
            Health::Healthy
        } else {
            Health::Degraded
        }
    }
}

/// Total shard bytes of a file (for progress bars), from its manifest.
pub fn shard_bytes(body: &ManifestBody) -> u64 {
    body.segments.iter().map(|s| (s.shard_len as u64 + HEADER_LEN as u64) * body.width() as u64).sum()
}

/// Merges per-file shard counts (for summaries).
pub fn total_counts(files: &[FileReport]) -> Counts {
    let mut c = Counts::default();
    for f in files {
        c.merge(&f.shards);
    }
    c
}
