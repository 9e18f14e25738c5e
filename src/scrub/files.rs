//! Scrubbing one file: its manifest copies and every shard of every segment, repaired from k verified shards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::codec::erasure::Codec;
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::files::catalog::{self, FileRef};
use crate::format::manifest::{manifest_key, Manifest, ManifestBody};
use crate::format::shard::ShardHeader;
use crate::format::shard::HEADER_LEN;
use crate::location::LocationExt;
use crate::store::shard_key;
use crate::stripe::fetch_shard;
use crate::stripe::{HomeRule, StripeAddr};

use super::policy::repair_targets;
use super::repair::write_rebuilt;
use super::report::*;
use super::Scrubber;

/// Outcome of one segment.
struct SegmentOutcome {
    segment: u64,
    statuses: Vec<ShardStatus>,
    relocated: u64,
    issues: Vec<ShardIssue>,
    good: usize,
    bytes: u64,
    errors: Vec<String>,
    /// Its shards' placement lost tolerance (see [`FileReport::segments_crowded`]), as found.
    crowded: bool,
    /// ... and still after this run.
    crowded_left: bool,
    /// Good shards moved home.
    moved: u64,
}

/// Per-worker buffers: one segment's k+m shards and an I/O buffer.
#[derive(Default)]
struct SegmentBuffers {
    shards: Vec<u8>,
    io: Vec<u8>,
}

impl Scrubber<'_> {
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
        report.pack = body.is_pack();
        report.label = match self.store.key_opt().and_then(|k| manifest.meta(k).ok()) {
            Some(meta) => meta.name,
            None if body.is_pack() => format!("pack:{}", report.file_id),
            None => format!("root:{}", report.root),
        };
        if matches!(body.data, crate::format::manifest::Data::Packed { .. }) {
            // Its bytes are inside a pack, which is scrubbed (and repaired) as a whole.
            report.segments = 1;
            return report;
        }
        let span = tracing::info_span!("scrub_file", file = %report.label);
        let _enter = span.enter();
        report.segments = body.segments.len() as u64;
        if self.opts.repair && !file.in_log {
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
            if o.crowded {
                report.segments_crowded.push(o.segment);
            }
            if o.crowded_left {
                report.segments_crowded_left.push(o.segment);
            }
            report.shards_moved += o.moved;
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
        if file.in_log {
            // Its copies are the catalog log's, checked once for the whole catalog.
            return match catalog::load(self.store, file) {
                Ok(e) => Some((e.manifest, Vec::new())),
                Err(e) => {
                    report.repair_errors.push(format!("catalog entry of file {}: {e}", hex::encode(file.file_id)));
                    None
                }
            };
        }
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

    /// [`Scrubber::file`], or `None` when a file found damaged was removed meanwhile (a removal deletes the
    /// catalog entry first, then the shards: their going is not damage). Its shard and manifest counts are then
    /// taken out of the location tallies again.
    pub fn file_if_present(&self, file: &FileRef, progress: &(dyn Fn(u64) + Sync)) -> Option<FileReport> {
        let before = self.tallies.lock().map(|t| t.clone()).unwrap_or_default();
        let report = self.file(file, progress);
        // An unreadable catalog counts as present: damage is reported rather than hidden.
        if report.health() == Health::Healthy || self.is_committed(file).unwrap_or(true) {
            return Some(report);
        }
        tracing::info!(file = %report.label, "removed while scrubbing; not reported");
        self.tally(|t| {
            for (now, was) in t.iter_mut().zip(before) {
                (now.0, now.1) = (was.0, was.1);
            }
        });
        None
    }

    /// Whether `file` is in the catalog now (its catalog entry, or for a file of manifest format 1, a manifest
    /// copy).
    fn is_committed(&self, file: &FileRef) -> Result<bool> {
        let mkey = manifest_key(&file.name_tag, &file.file_id);
        Ok(if file.in_log {
            crate::files::catalog_log::current(self.store)?.entries.contains_key(&(file.name_tag, file.file_id))
        } else {
            self.store.locations().iter().any(|l| l.get_range(&mkey, 0, 1).is_ok_and(|b| !b.is_empty()))
        })
    }

    /// Runs `f` under the catalog lock if the file is still committed (so a concurrent removal is never
    /// undone).
    fn with_committed(&self, file: &FileRef, f: impl FnOnce()) -> Result<()> {
        let _lock = self.store.lock_catalog()?;
        if !self.is_committed(file)? {
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
            rule: HomeRule::ById,
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
            crowded: false,
            crowded_left: false,
            moved: 0,
        };
        bufs.shards.resize(width * sl, 0);
        let mut found_at: Vec<Option<usize>> = vec![None; width];
        for (i, slot) in found_at.iter_mut().enumerate() {
            let Some(leaf) = body.leaf(seg, i) else { continue };
            *slot = self.check_shard(&addr, i, leaf, bufs, &mut out);
        }
        out.good = found_at.iter().filter(|f| f.is_some()).count();
        out.crowded = crowded(&found_at, body.k as usize, body.m as usize, self.writable.len());
        if !self.opts.repair {
            out.crowded_left = out.crowded;
            return out;
        }
        if !out.issues.is_empty() && out.good >= body.k as usize {
            if let Err(e) = self.repair_segment(file, body, &addr, codec, bufs, &found_at, &mut out) {
                out.errors.push(format!("segment {seg}: {e}"));
            }
        }
        // Where each shard is now: rebuilt ones where the repair put them.
        for issue in &out.issues {
            if let Some(to) = issue.repaired_to {
                found_at[issue.shard as usize] = Some(to);
            }
        }
        let homes: Vec<usize> = (0..width).map(|i| addr.home(self.store, i)).collect();
        if let Err(e) = self.move_home(file, body, &addr, bufs, &homes, &mut found_at, &mut out) {
            out.errors.push(format!("segment {seg}: {e}"));
        }
        out.crowded_left = crowded(&found_at, body.k as usize, body.m as usize, self.writable.len());
        out
    }

    /// Moves the verified shards that live away from their home back home, where home can be written again:
    /// a repair that had to put them elsewhere (home gone or read-only) may have put two shards of the segment
    /// on one location. Each is written and read back at home before the foreign copy is deleted.
    #[allow(clippy::too_many_arguments)]
    fn move_home(
        &self,
        file: &FileRef,
        body: &ManifestBody,
        addr: &StripeAddr<'_>,
        bufs: &SegmentBuffers,
        homes: &[usize],
        found_at: &mut [Option<usize>],
        out: &mut SegmentOutcome,
    ) -> Result<()> {
        let sl = addr.shard_len;
        let away: Vec<usize> = (0..found_at.len())
            .filter(|&i| found_at[i].is_some_and(|loc| loc != homes[i]) && self.writable[homes[i]])
            .collect();
        if away.is_empty() {
            return Ok(());
        }
        self.with_committed(file, || {
            for &i in &away {
                let (Some(from), home) = (found_at[i], homes[i]) else { continue };
                match put_verified(self.store, body, addr, i, &bufs.shards[i * sl..(i + 1) * sl], &[home]) {
                    Ok(_) => {
                        found_at[i] = Some(home);
                        out.moved += 1;
                        self.tally(|t| t[home].2 += 1);
                        if let Err(e) = self.store.locations()[from].delete(&(addr.key_of)(i)) {
                            tracing::warn!(error = %e, shard = i, "the copy left on a foreign location was not deleted");
                        }
                    }
                    // Home still refuses writes (read-only): the shard stays, and a crowded segment stays reported.
                    Err(e) => tracing::info!(error = %e, shard = i, "shard not moved home"),
                }
            }
        })
    }

    /// Fetches and verifies shard `i` of a segment into its slot of `bufs.shards`, recording its status (and, when
    /// bad, an issue) in `out` and the tallies; returns the location it was found good on.
    fn check_shard(
        &self,
        addr: &StripeAddr<'_>,
        i: usize,
        leaf: &Hash,
        bufs: &mut SegmentBuffers,
        out: &mut SegmentOutcome,
    ) -> Option<usize> {
        let sl = addr.shard_len;
        let (res, home) = fetch_shard(self.store, addr, i, leaf, &mut bufs.io);
        match res {
            Ok((range, loc)) => {
                bufs.shards[i * sl..(i + 1) * sl].copy_from_slice(&bufs.io[range]);
                out.bytes += (sl + HEADER_LEN) as u64;
                out.relocated += u64::from(loc != home);
                self.tally(|t| {
                    t[home].0.add(ShardStatus::Ok);
                    if loc != home {
                        t[home].0.relocated += 1;
                    }
                });
                out.statuses.push(ShardStatus::Ok);
                Some(loc)
            }
            Err(p) => {
                let status = classify(&p);
                self.tally(|t| t[home].0.add(status));
                out.issues.push(ShardIssue {
                    segment: addr.segment,
                    shard: i as u16,
                    location: home,
                    status,
                    detail: p.to_string(),
                    repaired_to: None,
                });
                out.statuses.push(status);
                None
            }
        }
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
        check_rebuilt(body, seg, sl, &bufs.shards, &out.issues)?;
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
        let target = put_verified(self.store, body, addr, i, payload, &repair_targets(home, &self.writable, occupied))?;
        if target != home {
            // A damaged copy at home would shadow nothing (readers search on), but remove it if we can.
            let _ = self.store.locations()[home].delete(&(addr.key_of)(i));
            let to = self.store.locations()[target].name();
            tracing::info!(segment = addr.segment, shard = i, to, "shard rebuilt away from its home");
        }
        Ok(target)
    }
}

/// Writes shard `i` of a segment (its verified `payload` under a fresh header) to the first of `targets` that
/// stores it and reads it back matching its Merkle leaf; returns that location.
fn put_verified(
    store: &crate::store::Store,
    body: &ManifestBody,
    addr: &StripeAddr<'_>,
    i: usize,
    payload: &[u8],
    targets: &[usize],
) -> Result<usize> {
    let header =
        ShardHeader::for_payload(body.store_id, body.file_id, addr.segment, i as u16, (body.k, body.m), payload);
    let leaf = body.leaf(addr.segment, i).copied().unwrap_or([0; 32]);
    write_rebuilt(store, &(addr.key_of)(i), &header, payload, &leaf, targets)
}

/// Whether shards found at `found_at` (by shard; `None` for bad ones) survive the loss of fewer locations
/// than they would on distinct ones: the tolerance of distinct placement is min(m, good - k) locations; the
/// placement's is how many of the fullest locations can go with k good shards left.
fn crowded(found_at: &[Option<usize>], k: usize, m: usize, locations: usize) -> bool {
    let mut per = vec![0usize; locations];
    for loc in found_at.iter().flatten() {
        if let Some(c) = per.get_mut(*loc) {
            *c += 1;
        }
    }
    let good: usize = per.iter().sum();
    let ideal = m.min(good.saturating_sub(k));
    per.sort_unstable_by(|a, b| b.cmp(a));
    let lost_with_ideal: usize = per.iter().take(ideal).sum();
    good.saturating_sub(lost_with_ideal) < k
}

/// Checks every rebuilt shard (one per issue, in `shards`, `sl` bytes each) against its Merkle leaf, before
/// anything is written.
fn check_rebuilt(body: &ManifestBody, seg: u64, sl: usize, shards: &[u8], issues: &[ShardIssue]) -> Result<()> {
    for issue in issues {
        let i = issue.shard as usize;
        let payload = &shards[i * sl..(i + 1) * sl];
        let leaf = crate::files::commit::shard_leaf(&body.file_id, seg, issue.shard, payload);
        if body.leaf(seg, i) != Some(&leaf) {
            return Err(Error::corrupt(
                format!("segment {seg} shard {i}"),
                "rebuilt shard does not match its Merkle leaf; nothing written",
            ));
        }
    }
    Ok(())
}
