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

pub mod state;
pub mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::catalog::{self, FileRef};
use crate::erasure::Codec;
use crate::error::{Error, Result};
use crate::format::{self, MAGIC_LOCATION};
use crate::location::LocationExt;
use crate::manifest::{manifest_key, Manifest, ManifestBody};
use crate::read::ShardProblem;
use crate::shard::{self, Expected, ShardFault, ShardHeader, HEADER_LEN};
use crate::store::{shard_key, LocationMarker, Store, LOCATION_MARKER};
use crate::stripe::{fetch_shard, StripeAddr};

/// How healthy something is; ordered from best to worst.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Every shard and manifest copy verified.
    #[default]
    Healthy,
    /// Data intact but redundancy reduced (bad shards or manifest copies, or an unusable location).
    Degraded,
    /// Some segment has fewer than k good shards, or a manifest has no valid copy.
    Lost,
}

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
    fn add(&mut self, s: ShardStatus) {
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

    fn merge(&mut self, o: &Counts) {
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
    /// Name (with the key) or `root:<hex>`.
    pub label: String,
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
        } else if self.shards.bad() > 0 || self.manifests.missing + self.manifests.corrupt > 0 {
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
                    && self.manifests.repaired == self.manifests.missing + self.manifests.corrupt =>
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
    /// Seconds since the newest of them changed (or since first seen), when known.
    pub age_secs: Option<u64>,
    /// Whether repair deleted them.
    pub deleted: bool,
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
}

impl ScrubReport {
    /// Health as found.
    pub fn health(&self) -> Health {
        let files = self.files.iter().map(FileReport::health).max().unwrap_or_default();
        let vols = self.volumes.iter().map(volumes::VolumeReport::health).max().unwrap_or_default();
        files.max(vols).max(self.location_health())
    }

    /// Health after repairs (unusable locations keep the store degraded: a disk needs attention).
    pub fn health_after(&self) -> Health {
        let files = self.files.iter().map(FileReport::health_after).max().unwrap_or_default();
        let vols = self.volumes.iter().map(volumes::VolumeReport::health_after).max().unwrap_or_default();
        files.max(vols).max(self.location_health_after())
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

/// Default orphan grace period: 24 hours.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How long to sleep so that `done` bytes after `elapsed` do not exceed `rate` bytes per second.
pub fn throttle_delay(done: u64, rate: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(done as f64 / rate as f64).saturating_sub(elapsed)
}

/// A shared byte-rate limiter.
#[derive(Debug)]
struct Throttle {
    rate: Option<u64>,
    start: Instant,
    done: AtomicU64,
}

impl Throttle {
    fn consume(&self, bytes: u64) -> u64 {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(rate) = self.rate {
            let d = throttle_delay(done, rate, self.start.elapsed());
            if !d.is_zero() {
                std::thread::sleep(d);
            }
        }
        done
    }
}

/// Candidate locations for a rebuilt shard, best first: home when writable, then writable locations holding
/// no shard of the segment (in rotation order after home), then the other writable ones, least loaded first.
pub fn repair_targets(home: usize, writable: &[bool], occupied: &[u32]) -> Vec<usize> {
    let n = writable.len();
    let order: Vec<usize> = (0..n).map(|j| (home + j) % n).filter(|&i| writable[i]).collect();
    let mut out: Vec<usize> = order.iter().copied().filter(|&i| i == home).collect();
    out.extend(order.iter().copied().filter(|&i| i != home && occupied[i] == 0));
    let mut rest: Vec<usize> = order.iter().copied().filter(|&i| i != home && occupied[i] > 0).collect();
    rest.sort_by_key(|&i| occupied[i]);
    out.extend(rest);
    out
}

/// Whether an orphan whose newest change was at `changed` may be deleted at `now`.
pub fn orphan_due(changed: SystemTime, now: SystemTime, grace: Duration) -> bool {
    now.duration_since(changed).is_ok_and(|age| age >= grace)
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
            let what = format!("location marker of {}", loc.name());
            let problem = match loc.get(LOCATION_MARKER) {
                Err(e) if !e.is_not_found() => return LocationState::Gone(e.to_string()),
                Err(_) => "marker missing".to_string(),
                Ok(bytes) => match format::open::<LocationMarker>(MAGIC_LOCATION, &what, &bytes) {
                    Ok(m) if m.store_id == d.store_id && m.index as usize == i => return LocationState::Ok,
                    Ok(_) => return LocationState::Foreign("marker names another store or position".into()),
                    Err(e) => e.to_string(),
                },
            };
            if !repair {
                return LocationState::MarkerMissing(problem);
            }
            let marker = LocationMarker { store_id: d.store_id, index: i as u32 };
            match loc.put(LOCATION_MARKER, &[&format::seal(MAGIC_LOCATION, &marker)]).and_then(|_| loc.sync()) {
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

/// Outcome of one segment.
struct SegmentOutcome {
    segment: u64,
    statuses: Vec<ShardStatus>,
    relocated: u64,
    issues: Vec<ShardIssue>,
    good: usize,
    bytes: u64,
    errors: Vec<String>,
}

/// Per-worker buffers: one segment's k+m shards and an I/O buffer.
#[derive(Default)]
struct SegmentBuffers {
    shards: Vec<u8>,
    io: Vec<u8>,
}

impl<'a> Scrubber<'a> {
    /// Starts a scrub: checks the locations (rewriting markers when repairing).
    pub fn new(store: &'a Store, opts: ScrubOptions) -> Self {
        let states = check_locations(store, opts.repair);
        let writable = states.iter().map(LocationState::writable).collect();
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

    /// Checks (and with repair, fixes) one file. `progress` receives the shard bytes verified so far by this
    /// scrubber.
    pub fn file(&self, file: &FileRef, progress: &(dyn Fn(u64) + Sync)) -> FileReport {
        let mut report = FileReport { file_id: hex::encode(file.file_id), ..FileReport::default() };
        let Some((manifest, copies)) = self.check_manifests(file, &mut report) else {
            report.label = format!("id:{}", report.file_id);
            return report;
        };
        let body = &manifest.body;
        report.root = body.root_hex();
        report.label = match self.store.key_opt().and_then(|k| manifest.meta(k).ok()) {
            Some(meta) => meta.name,
            None => format!("root:{}", report.root),
        };
        let span = tracing::info_span!("scrub_file", file = %report.label);
        let _enter = span.enter();
        report.segments = body.segments.len() as u64;
        if self.opts.repair {
            self.repair_manifests(file, &manifest, &copies, &mut report);
        }
        let outcomes = self.segments(file, body, progress);
        for o in outcomes {
            let plain = body.segments.get(o.segment as usize).map(|s| s.plain_len).unwrap_or(0);
            if o.good < body.k as usize {
                report.segments_lost.push(o.segment);
                report.bytes_lost += plain;
            } else if o.good == body.k as usize && o.good < body.width() {
                report.segments_at_risk.push(o.segment);
                report.bytes_at_risk += plain;
            }
            for &s in &o.statuses {
                report.shards.add(s);
            }
            report.shards.relocated += o.relocated;
            report.shards_repaired += o.issues.iter().filter(|i| i.repaired_to.is_some()).count() as u64;
            report.issues.extend(o.issues);
            report.repair_errors.extend(o.errors);
            report.bytes_verified += o.bytes;
        }
        report
    }

    /// Reads every manifest copy of `file`; returns a valid manifest and each location's copy bytes or problem.
    #[allow(clippy::type_complexity)]
    fn check_manifests(
        &self,
        file: &FileRef,
        report: &mut FileReport,
    ) -> Option<(Manifest, Vec<std::result::Result<Vec<u8>, String>>)> {
        let mkey = manifest_key(&file.name_tag, &file.file_id);
        let mut valid: Option<Manifest> = None;
        let mut copies = Vec::new();
        for (i, loc) in self.store.locations().iter().enumerate() {
            let what = format!("manifest {mkey} on {}", loc.name());
            let copy = match loc.get(&mkey) {
                Ok(bytes) => match catalog::decode_copy(self.store, file, &bytes, &what) {
                    Ok(m) => {
                        valid.get_or_insert(m);
                        Ok(bytes)
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) if e.is_not_found() => Err("missing".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let usable = self.writable[i];
            match &copy {
                Ok(_) => report.manifests.ok += 1,
                Err(_) if !usable => {}
                Err(r) if r == "missing" => report.manifests.missing += 1,
                Err(_) => report.manifests.corrupt += 1,
            }
            if copy.is_err() && usable {
                self.tally(|t| t[i].1 += 1);
            }
            copies.push(copy);
        }
        if valid.is_none() {
            report.repair_errors.push(format!("no valid manifest copy of file {}", hex::encode(file.file_id)));
        }
        valid.map(|m| (m, copies))
    }

    /// Rewrites bad or missing manifest copies from a valid one, when all valid copies agree.
    fn repair_manifests(
        &self,
        file: &FileRef,
        manifest: &Manifest,
        copies: &[std::result::Result<Vec<u8>, String>],
        report: &mut FileReport,
    ) {
        let good: BTreeSet<&Vec<u8>> = copies.iter().filter_map(|c| c.as_ref().ok()).collect();
        if good.len() != 1 {
            report.repair_errors.push("valid manifest copies differ; not rewriting any (check with the key)".into());
            return;
        }
        let bytes = manifest.encode();
        if good.first().is_none_or(|g| **g != bytes) {
            report.repair_errors.push("manifest copy does not re-encode identically; not rewriting".into());
            return;
        }
        let mkey = manifest_key(&file.name_tag, &file.file_id);
        let todo: Vec<usize> = (0..copies.len()).filter(|&i| copies[i].is_err() && self.writable[i]).collect();
        if todo.is_empty() {
            return;
        }
        let result = self.with_committed(file, || {
            for &i in &todo {
                let loc = &self.store.locations()[i];
                let written = loc.put(&mkey, &[&bytes]).and_then(|_| loc.sync()).and_then(|_| loc.get(&mkey));
                match written {
                    Ok(back) if back == bytes => {
                        report.manifests.repaired += 1;
                        self.tally(|t| t[i].2 += 1);
                    }
                    Ok(_) => report.repair_errors.push(format!("manifest copy on {} read back wrong", loc.name())),
                    Err(e) => report.repair_errors.push(format!("rewriting manifest copy on {}: {e}", loc.name())),
                }
            }
        });
        if let Err(e) = result {
            report.repair_errors.push(e.to_string());
        }
    }

    /// Runs `f` under the catalog lock if the file still has a manifest copy (so a concurrent removal is never
    /// undone).
    fn with_committed(&self, file: &FileRef, f: impl FnOnce()) -> Result<()> {
        let _lock = self.store.lock_catalog()?;
        let mkey = manifest_key(&file.name_tag, &file.file_id);
        if !self.store.locations().iter().any(|l| l.get_range(&mkey, 0, 1).is_ok_and(|b| !b.is_empty())) {
            return Err(Error::NotFound(format!("file {} (removed while scrubbing)", hex::encode(file.file_id))));
        }
        f();
        Ok(())
    }

    /// Checks every segment, `workers` at a time.
    fn segments(&self, file: &FileRef, body: &ManifestBody, progress: &(dyn Fn(u64) + Sync)) -> Vec<SegmentOutcome> {
        let count = body.segments.len() as u64;
        let next = AtomicU64::new(0);
        let results = Mutex::new(Vec::new());
        let worker = || {
            let mut codec = match Codec::new(body.k as usize, body.m as usize) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "bad shard counts");
                    return;
                }
            };
            let mut bufs = SegmentBuffers::default();
            loop {
                let seg = next.fetch_add(1, Ordering::Relaxed);
                if seg >= count {
                    return;
                }
                let o = self.segment(file, body, seg, &mut codec, &mut bufs);
                progress(self.throttle.consume(o.bytes));
                if let Ok(mut r) = results.lock() {
                    r.push(o);
                }
            }
        };
        let workers = self.opts.workers.clamp(1, 64).min(count as usize);
        if workers <= 1 {
            worker();
        } else {
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(worker);
                }
            });
        }
        let mut out = results.into_inner().unwrap_or_default();
        out.sort_by_key(|o| o.segment);
        out
    }

    /// Checks one segment and, with repair, rebuilds and rewrites its bad shards.
    fn segment(
        &self,
        file: &FileRef,
        body: &ManifestBody,
        seg: u64,
        codec: &mut Codec,
        bufs: &mut SegmentBuffers,
    ) -> SegmentOutcome {
        let width = body.width();
        let sl = body.segments.get(seg as usize).map(|s| s.shard_len as usize).unwrap_or(0);
        let key_of = |i: usize| shard_key(&body.file_id, seg, i);
        let addr = StripeAddr {
            file_id: &body.file_id,
            segment: seg,
            placement_start: body.placement_start,
            shard_len: sl,
            key_of: &key_of,
            deferred: false,
        };
        let mut out = SegmentOutcome {
            segment: seg,
            statuses: vec![],
            relocated: 0,
            issues: vec![],
            good: 0,
            bytes: 0,
            errors: vec![],
        };
        bufs.shards.resize(width * sl, 0);
        let mut found_at: Vec<Option<usize>> = vec![None; width];
        for (i, slot) in found_at.iter_mut().enumerate() {
            let Some(leaf) = body.leaf(seg, i) else { continue };
            let (res, home) = fetch_shard(self.store, &addr, i, leaf, &mut bufs.io);
            let status = match res {
                Ok((range, loc)) => {
                    bufs.shards[i * sl..(i + 1) * sl].copy_from_slice(&bufs.io[range]);
                    *slot = Some(loc);
                    out.bytes += (sl + HEADER_LEN) as u64;
                    out.relocated += u64::from(loc != home);
                    self.tally(|t| {
                        t[home].0.add(ShardStatus::Ok);
                        if loc != home {
                            t[home].0.relocated += 1;
                        }
                    });
                    ShardStatus::Ok
                }
                Err(p) => {
                    let status = classify(&p);
                    self.tally(|t| t[home].0.add(status));
                    out.issues.push(ShardIssue {
                        segment: seg,
                        shard: i as u16,
                        location: home,
                        status,
                        detail: p.to_string(),
                        repaired_to: None,
                    });
                    status
                }
            };
            out.statuses.push(status);
        }
        out.good = found_at.iter().filter(|f| f.is_some()).count();
        if self.opts.repair && !out.issues.is_empty() && out.good >= body.k as usize {
            if let Err(e) = self.repair_segment(file, body, &addr, codec, bufs, &found_at, &mut out) {
                out.errors.push(format!("segment {seg}: {e}"));
            }
        }
        out
    }

    /// Rebuilds every bad shard of a segment from the verified ones, checks each against its leaf, and writes it.
    #[allow(clippy::too_many_arguments)]
    fn repair_segment(
        &self,
        file: &FileRef,
        body: &ManifestBody,
        addr: &StripeAddr<'_>,
        codec: &mut Codec,
        bufs: &mut SegmentBuffers,
        found_at: &[Option<usize>],
        out: &mut SegmentOutcome,
    ) -> Result<()> {
        let (k, sl, seg) = (body.k as usize, addr.shard_len, addr.segment);
        let have: Vec<bool> = found_at.iter().map(Option::is_some).collect();
        // Never rebuild from fewer than k verified shards.
        if have.iter().filter(|h| **h).count() < k {
            return Err(Error::corrupt(format!("segment {seg}"), "fewer than k verified shards; not repaired"));
        }
        let (data, parity) = bufs.shards.split_at_mut(k * sl);
        codec.reconstruct(
            data,
            sl,
            &have[..k],
            (0..body.m as usize).filter(|j| have[k + j]).map(|j| (j, &parity[j * sl..(j + 1) * sl])),
        )?;
        codec.encode_with(data, sl, |fresh| {
            for (j, p) in fresh.iter().enumerate() {
                if !have[k + j] {
                    parity[j * sl..(j + 1) * sl].copy_from_slice(p);
                }
            }
        })?;
        // Check every rebuilt shard against its leaf before anything is written.
        for issue in &out.issues {
            let i = issue.shard as usize;
            let payload = &bufs.shards[i * sl..(i + 1) * sl];
            let leaf = crate::commit::shard_leaf(&body.file_id, seg, issue.shard, payload);
            if body.leaf(seg, i) != Some(&leaf) {
                return Err(Error::corrupt(
                    format!("segment {seg} shard {i}"),
                    "rebuilt shard does not match its Merkle leaf; nothing written",
                ));
            }
        }
        let mut occupied = vec![0u32; self.writable.len()];
        for loc in found_at.iter().flatten() {
            occupied[*loc] += 1;
        }
        // Bad shards whose home can be written will be rewritten there: count them before placing the others.
        for issue in out.issues.iter().filter(|i| self.writable[i.location]) {
            occupied[issue.location] += 1;
        }
        let shards = &bufs.shards;
        let mut errors = Vec::new();
        self.with_committed(file, || {
            for issue in out.issues.iter_mut() {
                let i = issue.shard as usize;
                match self.write_shard(body, addr, i, &shards[i * sl..(i + 1) * sl], issue.location, &occupied) {
                    Ok(loc) => {
                        if loc != issue.location {
                            occupied[loc] += 1;
                        }
                        issue.repaired_to = Some(loc);
                        self.tally(|t| t[loc].2 += 1);
                    }
                    Err(e) => errors.push(format!("segment {seg} shard {i}: {e}")),
                }
            }
        })?;
        out.errors.extend(errors);
        Ok(())
    }

    /// Writes a verified rebuilt shard to the best target that accepts it and reads it back; returns where.
    fn write_shard(
        &self,
        body: &ManifestBody,
        addr: &StripeAddr<'_>,
        i: usize,
        payload: &[u8],
        home: usize,
        occupied: &[u32],
    ) -> Result<usize> {
        let header =
            ShardHeader::for_payload(body.store_id, body.file_id, addr.segment, i as u16, (body.k, body.m), payload);
        let head = header.encode();
        let key = (addr.key_of)(i);
        let leaf = body.leaf(addr.segment, i).copied().unwrap_or([0; 32]);
        let want = Expected {
            store_id: &body.store_id,
            file_id: &body.file_id,
            segment: addr.segment,
            shard: i as u16,
            len: payload.len() as u32,
            leaf: &leaf,
        };
        let mut failures = Vec::new();
        for target in repair_targets(home, &self.writable, occupied) {
            let loc = &self.store.locations()[target];
            let written = loc.put(&key, &[&head, payload]).and_then(|_| loc.sync()).and_then(|_| loc.get(&key));
            match written {
                // Pair assertion: the copy on disk must verify as it is read back.
                Ok(back) if shard::verify(&back, &want).is_ok() => {
                    if target != home {
                        // A damaged copy at home would shadow nothing (readers search on), but remove it if we can.
                        let _ = self.store.locations()[home].delete(&key);
                        tracing::info!(
                            segment = addr.segment,
                            shard = i,
                            to = loc.name(),
                            "shard rebuilt away from its home"
                        );
                    }
                    return Ok(target);
                }
                Ok(_) => failures.push(format!("{}: read back wrong", loc.name())),
                Err(e) => failures.push(format!("{}: {e}", loc.name())),
            }
        }
        if failures.is_empty() {
            failures.push("no writable location".into());
        }
        Err(Error::WriteQuorum { what: format!("rebuilt shard {i}"), ok: 0, need: 1, detail: failures.join("; ") })
    }

    /// Finds orphaned shard sets; with repair deletes those older than the grace period (`first_seen` gives the
    /// age when the backend keeps no times, and is updated with newly seen orphans).
    pub fn orphans(&self, first_seen: &mut BTreeMap<[u8; 16], u64>) -> Result<Vec<OrphanReport>> {
        let known: BTreeSet<[u8; 16]> = catalog::scan(self.store)?.into_iter().map(|f| f.file_id).collect();
        let mut found: BTreeMap<[u8; 16], (Vec<usize>, u64, Option<SystemTime>)> = BTreeMap::new();
        for (i, loc) in self.store.locations().iter().enumerate() {
            if matches!(self.states[i], LocationState::Gone(_) | LocationState::Foreign(_)) {
                continue;
            }
            for dir in loc.list("shards")? {
                let mut id = [0u8; 16];
                if hex::decode_to_slice(&dir, &mut id).is_err() || known.contains(&id) {
                    continue;
                }
                let prefix = format!("shards/{dir}");
                let count = loc.list(&prefix)?.len() as u64;
                let changed = loc.modified(&prefix).ok().flatten();
                let e = found.entry(id).or_default();
                e.0.push(i);
                e.1 += count;
                e.2 = e.2.max(changed);
            }
        }
        let now = SystemTime::now();
        let now_unix = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
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

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Scrubs the selected files, recording progress and results in the store's scrub state after each file (at
/// most once a second) so an interrupted run can be resumed.
pub fn run(
    store: &Store,
    opts: &ScrubOptions,
    selection: Selection,
    ctl: &RunControl<'_>,
) -> Result<(ScrubReport, StateWarning)> {
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
    let full = !matches!(selection, Selection::Files(_));
    let (files, mut running) = match selection {
        Selection::Files(f) => (f, None),
        Selection::Resume if st.running.is_some() => (catalog::scan(store)?, st.running.take()),
        Selection::All | Selection::Resume => (catalog::scan(store)?, None),
    };
    let mut running = running.take().unwrap_or_else(|| state::Running {
        summary: state::RunSummary { started_unix: now_unix(), repair: opts.repair, ..Default::default() },
        cursor: None,
    });
    let skip = |f: &FileRef| full && running.cursor.is_some_and(|c| (f.name_tag, f.file_id) <= c);
    let resumed = files.iter().filter(|f| skip(f)).count() as u64;
    let todo: Vec<&FileRef> = files.iter().filter(|f| !skip(f)).collect();
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
    let mut saved = Instant::now();
    for (n, f) in todo.iter().enumerate() {
        let fr = scrubber.file(f, ctl.progress);
        st.files.insert(f.file_id, state::FileRecord::of(&fr, now_unix()));
        if full {
            running.summary.add_file(&fr);
            running.cursor = Some((f.name_tag, f.file_id));
        }
        report.files.push(fr);
        let out_of_time = ctl.max_duration.is_some_and(|d| scrubber.start.elapsed() >= d);
        if out_of_time && n + 1 < todo.len() {
            report.complete = false;
            break;
        }
        if saved.elapsed() >= Duration::from_secs(1) {
            if full {
                st.running = Some(running.clone());
            }
            if let Err(e) = st.save(store.dir()) {
                warning.get_or_insert(e);
            }
            saved = Instant::now();
        }
    }
    report.locations = scrubber.location_reports();
    if full && report.complete {
        report.orphans = scrubber.orphans(&mut st.orphans_seen)?;
        report.volumes = volumes::scrub_volumes(store, opts.repair);
        let live: BTreeSet<[u8; 16]> = files.iter().map(|f| f.file_id).collect();
        st.files.retain(|id, _| live.contains(id));
        running.summary.finish(&report, now_unix());
        st.last = Some(running.summary);
        st.running = None;
    } else if full {
        st.running = Some(running);
    }
    if opts.repair {
        report.pending_cleared = clear_pending(store, &pending, &report, full && report.complete, &files);
    }
    report.bytes_verified = scrubber.bytes_verified() + report.volumes.iter().map(|v| v.bytes_verified).sum::<u64>();
    report.elapsed_secs = scrubber.elapsed_secs();
    if let Err(e) = st.save(store.dir()) {
        warning.get_or_insert(e);
    }
    Ok((report, warning))
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
