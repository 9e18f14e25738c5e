//! Scrub: read every shard and manifest copy, check them without the key, and (on request) repair what is bad.
//!
//! A shard is good when it verifies against its header and its Merkle leaf ([`crate::stripe::fetch_shard`]).
//! Repair rebuilds a segment's bad shards from k verified ones (Reed-Solomon), regenerates parity by
//! re-encoding, checks every rebuilt shard against its leaf *before* writing it, writes it atomically to its
//! home location (or, when home cannot be written, to another healthy location holding no other shard of the
//! segment if there is one) and reads it back. Bad or missing manifest copies are rewritten from the bytes of a
//! valid copy. Nothing is ever rebuilt from fewer than k verified shards, and nothing is written that does not
//! match its leaf. Memory: one segment (k+m shards) per worker.
//!
//! Writes are made under the catalog lock after checking the file is still committed, so a concurrent `rm`
//! never has its file resurrected. Orphans (shards of a file id with no manifest, left by a crashed commit) are
//! reported and, with repair, deleted once older than a grace period, so a commit in progress elsewhere is
//! never touched. Resumable runs and per-file results are kept in [`state`].

mod catalog_copies;
mod files;
pub mod log_volumes;
mod orphans;
mod policy;
mod repair;
mod report;
pub mod state;
pub mod volumes;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::files::catalog::{self, FileRef};
use crate::store::{marker_matches, read_marker, write_marker, Store};

pub use catalog_copies::CatalogReport;
pub use orphans::{survey as survey_orphans, OrphanSurvey};
pub(crate) use policy::Throttle;
pub use policy::{classify_orphan, orphan_due, repair_targets, throttle_delay, OrphanKind, DEFAULT_ORPHAN_GRACE};
pub use report::*;

/// What a scrub does.
#[derive(Clone, Debug)]
pub struct ScrubOptions {
    /// Rebuild and rewrite what is bad.
    pub repair: bool,
    /// Segments checked in parallel within a file.
    pub workers: usize,
    /// Throttle, in shard bytes per second.
    pub rate_bytes_per_sec: Option<u64>,
    /// Orphans younger than this are never deleted.
    pub orphan_grace: Duration,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions { repair: false, workers: 2, rate_bytes_per_sec: None, orphan_grace: DEFAULT_ORPHAN_GRACE }
    }
}

/// Checks each location's presence and marker; with `repair`, rewrites missing or damaged markers.
pub fn check_locations(store: &Store, repair: bool) -> Vec<LocationState> {
    let d = store.descriptor();
    store
        .locations()
        .iter()
        .enumerate()
        .map(|(i, loc)| {
            if let Err(e) = loc.probe() {
                return LocationState::Gone(e.to_string());
            }
            let problem = match read_marker(loc.as_ref()) {
                Ok(Some(m)) if marker_matches(&m, d, i) => return LocationState::Ok,
                Ok(Some(_)) => return LocationState::Foreign("marker names another store or position".into()),
                Ok(None) => "marker missing".to_string(),
                Err(e @ Error::Corrupt { .. }) => e.to_string(),
                Err(e) => return LocationState::Gone(e.to_string()),
            };
            if !repair {
                return LocationState::MarkerMissing(problem);
            }
            match write_marker(loc.as_ref(), d, i) {
                Ok(()) => {
                    tracing::warn!(location = loc.name(), problem, "rewrote the location marker");
                    LocationState::MarkerRestored
                }
                Err(e) => LocationState::MarkerMissing(format!("{problem}; rewriting it failed: {e}")),
            }
        })
        .collect()
}

/// One scrub over a store: holds the location states, throttle and per-location tallies.
pub struct Scrubber<'a> {
    store: &'a Store,
    opts: ScrubOptions,
    states: Vec<LocationState>,
    writable: Vec<bool>,
    throttle: Throttle,
    tallies: Mutex<Vec<(Counts, u64, u64)>>,
    start: Instant,
}

impl<'a> Scrubber<'a> {
    /// Starts a scrub: checks the locations (rewriting markers when repairing).
    pub fn new(store: &'a Store, opts: ScrubOptions) -> Self {
        let states = check_locations(store, opts.repair);
        // A draining location is read but never written: it is about to be forgotten.
        let draining = &store.descriptor().draining;
        let writable = states.iter().zip(draining).map(|(s, d)| s.writable() && !d).collect();
        let n = states.len();
        Scrubber {
            store,
            throttle: Throttle { rate: opts.rate_bytes_per_sec, start: Instant::now(), done: AtomicU64::new(0) },
            opts,
            states,
            writable,
            tallies: Mutex::new(vec![(Counts::default(), 0, 0); n]),
            start: Instant::now(),
        }
    }

    /// Location states found at the start.
    pub fn states(&self) -> &[LocationState] {
        &self.states
    }

    fn tally(&self, f: impl FnOnce(&mut Vec<(Counts, u64, u64)>)) {
        if let Ok(mut t) = self.tallies.lock() {
            f(&mut t);
        }
    }

    /// Per-location results so far.
    pub fn location_reports(&self) -> Vec<LocationReport> {
        let tallies = self.tallies.lock().map(|t| t.clone()).unwrap_or_default();
        self.store
            .locations()
            .iter()
            .zip(&self.states)
            .zip(tallies)
            .map(|((loc, state), (shards, manifests_bad, written))| LocationReport {
                name: loc.name().to_string(),
                state: state.clone(),
                shards,
                manifests_bad,
                written,
            })
            .collect()
    }

    /// Shard bytes verified so far.
    pub fn bytes_verified(&self) -> u64 {
        self.throttle.done.load(Ordering::Relaxed)
    }

    /// Seconds since the scrubber started.
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// Which files a run covers.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every file: a full run (recorded as the store's last scrub; orphans are checked at the end).
    All,
    /// Continue an interrupted full run where it stopped (a new full run when none was interrupted).
    Resume,
    /// Only these files (no orphan check; their records are updated).
    Files(Vec<FileRef>),
}

/// Callbacks and limits of a run.
pub struct RunControl<'a> {
    /// Stop after the file during which this much time has passed (at least one file is always checked).
    pub max_duration: Option<Duration>,
    /// Called once with the total shard bytes to verify (reads one manifest copy per file first).
    pub total: Option<&'a dyn Fn(u64)>,
    /// Called with the shard bytes verified so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// What a run returns besides its report: a problem with the state record (the scrub itself went on).
pub type StateWarning = Option<Error>;

/// Scrubs the selected files, recording progress and results in the store's scrub state after each file (at
/// most once a second) so an interrupted run can be resumed.
pub fn run(
    store: &Store,
    opts: &ScrubOptions,
    selection: Selection,
    ctl: &RunControl<'_>,
) -> Result<(ScrubReport, StateWarning)> {
    let mut rec = Record::load(store, opts, &selection);
    let selection_kind =
        if matches!(selection, Selection::Files(_)) { SelectionKind::Files } else { SelectionKind::All };
    let files = match selection {
        Selection::Files(f) => f,
        Selection::All | Selection::Resume => catalog::scan(store)?,
    };
    let resumed = files.iter().filter(|f| rec.done_before(f)).count() as u64;
    let todo: Vec<&FileRef> = files.iter().filter(|f| !rec.done_before(f)).collect();
    if let Some(total) = ctl.total {
        let bytes = todo.iter().filter_map(|f| catalog::load(store, f).ok()).map(|e| shard_bytes(&e.manifest.body));
        total(bytes.sum());
    }
    let scrubber = Scrubber::new(store, opts.clone());
    let pending = crate::pending::list(store);
    let mut report = ScrubReport {
        repair: opts.repair,
        files_resumed: resumed,
        complete: true,
        pending_found: pending.len() as u64,
        ..Default::default()
    };
    if !matches!(selection_kind, SelectionKind::Files) {
        report.catalog = scrubber.catalog();
    }
    check_files(&scrubber, &todo, ctl, &mut rec, &mut report);
    report.locations = scrubber.location_reports();
    let whole_store = rec.full && report.complete;
    if whole_store {
        finish_full_run(&scrubber, &files, &mut rec, &mut report)?;
    } else if rec.full {
        rec.st.running = Some(rec.running.clone());
    }
    if opts.repair {
        report.pending_cleared = clear_pending(store, &pending, &report, whole_store, &files);
    }
    report.bytes_verified = scrubber.bytes_verified() + report.volumes.iter().map(|v| v.bytes_verified).sum::<u64>();
    report.elapsed_secs = scrubber.elapsed_secs();
    rec.save(store);
    Ok((report, rec.warning))
}

enum SelectionKind {
    All,
    Files,
}

/// The store's scrub state record as a run updates it.
struct Record {
    st: state::ScrubState,
    /// The whole-store run this one is or continues (unused, and never saved, for a run over chosen files).
    running: state::Running,
    /// A whole-store run (not over chosen files).
    full: bool,
    /// The first problem loading or saving the record.
    warning: StateWarning,
}

impl Record {
    /// Loads the record (a damaged one is replaced, with a warning) and picks the run: the interrupted one when
    /// resuming and there is one, else a new one.
    fn load(store: &Store, opts: &ScrubOptions, selection: &Selection) -> Record {
        let store_id = store.descriptor().store_id;
        let mut warning = None;
        let mut st = match state::ScrubState::load(store.dir(), &store_id) {
            Ok(s) => s.unwrap_or_else(|| state::ScrubState::new(store_id)),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a damaged scrub state record");
                warning = Some(e);
                state::ScrubState::new(store_id)
            }
        };
        let interrupted = if matches!(selection, Selection::Resume) { st.running.take() } else { None };
        let running = interrupted.unwrap_or_else(|| state::Running {
            summary: state::RunSummary {
                started_unix: crate::clock::unix_secs(),
                repair: opts.repair,
                ..Default::default()
            },
            cursor: None,
        });
        Record { st, running, full: !matches!(selection, Selection::Files(_)), warning }
    }

    /// Whether the interrupted run this one continues has checked `f` already.
    fn done_before(&self, f: &FileRef) -> bool {
        self.full && self.running.cursor.is_some_and(|c| (f.name_tag, f.file_id) <= c)
    }

    /// Records one file's result (and, in a whole-store run, that the run got past it).
    fn file_done(&mut self, f: &FileRef, fr: &FileReport) {
        self.st.files.insert(f.file_id, state::FileRecord::of(fr, crate::clock::unix_secs()));
        if self.full {
            self.running.summary.add_file(fr);
            self.running.cursor = Some((f.name_tag, f.file_id));
        }
    }

    /// Saves the record with the run's progress, so an interruption after this resumes from here.
    fn checkpoint(&mut self, store: &Store) {
        if self.full {
            self.st.running = Some(self.running.clone());
        }
        self.save(store);
    }

    fn save(&mut self, store: &Store) {
        if let Err(e) = self.st.save(store.dir()) {
            self.warning.get_or_insert(e);
        }
    }
}

/// Checks the files of `todo` in order, recording each result and saving the record at most once a second.
/// Stops (the report marked incomplete) after the file during which the time limit passed, unless it was the
/// last.
fn check_files(
    scrubber: &Scrubber<'_>,
    todo: &[&FileRef],
    ctl: &RunControl<'_>,
    rec: &mut Record,
    report: &mut ScrubReport,
) {
    let mut saved = Instant::now();
    for (n, f) in todo.iter().enumerate() {
        match scrubber.file_if_present(f, ctl.progress) {
            Some(fr) => {
                rec.file_done(f, &fr);
                report.files.push(fr);
            }
            None => report.files_removed += 1,
        }
        let out_of_time = ctl.max_duration.is_some_and(|d| scrubber.start.elapsed() >= d);
        if out_of_time && n + 1 < todo.len() {
            report.complete = false;
            break;
        }
        if saved.elapsed() >= Duration::from_secs(1) {
            rec.checkpoint(scrubber.store);
            saved = Instant::now();
        }
    }
}

/// Ends a complete whole-store run: checks orphans and volumes, drops the records of files that no longer
/// exist, and records the run as the store's last scrub.
fn finish_full_run(
    scrubber: &Scrubber<'_>,
    files: &[FileRef],
    rec: &mut Record,
    report: &mut ScrubReport,
) -> Result<()> {
    report.orphans = scrubber.orphans(&mut rec.st.orphans_seen)?;
    report.volumes = volumes::scrub_volumes(scrubber.store, scrubber.opts.repair);
    let live: BTreeSet<[u8; 16]> = files.iter().map(|f| f.file_id).collect();
    rec.st.files.retain(|id, _| live.contains(id));
    let now = crate::clock::unix_secs();
    rec.st.volumes = report.volumes.iter().map(|v| (v.id.clone(), state::FileRecord::of_volume(v, now))).collect();
    rec.running.summary.finish(report, now);
    rec.st.last = Some(std::mem::take(&mut rec.running.summary));
    rec.st.running = None;
    Ok(())
}

/// Clears the pending-repair records whose file or volume this run left whole; after a complete whole-store run
/// also those of files and volumes that no longer exist. Returns how many were cleared.
fn clear_pending(
    store: &Store,
    pending: &std::collections::BTreeMap<[u8; 16], crate::pending::PendingRepair>,
    report: &ScrubReport,
    whole_store: bool,
    files: &[FileRef],
) -> u64 {
    let mut cleared = 0;
    for id in pending.keys() {
        let hex_id = hex::encode(id);
        let file = report.files.iter().find(|f| f.file_id == hex_id).map(|f| f.health_after());
        let volume = report.volumes.iter().find(|v| v.id == hex_id).map(|v| v.health_after());
        let whole = match file.or(volume) {
            Some(h) => h == Health::Healthy,
            None => whole_store && !files.iter().any(|f| &f.file_id == id),
        };
        if whole {
            crate::pending::clear(store, id);
            cleared += 1;
        }
    }
    cleared
}

#[cfg(test)]
mod campaign;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::shard::ShardFault;
    use crate::stripe::ShardProblem;
    use std::time::SystemTime;

    #[test]
    fn targets_prefer_home_then_free_locations() {
        assert_eq!(repair_targets(2, &[true; 6], &[1, 1, 0, 1, 0, 1]), vec![2, 4, 3, 5, 0, 1]);
        // Home not writable: a location holding no shard of the segment comes first.
        assert_eq!(repair_targets(2, &[true, true, false, true, true, true], &[1, 1, 0, 1, 0, 2]), vec![4, 3, 0, 1, 5]);
        assert!(repair_targets(0, &[false; 3], &[0; 3]).is_empty());
    }

    #[test]
    fn throttle_and_orphan_timing() {
        assert_eq!(throttle_delay(1_000_000, 1_000_000, Duration::from_millis(400)), Duration::from_millis(600));
        assert_eq!(throttle_delay(1_000, 1_000_000, Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(throttle_delay(1_000, 0, Duration::ZERO), Duration::ZERO);
        let now = SystemTime::now();
        let h = Duration::from_secs(3600);
        assert!(orphan_due(now - 25 * h, now, 24 * h));
        assert!(!orphan_due(now - h, now, 24 * h));
        assert!(!orphan_due(now + h, now, Duration::ZERO));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&ShardProblem::Missing), ShardStatus::Missing);
        assert_eq!(classify(&ShardProblem::Fault(ShardFault::Misplaced("x".into()))), ShardStatus::Misplaced);
        assert_eq!(classify(&ShardProblem::Fault(ShardFault::BadPayload)), ShardStatus::Corrupt);
        assert_eq!(classify(&ShardProblem::Unreadable("eio".into())), ShardStatus::Corrupt);
    }
}
