//! `bf scrub`: check (and repair) every shard and manifest copy, once or periodically.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use blockframe::files::catalog;
use blockframe::scrub::volumes::VolumeReport;
use blockframe::scrub::{
    self, FileReport, Health, LocationReport, LocationState, OrphanKind, RunControl, ScrubOptions, ScrubReport,
    Selection,
};
use blockframe::store::Store;

use crate::cli::ScrubArgs;
use crate::open::open_optional_key;
use crate::output::shown;
use crate::settings::Settings;
use crate::units::parse_duration;
use crate::{EXIT_DEGRADED, EXIT_LOST, EXIT_OK};

pub(crate) fn exit_code(h: Health) -> u8 {
    match h {
        Health::Healthy => EXIT_OK,
        Health::Degraded => EXIT_DEGRADED,
        Health::Lost => EXIT_LOST,
    }
}

fn options(a: &ScrubArgs, s: &Settings) -> Result<ScrubOptions> {
    scrub_options(a.repair, a.rate, a.orphan_grace_hours, s)
}

/// Scrub options from flags (when given) over the config file.
/// A rate limit given in MB/s as bytes per second: `None` for none (or 0); an error naming `what` for a negative
/// or non-finite one.
pub(crate) fn rate_bytes(rate_mb: Option<f64>, what: &str) -> Result<Option<u64>> {
    match rate_mb {
        Some(r) if r.is_finite() && r > 0.0 => Ok(Some((r * 1e6) as u64)),
        Some(0.0) | None => Ok(None),
        Some(r) => bail!("invalid {what} {r} MB/s"),
    }
}

pub(crate) fn scrub_options(
    repair: bool,
    rate: Option<f64>,
    grace_hours: Option<f64>,
    s: &Settings,
) -> Result<ScrubOptions> {
    let rate_bytes_per_sec = rate_bytes(rate.or(s.file.scrub_rate_mb), "scrub rate")?;
    let grace_h = grace_hours.or(s.file.orphan_grace_hours).unwrap_or(24.0);
    if !grace_h.is_finite() || grace_h < 0.0 {
        bail!("invalid orphan grace period {grace_h} hours");
    }
    Ok(ScrubOptions {
        repair,
        workers: s.workers,
        rate_bytes_per_sec,
        orphan_grace: Duration::from_secs_f64(grace_h * 3600.0),
    })
}

/// `bf scrub`.
pub(crate) fn scrub_cmd(a: &ScrubArgs, s: &Settings) -> Result<u8> {
    let st = open_optional_key(s)?;
    let opts = options(a, s)?;
    let max_duration = a.max_duration.as_deref().map(parse_duration).transpose()?;
    if !a.names.is_empty() && (a.resume || a.watch) {
        bail!("--resume and --watch scrub the whole store; do not name files");
    }
    let interval = parse_duration(&a.interval)?;
    loop {
        let selection = if !a.names.is_empty() {
            let files = a.names.iter().map(|n| catalog::find(&st, n).map(|e| e.file)).collect::<Result<Vec<_>, _>>()?;
            Selection::Files(files)
        } else if a.resume || a.watch {
            Selection::Resume
        } else {
            Selection::All
        };
        let code = scrub_once(&st, &opts, selection, max_duration, a.json)?;
        if !a.watch {
            return Ok(code);
        }
        tracing::info!(secs = interval.as_secs(), "next scrub after the interval");
        std::thread::sleep(interval);
    }
}

pub(crate) fn scrub_once(
    st: &Store,
    opts: &ScrubOptions,
    selection: Selection,
    max_duration: Option<Duration>,
    json: bool,
) -> Result<u8> {
    scrub_reported(st, opts, selection, max_duration, json).map(|r| exit_code(r.health()))
}

/// A repairing scrub of the whole store after a change of its locations (`bf location add`, `remove`): prints
/// the report; the exit status is the health after the repair (a new location lacks every copy until then).
pub(crate) fn repair_after_layout_change(st: &Store, s: &Settings, json: bool) -> Result<u8> {
    let opts = scrub_options(true, None, None, s)?;
    scrub_reported(st, &opts, Selection::All, None, json).map(|r| exit_code(r.health_after()))
}

/// Runs one scrub with a progress bar on a terminal, prints its report and returns it.
fn scrub_reported(
    st: &Store,
    opts: &ScrubOptions,
    selection: Selection,
    max_duration: Option<Duration>,
    json: bool,
) -> Result<ScrubReport> {
    let pb = (std::io::stderr().is_terminal() && !json).then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("scrub {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    });
    let set_total = |n: u64| {
        if let Some(pb) = &pb {
            pb.set_length(n)
        }
    };
    let progress = |n: u64| {
        if let Some(pb) = &pb {
            pb.set_position(n)
        }
    };
    let ctl = RunControl { max_duration, total: pb.as_ref().map(|_| &set_total as &dyn Fn(u64)), progress: &progress };
    let (report, warning) = scrub::run(st, opts, selection, &ctl)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if let Some(w) = warning {
        eprintln!("bf: warning: scrub state: {w}");
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(st, &report)?;
    }
    Ok(report)
}

fn file_line(f: &FileReport) -> String {
    let c = &f.shards;
    let state = match f.health() {
        Health::Healthy => "ok".to_string(),
        Health::Degraded => "degraded".to_string(),
        Health::Lost if f.root.is_empty() => "LOST (no valid manifest copy)".to_string(),
        Health::Lost => format!("LOST segments {:?}", f.segments_lost),
    };
    let mut line = format!(
        "{}: {state}: shards {} ok, {} corrupt, {} missing, {} misplaced",
        shown(&f.label),
        c.ok,
        c.corrupt,
        c.missing,
        c.misplaced
    );
    if !f.segments_at_risk.is_empty() {
        line += &format!("; segments at risk {:?}", f.segments_at_risk);
    }
    if !f.segments_crowded.is_empty() {
        line += &format!(
            "; segments crowded {:?} (shards share a location: fewer lost locations than m would lose them)",
            f.segments_crowded
        );
    }
    if f.shards_moved > 0 {
        line += &format!("; moved {} shards home", f.shards_moved);
    }
    if f.manifests.missing + f.manifests.corrupt > 0 {
        line += &format!("; manifest copies {} missing, {} corrupt", f.manifests.missing, f.manifests.corrupt);
    }
    if f.shards_repaired + f.manifests.repaired > 0 {
        line += &format!("; repaired {} shards, {} manifest copies", f.shards_repaired, f.manifests.repaired);
    }
    line
}

fn print_report(st: &Store, r: &ScrubReport) -> std::io::Result<()> {
    for f in r.files.iter().filter(|f| f.health() != Health::Healthy) {
        print_file(st, f)?;
    }
    for l in &r.locations {
        print_location(l)?;
    }
    out!("{}", super::location::tolerance_line(&st.zone_tolerance()))?;
    for o in &r.orphans {
        let age = o.age_secs.map(|a| format!("{:.1} h old", a as f64 / 3600.0)).unwrap_or_else(|| "age unknown".into());
        let what = match (o.kind, o.deleted) {
            (OrphanKind::Unreferenced, _) => {
                "LOST from the catalog: its shards look whole and are kept; `bf lost-found --restore` brings it back"
            }
            (_, true) => "deleted",
            (OrphanKind::Leftover, false) => {
                "left by a cut commit or removal; kept (younger than the grace period, or no --repair)"
            }
            (OrphanKind::Fragment, false) => "a fragment; kept (younger than the grace period, or no --repair)",
        };
        out!(
            "orphan {}: {} shards of {} segments on {} locations, {age}: {what}",
            o.file_id,
            o.shards,
            o.segments,
            o.locations.len()
        )?;
    }
    for v in &r.volumes {
        print_volume(v)?;
    }
    print_catalog(&r.catalog)?;
    print_summary(r)?;
    Ok(())
}

/// The catalog log's copies, when something was wrong with them.
fn print_catalog(c: &blockframe::scrub::CatalogReport) -> std::io::Result<()> {
    if c.bad() == 0 && c.errors.is_empty() && c.stale_deleted == 0 {
        return Ok(());
    }
    out!(
        "catalog log: {} objects, copies {} ok, {} missing, {} corrupt, {} rewritten, {} stale deleted",
        c.objects,
        c.copies.ok,
        c.copies.missing,
        c.copies.corrupt,
        c.copies.repaired,
        c.stale_deleted
    )?;
    for e in &c.errors {
        out!("  {e}")?;
    }
    Ok(())
}

/// A file that is not healthy: its line, its first issues and its repair failures.
fn print_file(st: &Store, f: &FileReport) -> std::io::Result<()> {
    const MAX_ISSUES: usize = 20;
    out!("{}", file_line(f))?;
    for i in f.issues.iter().take(MAX_ISSUES) {
        let loc = st.locations().get(i.location).map(|l| l.name()).unwrap_or("?");
        let fix = match i.repaired_to.and_then(|t| st.locations().get(t)) {
            Some(t) => format!(" -> rebuilt on {}", t.name()),
            None => String::new(),
        };
        out!("  segment {} shard {} on {loc}: {:?}: {}{fix}", i.segment, i.shard, i.status, i.detail)?;
    }
    if f.issues.len() > MAX_ISSUES {
        out!("  ... and {} more", f.issues.len() - MAX_ISSUES)?;
    }
    for e in &f.repair_errors {
        out!("  repair failed: {e}")?;
    }
    Ok(())
}

fn print_location(l: &LocationReport) -> std::io::Result<()> {
    let c = &l.shards;
    out!(
        "location {}: {}: shards {} ok ({} served from elsewhere), {} corrupt, {} missing, {} misplaced; {} bad \
         manifest copies; {} written",
        l.name,
        location_word(&l.state),
        c.ok,
        c.relocated,
        c.corrupt,
        c.missing,
        c.misplaced,
        l.manifests_bad,
        l.written
    )?;
    Ok(())
}

fn print_volume(v: &VolumeReport) -> std::io::Result<()> {
    let c = &v.shards;
    out!(
        "volume {} (generation {}): {}: {} stripes, shards {} ok, {} corrupt, {} missing, {} misplaced; {} at risk, \
         {} lost; {} bad superblock and {} bad map page copies; {} shards repaired{}",
        v.label,
        v.generation,
        health_word(v.health()),
        v.stripes,
        c.ok,
        c.corrupt,
        c.missing,
        c.misplaced,
        v.stripes_at_risk.len(),
        v.stripes_lost.len(),
        v.superblocks_bad,
        v.pages_bad,
        v.shards_repaired,
        if v.exclusive { "" } else { " (in use: verified only, not repaired)" }
    )?;
    if !v.stripes_lost.is_empty() {
        out!("  lost stripes: {:?}", v.stripes_lost)?;
    }
    for e in &v.errors {
        out!("  {e}")?;
    }
    Ok(())
}

/// The run's totals, its result and what to do next.
fn print_summary(r: &ScrubReport) -> std::io::Result<()> {
    let total = scrub::total_counts(&r.files);
    let lost: usize = r.files.iter().map(|f| f.segments_lost.len()).sum();
    let risk: usize = r.files.iter().map(|f| f.segments_at_risk.len()).sum();
    let mb = r.bytes_verified as f64 / 1e6;
    out!(
        "scrubbed {} files{} ({} resumed from an earlier run): {mb:.1} MB of shards verified in {:.1} s ({:.1} MB/s); \
         {} bad shards, {risk} segments at risk, {lost} lost; result: {}",
        r.files.iter().filter(|f| !f.pack).count(),
        match r.files.iter().filter(|f| f.pack).count() {
            0 => String::new(),
            p => format!(" and {p} packs of small files"),
        },
        r.files_resumed,
        r.elapsed_secs,
        mb / r.elapsed_secs.max(1e-9),
        total.bad(),
        health_word(r.health())
    )?;
    if r.files_removed > 0 {
        out!("{} files were removed while being checked (not counted)", r.files_removed)?;
    }
    if r.repair && r.health() != Health::Healthy {
        out!("after repair: {}", health_word(r.health_after()))?;
    }
    if !r.complete {
        out!("paused by --max-duration; continue with `bf scrub --resume`")?;
    }
    Ok(())
}

pub(crate) fn location_word(state: &LocationState) -> String {
    match state {
        LocationState::Ok => "ok".to_string(),
        LocationState::MarkerRestored => "marker restored".to_string(),
        LocationState::MarkerMissing(d) => format!("marker missing ({d})"),
        LocationState::Foreign(d) => format!("FOREIGN ({d}), not written to"),
        LocationState::Gone(d) => format!("UNAVAILABLE ({d})"),
    }
}

pub(crate) fn health_word(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Lost => "DATA LOST",
    }
}
