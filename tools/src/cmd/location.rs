//! `bf location ls`, `zone`, `add`, `remove` and `replace`, and `bf rebalance`.

use anyhow::{bail, Context, Result};

use blockframe::rebalance::{self, RebalanceOptions, RebalanceReport};
use blockframe::scrub::{self, LocationState, Selection};
use blockframe::store::Store;

use super::scrub::{location_word, rate_bytes, repair_after_layout_change, scrub_once, scrub_options};
use crate::cli::{LocationCommand, MoveArgs, RebalanceArgs};
use crate::open::{open_keyless, open_optional_key};
use crate::settings::Settings;
use crate::{EXIT_DEGRADED, EXIT_LOST, EXIT_OK};

/// `bf location ...`.
pub(crate) fn location_cmd(c: &LocationCommand, s: &Settings) -> Result<u8> {
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
            let (zones, draining) = (&st.descriptor().zones, &st.descriptor().draining);
            if *json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|(i, spec, state)| {
                        serde_json::json!({"index": i, "spec": spec, "zone": zones[*i], "state": state,
                            "draining": draining[*i]})
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for (i, spec, state) in &rows {
                    let zone = if zones[*i].is_empty() { String::new() } else { format!("  zone {}", zones[*i]) };
                    let drain = if draining[*i] { "  DRAINING (bf location remove)" } else { "" };
                    out!("{i:>3}  {spec}  {}{zone}{drain}", location_word(state))?;
                }
            }
            Ok(if rows.iter().all(|r| matches!(r.2, LocationState::Ok)) { EXIT_OK } else { EXIT_DEGRADED })
        }
        LocationCommand::Zone { location, zone } => {
            let mut st = open_keyless(s)?;
            let index = location_index(&st.descriptor().locations, location)?;
            st.set_zone(index, zone)?;
            let t = st.zone_tolerance();
            eprintln!("bf: {}", tolerance_line(&t));
            Ok(if t.tolerance == 0 { EXIT_DEGRADED } else { EXIT_OK })
        }
        LocationCommand::Add { location, zone, no_rebalance, moves } => {
            let mut st = open_optional_key(s)?;
            let index = st.add_location(location, zone)?;
            eprintln!("bf: location {index} ({}) added", st.descriptor().locations[index]);
            eprintln!("bf: {}", tolerance_line(&st.zone_tolerance()));
            if *no_rebalance {
                eprintln!("bf: run `bf rebalance` to move shards onto it, then `bf scrub --repair`");
                return Ok(EXIT_OK);
            }
            let r = run_rebalance(&st, moves, false)?;
            eprintln!("bf: writing the replicated objects' copies onto it (a repairing scrub)");
            let code = repair_after_layout_change(&st, s, moves.json)?;
            Ok(if r.left > 0 { code.max(EXIT_DEGRADED) } else { code })
        }
        LocationCommand::Remove { location, moves } => {
            let mut st = open_optional_key(s)?;
            let index = location_index(&st.descriptor().locations, location)?;
            let spec = st.descriptor().locations[index].clone();
            st.start_draining(index)?;
            eprintln!("bf: location {index} ({spec}) is draining: nothing new is written to it");
            let r = run_rebalance(&st, moves, false)?;
            if r.left > 0 {
                bail!("{} shards could not be moved off {spec} (see above); it stays draining: run this again", r.left);
            }
            eprintln!("bf: restoring every replicated object's copies on the other locations (a repairing scrub)");
            let code = repair_after_layout_change(&st, s, moves.json)?;
            if code == EXIT_LOST {
                bail!("the store has lost data (see the scrub report); {spec} stays draining and is not forgotten");
            }
            st.exclusively(|st| forget_drained(st, index, moves))?;
            eprintln!("bf: location {spec} removed; it holds nothing this store needs");
            Ok(EXIT_OK)
        }
        LocationCommand::Replace { old, new, no_repair, json } => {
            let mut st = open_optional_key(s)?;
            let specs = &st.descriptor().locations;
            let index = location_index(specs, old)?;
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

/// The last step of `bf location remove`, the store held alone: moves whatever a process that had the store
/// open wrote to the draining location meanwhile, checks nothing is left on it, and forgets it.
fn forget_drained(st: &mut Store, index: usize, moves: &MoveArgs) -> blockframe::error::Result<()> {
    let opts = RebalanceOptions { workers: moves.movers, rate_bytes_per_sec: None, dry_run: false };
    rebalance::rebalance(st, &opts, &|_| {})?;
    let left = rebalance::shards_on(st, index)?;
    if left > 0 {
        return Err(blockframe::error::Error::Config(format!(
            "{left} shards are still on location {index}; it stays draining: run `bf location remove` again"
        )));
    }
    st.forget_location(index)
}

/// `bf rebalance`.
pub(crate) fn rebalance_cmd(a: &RebalanceArgs, s: &Settings) -> Result<u8> {
    let mut st = open_keyless(s)?;
    if a.spread_zones {
        let changed = st.spread_zones()?;
        let word = if changed { "reordered by zone" } else { "already spread over the zones" };
        eprintln!("bf: locations {word}; {}", tolerance_line(&st.zone_tolerance()));
    }
    let r = run_rebalance(&st, &a.moves, a.dry_run)?;
    Ok(if r.left > 0 { EXIT_DEGRADED } else { EXIT_OK })
}

/// Runs a rebalance with progress on stderr; prints its report (JSON with --json).
fn run_rebalance(st: &Store, a: &MoveArgs, dry_run: bool) -> Result<RebalanceReport> {
    let rate_bytes_per_sec = rate_bytes(a.rate, "rate")?;
    let opts = RebalanceOptions { workers: a.movers.max(1), rate_bytes_per_sec, dry_run };
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |r: &RebalanceReport| {
        let Ok(mut last) = last.lock() else { return };
        if last.elapsed() >= std::time::Duration::from_secs(2) {
            *last = std::time::Instant::now();
            eprintln!(
                "bf: rebalance: {} shards seen, {} moved ({})",
                r.shards_seen,
                r.moved,
                mb(r.bytes_moved, r.seconds)
            );
        }
    };
    let r = rebalance::rebalance(st, &opts, &progress)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        let verb = if dry_run { "would move" } else { "moved" };
        out!(
            "rebalance: {} shards seen, {verb} {} home ({}), {} duplicate copies dropped, {} left",
            r.shards_seen,
            r.moved,
            mb(r.bytes_moved, r.seconds),
            r.duplicates_dropped,
            r.left
        )?;
        for e in &r.errors {
            out!("  not moved: {e}")?;
        }
    }
    Ok(r)
}

/// "N MB in S s, R MB/s".
fn mb(bytes: u64, secs: f64) -> String {
    let m = bytes as f64 / 1e6;
    format!("{m:.1} MB in {secs:.1} s, {:.1} MB/s", if secs > 0.0 { m / secs } else { 0.0 })
}

/// The number of the location `arg` names: its number, or its spec as `bf location ls` shows it.
fn location_index(specs: &[String], arg: &str) -> Result<usize> {
    match arg.parse::<usize>() {
        Ok(i) if i < specs.len() => Ok(i),
        _ => specs
            .iter()
            .position(|l| l == arg || l.trim_end_matches('/') == arg.trim_end_matches('/'))
            .with_context(|| format!("{arg:?} is not one of this store's locations (see `bf location ls`)")),
    }
}

/// One line on the failure domains and how many of them may be lost.
pub(crate) fn tolerance_line(t: &blockframe::zones::ZoneTolerance) -> String {
    let what = if t.named {
        "failure domains (zones, and locations without one)"
    } else {
        "locations, each its own failure domain"
    };
    match t.tolerance {
        0 => format!(
            "{} {what}; NOT TOLERANT: losing one of them loses data (up to {} shards of a stripe share one)",
            t.domains, t.most_in_one
        ),
        n => format!("{} {what}; any {n} of them may be lost", t.domains),
    }
}
