//! The scrub state record, `<store>/scrub.state`: where an interrupted scrub got to, the summary of the last
//! complete run, when each file and volume was last verified and with what result, and when orphans were first
//! seen.
//!
//! Envelope-framed (magic `BFSCRUB\0`, version, BLAKE3 checksum; see [`crate::format`]) and written atomically.
//! It is a cache of scrub results, never a source of truth: a missing or damaged record only means "no history".

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::volumes::VolumeReport;
use super::{FileReport, Health, ScrubReport};
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_SCRUB_STATE};
use crate::store::write_atomic;

/// File name of the record in the store directory.
pub const STATE_FILE: &str = "scrub.state";

/// Format version of the record: 2 added the volumes' results. A version 1 record reads as no history.
const STATE_VERSION: u16 = 2;

/// Totals of one scrub run (complete, or so far).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Start, seconds since the epoch.
    pub started_unix: u64,
    /// End, seconds since the epoch (0 while running).
    pub finished_unix: u64,
    /// Whether repair was on.
    pub repair: bool,
    /// Worst health found.
    pub health: Health,
    /// Worst health after repairs.
    pub health_after: Health,
    /// Files checked.
    pub files: u64,
    /// Block volumes checked.
    pub volumes: u64,
    /// Shard bytes verified (files and volumes).
    pub bytes_verified: u64,
    /// Bad shards found (files and volumes).
    pub shards_bad: u64,
    /// Shards rebuilt (files and volumes).
    pub shards_repaired: u64,
    /// Missing or corrupt manifest copies found.
    pub manifest_copies_bad: u64,
    /// Segments of files and stripes of volumes with exactly k good shards.
    pub segments_at_risk: u64,
    /// Segments of files and stripes of volumes with fewer than k good shards.
    pub segments_lost: u64,
    /// Plaintext bytes still at risk after repairs (files and volumes).
    pub bytes_at_risk: u64,
    /// Plaintext bytes lost (files and volumes).
    pub bytes_lost: u64,
    /// Orphaned shard sets found.
    pub orphans: u64,
}

impl RunSummary {
    /// Adds one file's results.
    pub fn add_file(&mut self, f: &FileReport) {
        self.health = self.health.max(f.health());
        self.health_after = self.health_after.max(f.health_after());
        self.files += 1;
        self.bytes_verified += f.bytes_verified;
        self.shards_bad += f.shards.bad();
        self.shards_repaired += f.shards_repaired;
        self.manifest_copies_bad += f.manifests.missing + f.manifests.corrupt;
        self.segments_at_risk += f.segments_at_risk.len() as u64;
        self.segments_lost += f.segments_lost.len() as u64;
        self.bytes_at_risk += f.bytes_at_risk_after();
        self.bytes_lost += f.bytes_lost;
    }

    /// Adds the store-wide results (locations, volumes, orphans) at the end of a run.
    pub fn finish(&mut self, report: &ScrubReport, now_unix: u64) {
        self.health = self.health.max(report.location_health());
        self.health_after = self.health_after.max(report.location_health_after());
        for v in &report.volumes {
            self.volumes += 1;
            self.bytes_verified += v.bytes_verified;
            self.shards_bad += v.shards.bad();
            self.shards_repaired += v.shards_repaired;
            self.segments_at_risk += v.stripes_at_risk.len() as u64;
            self.segments_lost += v.stripes_lost.len() as u64;
            self.bytes_at_risk += v.bytes_at_risk_after();
            self.bytes_lost += v.bytes_lost();
        }
        self.orphans = report.orphans.len() as u64;
        self.finished_unix = now_unix;
    }
}

/// The last result for one file, or for one volume (its stripes counted as segments).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// When it was last verified, seconds since the epoch.
    pub verified_unix: u64,
    /// Health after that run's repairs.
    pub health: Health,
    /// Segments still at risk.
    pub segments_at_risk: u64,
    /// Segments lost.
    pub segments_lost: u64,
    /// Plaintext bytes still at risk.
    pub bytes_at_risk: u64,
    /// Plaintext bytes lost.
    pub bytes_lost: u64,
}

impl FileRecord {
    /// The record of a file report made at `now_unix`.
    pub fn of(f: &FileReport, now_unix: u64) -> Self {
        let healthy = f.health_after() == Health::Healthy;
        FileRecord {
            verified_unix: now_unix,
            health: f.health_after(),
            segments_at_risk: if healthy { 0 } else { f.segments_at_risk.len() as u64 },
            segments_lost: f.segments_lost.len() as u64,
            bytes_at_risk: f.bytes_at_risk_after(),
            bytes_lost: f.bytes_lost,
        }
    }

    /// The record of a volume report made at `now_unix`.
    pub fn of_volume(v: &VolumeReport, now_unix: u64) -> Self {
        let healthy = v.health_after() == Health::Healthy;
        FileRecord {
            verified_unix: now_unix,
            health: v.health_after(),
            segments_at_risk: if healthy { 0 } else { v.stripes_at_risk.len() as u64 },
            segments_lost: v.stripes_lost.len() as u64,
            bytes_at_risk: v.bytes_at_risk_after(),
            bytes_lost: v.bytes_lost(),
        }
    }
}

/// A run in progress: its totals so far and the last file it finished (files are scrubbed in catalog order,
/// by name tag then file id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// Totals so far.
    pub summary: RunSummary,
    /// Last file finished.
    pub cursor: Option<(Hash, [u8; 16])>,
}

/// Everything recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubState {
    /// Store the record belongs to.
    pub store_id: [u8; 16],
    /// An unfinished full run.
    pub running: Option<Running>,
    /// The last complete full run.
    pub last: Option<RunSummary>,
    /// Last result per file id.
    pub files: BTreeMap<[u8; 16], FileRecord>,
    /// Last result per block volume (by hex id), from the last complete run.
    pub volumes: BTreeMap<String, FileRecord>,
    /// When each current orphan was first seen, seconds since the epoch.
    pub orphans_seen: BTreeMap<[u8; 16], u64>,
}

impl ScrubState {
    /// An empty record for a store.
    pub fn new(store_id: [u8; 16]) -> Self {
        ScrubState { store_id, ..ScrubState::default() }
    }

    /// Reads the record of the store in `dir`: `Ok(None)` when there is none, an error when it is damaged or
    /// belongs to another store.
    pub fn load(dir: &Path, store_id: &[u8; 16]) -> Result<Option<ScrubState>> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let what = format!("scrub state {}", path.display());
        let (version, payload) = format::open_bytes_version(MAGIC_SCRUB_STATE, &what, &bytes, 1..=STATE_VERSION)?;
        if version < STATE_VERSION {
            tracing::info!(version, "the scrub state record is of an older format: starting without history");
            return Ok(None);
        }
        let state: ScrubState =
            postcard::from_bytes(payload).map_err(|e| Error::corrupt(what.clone(), format!("undecodable: {e}")))?;
        if &state.store_id != store_id {
            return Err(Error::corrupt(what, "belongs to another store"));
        }
        Ok(Some(state))
    }

    /// Writes the record atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let payload =
            postcard::to_allocvec(self).map_err(|e| Error::internal(format!("encoding the scrub state: {e}")))?;
        write_atomic(
            &dir.join(STATE_FILE),
            &format::seal_bytes_version(MAGIC_SCRUB_STATE, STATE_VERSION, &payload),
            0o644,
        )
    }

    /// Files and volumes whose last result was not healthy, and the plaintext bytes at risk and lost in them,
    /// from the per-file and per-volume records.
    pub fn at_risk(&self) -> (u64, u64, u64, u64) {
        let unhealthy = |r: &&FileRecord| r.health != Health::Healthy;
        let all = || self.files.values().chain(self.volumes.values());
        let (risk, lost) = (all().map(|f| f.bytes_at_risk).sum(), all().map(|f| f.bytes_lost).sum());
        let files = self.files.values().filter(unhealthy).count() as u64;
        (files, self.volumes.values().filter(unhealthy).count() as u64, risk, lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage_and_other_stores() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(ScrubState::load(d.path(), &[1; 16]).unwrap(), None);
        let mut s = ScrubState::new([1; 16]);
        s.files.insert([2; 16], FileRecord { verified_unix: 5, health: Health::Degraded, ..FileRecord::default() });
        s.volumes.insert("ab".into(), FileRecord { verified_unix: 6, health: Health::Lost, ..FileRecord::default() });
        s.running = Some(Running {
            summary: RunSummary { files: 3, ..RunSummary::default() },
            cursor: Some(([3; 32], [4; 16])),
        });
        s.save(d.path()).unwrap();
        assert_eq!(ScrubState::load(d.path(), &[1; 16]).unwrap(), Some(s.clone()));
        assert!(ScrubState::load(d.path(), &[9; 16]).is_err());
        let p = d.path().join(STATE_FILE);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 4;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(ScrubState::load(d.path(), &[1; 16]), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn a_record_of_the_first_format_reads_as_no_history() {
        let d = tempfile::tempdir().unwrap();
        let old = format::seal_bytes_version(MAGIC_SCRUB_STATE, 1, b"whatever version 1 held");
        std::fs::write(d.path().join(STATE_FILE), old).unwrap();
        assert_eq!(ScrubState::load(d.path(), &[1; 16]).unwrap(), None);
        let newer = format::seal_bytes_version(MAGIC_SCRUB_STATE, STATE_VERSION + 1, b"");
        std::fs::write(d.path().join(STATE_FILE), newer).unwrap();
        assert!(ScrubState::load(d.path(), &[1; 16]).is_err(), "a newer format is not read as no history");
    }
}
