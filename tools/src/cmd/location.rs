//! `bf location ls` and `bf location replace`.

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
            if *json {
                out!("{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for (i, spec, state) in &rows {
                    out!("{i:>3}  {spec}  {}", location_word(state))?;
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
