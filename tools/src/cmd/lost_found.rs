//! `bf lost-found`: files whose shards are whole but whose catalog entry was lost (scrub reports them as data
//! lost and never deletes them): list them, restore them under `lost+found/`, or discard them.

use anyhow::{Context, Result};
use serde::Serialize;

use blockframe::files::lost_found::{self, Lost};

use crate::cli::LostFoundArgs;
use crate::open::open_keyed;
use crate::output::shown;
use crate::settings::Settings;
use crate::{EXIT_LOST, EXIT_OK};

/// One lost file or pack as listed.
#[derive(Serialize)]
struct Row {
    file_id: String,
    segments: u64,
    /// A pack of small files.
    pack: bool,
    /// The files it gives back, when it reads back whole with the key: names (as restored) and sizes.
    files: Vec<(String, u64)>,
    restored: bool,
    /// Why it cannot be restored (or some of its files were refused).
    error: Option<String>,
}

/// `bf lost-found`.
pub(crate) fn lost_found_cmd(a: &LostFoundArgs, s: &Settings) -> Result<u8> {
    let st = open_keyed(s)?;
    if !a.discard.is_empty() {
        for id in &a.discard {
            let mut raw = [0u8; 16];
            hex::decode_to_slice(id, &mut raw).with_context(|| format!("{id:?} is not a file id (32 hex digits)"))?;
            lost_found::discard(&st, &raw)?;
            eprintln!("bf: discarded the shards of {id}");
        }
        return Ok(EXIT_OK);
    }
    let found = lost_found::find(&st)?;
    let mut rows = Vec::new();
    let mut ready: Vec<Lost> = Vec::new();
    for (id, survey) in &found {
        let mut row = Row {
            file_id: hex::encode(id),
            segments: survey.segments(),
            pack: false,
            files: vec![],
            restored: false,
            error: None,
        };
        match lost_found::examine(&st, id, survey) {
            Ok(l) => {
                (row.pack, row.files) = (l.pack, l.files.clone());
                ready.push(l);
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        rows.push(row);
    }
    if a.restore && !ready.is_empty() {
        let mut outcomes = lost_found::restore(&st, &ready)?.into_iter();
        for l in &ready {
            let Some(row) = rows.iter_mut().find(|row| row.file_id == hex::encode(l.id)) else { continue };
            row.restored = true;
            for (name, _) in &l.files {
                if let Some(Err(e)) = outcomes.next() {
                    row.error = Some(format!("{}: {e}", shown(name)));
                }
            }
        }
    }
    print_rows(&rows, a.json)?;
    if rows.iter().any(|r| r.error.is_some()) {
        return Ok(EXIT_LOST);
    }
    if !a.restore && !rows.is_empty() {
        eprintln!("bf: `bf lost-found --restore` publishes them again");
    }
    Ok(EXIT_OK)
}

fn print_rows(rows: &[Row], json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(rows)?)?;
        return Ok(());
    }
    if rows.is_empty() {
        out!("no lost files")?;
    }
    for r in rows {
        let what = match (&r.error, r.restored) {
            (Some(e), _) => format!("cannot be restored: {e}"),
            (None, true) => "restored".to_string(),
            (None, false) => "restorable".to_string(),
        };
        let kind = if r.pack { format!("pack of {} files", r.files.len()) } else { format!("{} segments", r.segments) };
        out!("{}  {kind}  {what}", r.file_id)?;
        for (name, size) in &r.files {
            out!("  {}  {size} bytes", shown(name))?;
        }
    }
    Ok(())
}
