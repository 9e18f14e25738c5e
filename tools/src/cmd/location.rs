//! `bf location ls`, `bf location zone` and `bf location replace`.

use anyhow::{Context, Result};

use blockframe::scrub::{self, LocationState, Selection};

use super::scrub::{location_word, scrub_once, scrub_options};
use crate::cli::LocationCommand;
use crate::open::{open_keyless, open_optional_key};
use crate::settings::Settings;
use crate::{EXIT_DEGRADED, EXIT_OK};

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
            let zones = &st.descriptor().zones;
            if *json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|(i, spec, state)| serde_json::json!({"index": i, "spec": spec, "zone": zones[*i], "state": state}))
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for (i, spec, state) in &rows {
                    let zone = if zones[*i].is_empty() { String::new() } else { format!("  zone {}", zones[*i]) };
                    out!("{i:>3}  {spec}  {}{zone}", location_word(state))?;
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
