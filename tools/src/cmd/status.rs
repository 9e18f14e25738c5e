//! `bf status`: the store, its locations, the last scrub and the data at risk.

use anyhow::Result;

use blockframe::files::catalog;
use blockframe::scrub::state::{RunSummary, ScrubState};
use blockframe::scrub::{self, LocationState};
use blockframe::store::Store;

use super::scrub::{health_word, location_word};
use crate::cli::StatusArgs;
use crate::open::open_keyless;
use crate::settings::Settings;
use crate::units::format_utc;
use crate::{EXIT_DEGRADED, EXIT_OK};

#[derive(serde::Serialize)]
struct StatusReport {
    store: String,
    store_id: String,
    k: u16,
    m: u16,
    segment_size: u64,
    files: usize,
    locations: Vec<(String, LocationState)>,
    /// Failure domains and how many may be lost.
    zones: blockframe::zones::ZoneTolerance,
    last_scrub: Option<RunSummary>,
    interrupted_scrub: Option<RunSummary>,
    files_not_healthy: u64,
    /// Block volumes whose last scrub found them degraded or lost.
    volumes_not_healthy: u64,
    bytes_at_risk: u64,
    bytes_lost: u64,
    /// Files and volumes written short (a location was down), waiting for `bf scrub --repair`.
    pending_repairs: u64,
}

/// `bf status`.
pub(crate) fn status_cmd(a: &StatusArgs, s: &Settings) -> Result<u8> {
    let st = open_keyless(s)?;
    let report = status_report(&st);
    // A layout that cannot survive the loss of one failure domain is degraded, whatever the data's state.
    let code = if report.zones.tolerance == 0 { EXIT_DEGRADED } else { EXIT_OK };
    if a.json {
        out!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(code);
    }
    print_status(&report)?;
    Ok(code)
}

/// The scrub state record; an unreadable one is reported and treated as no history.
fn scrub_state(st: &Store) -> ScrubState {
    let id = st.descriptor().store_id;
    match ScrubState::load(st.dir(), &id) {
        Ok(x) => x.unwrap_or_else(|| ScrubState::new(id)),
        Err(e) => {
            eprintln!("bf: warning: scrub state unreadable ({e}); showing no scrub history");
            ScrubState::new(id)
        }
    }
}

fn status_report(st: &Store) -> StatusReport {
    let d = st.descriptor();
    let state = scrub_state(st);
    let (bad_files, bad_volumes, at_risk, lost) = state.at_risk();
    StatusReport {
        store: st.dir().display().to_string(),
        store_id: hex::encode(d.store_id),
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        files: catalog::scan(st).map(|f| f.len()).unwrap_or(0),
        locations: st.locations().iter().map(|l| l.name().to_string()).zip(scrub::check_locations(st, false)).collect(),
        zones: st.zone_tolerance(),
        last_scrub: state.last.clone(),
        interrupted_scrub: state.running.as_ref().map(|r| r.summary.clone()),
        files_not_healthy: bad_files,
        volumes_not_healthy: bad_volumes,
        bytes_at_risk: at_risk,
        bytes_lost: lost,
        pending_repairs: blockframe::pending::list(st).len() as u64,
    }
}

fn print_status(report: &StatusReport) -> std::io::Result<()> {
    out!("store {} (id {})", report.store, report.store_id)?;
    out!("k={} m={} segment {} KiB, {} files", report.k, report.m, report.segment_size >> 10, report.files)?;
    for (name, state) in &report.locations {
        out!("  location {name}: {}", location_word(state))?;
    }
    out!("{}", super::location::tolerance_line(&report.zones))?;
    if report.pending_repairs > 0 {
        out!(
            "{} files or volumes were written with shards missing (a location was down): run `bf scrub --repair`",
            report.pending_repairs
        )?;
    }
    match &report.last_scrub {
        None => out!("last scrub: never (run `bf scrub`)")?,
        Some(l) => print_last_scrub(l)?,
    }
    if let Some(r) = &report.interrupted_scrub {
        out!(
            "interrupted scrub started {}: {} files done; continue with `bf scrub --resume`",
            format_utc(r.started_unix),
            r.files
        )?;
    }
    out!(
        "data at risk: {} bytes in {} files and {} volumes not healthy; data lost: {} bytes",
        report.bytes_at_risk,
        report.files_not_healthy,
        report.volumes_not_healthy,
        report.bytes_lost
    )?;
    Ok(())
}

fn print_last_scrub(l: &RunSummary) -> std::io::Result<()> {
    out!(
        "last scrub: {} ({}), {} files, {:.1} MB verified: {}{}",
        format_utc(l.finished_unix),
        if l.repair { "with repair" } else { "check only" },
        l.files,
        l.bytes_verified as f64 / 1e6,
        health_word(l.health),
        if l.repair && l.health != l.health_after {
            format!(", after repair {}", health_word(l.health_after))
        } else {
            String::new()
        }
    )?;
    out!(
        "  {} bad shards, {} repaired, {} bad manifest copies, {} orphans",
        l.shards_bad,
        l.shards_repaired,
        l.manifest_copies_bad,
        l.orphans
    )?;
    Ok(())
}
