//! The catalog of committed files. There is no local index to lose: the truth is the manifest copies on the
//! locations, found by listing `manifests/` (object names carry the name tag and file id, so finding a name
//! reads no manifest it does not need).

use std::collections::BTreeMap;

use crate::codec::merkle::Hash;
use crate::error::{Error, LocationFailure, Result};
use crate::format::manifest::{manifest_key, parse_manifest_name, FileMeta, Manifest, ManifestBody};
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

/// A file known from manifest object names (nothing read yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// Keyed hash of the name.
    pub name_tag: Hash,
    /// File id.
    pub file_id: [u8; 16],
    /// Indexes of the locations listing a copy.
    pub copies: Vec<usize>,
}

/// A committed file with its manifest.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Where its copies are.
    pub file: FileRef,
    /// The first valid manifest copy.
    pub manifest: Manifest,
    /// Decrypted metadata when the key is loaded.
    pub meta: Option<FileMeta>,
    /// Copies that exist but failed to decode: (location index, reason).
    pub bad_copies: Vec<(usize, String)>,
}

impl Entry {
    /// Name when known, else `root:<hex>`.
    pub fn label(&self) -> String {
        match &self.meta {
            Some(m) => m.name.clone(),
            None => format!("root:{}", self.manifest.body.root_hex()),
        }
    }
}

/// Lists every file on every reachable location. Unreachable locations are logged and skipped; when no location
/// answers, that is an error.
pub fn scan(store: &Store) -> Result<Vec<FileRef>> {
    let mut files: BTreeMap<(Hash, [u8; 16]), Vec<usize>> = BTreeMap::new();
    let mut answered = 0;
    let mut last_err = None;
    for (i, loc) in store.locations().iter().enumerate() {
        match loc.list("manifests") {
            Ok(names) => {
                answered += 1;
                for n in names {
                    if let Some(key) = parse_manifest_name(&n) {
                        files.entry(key).or_default().push(i);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(location = loc.name(), error = %e, "location unavailable");
                last_err = Some(e);
            }
        }
    }
    if answered == 0 {
        return Err(last_err.unwrap_or_else(|| Error::Config("store has no locations".into())));
    }
    Ok(files.into_iter().map(|((name_tag, file_id), copies)| FileRef { name_tag, file_id, copies }).collect())
}

/// True when some manifest carries this name tag.
pub fn name_is_taken(store: &Store, name_tag: &Hash) -> Result<bool> {
    Ok(scan(store)?.iter().any(|f| &f.name_tag == name_tag))
}

/// Decodes one manifest copy of `file`: envelope, structure, the MAC when the store's key is loaded, and that
/// the copy belongs to this store and to the object name it was found under.
pub fn decode_copy(store: &Store, file: &FileRef, bytes: &[u8], what: &str) -> Result<Manifest> {
    let m = Manifest::decode(bytes, store.key_opt(), what)?;
    if m.body.file_id != file.file_id || m.body.name_tag != file.name_tag {
        return Err(Error::corrupt(what, "object name does not match its content"));
    }
    if m.body.store_id != store.descriptor().store_id {
        return Err(Error::corrupt(what, "belongs to another store"));
    }
    Ok(m)
}

/// Reads the first valid manifest copy of `file` (checking the MAC and decrypting metadata when keyed).
pub fn load(store: &Store, file: &FileRef) -> Result<Entry> {
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

/// Every file whose manifest can be read, plus the errors of those that cannot.
pub fn list(store: &Store) -> Result<(Vec<Entry>, Vec<Error>)> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in scan(store)? {
        match load(store, &f) {
            Ok(e) => ok.push(e),
            Err(e) => bad.push(e),
        }
    }
    ok.sort_by_key(|e| e.label());
    Ok((ok, bad))
}

/// Finds a file by name (needs the key) or by its root as 64 hex digits. When several versions of a name exist
/// (an interrupted replace), the newest is returned.
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
                if e.manifest.body.root_hex() == want {
                    return Ok(e);
                }
            }
        }
    }
    Err(Error::NotFound(spec.to_string()))
}

/// Publishes a manifest on every location (at least m+1 must accept it), under the catalog lock. Refuses when
/// the name exists unless `replace`, in which case older versions are removed afterwards. Returns whether an
/// older version was replaced.
pub fn publish(store: &Store, manifest: &Manifest, name: &str, replace: bool) -> Result<bool> {
    let _lock = store.lock_catalog()?;
    let body = &manifest.body;
    // A copy with the same file id is the one being rewritten (a [`reseal`] under the same name): `put`
    // replaces it in place, so it is not an older version to remove.
    let older: Vec<FileRef> =
        scan(store)?.into_iter().filter(|f| f.name_tag == body.name_tag && f.file_id != body.file_id).collect();
    if !older.is_empty() && !replace {
        return Err(Error::AlreadyExists(name.to_string()));
    }
    let mkey = manifest_key(&body.name_tag, &body.file_id);
    let bytes = manifest.encode();
    if let Err(e) = store.put_replicated(&mkey, &bytes, &format!("the manifest of {name:?}")) {
        // Not published: take back the copies that did get written.
        for loc in store.locations() {
            let _ = loc.delete(&mkey).and_then(|_| loc.sync());
        }
        return Err(e);
    }
    for o in &older {
        remove_ref(store, o)?;
    }
    Ok(!older.is_empty())
}

/// Removes a file: first every manifest copy (so it disappears from listings), then its shards.
pub fn remove(store: &Store, entry: &Entry) -> Result<()> {
    let _lock = store.lock_catalog()?;
    remove_ref(store, &entry.file)
}

fn remove_ref(store: &Store, file: &FileRef) -> Result<()> {
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
    // Shards are shared by every manifest naming their file id (see [`reseal`]): remove them only when no
    // manifest is left. When the catalog cannot be listed, keep them: garbage is better than loss.
    let still_used = scan(store).map(|fs| fs.iter().any(|f| f.file_id == file.file_id)).unwrap_or(true);
    if !still_used {
        store.remove_shards(&file.file_id);
    }
    Ok(())
}

/// Publishes the data of `entry` under new metadata (another name, mode or mtime) without rewriting a shard:
/// a new manifest with the same file id, leaves and root and freshly sealed metadata. The old manifest is
/// removed afterwards; its shards stay because the new manifest references them, so a crash in between leaves
/// both names (sharing shards), never neither. Refuses when `meta.name` exists (as another file) unless
/// `replace`. Returns the new entry.
pub fn reseal(store: &Store, entry: &Entry, meta: &FileMeta, replace: bool) -> Result<Entry> {
    let key = store.key()?;
    validate_name(&meta.name)?;
    let old = &entry.manifest.body;
    if meta.size != old.plain_size() {
        return Err(Error::InvalidArgument(format!("reseal of {:?} cannot change its size", meta.name)));
    }
    let meta_bytes =
        postcard::to_allocvec(meta).map_err(|e| Error::internal(format!("encoding file metadata: {e}")))?;
    let (sealed_meta, meta_nonce) = key.seal_metadata(&old.file_id, &meta_bytes)?;
    let body = ManifestBody {
        name_tag: key.name_tag(&meta.name),
        committed_unix_ns: crate::clock::unix_ns(),
        meta_nonce,
        sealed_meta,
        ..old.clone()
    };
    body.validate("resealed manifest")?;
    let manifest = Manifest::new(body, key);
    publish(store, &manifest, &meta.name, replace)?;
    if manifest.body.name_tag != old.name_tag {
        remove(store, entry)?;
    }
    let file = FileRef {
        name_tag: manifest.body.name_tag,
        file_id: manifest.body.file_id,
        copies: (0..store.locations().len()).collect(),
    };
    Ok(Entry { file, manifest, meta: Some(meta.clone()), bad_copies: Vec::new() })
}
