//! The maintenance commands: scrub, status, recover.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use blockframe::files::catalog;
use blockframe::recover::{recover, Fallback};
use blockframe::scrub::state::ScrubState;
use blockframe::scrub::{self, FileReport, Health, LocationState, RunControl, ScrubOptions, ScrubReport, Selection};
use blockframe::store::{self, Store};

use crate::cli::{LocationCommand, RecoverArgs, ScrubArgs, StatusArgs};
use crate::files::{open_keyless, unlock};
use crate::settings::Settings;
use crate::{EXIT_DEGRADED, EXIT_LOST, EXIT_OK};

/// Parses `90s`, `30m`, `12h`, `7d`, `2w` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().with_context(|| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        _ => bail!("invalid duration {s:?}: use a number followed by s, m, h, d or w"),
    };
    if !n.is_finite() || n < 0.0 {
        bail!("invalid duration {s:?}");
    }
    Ok(Duration::from_secs_f64(n * secs))
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let rem = unix % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

fn exit_code(h: Health) -> u8 {
    match h {
        Health::Healthy => EXIT_OK,
        Health::Degraded => EXIT_DEGRADED,
        Health::Lost => EXIT_LOST,
    }
}

/// Opens the store, loading the key only when one is available (scrub needs none).
fn open_optional_key(s: &Settings) -> Result<Store> {
    let mut st = open_keyless(s)?;
    let keyed =
        if st.descriptor().kdf.is_some() { std::env::var("BF_PASSPHRASE").is_ok() } else { s.key_path().exists() };
    if keyed {
        unlock(&mut st, s)?;
    }
    Ok(st)
}

fn options(a: &ScrubArgs, s: &Settings) -> Result<ScrubOptions> {
    scrub_options(a.repair, a.rate, a.orphan_grace_hours, s)
}

/// Scrub options from flags (when given) over the config file.
fn scrub_options(repair: bool, rate: Option<f64>, grace_hours: Option<f64>, s: &Settings) -> Result<ScrubOptions> {
    let rate_mb = rate.or(s.file.scrub_rate_mb);
    let rate_bytes_per_sec = match rate_mb {
        Some(r) if r.is_finite() && r > 0.0 => Some((r * 1e6) as u64),
        Some(0.0) => None,
        Some(r) => bail!("invalid scrub rate {r} MB/s"),
        None => None,
    };
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

/// `bf location ...`.
pub fn location_cmd(c: &LocationCommand, s: &Settings) -> Result<u8> {
    match c {
        LocationCommand::Ls { json } => {
            let st = open_keyless(s)?;
            let rows: Vec<(usize, String, LocationState)> = st
                .descriptor()
                .locations
                .iter()
                .cloned()
                .zip(scrub::check_locations(&st, false))
                .enumerate()
                .map(|(i, (spec, state))| (i, spec, state))
                .collect();
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for (i, spec, state) in &rows {
                    println!("{i:>3}  {spec}  {}", location_word(state));
                }
            }
            Ok(if rows.iter().all(|r| matches!(r.2, LocationState::Ok)) { EXIT_OK } else { EXIT_DEGRADED })
        }
        LocationCommand::Replace { old, new, no_repair, json } => {
            let mut st = open_optional_key(s)?;
            let specs = &st.descriptor().locations;
            let index = match old.parse::<usize>() {
                Ok(i) if i < specs.len() => i,
                _ => specs
                    .iter()
                    .position(|l| l == old || l.trim_end_matches('/') == old.trim_end_matches('/'))
                    .with_context(|| format!("{old:?} is not one of this store's locations (see `bf location ls`)"))?,
            };
            let was = specs[index].clone();
            st.replace_location(index, new)?;
            eprintln!("bf: location {index} ({was}) replaced by {}", st.descriptor().locations[index]);
            if *no_repair {
                eprintln!("bf: run `bf scrub --repair` to rebuild its shards and manifest copies");
                return Ok(EXIT_OK);
            }
            eprintln!("bf: rebuilding its shards and manifest copies from the other locations");
            scrub_once(&st, &scrub_options(true, None, None, s)?, Selection::All, None, *json)
        }
    }
}

/// `bf scrub`.
pub fn cmd_scrub(a: &ScrubArgs, s: &Settings) -> Result<u8> {
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

fn scrub_once(
    st: &Store,
    opts: &ScrubOptions,
    selection: Selection,
    max_duration: Option<Duration>,
    json: bool,
) -> Result<u8> {
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
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(st, &report);
    }
    Ok(exit_code(report.health()))
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
        f.label, c.ok, c.corrupt, c.missing, c.misplaced
    );
    if !f.segments_at_risk.is_empty() {
        line += &format!("; segments at risk {:?}", f.segments_at_risk);
    }
    if f.manifests.missing + f.manifests.corrupt > 0 {
        line += &format!("; manifest copies {} missing, {} corrupt", f.manifests.missing, f.manifests.corrupt);
    }
    if f.shards_repaired + f.manifests.repaired > 0 {
        line += &format!("; repaired {} shards, {} manifest copies", f.shards_repaired, f.manifests.repaired);
    }
    line
}

fn print_report(st: &Store, r: &ScrubReport) {
    const MAX_ISSUES: usize = 20;
    for f in r.files.iter().filter(|f| f.health() != Health::Healthy) {
        println!("{}", file_line(f));
        for i in f.issues.iter().take(MAX_ISSUES) {
            let loc = st.locations().get(i.location).map(|l| l.name()).unwrap_or("?");
            let fix = match i.repaired_to.and_then(|t| st.locations().get(t)) {
                Some(t) => format!(" -> rebuilt on {}", t.name()),
                None => String::new(),
            };
            println!("  segment {} shard {} on {loc}: {:?}: {}{fix}", i.segment, i.shard, i.status, i.detail);
        }
        if f.issues.len() > MAX_ISSUES {
            println!("  ... and {} more", f.issues.len() - MAX_ISSUES);
        }
        for e in &f.repair_errors {
            println!("  repair failed: {e}");
        }
    }
    for l in &r.locations {
        let c = &l.shards;
        println!(
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
        );
    }
    for o in &r.orphans {
        let age = o.age_secs.map(|a| format!("{:.1} h old", a as f64 / 3600.0)).unwrap_or_else(|| "age unknown".into());
        let what = if o.deleted { "deleted" } else { "kept (younger than the grace period, or no --repair)" };
        println!("orphan {}: {} shards on {} locations, {age}: {what}", o.file_id, o.shards, o.locations.len());
    }
    for v in &r.volumes {
        let c = &v.shards;
        println!(
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
        );
        if !v.stripes_lost.is_empty() {
            println!("  lost stripes: {:?}", v.stripes_lost);
        }
        for e in &v.errors {
            println!("  {e}");
        }
    }
    let total = scrub::total_counts(&r.files);
    let lost: usize = r.files.iter().map(|f| f.segments_lost.len()).sum();
    let risk: usize = r.files.iter().map(|f| f.segments_at_risk.len()).sum();
    let mb = r.bytes_verified as f64 / 1e6;
    println!(
        "scrubbed {} files ({} resumed from an earlier run): {mb:.1} MB of shards verified in {:.1} s ({:.1} MB/s); \
         {} bad shards, {risk} segments at risk, {lost} lost; result: {}",
        r.files.len(),
        r.files_resumed,
        r.elapsed_secs,
        mb / r.elapsed_secs.max(1e-9),
        total.bad(),
        health_word(r.health())
    );
    if r.repair && r.health() != Health::Healthy {
        println!("after repair: {}", health_word(r.health_after()));
    }
    if !r.complete {
        println!("paused by --max-duration; continue with `bf scrub --resume`");
    }
}

fn location_word(state: &LocationState) -> String {
    match state {
        LocationState::Ok => "ok".to_string(),
        LocationState::MarkerRestored => "marker restored".to_string(),
        LocationState::MarkerMissing(d) => format!("marker missing ({d})"),
        LocationState::Foreign(d) => format!("FOREIGN ({d}), not written to"),
        LocationState::Gone(d) => format!("UNAVAILABLE ({d})"),
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Lost => "DATA LOST",
    }
}

#[derive(serde::Serialize)]
struct StatusReport {
    store: String,
    store_id: String,
    k: u16,
    m: u16,
    segment_size: u64,
    files: usize,
    locations: Vec<(String, LocationState)>,
    last_scrub: Option<scrub::state::RunSummary>,
    interrupted_scrub: Option<scrub::state::RunSummary>,
    files_not_healthy: u64,
    bytes_at_risk: u64,
    bytes_lost: u64,
    /// Files and volumes written short (a location was down), waiting for `bf scrub --repair`.
    pending_repairs: u64,
}

/// `bf status`.
pub fn cmd_status(a: &StatusArgs, s: &Settings) -> Result<u8> {
    let st = open_keyless(s)?;
    let d = st.descriptor();
    let state = match ScrubState::load(st.dir(), &d.store_id) {
        Ok(x) => x.unwrap_or_else(|| ScrubState::new(d.store_id)),
        Err(e) => {
            eprintln!("bf: warning: scrub state unreadable ({e}); showing no scrub history");
            ScrubState::new(d.store_id)
        }
    };
    let (bad_files, at_risk, lost) = state.at_risk();
    let report = StatusReport {
        store: st.dir().display().to_string(),
        store_id: hex::encode(d.store_id),
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        files: catalog::scan(&st).map(|f| f.len()).unwrap_or(0),
        locations: st
            .locations()
            .iter()
            .map(|l| l.name().to_string())
            .zip(scrub::check_locations(&st, false))
            .collect(),
        last_scrub: state.last.clone(),
        interrupted_scrub: state.running.as_ref().map(|r| r.summary.clone()),
        files_not_healthy: bad_files,
        bytes_at_risk: at_risk,
        bytes_lost: lost,
        pending_repairs: blockframe::pending::list(&st).len() as u64,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(EXIT_OK);
    }
    println!("store {} (id {})", report.store, report.store_id);
    println!("k={} m={} segment {} KiB, {} files", d.k, d.m, d.segment_size >> 10, report.files);
    for (name, state) in &report.locations {
        println!("  location {name}: {}", location_word(state));
    }
    if report.pending_repairs > 0 {
        println!(
            "{} files or volumes were written with shards missing (a location was down): run `bf scrub --repair`",
            report.pending_repairs
        );
    }
    match &report.last_scrub {
        None => println!("last scrub: never (run `bf scrub`)"),
        Some(l) => {
            println!(
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
            );
            println!(
                "  {} bad shards, {} repaired, {} bad manifest copies, {} orphans",
                l.shards_bad, l.shards_repaired, l.manifest_copies_bad, l.orphans
            );
        }
    }
    if let Some(r) = &report.interrupted_scrub {
        println!(
            "interrupted scrub started {}: {} files done; continue with `bf scrub --resume`",
            format_utc(r.started_unix),
            r.files
        );
    }
    println!(
        "data at risk: {} bytes in {} files not healthy; data lost: {} bytes",
        report.bytes_at_risk, report.files_not_healthy, report.bytes_lost
    );
    Ok(EXIT_OK)
}

/// `bf recover`.
pub fn cmd_recover(a: &RecoverArgs, s: &Settings) -> Result<u8> {
    let key_path = s.key_path();
    if !key_path.exists() {
        bail!(
            "recover needs the key file to check the manifests and rebuild the key check value: {} not found \
             (set --key-file)",
            key_path.display()
        );
    }
    let key = store::read_key_file(&key_path)?;
    let segment_size = a.segment_size_mb.map(|mb| (mb * 1048576.0).round() as u64);
    let fallback = Fallback { k: a.data_shards, m: a.parity_shards, segment_size };
    let r = recover(&s.store, &a.locations, &key, &fallback)?;
    let d = &r.descriptor;
    eprintln!(
        "bf: rebuilt {} (k={}, m={}, segment {} KiB, {} locations) from {} authenticated manifest copies",
        s.store.join("store.bf").display(),
        d.k,
        d.m,
        d.segment_size >> 10,
        d.locations.len(),
        r.manifests_checked
    );
    for l in &r.new_locations {
        eprintln!("bf: {l} had no marker and replaces a lost location; run `bf scrub --repair`");
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("7 parsecs").is_err() && parse_duration("").is_err() && parse_duration("-1d").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
