//! The catalog log: the catalog as a chain of MACed records (each a batch of changes) on every location, folded
//! into a checkpoint (the whole catalog, in parts) every so often. A batch of any size is one record: one
//! replicated object write, not one manifest object per file per location.
//!
//! - **Writing** (under the catalog lock): list the catalog folder on every location, bring the in-memory state
//!   up to the end of the chain, append record `seq + 1` on every location (at least m+1 must accept it), and
//!   when the records since the checkpoint outweigh it, write a new checkpoint and delete what it replaces.
//! - **Reading**: the newest valid checkpoint, then records `seq + 1, seq + 2, ...` while each one's `prev` is the
//!   hash of the one before. Names carry a hash prefix; when two records share a number (a crash left one on a
//!   few locations, which were away when the next writer came), the one on more locations wins.
//! - A writer needs answers from all but m locations: a record acknowledged on m+1 locations is then always
//!   among those seen, so no acknowledged record can be overwritten by a fork.
//!
//! Records: [`crate::format::catalog`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::codec::crypto::MasterKey;
use crate::codec::merkle::Hash;
use crate::error::{Error, Result};
use crate::format::catalog::*;
use crate::format::manifest::Manifest;
use crate::location::LocationExt;
use crate::store::Store;

/// Records since the checkpoint after which a new one is written (or when they outweigh it).
const CHECKPOINT_RECORDS: u64 = 64;
/// Bytes of manifest copies per checkpoint part.
const PART_BYTES: usize = 4 << 20;

/// The catalog folder as listed: every object name and the locations listing it.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Name → indexes of the locations that list it.
    pub names: BTreeMap<CatalogName, Vec<usize>>,
    /// Locations that answered.
    pub answered: Vec<usize>,
}

/// The catalog as of a position in the chain.
#[derive(Clone, Debug, Default)]
pub struct CatalogState {
    /// Generation of the checkpoint it started from (0: none yet).
    pub generation: u64,
    /// Sequence number of that checkpoint.
    pub checkpoint_seq: u64,
    /// Last record applied.
    pub seq: u64,
    /// BLAKE3 of its body (the next record's `prev`).
    pub last: Hash,
    /// Every entry by (name tag, file id).
    pub entries: BTreeMap<(Hash, [u8; 16]), Arc<Manifest>>,
    /// The checkpoint's object name.
    pub checkpoint_name: Option<CatalogName>,
    /// Names of the records applied after the checkpoint, in order.
    pub records: Vec<CatalogName>,
    /// The BLAKE3 of each of the checkpoint's parts, as it lists them.
    pub part_hashes: Vec<Hash>,
    /// Bytes of the records since the checkpoint.
    bytes_since: u64,
    /// Bytes of the checkpoint's parts.
    checkpoint_bytes: u64,
}

impl CatalogState {
    /// Applies `ops` whole or not at all: every manifest is decoded before the first change (so a bad record
    /// leaves the state as it was, without copying it).
    fn apply(&mut self, ops: &[CatalogOp], key: Option<&MasterKey>, what: &str) -> Result<()> {
        let decoded: Vec<Option<Manifest>> = ops
            .iter()
            .map(|op| match op {
                CatalogOp::Put(bytes) => Manifest::decode(bytes, key, what).map(Some),
                CatalogOp::Remove { .. } => Ok(None),
            })
            .collect::<Result<_>>()?;
        for (op, m) in ops.iter().zip(decoded) {
            match (op, m) {
                (_, Some(m)) => {
                    self.entries.insert((m.body.name_tag, m.body.file_id), Arc::new(m));
                }
                (CatalogOp::Remove { name_tag, file_id }, None) => {
                    self.entries.remove(&(*name_tag, *file_id));
                }
                (CatalogOp::Put(_), None) => {}
            }
        }
        Ok(())
    }
}

/// Lists the catalog folder on every location. Fails only when no location answers.
pub fn list(store: &Store) -> Result<Listing> {
    let mut listing = Listing::default();
    let mut last_err = None;
    // A location that is itself missing (a directory gone) lists as empty: it counts as answering only once it
    // answers a probe, or appends could go on from a view missing the newest records.
    let listed = store.each_location(|_, loc| {
        loc.list(CATALOG_DIR).and_then(|names| match names.is_empty() {
            true => loc.probe().map(|()| names),
            false => Ok(names),
        })
    });
    for ((i, loc), listed) in store.locations().iter().enumerate().zip(listed) {
        match listed {
            Ok(names) => {
                listing.answered.push(i);
                for n in names.iter().filter_map(|n| parse_name(n)) {
                    listing.names.entry(n).or_default().push(i);
                }
            }
            Err(e) => {
                tracing::debug!(location = loc.name(), error = %e, "catalog not listable");
                last_err = Some(e);
            }
        }
    }
    if listing.answered.is_empty() {
        return Err(last_err.unwrap_or_else(|| Error::Config("store has no locations".into())));
    }
    Ok(listing)
}

/// The hash a copy of `name` must have: the prefix in a record's or checkpoint's name, or the full hash of a
/// part as its checkpoint lists it.
#[derive(Clone, Copy)]
enum Expect {
    Prefix([u8; 8]),
    Full(Hash),
}

impl Expect {
    fn of(name: &CatalogName) -> Option<Expect> {
        match name {
            CatalogName::Record(_, p) | CatalogName::Checkpoint(_, p) => Some(Expect::Prefix(*p)),
            CatalogName::Part(..) => None,
        }
    }

    fn matches(self, h: &Hash) -> bool {
        match self {
            Expect::Prefix(p) => h[..8] == p,
            Expect::Full(f) => *h == f,
        }
    }
}

/// Reads the first valid copy of `name` among the locations listing it whose body hashes as expected (a copy
/// left under the same name by an earlier, failed attempt is skipped).
fn fetch<T: serde::de::DeserializeOwned>(
    store: &Store,
    listing: &Listing,
    name: &CatalogName,
    magic: [u8; 8],
    expect: Option<Expect>,
) -> Result<(T, Hash, usize)> {
    let key = key_of(name);
    let mut problems = Vec::new();
    for &i in listing.names.get(name).map(|v| v.as_slice()).unwrap_or(&[]) {
        let loc = &store.locations()[i];
        let what = format!("{key} on {}", loc.name());
        match loc.get(&key).and_then(|b| Ok((open(magic, &b, store.key_opt(), &what)?, b.len()))) {
            Ok(((v, h), len)) if expect.is_none_or(|e| e.matches(&h)) => return Ok((v, h, len)),
            Ok(_) => problems.push(format!("{what}: not the expected contents")),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Err(Error::corrupt(format!("catalog object {key}"), format!("no valid copy ({})", problems.join("; "))))
}

/// Variants of record `seq` in the order they are tried: most copies first.
fn record_variants(listing: &Listing, seq: u64) -> Vec<CatalogName> {
    let mut v: Vec<(&CatalogName, usize)> = listing
        .names
        .range(CatalogName::Record(seq, [0; 8])..=CatalogName::Record(seq, [0xff; 8]))
        .map(|(n, locs)| (n, locs.len()))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter().map(|(n, _)| *n).collect()
}

/// Applies the records after `state.seq` that continue the chain; fails when the chain cannot be followed for
/// sure (a listed record readable nowhere, or records listed past a missing one).
pub fn advance(store: &Store, listing: &Listing, state: &mut CatalogState) -> Result<()> {
    loop {
        let seq = state.seq + 1;
        let Some((body, hash, len)) = next_record(store, listing, state, seq)? else {
            let beyond = listing.names.keys().any(|n| matches!(n, CatalogName::Record(s, _) if *s > seq));
            if beyond {
                return Err(Error::corrupt(
                    "the catalog",
                    format!("records are listed after record {seq}, which is missing or does not continue the chain"),
                ));
            }
            return Ok(());
        };
        state.apply(&body.ops, store.key_opt(), &format!("catalog record {seq}"))?;
        state.records.push(CatalogName::Record(seq, hash[..8].try_into().unwrap_or_default()));
        state.seq = seq;
        state.last = hash;
        state.bytes_since += len as u64;
    }
}

/// The record `seq` that continues `state`: of the listed variants that do, the one written last (a writer
/// appends only after reading every record that `n - m` locations show, so a later variant was written by a
/// writer that could not see the earlier one, which was therefore never acknowledged). Every variant must be
/// readable: one that cannot be read might be the right one.
fn next_record(
    store: &Store,
    listing: &Listing,
    state: &CatalogState,
    seq: u64,
) -> Result<Option<(RecordBody, Hash, usize)>> {
    let store_id = store.descriptor().store_id;
    let mut best: Option<(RecordBody, Hash, usize)> = None;
    for name in record_variants(listing, seq) {
        let (body, hash, len) = fetch::<RecordBody>(store, listing, &name, MAGIC_CATALOG_RECORD, Expect::of(&name))?;
        if body.seq != seq || body.store_id != store_id {
            return Err(Error::corrupt(key_of(&name), "does not match its name or store"));
        }
        if body.prev != state.last {
            tracing::debug!(record = %key_of(&name), "catalog record does not continue the chain");
            continue;
        }
        if best.as_ref().is_none_or(|b| body.written_unix_ns > b.0.written_unix_ns) {
            best = Some((body, hash, len));
        }
    }
    Ok(best)
}

/// Loads the newest checkpoint (an empty catalog when there has never been one). Never falls back to an older
/// one: the records after it are gone, so that would roll the catalog back. Of several checkpoints of the newest
/// generation (an attempt that failed, then one made while its locations were away), the one on more locations
/// that reads whole.
fn load_checkpoint(store: &Store, listing: &Listing) -> Result<CatalogState> {
    let Some(newest) = listing
        .names
        .keys()
        .filter_map(|n| match n {
            CatalogName::Checkpoint(g, _) => Some(*g),
            _ => None,
        })
        .max()
    else {
        return Ok(CatalogState::default());
    };
    let mut ckpts: Vec<(&CatalogName, usize)> = listing
        .names
        .iter()
        .filter(|(n, _)| matches!(n, CatalogName::Checkpoint(g, _) if *g == newest))
        .map(|(n, l)| (n, l.len()))
        .collect();
    ckpts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut problems = Vec::new();
    for (name, _) in ckpts {
        match read_checkpoint(store, listing, name) {
            Ok(st) => return Ok(st),
            Err(e) => {
                tracing::warn!(error = %e, "catalog checkpoint unreadable");
                problems.push(e.to_string());
            }
        }
    }
    Err(Error::corrupt("the catalog", format!("checkpoint {newest} is unreadable ({})", problems.join("; "))))
}

fn read_checkpoint(store: &Store, listing: &Listing, name: &CatalogName) -> Result<CatalogState> {
    let CatalogName::Checkpoint(generation, prefix) = *name else {
        return Err(Error::internal("not a checkpoint name"));
    };
    let (body, hash, _) = fetch::<CheckpointBody>(store, listing, name, MAGIC_CATALOG_CHECKPOINT, Expect::of(name))?;
    let what = key_of(name);
    if body.generation != generation || hash[..8] != prefix || body.store_id != store.descriptor().store_id {
        return Err(Error::corrupt(&what, "does not match its name or store"));
    }
    let mut st = CatalogState {
        generation,
        checkpoint_seq: body.seq,
        seq: body.seq,
        last: body.last,
        checkpoint_name: Some(*name),
        part_hashes: body.parts.iter().map(|p| p.hash).collect(),
        ..Default::default()
    };
    for (index, part) in body.parts.iter().enumerate() {
        let pname = CatalogName::Part(generation, index as u32);
        let (p, phash, len) =
            fetch::<PartBody>(store, listing, &pname, MAGIC_CATALOG_PART, Some(Expect::Full(part.hash)))?;
        if phash != part.hash || p.manifests.len() != part.entries as usize || p.index as usize != index {
            return Err(Error::corrupt(key_of(&pname), "does not match its checkpoint"));
        }
        st.checkpoint_bytes += len as u64;
        let ops: Vec<CatalogOp> = p.manifests.into_iter().map(CatalogOp::Put).collect();
        st.apply(&ops, store.key_opt(), &key_of(&pname))?;
    }
    Ok(st)
}

/// The catalog as it is on the locations now, starting from `cached` when it is still on the chain.
pub fn refresh(store: &Store, listing: &Listing, cached: Option<&CatalogState>) -> Result<CatalogState> {
    let newest = listing.names.keys().filter_map(|n| match n {
        CatalogName::Checkpoint(g, _) => Some(*g),
        _ => None,
    });
    let mut st = match cached {
        // A newer checkpoint means the records after the cached position may be gone: start from it. So does
        // the disappearance of the cached position's last object (a repair chose another chain).
        Some(c) if newest.max().unwrap_or(0) <= c.generation && last_listed(listing, c) => c.clone(),
        _ => load_checkpoint(store, listing)?,
    };
    advance(store, listing, &mut st)?;
    Ok(st)
}

/// True when `listing` shows nothing newer than `c`: no later checkpoint, no record past it, and its last
/// object still there.
fn unchanged(listing: &Listing, c: &CatalogState) -> bool {
    listing.names.keys().all(|n| match n {
        CatalogName::Checkpoint(g, _) | CatalogName::Part(g, _) => *g <= c.generation,
        CatalogName::Record(s, _) => *s <= c.seq,
    }) && last_listed(listing, c)
}

/// True when the last object `c` was read from (its last record, else its checkpoint) is still listed: when it
/// is gone, a repair chose another chain.
fn last_listed(listing: &Listing, c: &CatalogState) -> bool {
    c.records.last().or(c.checkpoint_name.as_ref()).is_none_or(|n| listing.names.contains_key(n))
}

/// The catalog as it is on the locations now (and remembered by the store).
pub fn current(store: &Store) -> Result<Arc<CatalogState>> {
    let listing = list(store)?;
    let cached = store.catalog_cache();
    if let Some(c) = cached.as_ref().filter(|c| unchanged(&listing, c)) {
        // Nothing was written since: no copy of the (possibly large) state.
        return Ok(c.clone());
    }
    let st = refresh(store, &listing, cached.as_deref())?;
    Ok(store.set_catalog_cache(st))
}

/// Appends one record of the changes `build` makes from the current state (under the catalog lock, which the
/// caller holds) and returns the new state. Nothing is written when `build` returns no change.
pub fn append(store: &Store, build: impl FnOnce(&CatalogState) -> Result<Vec<CatalogOp>>) -> Result<Arc<CatalogState>> {
    let listing = list(store)?;
    let n = store.locations().len();
    let need = n.saturating_sub(store.descriptor().m as usize).max(1);
    if listing.answered.len() < need {
        return Err(Error::write_quorum(
            "a catalog change (listing the catalog)",
            listing.answered.len(),
            need,
            vec![],
        ));
    }
    let cached = store.catalog_cache();
    let mut st = refresh(store, &listing, cached.as_deref())?;
    let ops = build(&st)?;
    if ops.is_empty() {
        return Ok(store.set_catalog_cache(st));
    }
    let key = store.key()?;
    let body = RecordBody {
        store_id: store.descriptor().store_id,
        seq: st.seq + 1,
        prev: st.last,
        written_unix_ns: crate::clock::unix_ns(),
        ops,
    };
    let (bytes, hash) = seal(MAGIC_CATALOG_RECORD, &body, key)?;
    let rkey = record_key(body.seq, &hash);
    if let Err(e) = store.put_replicated(&rkey, &bytes, "a catalog record") {
        return Err(take_back(store, &rkey, e, "a catalog record"));
    }
    // Records left under the same number by a crashed writer lose to this one; drop them.
    for name in record_variants(&listing, body.seq) {
        delete_everywhere(store, &key_of(&name));
    }
    st.apply(&body.ops, Some(key), "a new catalog record")?;
    st.seq = body.seq;
    st.last = hash;
    st.records.push(CatalogName::Record(body.seq, hash[..8].try_into().unwrap_or_default()));
    st.bytes_since += bytes.len() as u64;
    if st.seq - st.checkpoint_seq >= CHECKPOINT_RECORDS || st.bytes_since > st.checkpoint_bytes.max(1 << 20) {
        if let Err(e) = write_checkpoint(store, &listing, &mut st) {
            // The record is durable; the checkpoint is only an optimisation and the next writer tries again.
            tracing::warn!(error = %e, "catalog checkpoint failed");
        }
    }
    Ok(store.set_catalog_cache(st))
}

/// Deletes the copies of a write that failed its quorum. When some location cannot confirm the deletion, the
/// write may yet be found there later: the error becomes [`Error::OutcomeUnknown`].
fn take_back(store: &Store, key: &str, cause: Error, what: &str) -> Error {
    let all_gone = store.locations().iter().all(|loc| match loc.delete(key).and_then(|_| loc.sync()) {
        Ok(()) => true,
        Err(e) => e.is_not_found(),
    });
    if all_gone {
        cause
    } else {
        Error::OutcomeUnknown { what: what.to_string(), cause: Box::new(cause) }
    }
}

fn delete_everywhere(store: &Store, key: &str) {
    for loc in store.locations() {
        if let Err(e) = loc.delete(key) {
            tracing::debug!(location = loc.name(), key, error = %e, "could not delete catalog object");
        }
    }
}

/// Writes the whole catalog as checkpoint `generation + 1` (parts first, then the checkpoint), then deletes the
/// records and older checkpoints it replaces.
pub fn write_checkpoint(store: &Store, listing: &Listing, st: &mut CatalogState) -> Result<()> {
    let key = store.key()?;
    let store_id = store.descriptor().store_id;
    let listed_max = listing
        .names
        .keys()
        .filter_map(|n| match n {
            CatalogName::Checkpoint(g, _) | CatalogName::Part(g, _) => Some(*g),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let generation = listed_max.max(st.generation) + 1;
    let mut parts = Vec::new();
    let mut part_bytes = 0u64;
    let mut chunk: Vec<Vec<u8>> = Vec::new();
    let mut size = 0usize;
    let entries: Vec<&Arc<Manifest>> = st.entries.values().collect();
    let mut flush = |chunk: &mut Vec<Vec<u8>>, parts: &mut Vec<PartRef>| -> Result<()> {
        let index = parts.len() as u32;
        let body = PartBody { store_id, generation, index, manifests: std::mem::take(chunk) };
        let (bytes, hash) = seal(MAGIC_CATALOG_PART, &body, key)?;
        store.put_replicated(&part_key(generation, index), &bytes, "a catalog checkpoint part")?;
        part_bytes += bytes.len() as u64;
        parts.push(PartRef { entries: body.manifests.len() as u32, hash });
        Ok(())
    };
    for m in entries {
        let b = m.encode();
        size += b.len();
        chunk.push(b);
        if size >= PART_BYTES {
            flush(&mut chunk, &mut parts)?;
            size = 0;
        }
    }
    if !chunk.is_empty() || parts.is_empty() {
        flush(&mut chunk, &mut parts)?;
    }
    let body = CheckpointBody { store_id, generation, seq: st.seq, last: st.last, parts };
    let (bytes, hash) = seal(MAGIC_CATALOG_CHECKPOINT, &body, key)?;
    let ckey = checkpoint_key(generation, &hash);
    if let Err(e) = store.put_replicated(&ckey, &bytes, "a catalog checkpoint") {
        // Left listed, it would be the newest generation: readers would need its parts for ever.
        return Err(take_back(store, &ckey, e, "a catalog checkpoint"));
    }
    st.generation = generation;
    st.checkpoint_name = Some(CatalogName::Checkpoint(generation, hash[..8].try_into().unwrap_or_default()));
    st.records.clear();
    st.part_hashes = body.parts.iter().map(|p| p.hash).collect();
    st.checkpoint_seq = st.seq;
    st.bytes_since = 0;
    st.checkpoint_bytes = part_bytes;
    // What the new checkpoint replaces: records it covers, older checkpoints and their parts.
    let fresh = list(store)?;
    for name in fresh.names.keys() {
        let stale = match name {
            CatalogName::Record(s, _) => *s <= st.seq,
            CatalogName::Checkpoint(g, _) | CatalogName::Part(g, _) => *g < generation,
        };
        if stale {
            delete_everywhere(store, &key_of(name));
        }
    }
    Ok(())
}

/// The objects of the current chain (checkpoint, its parts, the records after it), for scrub.
pub fn chain_objects(listing: &Listing, st: &CatalogState) -> Vec<CatalogName> {
    let parts = listing.names.keys().filter(|n| matches!(n, CatalogName::Part(g, _) if *g == st.generation));
    st.checkpoint_name.iter().chain(parts).chain(&st.records).copied().collect()
}
