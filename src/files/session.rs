//! Committing many files as few catalog changes: small files go into packs, large ones into their own
//! segments, and every manifest waits in a batch that is published as one catalog record. A file's report is
//! handed out only after its record is durable, so whatever a caller prints has been made safe.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::codec::erasure::Codec;
use crate::codec::merkle::Hash;
use crate::error::{Error, IoContext, Result};
use crate::files::catalog::{self, Batch};
use crate::files::commit::{self, CommitReport, CommitRequest};
use crate::files::pack::{self, Packer};
use crate::format::manifest::{Manifest, PACK_NAME_TAG};
use crate::store::Store;

/// When a session publishes what it has gathered.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// Files up to this size are packed (see [`pack::DEFAULT_PACK_THRESHOLD`]); 0 turns packing off.
    pub pack_threshold: u64,
    /// Publish once this many files wait.
    pub max_files: usize,
    /// Publish once the oldest waiting file has waited this long.
    pub max_wait: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            pack_threshold: pack::DEFAULT_PACK_THRESHOLD,
            max_files: 4096,
            max_wait: Duration::from_secs(2),
        }
    }
}

/// A file stored (or packed) and waiting for its manifest to be published.
struct Waiting {
    report: CommitReport,
    manifest: Manifest,
    replace: bool,
    /// The pack holding it, for a packed file.
    pack: Option<[u8; 16]>,
}

/// A commit session (see the module documentation).
pub struct Session<'a> {
    store: &'a Store,
    opts: SessionOptions,
    packer: Packer,
    codec: Codec,
    waiting: Vec<Waiting>,
    /// Sealed packs waiting to be published with their files.
    packs: Vec<pack::SealedPack>,
    /// Packs whose store failed: their files fail at the next publication.
    failed_packs: Vec<([u8; 16], String)>,
    since: Option<Instant>,
    /// Names in the catalog when the session last looked, to refuse a taken name before storing anything.
    taken: std::collections::BTreeSet<Hash>,
    /// Files to remove in the same record.
    removes: Vec<catalog::FileRef>,
}

impl<'a> Session<'a> {
    /// A session on `store` (needs the key).
    pub fn new(store: &'a Store, opts: SessionOptions) -> Result<Self> {
        store.key()?;
        let d = store.descriptor();
        let mut s = Session {
            store,
            opts,
            packer: Packer::new(store)?,
            codec: Codec::new(d.k as usize, d.m as usize)?,
            waiting: Vec::new(),
            packs: Vec::new(),
            failed_packs: Vec::new(),
            since: None,
            taken: Default::default(),
            removes: Vec::new(),
        };
        s.look_at_catalog()?;
        Ok(s)
    }

    fn look_at_catalog(&mut self) -> Result<()> {
        self.taken = catalog::scan(self.store)?.into_iter().map(|f| f.name_tag).collect();
        Ok(())
    }

    /// Stores one file (packed when small) and queues its manifest. Fails, storing nothing, when the name is
    /// taken (and not `req.replace`), the name is invalid, or the input or a write fails. The report comes from
    /// [`Session::flush`].
    pub fn commit(&mut self, input: &mut dyn Read, req: &CommitRequest, progress: &(dyn Fn(u64) + Sync)) -> Result<()> {
        let key = self.store.key()?;
        catalog::validate_name(&req.name)?;
        let name_tag = key.name_tag(&req.name);
        if !req.replace && self.taken.contains(&name_tag) {
            return Err(Error::AlreadyExists(req.name.clone()));
        }
        let limit = pack::pack_limit(self.store, self.opts.pack_threshold);
        let mut head = Vec::new();
        let small = match req.size {
            Some(size) if size > limit => false,
            _ => {
                // Read up to one byte past the limit: the file is small exactly when the input ends first.
                input.take(limit + 1).read_to_end(&mut head).ctx(|| "reading the input".into())?;
                head.len() as u64 <= limit && req.size.is_none_or(|s| s == head.len() as u64)
            }
        };
        let queued = if small {
            self.pack_file(req, name_tag, &head, progress)?
        } else {
            let mut rest = std::io::Cursor::new(head).chain(input);
            let (manifest, report) = commit::store_file(self.store, &mut rest, req, name_tag, true, progress)?;
            Waiting { report, manifest, replace: req.replace, pack: None }
        };
        self.taken.insert(name_tag);
        self.waiting.push(queued);
        self.since.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn pack_file(
        &mut self,
        req: &CommitRequest,
        name_tag: Hash,
        plain: &[u8],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Waiting> {
        let meta = req.meta(plain.len() as u64);
        if !self.packer.fits(plain.len(), meta.sealed_len()) {
            self.seal_pack();
        }
        let pack_id = self.packer.id();
        let manifest = self.packer.add(self.store, name_tag, &meta, plain)?;
        progress(plain.len() as u64);
        let report = CommitReport {
            name: req.name.clone(),
            root: manifest.body.root_hex(),
            size: plain.len() as u64,
            segments: 1,
            replaced: false,
            shards_not_stored: 0,
            failed_locations: vec![],
        };
        Ok(Waiting { report, manifest, replace: req.replace, pack: Some(pack_id) })
    }

    /// Stores the open pack (its files are published with the next batch).
    fn seal_pack(&mut self) {
        let id = self.packer.id();
        match self.packer.seal(self.store, &mut self.codec) {
            Ok(Some(p)) => self.packs.push(p),
            Ok(None) => {}
            Err(e) => self.failed_packs.push((id, e.to_string())),
        }
    }

    /// Removes `file` in the record of the next [`Session::flush`] (before that record's publications, so a
    /// file of the same name committed in this session replaces nothing).
    pub fn remove(&mut self, file: catalog::FileRef) {
        self.removes.push(file);
        self.since.get_or_insert_with(Instant::now);
    }

    /// True when enough waits (files or time) that the caller should [`Session::flush`].
    pub fn wants_flush(&self) -> bool {
        self.waiting.len() >= self.opts.max_files || self.since.is_some_and(|t| t.elapsed() >= self.opts.max_wait)
    }

    /// Files waiting for publication.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Stores the open pack and publishes every waiting manifest in one catalog record; returns each file's
    /// outcome in commit order. An error means nothing was published (every waiting file's data is deleted,
    /// unless the record may exist somewhere: see [`Error::OutcomeUnknown`]).
    pub fn flush(&mut self) -> Result<Vec<Result<CommitReport>>> {
        Ok(self.flush_manifests()?.into_iter().map(|r| r.map(|(report, _)| report)).collect())
    }

    /// Like [`Session::flush`], with each published file's manifest.
    pub fn flush_manifests(&mut self) -> Result<Vec<Result<(CommitReport, Manifest)>>> {
        self.seal_pack();
        self.since = None;
        let mut waiting = std::mem::take(&mut self.waiting);
        let mut packs = std::mem::take(&mut self.packs);
        let mut failed = std::mem::take(&mut self.failed_packs);
        let mut outcome: Vec<Option<Result<(CommitReport, Manifest)>>> = Vec::with_capacity(waiting.len());
        self.make_durable(&mut waiting, &mut packs, &mut failed, &mut outcome);
        let mut batch = Batch::new();
        let removes = std::mem::take(&mut self.removes);
        let removing = !removes.is_empty();
        for f in removes {
            batch.remove(f);
        }
        for p in &packs {
            batch.publish(p.manifest.clone(), "a pack", false);
        }
        for (w, o) in waiting.iter().zip(outcome.iter_mut()) {
            if o.is_some() {
                continue;
            }
            match w.pack.and_then(|id| failed.iter().find(|(f, _)| *f == id)) {
                Some((_, why)) => *o = Some(Err(Error::internal(format!("storing its pack: {why}")))),
                None => batch.publish(w.manifest.clone(), &w.report.name, w.replace),
            }
        }
        if batch.len() == packs.len() && !removing {
            // Nothing of a file left to publish: the packs go with their refused files.
            self.drop_data(&[], &packs);
            return Ok(outcome.into_iter().flatten().collect());
        }
        let published = match catalog::apply(self.store, batch) {
            Ok(p) => p,
            Err(e) => {
                // A record that may exist somewhere must find its data when it is read: keep it (a scrub deletes
                // it as orphans after the grace period if the record never appears).
                if !matches!(e, Error::OutcomeUnknown { .. }) {
                    self.drop_data(&waiting, &packs);
                }
                return Err(e);
            }
        };
        let mut results = published.into_iter().skip(packs.len());
        let mut kept_packs = std::collections::BTreeSet::new();
        let mut out = Vec::with_capacity(waiting.len());
        let mut named = Vec::new();
        for (w, o) in waiting.into_iter().zip(outcome) {
            if let Some(done) = o {
                out.push(done);
                continue;
            }
            let r = results.next().unwrap_or_else(|| Err(Error::internal("missing publication outcome")));
            if r.is_ok() && w.pack.is_none() {
                named.push(w.manifest.body.file_id);
            }
            out.push(self.finish_one(w, r, &packs, &mut kept_packs));
        }
        named.extend(kept_packs.iter().copied());
        crate::files::intent::clear_commit(self.store, &named);
        // Published: what follows is housekeeping, and its failure must not hide the reports.
        if let Err(e) = self.drop_unused_packs(&packs, &kept_packs) {
            tracing::warn!(error = %e, "could not drop packs none of whose files were published");
        }
        if let Err(e) = self.look_at_catalog() {
            tracing::warn!(error = %e, "could not re-read the catalog after a publication");
        }
        Ok(out)
    }

    /// Syncs every location, so each shard of the batch (packs and files of their own, written deferred) is
    /// durable before any record names it. A location whose sync fails may have lost what it acknowledged: a
    /// pack or file with shards stored there fails (its data is deleted), unless that location was already
    /// among those it could not store on.
    fn make_durable(
        &self,
        waiting: &mut [Waiting],
        packs: &mut Vec<pack::SealedPack>,
        failed: &mut Vec<([u8; 16], String)>,
        outcome: &mut Vec<Option<Result<(CommitReport, Manifest)>>>,
    ) {
        let locs = self.store.locations();
        let unsynced: Vec<(usize, String)> =
            locs.iter().enumerate().filter_map(|(i, l)| l.sync().err().map(|e| (i, e.to_string()))).collect();
        let why = |missing: &dyn Fn(usize) -> bool| {
            unsynced.iter().find(|(i, _)| !missing(*i)).map(|(i, e)| Error::Unavailable {
                location: locs[*i].name().to_string(),
                reason: format!("sync failed: {e}"),
            })
        };
        packs.retain(|p| match why(&|i| p.missing.contains(&i)) {
            Some(reason) => {
                self.store.remove_shards(&p.manifest.body.file_id);
                failed.push((p.manifest.body.file_id, reason.to_string()));
                false
            }
            None => true,
        });
        outcome.clear();
        for w in waiting.iter_mut() {
            let reason = match w.pack {
                Some(_) => None,
                None => why(&|i| w.report.failed_locations.iter().any(|n| n == locs[i].name())),
            };
            outcome.push(reason.map(|e| {
                self.store.remove_shards(&w.manifest.body.file_id);
                Err(e)
            }));
        }
    }

    fn finish_one(
        &self,
        w: Waiting,
        published: Result<bool>,
        packs: &[pack::SealedPack],
        kept: &mut std::collections::BTreeSet<[u8; 16]>,
    ) -> Result<(CommitReport, Manifest)> {
        let replaced = match published {
            Ok(r) => r,
            Err(e) => {
                if w.pack.is_none() {
                    self.store.remove_shards(&w.manifest.body.file_id);
                }
                return Err(e);
            }
        };
        let mut report = CommitReport { replaced, ..w.report };
        if w.pack.is_none() && report.shards_not_stored > 0 {
            if let Err(e) = crate::pending::record(self.store, &w.manifest.body.file_id, report.shards_not_stored) {
                tracing::warn!(error = %e, "could not record the pending repair (a scrub finds it anyway)");
            }
        }
        if let Some(p) = w.pack.and_then(|id| packs.iter().find(|p| p.manifest.body.file_id == id)) {
            kept.insert(p.manifest.body.file_id);
            report.shards_not_stored = p.missing.len() as u64;
            report.failed_locations = p.missing.iter().map(|&l| self.store.locations()[l].name().to_string()).collect();
        }
        Ok((report, w.manifest))
    }

    /// Removes packs none of whose files were published (every name was refused).
    fn drop_unused_packs(&self, packs: &[pack::SealedPack], kept: &std::collections::BTreeSet<[u8; 16]>) -> Result<()> {
        let mut batch = Batch::new();
        for p in packs.iter().filter(|p| !kept.contains(&p.manifest.body.file_id)) {
            batch.remove(catalog::FileRef {
                name_tag: PACK_NAME_TAG,
                file_id: p.manifest.body.file_id,
                copies: vec![],
                in_log: true,
            });
        }
        if !batch.is_empty() {
            catalog::apply(self.store, batch)?;
        }
        for p in packs {
            if !p.missing.is_empty() && kept.contains(&p.manifest.body.file_id) {
                if let Err(e) = crate::pending::record(self.store, &p.manifest.body.file_id, p.missing.len() as u64) {
                    tracing::warn!(error = %e, "could not record the pending repair (a scrub finds it anyway)");
                }
            }
        }
        Ok(())
    }

    fn drop_data(&self, waiting: &[Waiting], packs: &[pack::SealedPack]) {
        for w in waiting.iter().filter(|w| w.pack.is_none()) {
            self.store.remove_shards(&w.manifest.body.file_id);
        }
        for p in packs {
            self.store.remove_shards(&p.manifest.body.file_id);
        }
    }
}
