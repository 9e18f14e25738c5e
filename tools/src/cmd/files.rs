//! The file commands: commit, get, ls, rm, verify.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use blockframe::files::catalog::{self, Entry};
use blockframe::files::commit::{CommitReport, CommitRequest};
use blockframe::files::health::{quick_health, Health};
use blockframe::files::read::{read_to, verify_file, OpenFile};
use blockframe::files::session::{Session, SessionOptions};
use blockframe::format::manifest::EntryKind;
use blockframe::store::Store;
use blockframe::Error;

use crate::cli::{CommitArgs, GetArgs, InitArgs, LsArgs, RmArgs, VerifyArgs};
use crate::cmd::init::init;
use crate::open::{open_keyed, open_keyless, unlock};
use crate::output::shown;
use crate::settings::Settings;
use crate::{EXIT_DEGRADED, EXIT_LOST, EXIT_OK};

fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || total < (64 << 20) {
        return None;
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(pb)
}

/// Store name for a path given on the command line: relative paths keep their (normalised) form, absolute
/// ones their file name.
fn name_for(path: &Path) -> Result<String> {
    let parts: Vec<String> = if path.is_absolute() {
        path.file_name().map(|n| vec![n.to_string_lossy().into_owned()]).unwrap_or_default()
    } else {
        let mut v: Vec<String> = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => v.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                _ => bail!("cannot derive a store name from {}; pass --name", path.display()),
            }
        }
        v
    };
    if parts.is_empty() {
        bail!("cannot derive a store name from {}; pass --name", path.display());
    }
    Ok(parts.join("/"))
}

/// One thing to commit: a source path, its store name, and whether it is a symbolic link (stored as a link, with
/// its target) rather than a file to read.
struct Input {
    path: PathBuf,
    name: String,
    link: Option<String>,
}

/// How many entries of a tree `commit -r` did not commit, by reason.
#[derive(Default)]
struct Skipped {
    /// Not committed although they hold data (a name that is not UTF-8): the command fails at the end.
    refused: usize,
    /// Kinds the store does not keep (FIFOs, sockets, devices): reported, as tar and rsync do.
    other: usize,
}

/// Expands the command line into inputs; what a tree holds that cannot be committed goes into `skipped`.
fn inputs(a: &CommitArgs, skipped: &mut Skipped) -> Result<Vec<Input>> {
    if a.name.is_some() && a.paths.len() != 1 {
        bail!("--name needs exactly one input");
    }
    let mut out = Vec::new();
    for p in &a.paths {
        if p.as_os_str() == "-" {
            let name = a.name.clone().context("committing standard input needs --name")?;
            out.push(Input { path: p.clone(), name, link: None });
        } else if p.is_dir() {
            if !a.recursive {
                bail!("{} is a directory (use -r to commit a tree)", p.display());
            }
            let base = a.name.clone().map(Ok).unwrap_or_else(|| name_for(p))?;
            walk(p, &base, &mut out, skipped)?;
        } else {
            let name = a.name.clone().map(Ok).unwrap_or_else(|| name_for(p))?;
            out.push(Input { path: p.clone(), name, link: None });
        }
    }
    Ok(out)
}

/// Adds the files and symbolic links under `dir` (links are not followed: they are stored as links).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<Input>, skipped: &mut Skipped) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Some(part) = e.file_name().to_str().map(str::to_string) else {
            eprintln!("bf: {}: the name is not UTF-8; not committed", shown(&path.to_string_lossy()));
            skipped.refused += 1;
            continue;
        };
        let name = format!("{prefix}/{part}");
        let ft = e.file_type().with_context(|| format!("reading {}", path.display()))?;
        if ft.is_dir() {
            walk(&path, &name, out, skipped)?;
        } else if ft.is_file() {
            out.push(Input { path, name, link: None });
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).with_context(|| format!("reading {}", path.display()))?;
            match target.to_str() {
                Some(t) => out.push(Input { path, name, link: Some(t.to_string()) }),
                None => {
                    eprintln!("bf: {}: the link's target is not UTF-8; not committed", shown(&name));
                    skipped.refused += 1;
                }
            }
        } else {
            eprintln!("bf: {}: not a file, directory or symbolic link; skipped", shown(&name));
            skipped.other += 1;
        }
    }
    Ok(())
}

pub(crate) fn commit_cmd(a: &CommitArgs, s: &Settings) -> Result<u8> {
    let st = if s.store_is_default && !Store::exists(&s.store) {
        eprintln!("bf: no store yet at {}; creating the default one", s.store.display());
        let defaults = InitArgs {
            data_shards: None,
            parity_shards: None,
            segment_size_mb: None,
            locations: vec![],
            zones: vec![],
            passphrase: false,
        };
        init(&defaults, s)?
    } else {
        open_keyed(s)?
    };
    let mut session = Session::new(&st, SessionOptions::default())?;
    let mut reports: Vec<CommitReport> = Vec::new();
    let mut failure = None;
    let mut skipped = Skipped::default();
    for input in inputs(a, &mut skipped)? {
        if let Err(e) = commit_one(&mut session, a, s, &input) {
            failure = Some(e);
            break;
        }
        if session.wants_flush() {
            print_committed(a, session.flush()?, &mut reports)?;
        }
    }
    // Whatever was stored before a failure is published (and printed) before the failure is reported.
    print_committed(a, session.flush()?, &mut reports)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if skipped.other > 0 {
        eprintln!("bf: {} entries that are not files, directories or links were skipped", skipped.other);
    }
    if a.json {
        out!("{}", serde_json::to_string_pretty(&reports)?)?;
    }
    if skipped.refused > 0 {
        bail!("{} entries were not committed (their names are not UTF-8); everything else was", skipped.refused);
    }
    let degraded = reports.iter().any(|r| r.shards_not_stored > 0);
    Ok(if degraded { EXIT_DEGRADED } else { EXIT_OK })
}

/// Stores one input in the session (its report comes with the session's next flush).
fn commit_one(session: &mut Session<'_>, a: &CommitArgs, s: &Settings, input: &Input) -> Result<()> {
    let (path, name) = (input.path.as_path(), input.name.as_str());
    if let Some(target) = &input.link {
        let md = std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let req = CommitRequest {
            name: name.to_string(),
            mtime_unix_ns: mtime_ns(&md),
            mode: 0o777,
            replace: a.replace,
            workers: 1,
            size: Some(0),
            kind: EntryKind::Symlink { target: target.clone() },
            ..Default::default()
        };
        session
            .commit(&mut std::io::empty(), &req, &|_| {})
            .with_context(|| format!("committing {}", path.display()))?;
        return Ok(());
    }
    let (mut input, size, mtime_unix_ns, mode): (Box<dyn std::io::Read>, u64, i64, u32) = if path.as_os_str() == "-" {
        (Box::new(std::io::stdin().lock()), 0, blockframe::clock::unix_ns() as i64, 0o644)
    } else {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let md = f.metadata().with_context(|| format!("reading {}", path.display()))?;
        (Box::new(f), md.len(), mtime_ns(&md), mode_of(&md))
    };
    let pb = progress_bar(size);
    let known_size = (path.as_os_str() != "-").then_some(size);
    let req = CommitRequest {
        name: name.to_string(),
        mtime_unix_ns,
        mode,
        replace: a.replace,
        workers: s.workers,
        size: known_size,
        ..Default::default()
    };
    let start = Instant::now();
    session
        .commit(&mut input, &req, &|done| {
            if let Some(pb) = &pb {
                pb.set_position(done)
            }
        })
        .with_context(|| format!("committing {}", path.display()))?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let secs = start.elapsed().as_secs_f64();
    tracing::debug!(name, bytes = size, secs, "stored");
    Ok(())
}

/// Prints the files a flush made durable; fails on the first file whose publication was refused.
fn print_committed(
    a: &CommitArgs,
    done: Vec<blockframe::Result<CommitReport>>,
    reports: &mut Vec<CommitReport>,
) -> Result<()> {
    let mut first_err = None;
    for r in done {
        let report = match r {
            Ok(r) => r,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        if !a.json {
            out!("{}  {}  {} bytes", report.root, shown(&report.name), report.size)?;
        }
        if report.shards_not_stored > 0 {
            eprintln!(
                "bf: warning: {}: {} shards could not be stored on {}; the file is readable with reduced \
                 redundancy until `bf scrub --repair` rebuilds them",
                report.name,
                report.shards_not_stored,
                report.failed_locations.join(", ")
            );
        }
        reports.push(report);
    }
    match first_err {
        Some(e) => Err(anyhow::Error::new(e).context("committing")),
        None => Ok(()),
    }
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(unix)]
fn mode_of(md: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777
}

#[cfg(not(unix))]
fn mode_of(_: &std::fs::Metadata) -> u32 {
    0o644
}

pub(crate) fn get(a: &GetArgs, s: &Settings) -> Result<u8> {
    let st = open_keyed(s)?;
    let entry = catalog::find(&st, &a.name)?;
    match entry.meta.as_ref().map(|m| &m.kind) {
        Some(EntryKind::Dir) => bail!("{} is a directory (made through the mount)", a.name),
        Some(EntryKind::Symlink { target }) => bail!("{} is a symbolic link to {target:?}", a.name),
        _ => {}
    }
    let file = OpenFile::new(&st, &entry)?;
    let pb = progress_bar(file.meta.size);
    let progress = |n: u64| {
        if let Some(pb) = &pb {
            pb.set_position(n)
        }
    };
    match output_target(a, &file.meta.name)? {
        Output::Stdout => {
            let stdout = CountingWriter { inner: std::io::stdout().lock(), n: 0 };
            let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout);
            let read = read_to(&st, &file, &mut out, s.workers, &progress);
            // Each segment is verified (or rebuilt) before a byte of it is written, so what was read goes out
            // even when a later segment is beyond repair: the stream ends early, at that segment's start, and
            // the error says where.
            let flushed = out.flush();
            let n = out.get_ref().n;
            read.map_err(anyhow::Error::new)
                .and(flushed.map_err(anyhow::Error::new))
                .with_context(|| format!("standard output stopped after {n} bytes"))?;
        }
        Output::Device(path) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
            read_to(&st, &file, &mut out, s.workers, &progress)?;
            out.flush().with_context(|| format!("writing {}", path.display()))?;
        }
        Output::File(path) => write_file_atomically(&st, &file, &path, s.workers, &progress)?,
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(EXIT_OK)
}

/// Where `bf get` writes.
enum Output {
    /// Standard output (`-o -`).
    Stdout,
    /// Something that is not a regular file (`/dev/null`, a FIFO): written in place.
    Device(PathBuf),
    /// A regular file: rebuilt beside it and renamed in.
    File(PathBuf),
}

/// The output of `bf get`: `-o` as given (a directory means the file's name in it), else the last part of the
/// file's name in the current directory.
fn output_target(a: &GetArgs, name: &str) -> Result<Output> {
    let base = || {
        let base = name.rsplit('/').next().filter(|b| !b.is_empty()).unwrap_or("out");
        if base.len() > 255 {
            bail!(
                "the last part of {name:?} is {} bytes, longer than a local file name may be: give -o PATH",
                base.len()
            );
        }
        Ok(PathBuf::from(base))
    };
    let path = match &a.output {
        Some(p) if p.as_os_str() == "-" => return Ok(Output::Stdout),
        Some(p) if p.is_dir() => p.join(base()?),
        Some(p) => p.clone(),
        None => base()?,
    };
    match std::fs::metadata(&path) {
        Ok(md) if md.is_dir() => bail!("{} is a directory", path.display()),
        Ok(md) if !md.is_file() => Ok(Output::Device(path)),
        Ok(_) if !a.force => bail!("{} exists (use --force to overwrite)", path.display()),
        _ => Ok(Output::File(path)),
    }
}

/// Rebuilds `file` into a temporary file beside `path`, synced, then renamed over it: a failure never leaves
/// a truncated file under the target name.
fn write_file_atomically(
    st: &Store,
    file: &OpenFile,
    path: &Path,
    workers: usize,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".bf-partial-{}", std::process::id()));
    let res = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        read_to(st, file, &mut out, workers, progress)?;
        let f = out.into_inner().map_err(|e| e.into_error()).context("writing output")?;
        f.sync_all().context("syncing output")?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(file.meta.mode & 0o777));
        }
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A writer that counts the bytes it passed on.
struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[derive(serde::Serialize)]
struct LsRow {
    name: String,
    /// `file`, `dir` or `symlink` (directories and links are entries made through the mount).
    kind: &'static str,
    /// Target of a symbolic link.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    size: u64,
    segments: u64,
    root: String,
    health: Health,
    /// Where its manifest is: `catalog-log`, or `objects` (a format version 1 file, one copy per location).
    catalog: &'static str,
    /// Readable manifest copies of a version 1 file (the catalog log's copies are checked by `bf scrub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_copies: Option<usize>,
}

pub(crate) fn ls(a: &LsArgs, s: &Settings) -> Result<u8> {
    let st = open_keyed(s)?;
    let (entries, bad) = catalog::list(&st)?;
    // Packed files share their pack's shards: check each pack once.
    let mut healths: std::collections::HashMap<[u8; 16], Health> = std::collections::HashMap::new();
    let mut health_of = |body: &blockframe::format::manifest::ManifestBody| {
        let owner = match body.data {
            blockframe::format::manifest::Data::Packed { pack, .. } => pack,
            _ => body.file_id,
        };
        *healths.entry(owner).or_insert_with(|| quick_health(&st, body))
    };
    let rows: Vec<LsRow> = entries
        .iter()
        .map(|e| LsRow {
            name: e.label(),
            kind: match e.meta.as_ref().map(|m| &m.kind) {
                Some(EntryKind::Dir) => "dir",
                Some(EntryKind::Symlink { .. }) => "symlink",
                _ => "file",
            },
            target: e.meta.as_ref().and_then(|m| match &m.kind {
                EntryKind::Symlink { target } => Some(target.clone()),
                _ => None,
            }),
            size: e.meta.as_ref().map(|m| m.size).unwrap_or_else(|| e.manifest.body.plain_size()),
            segments: e.manifest.body.segments.len() as u64,
            root: e.manifest.body.root_hex(),
            health: health_of(&e.manifest.body),
            catalog: if e.file.in_log { "catalog-log" } else { "objects" },
            manifest_copies: (!e.file.in_log).then(|| e.file.copies.len() - e.bad_copies.len()),
        })
        .collect();
    if a.json {
        out!("{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        for r in &rows {
            let h = format!("{:?}", r.health).to_lowercase();
            let name = match (r.kind, &r.target) {
                ("dir", _) => format!("{}/", shown(&r.name)),
                (_, Some(t)) => format!("{} -> {}", shown(&r.name), shown(t)),
                _ => shown(&r.name).into_owned(),
            };
            out!("{:>14}  {:>6}  {:<8}  {}  {name}", r.size, r.segments, h, &r.root[..16])?;
        }
    }
    for e in &bad {
        eprintln!("bf: unreadable manifest: {e}");
    }
    let code = if !bad.is_empty() || rows.iter().any(|r| r.health == Health::Lost) {
        EXIT_LOST
    } else if rows.iter().any(|r| r.health == Health::Degraded) {
        EXIT_DEGRADED
    } else {
        EXIT_OK
    };
    Ok(code)
}

/// `bf rm`: every name is looked up first (one unknown name removes nothing), then all are removed in one
/// catalog record.
pub(crate) fn rm(a: &RmArgs, s: &Settings) -> Result<u8> {
    let st = open_keyed(s)?;
    let entries = if a.names.len() == 1 {
        vec![catalog::find(&st, &a.names[0])?]
    } else {
        let (all, _) = catalog::list(&st)?;
        let mut by_name: std::collections::HashMap<String, Entry> = std::collections::HashMap::new();
        for e in all {
            let newer = by_name
                .get(&e.label())
                .is_none_or(|b| e.manifest.body.committed_unix_ns > b.manifest.body.committed_unix_ns);
            if newer {
                by_name.insert(e.label(), e);
            }
        }
        let mut out = Vec::with_capacity(a.names.len());
        for name in &a.names {
            match by_name.get(name) {
                Some(e) => out.push(e.clone()),
                // Named by root, or not there: the single lookup says which.
                None => out.push(catalog::find(&st, name)?),
            }
        }
        out
    };
    let mut batch = catalog::Batch::new();
    for e in &entries {
        batch.remove(e.file.clone());
    }
    catalog::apply(&st, batch).context("removing")?;
    for e in &entries {
        eprintln!("bf: removed {}", shown(&e.label()));
    }
    // Packs the removals left mostly empty are rewritten (their space is freed); a failure here loses nothing.
    match blockframe::files::compact::compact(&st, blockframe::files::compact::MAX_PACKS) {
        Ok(r) if r.packs_dropped > 0 => eprintln!(
            "bf: compacted {} packs ({} files moved, {} bytes freed)",
            r.packs_dropped, r.files_moved, r.bytes_freed
        ),
        Ok(_) => {}
        Err(e) => eprintln!("bf: warning: compacting packs failed ({e}); the space is freed by a later bf rm"),
    }
    Ok(EXIT_OK)
}

#[derive(serde::Serialize)]
struct VerifyRow {
    name: String,
    root: String,
    segments: u64,
    shards_ok: usize,
    shards_bad: usize,
    segments_degraded: u64,
    segments_lost: Vec<u64>,
    problems: Vec<String>,
}

/// `bf verify`.
pub(crate) fn verify(a: &VerifyArgs, s: &Settings) -> Result<u8> {
    let mut st = open_keyless(s)?;
    // The key is optional here: without it files are named by root and manifests are checked structurally.
    let key_path = s.key_path();
    if st.descriptor().kdf.is_none() && key_path.exists() || std::env::var("BF_PASSPHRASE").is_ok() {
        unlock(&mut st, s)?;
    }
    let entries: Vec<Entry> = if a.names.is_empty() {
        let (ok, bad) = catalog::list(&st)?;
        for e in &bad {
            eprintln!("bf: unreadable manifest: {e}");
        }
        ok
    } else {
        a.names.iter().map(|n| catalog::find(&st, n)).collect::<Result<_, Error>>()?
    };
    let rows: Vec<VerifyRow> = entries.iter().map(|e| verify_row(&st, e)).collect();
    if a.json {
        out!("{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        rows.iter().try_for_each(print_verify_row)?;
    }
    Ok(if rows.iter().any(|r| !r.segments_lost.is_empty()) {
        EXIT_LOST
    } else if rows.iter().any(|r| r.shards_bad > 0) {
        EXIT_DEGRADED
    } else {
        EXIT_OK
    })
}

/// Reads and checks every shard of one file.
fn verify_row(st: &Store, e: &Entry) -> VerifyRow {
    let body = &e.manifest.body;
    let mut row = VerifyRow {
        name: e.label(),
        root: body.root_hex(),
        segments: body.segments.len() as u64,
        shards_ok: 0,
        shards_bad: 0,
        segments_degraded: 0,
        segments_lost: vec![],
        problems: vec![],
    };
    for (seg, shards) in verify_file(st, body).iter().enumerate() {
        let good = shards.iter().filter(|c| c.outcome.is_ok()).count();
        row.shards_ok += good;
        row.shards_bad += shards.len() - good;
        if good < body.k as usize {
            row.segments_lost.push(seg as u64);
        } else if good < shards.len() {
            row.segments_degraded += 1;
        }
        for c in shards {
            if let Err(p) = &c.outcome {
                let loc = st.locations().get(c.location).map(|l| l.name()).unwrap_or("?");
                row.problems.push(format!("segment {seg} shard {} on {loc}: {p}", c.shard));
            }
        }
    }
    row
}

fn print_verify_row(r: &VerifyRow) -> std::io::Result<()> {
    let state = if !r.segments_lost.is_empty() {
        format!("LOST segments {:?}", r.segments_lost)
    } else if r.shards_bad > 0 {
        format!("degraded ({} bad shards in {} segments, repairable)", r.shards_bad, r.segments_degraded)
    } else {
        "ok".into()
    };
    out!("{}: {state} ({} shards ok)", shown(&r.name), r.shards_ok)?;
    for p in &r.problems {
        out!("  {p}")?;
    }
    Ok(())
}
