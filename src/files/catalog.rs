//! The catalog of committed files. There is no local index to lose: the truth is on the locations, in the
//! catalog log ([`crate::files::catalog_log`]: batches of manifests, replicated) and, for files committed by
//! format version 1, one manifest object per file per location under `manifests/` (still read and removed;
//! new manifests only go to the log).
//!
//! Changes are made in batches ([`Batch`], applied by [`apply`]): any number of publications and removals is
//! one record of the log, all or nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::merkle::Hash;
use crate::error::{Error, LocationFailure, Result};
use crate::files::catalog_log::{self, CatalogState};
use crate::format::catalog::CatalogOp;
use crate::format::manifest::{
    manifest_key, parse_manifest_name, Data, FileMeta, Manifest, ManifestBody, PACK_NAME_TAG,
};
use crate::location::LocationExt;
use crate::store::Store;

/// Checks that a store name is a clean relative path.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 4096
        && !name.starts_with('/')
        && !name.contains('\0')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid name {name:?}: use a relative path without '.', '..' or empty parts"
        )))
    }
}

/// A file known from the catalog (nothing decrypted yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// Keyed hash of the name ([`crate::format::manifest::PACK_NAME_TAG`] for a pack).
    pub name_tag: Hash,
    /// File id.
    pub file_id: [u8; 16],
    /// For a format version 1 file: indexes of the locations listing a manifest copy. Empty for a file of the
    /// catalog log, whose copies are the log's (checked once for the whole catalog).
    pub copies: Vec<usize>,
    /// In the catalog log (else a version 1 manifest object).
    pub in_log: bool,
}

/// A committed file with its manifest.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Where its copies are.
    pub file: FileRef,
    /// The first valid manifest copy.
    pub manifest: Manifest,
    /// Decrypted metadata when the key is loaded (never for a pack).
    pub meta: Option<FileMeta>,
    /// Copies that exist but failed to decode: (location index, reason).
    pub bad_copies: Vec<(usize, String)>,
}

impl Entry {
    /// Name when known, else `root:<hex>`.
    pub fn label(&self) -> String {
        match &self.meta {
            Some(m) => m.name.clone(),
            None if self.manifest.body.is_pack() => format!("pack:{}", hex::encode(self.file.file_id)),
            None => format!("root:{}", self.manifest.body.root_hex()),
        }
    }
}

/// Version 1 manifest objects by (name tag, file id), with the locations listing them.
type Objects = BTreeMap<(Hash, [u8; 16]), Vec<usize>>;

/// The version 1 manifest objects of every reachable location, by (name tag, file id) with the locations
/// listing them. Unreachable locations are logged and skipped.
fn scan_objects(store: &Store) -> Objects {
    scan_objects_checked(store).0
}

/// Like [`scan_objects`], with whether every location answered.
fn scan_objects_checked(store: &Store) -> (Objects, bool) {
    let mut all = true;
    let mut files = Objects::new();
    let listed = store.each_location(|_, loc| loc.list("manifests"));
    for ((i, loc), listed) in store.locations().iter().enumerate().zip(listed) {
        match listed {
            Ok(names) => {
                for n in names {
                    if let Some(key) = parse_manifest_name(&n) {
                        files.entry(key).or_default().push(i);
                    }
                }
            }
            Err(e) => {
                all = false;
                tracing::debug!(location = loc.name(), error = %e, "location unavailable");
            }
        }
    }
    (files, all)
}

/// Every file (and pack) in the catalog: the log's, then the version 1 manifest objects' not also in the log.
/// Fails when the catalog cannot be read (no location answers, or no valid checkpoint).
pub fn scan(store: &Store) -> Result<Vec<FileRef>> {
    let st = catalog_log::current(store)?;
    Ok(refs(&st, scan_objects(store)))
}

fn refs(st: &CatalogState, objects: Objects) -> Vec<FileRef> {
    let logged =
        st.entries.keys().map(|&(name_tag, file_id)| FileRef { name_tag, file_id, copies: vec![], in_log: true });
    let legacy = objects
        .into_iter()
        .filter(|(k, _)| !st.entries.contains_key(k))
        .map(|((name_tag, file_id), copies)| FileRef { name_tag, file_id, copies, in_log: false });
    logged.chain(legacy).collect()
}

/// True when some manifest carries this name tag.
pub fn name_is_taken(store: &Store, name_tag: &Hash) -> Result<bool> {
    Ok(scan(store)?.iter().any(|f| &f.name_tag == name_tag))
}

/// Decodes one manifest copy of `file`: envelope, structure, the MAC when the store's key is loaded, and that
/// the copy belongs to this store and to the object name it was found under.
pub fn decode_copy(store: &Store, file: &FileRef, bytes: &[u8], what: &str) -> Result<Manifest> {
    let m = Manifest::decode(bytes, store.key_opt(), what)?;
    check_belongs(store, file, &m, what)?;
    Ok(m)
}

fn check_belongs(store: &Store, file: &FileRef, m: &Manifest, what: &str) -> Result<()> {
    if m.body.file_id != file.file_id || m.body.name_tag != file.name_tag {
        return Err(Error::corrupt(what, "object name does not match its content"));
    }
    if m.body.store_id != store.descriptor().store_id {
        return Err(Error::corrupt(what, "belongs to another store"));
    }
    Ok(())
}

/// Reads the manifest of `file` (checking the MAC and decrypting metadata when keyed).
pub fn load(store: &Store, file: &FileRef) -> Result<Entry> {
    if file.in_log {
        let st = match store.catalog_cache() {
            Some(st) if st.entries.contains_key(&(file.name_tag, file.file_id)) => st,
            _ => catalog_log::current(store)?,
        };
        return entry_of(store, &st, file);
    }
    let key = store.key_opt();
    let mkey = manifest_key(&file.name_tag, &file.file_id);
    let mut bad_copies = Vec::new();
    for &i in &file.copies {
        let loc = &store.locations()[i];
        let what = format!("manifest {mkey} on {}", loc.name());
        let decoded = loc.get(&mkey).and_then(|b| decode_copy(store, file, &b, &what)).and_then(|m| {
            let meta = key.map(|k| m.meta(k)).transpose()?;
            Ok((m, meta))
        });
        match decoded {
            Ok((manifest, meta)) => return Ok(Entry { file: file.clone(), manifest, meta, bad_copies }),
            Err(e) => {
                tracing::warn!(error = %e, "skipping bad manifest copy");
                bad_copies.push((i, e.to_string()));
            }
        }
    }
    Err(Error::corrupt(
        format!("manifest of file {}", hex::encode(file.file_id)),
        format!(
            "no valid copy among {} ({})",
            file.copies.len(),
            bad_copies.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>().join("; ")
        ),
    ))
}

fn entry_of(store: &Store, st: &CatalogState, file: &FileRef) -> Result<Entry> {
    let m = st
        .entries
        .get(&(file.name_tag, file.file_id))
        .ok_or_else(|| Error::NotFound(format!("file {}", hex::encode(file.file_id))))?;
    let what = format!("catalog entry of file {}", hex::encode(file.file_id));
    check_belongs(store, file, m, &what)?;
    let meta = match store.key_opt() {
        Some(k) if !m.body.is_pack() => Some(m.meta(k)?),
        _ => None,
    };
    Ok(Entry { file: file.clone(), manifest: (**m).clone(), meta, bad_copies: Vec::new() })
}

/// Where the data of a file of the catalog log lies, from the catalog this process last read (`None` for a
/// version 1 file or one not in it).
pub fn data_of(store: &Store, file: &FileRef) -> Option<Data> {
    let st = store.catalog_cache()?;
    st.entries.get(&(file.name_tag, file.file_id)).map(|m| m.body.data)
}

/// The manifest body of pack `id`.
pub fn pack_of(store: &Store, id: &[u8; 16]) -> Result<ManifestBody> {
    let file = FileRef { name_tag: PACK_NAME_TAG, file_id: *id, copies: vec![], in_log: true };
    let e = load(store, &file).map_err(|e| match e {
        Error::NotFound(_) => Error::corrupt(format!("pack {}", hex::encode(id)), "not in the catalog"),
        e => e,
    })?;
    Ok(e.manifest.body)
}

/// The manifest body whose shards hold a file's data: its own, or its pack's.
pub fn shards_body(store: &Store, body: &ManifestBody) -> Result<ManifestBody> {
    match body.data {
        Data::Packed { pack, .. } => pack_of(store, &pack),
        _ => Ok(body.clone()),
    }
}

/// Every file whose manifest can be read, plus the errors of those that cannot. Packs are left out.
pub fn list(store: &Store) -> Result<(Vec<Entry>, Vec<Error>)> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in scan(store)? {
        match load(store, &f) {
            Ok(e) if e.manifest.body.is_pack() => {}
            Ok(e) => ok.push(e),
            Err(e) => bad.push(e),
        }
    }
    ok.sort_by_key(|e| e.label());
    Ok((ok, bad))
}

/// Finds a file by name (needs the key) or by its root as 64 hex digits. When several versions of a name exist
/// (an interrupted replace of a version 1 file), the newest is returned.
pub fn find(store: &Store, spec: &str) -> Result<Entry> {
    let files = scan(store)?;
    if let Some(key) = store.key_opt() {
        let tag = key.name_tag(spec);
        let mut best: Option<Entry> = None;
        for f in files.iter().filter(|f| f.name_tag == tag) {
            let e = load(store, f)?;
            if best.as_ref().is_none_or(|b| e.manifest.body.committed_unix_ns > b.manifest.body.committed_unix_ns) {
                best = Some(e);
            }
        }
        if let Some(b) = best {
            return Ok(b);
        }
    }
    if spec.len() == 64 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        let want = spec.to_ascii_lowercase();
        for f in &files {
            if let Ok(e) = load(store, f) {
                if e.manifest.body.root_hex() == want && !e.manifest.body.is_pack() {
                    return Ok(e);
                }
            }
        }
    }
    Err(Error::NotFound(spec.to_string()))
}

/// Catalog changes applied together by [`apply`]: one record of the catalog log.
#[derive(Default)]
pub struct Batch {
    puts: Vec<(Manifest, String, bool)>,
    removes: Vec<FileRef>,
    moves: Vec<(Manifest, [u8; 16])>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Publishes `manifest` under `name`; refused (that item only) when the name exists unless `replace`, in
    /// which case the older versions are removed in the same record.
    pub fn publish(&mut self, manifest: Manifest, name: &str, replace: bool) {
        self.puts.push((manifest, name.to_string(), replace));
    }

    /// Removes a file.
    pub fn remove(&mut self, file: FileRef) {
        self.removes.push(file);
    }

    /// Moves a packed file out of pack `from` (its new manifest names the new pack): applied only when the file
    /// is still in the catalog and still in `from` (a file removed or replaced meanwhile stays so). Pack `from`
    /// is dropped when no file is left in it. Moves have no outcome of their own.
    pub fn move_packed(&mut self, manifest: Manifest, from: [u8; 16]) {
        self.moves.push((manifest, from));
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.removes.is_empty() && self.moves.is_empty()
    }

    /// Manifests to publish (in order).
    pub fn len(&self) -> usize {
        self.puts.len()
    }
}

/// What each publication of a batch came to: whether an older version was replaced, or why it was refused.
pub type Outcomes = Vec<Result<bool>>;

/// Applies a batch under the catalog lock as one record of the catalog log, then deletes what it made garbage:
/// the shards of removed files no entry names any more, and packs left without a live file. A publication
/// refused for its name fails alone; a failure to write the record fails them all (nothing is applied).
pub fn apply(store: &Store, batch: Batch) -> Result<Outcomes> {
    let _lock = store.lock_catalog()?;
    let objects = scan_objects(store);
    let mut done = None;
    let mut marked = Vec::new();
    let st = catalog_log::append(store, |st| {
        let mut plan = Plan::new(st, &objects);
        for f in &batch.removes {
            plan.remove(f);
        }
        for (m, name, replace) in &batch.puts {
            plan.publish(m, name, *replace);
        }
        for (m, from) in &batch.moves {
            plan.move_packed(m, *from);
        }
        let (ops, rest) = plan.finish();
        // Before the record: shards it leaves unnamed must not look like a file the catalog lost.
        marked = rest.unnamed.clone();
        crate::files::intent::mark_removal(store, &rest.unnamed)?;
        done = Some(rest);
        Ok(ops)
    });
    let st = match st {
        Ok(st) => st,
        Err(e) => {
            if !matches!(e, Error::OutcomeUnknown { .. }) {
                crate::files::intent::clear_removal(store, &marked);
            }
            return Err(e);
        }
    };
    let Some(rest) = done else { return Err(Error::internal("catalog batch was not planned")) };
    // The change is durable: what follows only deletes garbage, and a failure there is left to scrub.
    collect_garbage(store, &st, &rest.legacy_gone, &rest.removed_ids);
    Ok(rest.outcomes)
}

/// What a batch leaves to do once its record is durable, and its outcomes.
struct Planned {
    legacy_gone: Vec<FileRef>,
    removed_ids: BTreeSet<[u8; 16]>,
    /// Removed ids with shard folders of their own (files in their own segments, packs) that no entry of the
    /// batch keeps: they get a removal marker before the record.
    unnamed: Vec<[u8; 16]>,
    outcomes: Outcomes,
}

/// An entry a batch adds: its key, its manifest bytes, and the pack it lies in when packed.
type NewEntry = ((Hash, [u8; 16]), Vec<u8>, Option<[u8; 16]>);

/// Turns a batch into the operations of one record, against the catalog as it is.
struct Plan<'s> {
    st: &'s CatalogState,
    objects: &'s Objects,
    removes: Vec<CatalogOp>,
    /// New entries.
    puts: Vec<NewEntry>,
    gone: BTreeSet<(Hash, [u8; 16])>,
    /// Entries moved to another pack by this batch.
    moved: BTreeSet<(Hash, [u8; 16])>,
    /// Packs files were moved out of.
    vacated: BTreeSet<[u8; 16]>,
    /// Packed files of the batch superseded before they were published (they have no shard folder).
    packed_gone: BTreeSet<[u8; 16]>,
    done: Planned,
}

impl<'s> Plan<'s> {
    fn new(st: &'s CatalogState, objects: &'s Objects) -> Self {
        Plan {
            st,
            objects,
            removes: Vec::new(),
            puts: Vec::new(),
            gone: BTreeSet::new(),
            moved: BTreeSet::new(),
            vacated: BTreeSet::new(),
            packed_gone: BTreeSet::new(),
            done: Planned {
                legacy_gone: Vec::new(),
                removed_ids: BTreeSet::new(),
                unnamed: Vec::new(),
                outcomes: Vec::new(),
            },
        }
    }

    fn remove(&mut self, f: &FileRef) {
        let key = (f.name_tag, f.file_id);
        if f.in_log && self.st.entries.contains_key(&key) {
            self.removes.push(CatalogOp::Remove { name_tag: f.name_tag, file_id: f.file_id });
        }
        self.drop_legacy(f);
        self.gone.insert((f.name_tag, f.file_id));
        self.done.removed_ids.insert(f.file_id);
    }

    /// The version 1 objects of `f`'s key go too (a version 1 file resealed into the log under the same name
    /// keeps its key: its old object must not come back when the log entry is removed).
    fn drop_legacy(&mut self, f: &FileRef) {
        if let Some(copies) = self.objects.get(&(f.name_tag, f.file_id)) {
            let legacy = FileRef { copies: copies.clone(), in_log: false, ..f.clone() };
            if !self.done.legacy_gone.contains(&legacy) {
                self.done.legacy_gone.push(legacy);
            }
        }
    }

    fn publish(&mut self, m: &Manifest, name: &str, replace: bool) {
        let key = (m.body.name_tag, m.body.file_id);
        let pack = match m.body.data {
            Data::Packed { pack, .. } => Some(pack),
            _ => None,
        };
        if m.body.is_pack() {
            // Packs have no name: every one is new.
            self.puts.push((key, m.encode(), None));
            self.done.outcomes.push(Ok(false));
            return;
        }
        let older: Vec<FileRef> = refs_named(self.st, self.objects, &key.0)
            .into_iter()
            .filter(|f| f.file_id != key.1 && !self.gone.contains(&(f.name_tag, f.file_id)))
            .collect();
        let in_batch = self.puts.iter().any(|(k, _, _)| k.0 == key.0 && k.1 != key.1);
        if (!older.is_empty() || in_batch) && !replace {
            self.done.outcomes.push(Err(Error::AlreadyExists(name.to_string())));
            return;
        }
        for o in &older {
            self.remove(o);
        }
        // An earlier version in this same batch is replaced before it was ever published.
        let removed_ids = &mut self.done.removed_ids;
        let packed_gone = &mut self.packed_gone;
        self.puts.retain(|(k, _, pack)| {
            let superseded = k.0 == key.0 && k.1 != key.1;
            if superseded {
                removed_ids.insert(k.1);
                if pack.is_some() {
                    packed_gone.insert(k.1);
                }
            }
            !superseded
        });
        let resealed = FileRef { name_tag: key.0, file_id: key.1, copies: vec![], in_log: false };
        self.drop_legacy(&resealed);
        self.puts.push((key, m.encode(), pack));
        self.done.outcomes.push(Ok(!older.is_empty() || in_batch));
    }

    fn move_packed(&mut self, m: &Manifest, from: [u8; 16]) {
        let key = (m.body.name_tag, m.body.file_id);
        let Data::Packed { pack: to, .. } = m.body.data else { return };
        self.vacated.insert(from);
        let still_there = !self.gone.contains(&key)
            && !self.puts.iter().any(|(k, _, _)| *k == key)
            && self
                .st
                .entries
                .get(&key)
                .is_some_and(|c| matches!(c.body.data, Data::Packed { pack, .. } if pack == from));
        if still_there {
            self.puts.push((key, m.encode(), Some(to)));
            self.moved.insert(key);
        }
    }

    /// The record's operations (removals, then puts, then the packs emptied) and what is left to do.
    fn finish(mut self) -> (Vec<CatalogOp>, Planned) {
        let emptied = self.empty_packs();
        let kept: BTreeSet<[u8; 16]> = self.puts.iter().map(|((_, id), _, _)| *id).collect();
        let mut ops = std::mem::take(&mut self.removes);
        ops.extend(self.puts.into_iter().map(|(_, b, _)| CatalogOp::Put(b)));
        for pack in emptied {
            ops.push(CatalogOp::Remove { name_tag: PACK_NAME_TAG, file_id: pack });
            self.done.removed_ids.insert(pack);
        }
        let is_packed = |m: &Manifest| matches!(m.body.data, Data::Packed { .. });
        let mut packed = std::mem::take(&mut self.packed_gone);
        packed.extend(self.gone.iter().filter(|k| self.st.entries.get(*k).is_some_and(|m| is_packed(m))).map(|k| k.1));
        self.done.unnamed =
            self.done.removed_ids.iter().filter(|id| !kept.contains(*id) && !packed.contains(*id)).copied().collect();
        (ops, self.done)
    }

    /// Packs whose last live file this batch removes or moves away (new entries keep the packs they lie in).
    fn empty_packs(&self) -> Vec<[u8; 16]> {
        let packed_in = |m: &Manifest| match m.body.data {
            Data::Packed { pack, .. } => Some(pack),
            _ => None,
        };
        let mut touched: BTreeSet<[u8; 16]> =
            self.gone.iter().filter_map(|k| self.st.entries.get(k)).filter_map(|m| packed_in(m)).collect();
        touched.extend(self.vacated.iter().copied());
        if touched.is_empty() {
            return vec![];
        }
        let mut live: BTreeSet<[u8; 16]> = self.puts.iter().filter_map(|(_, _, p)| *p).collect();
        for (k, m) in &self.st.entries {
            let stays = !self.gone.contains(k) && !self.moved.contains(k);
            if let Some(pack) = packed_in(m).filter(|p| stays && touched.contains(p)) {
                live.insert(pack);
            }
        }
        // A vacated pack that is not in the catalog (dropped already) needs no removal.
        touched.difference(&live).filter(|p| self.st.entries.contains_key(&(PACK_NAME_TAG, **p))).copied().collect()
    }
}

/// Every entry (log or version 1 object) named `tag`.
fn refs_named(st: &CatalogState, objects: &Objects, tag: &Hash) -> Vec<FileRef> {
    let range = (*tag, [0u8; 16])..=(*tag, [0xffu8; 16]);
    let logged = st.entries.range(range.clone()).map(|(&(name_tag, file_id), _)| FileRef {
        name_tag,
        file_id,
        copies: vec![],
        in_log: true,
    });
    let legacy = objects
        .range(range)
        .filter(|(k, _)| !st.entries.contains_key(k))
        .map(|(&(name_tag, file_id), copies)| FileRef { name_tag, file_id, copies: copies.clone(), in_log: false });
    logged.chain(legacy).collect()
}

/// After a batch is durable: deletes the version 1 manifest objects it removed, then the shards of every file
/// id (removed files, emptied packs) no entry names any more.
fn collect_garbage(store: &Store, st: &CatalogState, legacy: &[FileRef], removed: &BTreeSet<[u8; 16]>) {
    let mut legacy_left = false;
    for f in legacy {
        if let Err(e) = remove_objects(store, f) {
            // The log already says the file is gone; the object left behind hides nothing newer (the log's
            // entries win) and a later removal or scrub takes it.
            tracing::warn!(error = %e, "could not delete every version 1 manifest copy");
            legacy_left = true;
        }
    }
    let mut dead: BTreeSet<[u8; 16]> = removed.clone();
    for (&(_, id), m) in &st.entries {
        dead.remove(&id);
        if let Data::Packed { pack, .. } = m.body.data {
            dead.remove(&pack);
        }
    }
    if dead.is_empty() || legacy_left {
        return;
    }
    // Ids still named by a version 1 object keep their shards too. When that cannot be listed, keep them all:
    // garbage is better than loss.
    let (objects, all_answered) = scan_objects_checked(store);
    if !all_answered {
        return;
    }
    for id in dead.iter().filter(|id| !objects.keys().any(|(_, i)| i == *id)) {
        store.remove_shards(id);
    }
}

fn remove_objects(store: &Store, file: &FileRef) -> Result<()> {
    let mkey = manifest_key(&file.name_tag, &file.file_id);
    let mut failures = Vec::new();
    for loc in store.locations() {
        if let Err(e) = loc.delete(&mkey).and_then(|_| loc.sync()) {
            failures.push(LocationFailure::new(loc.name(), e));
        }
    }
    if !failures.is_empty() {
        let n = store.locations().len();
        return Err(Error::write_quorum("removal of every manifest copy", n - failures.len(), n, failures));
    }
    Ok(())
}

/// Publishes one manifest (see [`Batch::publish`]). Returns whether an older version was replaced.
pub fn publish(store: &Store, manifest: &Manifest, name: &str, replace: bool) -> Result<bool> {
    let mut batch = Batch::new();
    batch.publish(manifest.clone(), name, replace);
    apply(store, batch)?.pop().unwrap_or_else(|| Err(Error::internal("a batch of one gave no outcome")))
}

/// Removes a file, and its shards when no other entry names them.
pub fn remove(store: &Store, entry: &Entry) -> Result<()> {
    let mut batch = Batch::new();
    batch.remove(entry.file.clone());
    apply(store, batch).map(|_| ())
}

/// Publishes the data of `entry` under new metadata (another name, mode or mtime) without rewriting a shard:
/// a new manifest with the same file id, leaves and root and freshly sealed metadata, and the removal of the
/// old one, in one record. Refuses when `meta.name` exists (as another file) unless `replace`. Returns the new
/// entry.
pub fn reseal(store: &Store, entry: &Entry, meta: &FileMeta, replace: bool) -> Result<Entry> {
    let mut out = reseal_all(store, &[(entry.clone(), meta.clone())], replace)?;
    out.pop().ok_or_else(|| Error::internal("a reseal of one gave no entry"))
}

/// [`reseal`] of many files in one record (a directory renamed through the mount): all of them, or none when
/// the record cannot be written; a refused name fails the call after the others were applied.
pub fn reseal_all(store: &Store, items: &[(Entry, FileMeta)], replace: bool) -> Result<Vec<Entry>> {
    let mut batch = Batch::new();
    let mut out = Vec::with_capacity(items.len());
    // The data as the catalog has it now: another process may have moved a packed file since the caller read it.
    let st = if items.iter().any(|(e, _)| e.file.in_log) { Some(catalog_log::current(store)?) } else { None };
    for (entry, meta) in items {
        let current = match &st {
            Some(st) if entry.file.in_log => {
                let key = (entry.file.name_tag, entry.file.file_id);
                let m = st.entries.get(&key).ok_or_else(|| Error::NotFound(entry.label()))?;
                &m.body
            }
            _ => &entry.manifest.body,
        };
        let manifest = resealed(store, current, meta)?;
        if manifest.body.name_tag != entry.manifest.body.name_tag {
            batch.remove(entry.file.clone());
        }
        batch.publish(manifest.clone(), &meta.name, replace);
        let b = &manifest.body;
        let file = FileRef { name_tag: b.name_tag, file_id: b.file_id, copies: vec![], in_log: true };
        out.push(Entry { file, manifest, meta: Some(meta.clone()), bad_copies: Vec::new() });
    }
    for r in apply(store, batch)? {
        r?;
    }
    Ok(out)
}

/// The manifest of the data of `old` under `meta`.
fn resealed(store: &Store, old: &ManifestBody, meta: &FileMeta) -> Result<Manifest> {
    let key = store.key()?;
    validate_name(&meta.name)?;
    if meta.size != old.plain_size() {
        return Err(Error::InvalidArgument(format!("reseal of {:?} cannot change its size", meta.name)));
    }
    let (sealed_meta, meta_nonce) = meta.seal(key, &old.file_id)?;
    let body = ManifestBody {
        name_tag: key.name_tag(&meta.name),
        committed_unix_ns: crate::clock::unix_ns(),
        meta_nonce,
        sealed_meta,
        ..old.clone()
    };
    body.validate("resealed manifest")?;
    Ok(Manifest::new(body, key))
}
