//! The store's section of every metrics endpoint (`bf serve`, `bf nbd serve`, `bf mount`): what this process's
//! reads met ([`super::reads`]: shards rebuilt on the fly, verification failures) and the results of the last
//! scrub, from the `scrub.state` record that `bf scrub` writes ([`crate::scrub::state`]) in another process.
//!
//! The record is read again only when its file changed (size, modification time or inode: it is replaced by a
//! rename), so a scrape costs one `stat` otherwise. [`ScrubGauges::of`] and the rendering are pure.

use std::path::Path;
use std::sync::Mutex;

use super::{family, sample, single};
use crate::files::health::Health;
use crate::scrub::state::{FileRecord, RunSummary, ScrubState, STATE_FILE};
use crate::store::Store;

/// What a file's last scrub found, as the metrics count files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileStanding {
    /// Every shard and manifest copy verified (or was repaired).
    Healthy,
    /// Redundancy reduced, every segment still with more than k good shards: repairable, not yet at risk.
    Degraded,
    /// Some segment has exactly k good shards: one more loss and it is gone.
    AtRisk,
    /// Some segment has fewer than k good shards.
    Lost,
}

impl FileStanding {
    /// Every standing, in the order of [`ScrubGauges::files`] and the rendered label values.
    pub const ALL: [FileStanding; 4] =
        [FileStanding::Healthy, FileStanding::Degraded, FileStanding::AtRisk, FileStanding::Lost];

    /// The standing of a file (or volume) from its last result.
    pub fn of(f: &FileRecord) -> FileStanding {
        match f.health {
            Health::Healthy => FileStanding::Healthy,
            Health::Lost => FileStanding::Lost,
            Health::Degraded if f.segments_at_risk > 0 => FileStanding::AtRisk,
            Health::Degraded => FileStanding::Degraded,
        }
    }

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            FileStanding::Healthy => "healthy",
            FileStanding::Degraded => "degraded",
            FileStanding::AtRisk => "at_risk",
            FileStanding::Lost => "lost",
        }
    }
}

/// The numbers the metrics show of a scrub state record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubGauges {
    /// The record exists but could not be read (damaged, or another store's): everything else is 0.
    pub unreadable: bool,
    /// The last complete whole-store run.
    pub last: Option<RunSummary>,
    /// A whole-store run is under way or was interrupted (`bf scrub --resume` continues it).
    pub unfinished: bool,
    /// Files by the standing of their last result, in the order of [`FileStanding::ALL`].
    pub files: [u64; FileStanding::ALL.len()],
    /// Block volumes by the standing of their result in the last complete run, likewise.
    pub volumes: [u64; FileStanding::ALL.len()],
    /// Plaintext bytes at risk, by the files' and volumes' last results.
    pub bytes_at_risk: u64,
    /// Plaintext bytes lost, by the files' and volumes' last results.
    pub bytes_lost: u64,
}

impl ScrubGauges {
    /// The gauges of a record.
    pub fn of(state: &ScrubState) -> ScrubGauges {
        let standings = |records: &mut dyn Iterator<Item = &FileRecord>| {
            let mut n = [0; FileStanding::ALL.len()];
            for r in records {
                n[FileStanding::of(r) as usize] += 1;
            }
            n
        };
        let (_, _, bytes_at_risk, bytes_lost) = state.at_risk();
        ScrubGauges {
            unreadable: false,
            last: state.last.clone(),
            unfinished: state.running.is_some(),
            files: standings(&mut state.files.values()),
            volumes: standings(&mut state.volumes.values()),
            bytes_at_risk,
            bytes_lost,
        }
    }

    /// Appends the text exposition to `out`.
    pub fn render(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| single(out, name, "gauge", help, v);
        let state_help = "1 when the scrub state record is damaged.";
        gauge(out, "bf_scrub_state_unreadable", state_help, self.unreadable.into());
        let running_help = "1 while a whole-store scrub is under way or interrupted.";
        gauge(out, "bf_scrub_unfinished", running_help, self.unfinished.into());
        for (suffix, help, v) in last_run_rows(&self.last.clone().unwrap_or_default()) {
            gauge(out, &format!("bf_scrub_last_{suffix}"), help, v);
        }
        let name = "bf_scrub_files";
        let files_help = "Files by the result of their last scrub (at_risk: some segment has only k good shards).";
        family(out, name, "gauge", files_help);
        for (s, n) in FileStanding::ALL.iter().zip(self.files) {
            sample(out, name, &format!("result=\"{}\"", s.label()), n);
        }
        let name = "bf_scrub_volumes";
        let volumes_help =
            "Block volumes by their result in the last complete scrub (at_risk: some stripe has only k good shards).";
        family(out, name, "gauge", volumes_help);
        for (s, n) in FileStanding::ALL.iter().zip(self.volumes) {
            sample(out, name, &format!("result=\"{}\"", s.label()), n);
        }
        let risk_help = "Plaintext bytes not fully redundant, by the files' and volumes' last scrubs (a volume counts its whole stripes).";
        gauge(out, "bf_data_at_risk_bytes", risk_help, self.bytes_at_risk);
        let lost_help = "Plaintext bytes beyond repair, by the files' and volumes' last scrubs.";
        gauge(out, "bf_data_lost_bytes", lost_help, self.bytes_lost);
    }
}

/// The `bf_scrub_last_*` gauges of the last complete run (all 0 when there was none): name suffix, help, value.
fn last_run_rows(last: &RunSummary) -> [(&'static str, &'static str, u64); 12] {
    let took = last.finished_unix.saturating_sub(last.started_unix);
    [
        (
            "timestamp_seconds",
            "End of the last complete scrub (seconds since the epoch; 0: never).",
            last.finished_unix,
        ),
        ("duration_seconds", "How long the last complete scrub ran.", took),
        ("repair", "1 when the last complete scrub repaired.", last.repair.into()),
        (
            "health_after",
            "Worst health after its repairs (0 healthy, 1 degraded, 2 lost).",
            health_value(last.health_after),
        ),
        ("files", "Files the last complete scrub checked.", last.files),
        ("volumes", "Block volumes the last complete scrub checked.", last.volumes),
        ("bytes_verified", "Shard bytes the last complete scrub verified.", last.bytes_verified),
        ("shards_bad", "Bad or missing shards the last complete scrub found.", last.shards_bad),
        ("shards_repaired", "Shards the last complete scrub rebuilt.", last.shards_repaired),
        ("segments_at_risk", "Segments with exactly k good shards in the last scrub.", last.segments_at_risk),
        ("segments_lost", "Segments with fewer than k good shards in the last scrub.", last.segments_lost),
        ("orphans", "Orphaned shard sets the last complete scrub found.", last.orphans),
    ]
}

/// Health as a gauge value: 0 healthy, 1 degraded, 2 lost.
fn health_value(h: Health) -> u64 {
    match h {
        Health::Healthy => 0,
        Health::Degraded => 1,
        Health::Lost => 2,
    }
}

/// What identifies one version of the record's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    let modified_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    Some(Stamp { len: md.len(), modified_ns, inode: md.ino() })
}

/// The store's section of a metrics endpoint; keeps the gauges of the scrub record last read.
#[derive(Default, Debug)]
pub struct StoreMetrics {
    scrub: Mutex<Option<(Option<Stamp>, ScrubGauges)>>,
}

impl StoreMetrics {
    /// Appends the store's read counters, scrub gauges and failure-domain gauges to `out`.
    pub fn render(&self, store: &Store, out: &mut String) {
        store.read_stats().counts().render(out);
        self.scrub_gauges(store).render(out);
        render_zones(&store.zone_tolerance(), out);
    }

    /// The gauges of the store's scrub record, read again when its file changed since the last call.
    pub fn scrub_gauges(&self, store: &Store) -> ScrubGauges {
        let now = stamp(&store.dir().join(STATE_FILE));
        let Ok(mut cached) = self.scrub.lock() else { return load_gauges(store) };
        match &*cached {
            Some((seen, gauges)) if *seen == now => gauges.clone(),
            _ => {
                let gauges = load_gauges(store);
                *cached = Some((now, gauges.clone()));
                gauges
            }
        }
    }
}

/// The failure domains of the layout (see [`crate::zones`]): how many, and how many may be lost.
pub fn render_zones(t: &crate::zones::ZoneTolerance, out: &mut String) {
    let help = "Failure domains of the store's locations (zones, and locations without one).";
    single(out, "bf_failure_domains", "gauge", help, t.domains as u64);
    let help = "Failure domains that may be lost, whichever they are, with every stripe still readable (0: the layout cannot lose one).";
    single(out, "bf_failure_domains_tolerated", "gauge", help, t.tolerance as u64);
}

fn load_gauges(store: &Store) -> ScrubGauges {
    match ScrubState::load(store.dir(), &store.descriptor().store_id) {
        Ok(Some(state)) => ScrubGauges::of(&state),
        Ok(None) => ScrubGauges::default(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the scrub state record is unreadable");
            ScrubGauges { unreadable: true, ..ScrubGauges::default() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrub::state::Running;

    fn file(health: Health, segments_at_risk: u64, bytes_at_risk: u64, bytes_lost: u64) -> FileRecord {
        FileRecord { verified_unix: 1, health, segments_at_risk, segments_lost: 0, bytes_at_risk, bytes_lost }
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }

    #[test]
    fn files_are_counted_by_standing_and_the_last_run_is_rendered() {
        let mut st = ScrubState::new([1; 16]);
        st.files.insert([1; 16], file(Health::Healthy, 0, 0, 0));
        st.files.insert([2; 16], file(Health::Healthy, 0, 0, 0));
        st.files.insert([3; 16], file(Health::Degraded, 0, 100, 0));
        st.files.insert([4; 16], file(Health::Degraded, 2, 200, 0));
        st.files.insert([5; 16], file(Health::Lost, 0, 0, 70));
        st.volumes.insert("aa".into(), file(Health::Healthy, 0, 0, 0));
        st.volumes.insert("bb".into(), file(Health::Degraded, 1, 4000, 0));
        st.last = Some(RunSummary {
            started_unix: 1_000,
            finished_unix: 1_060,
            repair: true,
            health_after: Health::Lost,
            files: 5,
            volumes: 2,
            shards_bad: 9,
            shards_repaired: 6,
            orphans: 3,
            ..RunSummary::default()
        });
        let g = ScrubGauges::of(&st);
        assert_eq!(g.files, [2, 1, 1, 1]);
        assert_eq!(g.volumes, [1, 0, 1, 0]);
        let mut text = String::new();
        g.render(&mut text);
        for line in [
            "bf_scrub_files{result=\"healthy\"} 2",
            "bf_scrub_files{result=\"degraded\"} 1",
            "bf_scrub_files{result=\"at_risk\"} 1",
            "bf_scrub_files{result=\"lost\"} 1",
            "bf_scrub_last_timestamp_seconds 1060",
            "bf_scrub_last_duration_seconds 60",
            "bf_scrub_last_repair 1",
            "bf_scrub_last_health_after 2",
            "bf_scrub_last_shards_bad 9",
            "bf_scrub_last_shards_repaired 6",
            "bf_scrub_last_orphans 3",
            "bf_scrub_volumes{result=\"healthy\"} 1",
            "bf_scrub_volumes{result=\"at_risk\"} 1",
            "bf_scrub_volumes{result=\"lost\"} 0",
            "bf_scrub_last_volumes 2",
            "bf_data_at_risk_bytes 4300",
            "bf_data_lost_bytes 70",
            "bf_scrub_unfinished 0",
            "bf_scrub_state_unreadable 0",
            "# TYPE bf_scrub_files gauge",
        ] {
            has(&text, line);
        }
    }

    #[test]
    fn failure_domains_and_their_tolerance_are_gauges() {
        let zones: Vec<String> = ["a", "a", "a", "b", "c", "d"].iter().map(|z| z.to_string()).collect();
        let mut text = String::new();
        render_zones(&crate::zones::tolerance(&zones, 4, 2), &mut text);
        has(&text, "bf_failure_domains 4");
        has(&text, "bf_failure_domains_tolerated 0");
        has(&text, "# TYPE bf_failure_domains_tolerated gauge");
    }

    #[test]
    fn no_record_renders_zeros_and_an_interrupted_run_shows() {
        let mut text = String::new();
        ScrubGauges::default().render(&mut text);
        has(&text, "bf_scrub_last_timestamp_seconds 0");
        has(&text, "bf_scrub_files{result=\"healthy\"} 0");
        let mut st = ScrubState::new([1; 16]);
        st.running = Some(Running::default());
        let mut text = String::new();
        ScrubGauges::of(&st).render(&mut text);
        has(&text, "bf_scrub_unfinished 1");
        has(&text, "bf_scrub_last_timestamp_seconds 0");
    }

    #[test]
    fn the_record_is_read_again_when_it_changes_and_a_damaged_one_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::tests::new_store(dir.path(), 2, 1);
        let m = StoreMetrics::default();
        assert_eq!(m.scrub_gauges(&store), ScrubGauges::default(), "no record yet");
        let mut st = ScrubState::new(store.descriptor().store_id);
        st.files.insert([7; 16], file(Health::Degraded, 1, 5, 0));
        st.save(store.dir()).unwrap();
        assert_eq!(m.scrub_gauges(&store).files, [0, 0, 1, 0]);
        st.files.insert([8; 16], file(Health::Healthy, 0, 0, 0));
        st.save(store.dir()).unwrap();
        assert_eq!(m.scrub_gauges(&store).files, [1, 0, 1, 0], "the replaced record is read");
        std::fs::write(store.dir().join(STATE_FILE), b"garbage").unwrap();
        let g = m.scrub_gauges(&store);
        assert!(g.unreadable && g.files == [0; 4], "{g:?}");
    }
}
