//! Rebuilding a lost or damaged store descriptor (`store.bf`) from the locations.
//!
//! The catalog already lives on the locations (manifest copies), so the only local state worth having is the
//! descriptor. Everything in it can be found again: the store id and each location's position from the location
//! markers, k, m and the segment size from the manifests, and the key check value from the key (which must
//! authenticate the manifests). Directories without a marker stand in for lost locations and get one.

use std::path::Path;
use std::sync::Arc;

use crate::codec::crypto::MasterKey;
use crate::error::{Error, Result};
use crate::format::manifest::{parse_manifest_name, Manifest};
use crate::location::{open_location, Location, LocationExt};
use crate::store::{canonical_spec, read_marker, write_marker, Store, StoreDescriptor};

/// Settings used only when no manifest is left to read them from.
#[derive(Clone, Debug, Default)]
pub struct Fallback {
    /// Data shards.
    pub k: Option<u16>,
    /// Parity shards.
    pub m: Option<u16>,
    /// Segment size in bytes.
    pub segment_size: Option<u64>,
}

/// What recovery found, for the report.
#[derive(Clone, Debug)]
pub struct Recovered {
    /// The descriptor written.
    pub descriptor: StoreDescriptor,
    /// Manifest copies that the key authenticated.
    pub manifests_checked: usize,
    /// Locations that had no marker and were given one (replacements for lost locations).
    pub new_locations: Vec<String>,
}

/// A location as given on the command line: its spec (local paths made absolute) and the open location.
struct Given {
    spec: String,
    loc: Arc<dyn Location>,
}

fn open_given(specs: &[String]) -> Result<Vec<Given>> {
    specs
        .iter()
        .map(|spec| {
            let spec = canonical_spec(spec)?;
            let loc = open_location(Path::new("/"), &spec)?;
            loc.probe()?;
            Ok(Given { spec, loc })
        })
        .collect()
}

/// How the given locations map onto the store's.
struct Order {
    store_id: [u8; 16],
    /// Indices into `given`, in store order.
    ordered: Vec<usize>,
    /// The given locations without a marker (standing in for lost ones).
    blank: Vec<usize>,
    /// The location numbers, in store order.
    ids: Vec<u32>,
    /// The layout generation the newest marker names (0: the initial layout).
    layout_gen: u64,
}

/// Orders the given locations by their markers: by the layout the newest marker records when the store's
/// locations were ever added or removed, else by marker number; gaps are filled with marker-less ones.
fn order_locations(given: &[Given]) -> Result<Order> {
    let mut store_id = None;
    let mut markers = Vec::new();
    let mut blank = Vec::new();
    for (g, d) in given.iter().enumerate() {
        let Some(m) = read_marker(d.loc.as_ref())? else {
            blank.push(g);
            continue;
        };
        if *store_id.get_or_insert(m.store_id) != m.store_id {
            return Err(Error::Config(format!("{} belongs to another store", d.spec)));
        }
        if m.index >= 4096 {
            return Err(Error::corrupt(format!("location marker of {}", d.spec), "implausible index"));
        }
        markers.push((g, m));
    }
    let store_id =
        store_id.ok_or_else(|| Error::Config("no location has a marker: cannot tell which store they hold".into()))?;
    let newest = markers.iter().map(|(_, m)| m).max_by_key(|m| m.layout_gen).filter(|m| m.layout_gen > 0);
    let (ids, layout_gen): (Vec<u32>, u64) = match newest {
        Some(m) => (m.layout.clone(), m.layout_gen),
        // Placement depends on the location count, which only the descriptor records for a store whose layout
        // never changed: every location must be given (an empty one for each lost one).
        None => {
            let highest = markers.iter().map(|(_, m)| m.index as usize + 1).max().unwrap_or(0);
            let total = markers.len() + blank.len();
            if highest > total {
                return Err(Error::Config(format!(
                    "a marker names location {} but only {total} locations were given: give every location (an \
                     empty directory or bucket for each lost one)",
                    highest - 1
                )));
            }
            ((0..total as u32).collect(), 0)
        }
    };
    let mut placed: Vec<Option<usize>> = vec![None; ids.len()];
    for (g, m) in &markers {
        let Some(i) = ids.iter().position(|id| *id == m.index) else {
            return Err(Error::Config(format!(
                "{} was removed from the store (its number is not in the newest layout): leave it out",
                given[*g].spec
            )));
        };
        if let Some(other) = placed[i] {
            return Err(Error::Config(format!("{} and {} both claim location {i}", given[other].spec, given[*g].spec)));
        }
        placed[i] = Some(*g);
    }
    if markers.len() + blank.len() > ids.len() {
        return Err(Error::Config(format!("{} locations given; the store has {}", given.len(), ids.len())));
    }
    let mut spare = blank.clone().into_iter();
    let mut ordered = Vec::new();
    for (i, p) in placed.into_iter().enumerate() {
        match p.or_else(|| spare.next()) {
            Some(p) => ordered.push(p),
            None => {
                return Err(Error::Config(format!(
                    "location {i} is missing: give it, or an empty directory or bucket to replace it"
                )))
            }
        }
    }
    Ok(Order { store_id, ordered, blank, ids, layout_gen })
}

/// Checks that the shards of a file sit where placement over this many locations puts them (a wrong location
/// count would make every read look in the wrong place).
fn check_placement(
    body: &crate::format::manifest::ManifestBody,
    given: &[Given],
    ordered: &[usize],
    blank: &[usize],
) -> Result<()> {
    let n = ordered.len();
    let (mut home, mut away) = (0, 0);
    for seg in 0..body.segments.len().min(4) as u64 {
        for i in 0..body.width() {
            let key = crate::store::shard_key(&body.file_id, seg, i);
            for (l, g) in ordered.iter().enumerate().filter(|(_, g)| !blank.contains(g)) {
                if given[*g].loc.get_range(&key, 0, 1).is_ok_and(|b| !b.is_empty()) {
                    let start = crate::store::placement_start(&body.file_id, n);
                    if l == crate::store::placement(start, seg, i, n) {
                        home += 1;
                    } else {
                        away += 1;
                    }
                }
            }
        }
    }
    if away > home {
        return Err(Error::Config(format!(
            "shards are not where {n} locations would put them: give every location (an empty one for each lost one)"
        )));
    }
    Ok(())
}

/// Rebuilds `<dir>/store.bf` from `locations` (specs, in any order) and `key`. Refuses when a valid descriptor
/// exists.
pub fn recover(dir: &Path, locations: &[String], key: &MasterKey, fallback: &Fallback) -> Result<Recovered> {
    if Store::open(dir).is_ok() {
        return Err(Error::StoreExists(dir.to_path_buf()));
    }
    let given = open_given(locations)?;
    let Order { store_id, ordered, blank, ids, layout_gen } = order_locations(&given)?;
    let (newest, checked) = newest_manifest(&given, &ordered, &store_id, key)?;
    let (k, m, segment_size) = geometry(newest.as_ref(), fallback)?;
    crate::codec::erasure::validate(k as usize, m as usize)?;
    if let Some(n) = &newest {
        check_placement(&n.body, &given, &ordered, &blank)?;
    }
    let n = ordered.len();
    let descriptor = StoreDescriptor {
        store_id,
        k,
        m,
        segment_size,
        locations: descriptor_locations(dir, &given, &ordered)?,
        key_check: key.check_value(),
        kdf: None,
        created_unix: crate::clock::unix_secs(),
        // Zones live only in the descriptor: `bf location zone` sets them again.
        zones: vec![String::new(); n],
        ids,
        draining: vec![false; n],
        layout_gen,
    };
    for (i, g) in ordered.iter().enumerate() {
        if blank.contains(g) {
            write_marker(given[*g].loc.as_ref(), &descriptor, i)?;
        }
    }
    write_descriptor(dir, &descriptor)?;
    let new_locations = blank.iter().map(|&g| given[g].spec.clone()).collect();
    Ok(Recovered { descriptor, manifests_checked: checked, new_locations })
}

/// Reads every manifest copy on the locations with `key`; returns the newest of this store's and how many the
/// key authenticated. Fails with [`Error::WrongKey`] when copies exist but none authenticates.
fn newest_manifest(
    given: &[Given],
    ordered: &[usize],
    store_id: &[u8; 16],
    key: &MasterKey,
) -> Result<(Option<Manifest>, usize)> {
    let mut newest: Option<Manifest> = None;
    let mut checked = 0;
    let mut rejected = 0;
    for &g in ordered {
        let loc = &given[g].loc;
        for name in loc.list("manifests")? {
            if parse_manifest_name(&name).is_none() {
                continue;
            }
            let what = format!("manifest {name} on {}", given[g].spec);
            match loc.get(&format!("manifests/{name}")).and_then(|b| Manifest::decode(&b, Some(key), &what)) {
                Ok(m) if m.body.store_id == *store_id => {
                    checked += 1;
                    if newest.as_ref().is_none_or(|n| m.body.committed_unix_ns > n.body.committed_unix_ns) {
                        newest = Some(m);
                    }
                }
                Ok(_) => rejected += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping manifest copy");
                    rejected += 1;
                }
            }
        }
    }
    for &g in ordered {
        let (c, r, n) = catalog_manifests(&given[g], store_id, key)?;
        checked += c;
        rejected += r;
        for m in n {
            if newest.as_ref().is_none_or(|x| m.body.committed_unix_ns > x.body.committed_unix_ns) {
                newest = Some(m);
            }
        }
    }
    if checked == 0 && rejected > 0 {
        return Err(Error::WrongKey);
    }
    Ok((newest, checked))
}

/// The manifests in the catalog log objects of one location that `key` authenticates: (objects checked,
/// objects rejected, the manifests).
fn catalog_manifests(g: &Given, store_id: &[u8; 16], key: &MasterKey) -> Result<(usize, usize, Vec<Manifest>)> {
    use crate::format::catalog::{self as cat, CatalogName, CatalogOp};
    let (mut checked, mut rejected, mut out) = (0, 0, Vec::new());
    for name in g.loc.list(cat::CATALOG_DIR)? {
        let Some(parsed) = cat::parse_name(&name) else { continue };
        let okey = cat::key_of(&parsed);
        let what = format!("{okey} on {}", g.spec);
        let Ok(bytes) = g.loc.get(&okey) else { continue };
        let manifests: Result<Vec<Vec<u8>>> = match parsed {
            CatalogName::Record(..) => {
                cat::open::<cat::RecordBody>(cat::MAGIC_CATALOG_RECORD, &bytes, Some(key), &what).map(|(r, _)| {
                    r.ops
                        .into_iter()
                        .filter_map(|op| match op {
                            CatalogOp::Put(b) => Some(b),
                            CatalogOp::Remove { .. } => None,
                        })
                        .collect()
                })
            }
            CatalogName::Part(..) => {
                cat::open::<cat::PartBody>(cat::MAGIC_CATALOG_PART, &bytes, Some(key), &what).map(|(p, _)| p.manifests)
            }
            CatalogName::Checkpoint(..) => {
                cat::open::<cat::CheckpointBody>(cat::MAGIC_CATALOG_CHECKPOINT, &bytes, Some(key), &what)
                    .map(|_| vec![])
            }
        };
        match manifests {
            Ok(ms) => {
                checked += 1;
                out.extend(
                    ms.iter()
                        .filter_map(|b| Manifest::decode(b, Some(key), &what).ok())
                        .filter(|m| m.body.store_id == *store_id),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping catalog object");
                rejected += 1;
            }
        }
    }
    Ok((checked, rejected, out))
}

/// k, m and the segment size: from the newest manifest, else from the fallback settings.
fn geometry(newest: Option<&Manifest>, fallback: &Fallback) -> Result<(u16, u16, u64)> {
    match (newest, fallback) {
        (Some(n), _) => Ok((n.body.k, n.body.m, n.body.segment_size)),
        (None, Fallback { k: Some(k), m: Some(m), segment_size: Some(s) }) => Ok((*k, *m, *s)),
        (None, _) => {
            Err(Error::Config("no manifest left to read k, m and the segment size from; give them explicitly".into()))
        }
    }
}

/// The descriptor's location list, in store order: locations inside the store directory stay relative, as
/// `bf init` wrote them.
fn descriptor_locations(dir: &Path, given: &[Given], ordered: &[usize]) -> Result<Vec<String>> {
    let abs_dir = std::path::absolute(dir).map_err(|e| Error::io("resolving the store directory", e))?;
    Ok(ordered
        .iter()
        .map(|&g| {
            let spec = &given[g].spec;
            match Path::new(spec).strip_prefix(&abs_dir) {
                Ok(rel) if spec.starts_with('/') => rel.display().to_string(),
                _ => spec.clone(),
            }
        })
        .collect())
}

/// Writes `<dir>/store.bf` atomically, keeping a damaged one as `store.bf.damaged`.
fn write_descriptor(dir: &Path, descriptor: &StoreDescriptor) -> Result<()> {
    let old = dir.join("store.bf");
    if old.exists() {
        let keep = dir.join("store.bf.damaged");
        std::fs::rename(&old, &keep).map_err(|e| Error::io(format!("moving aside {}", old.display()), e))?;
        tracing::warn!(path = %keep.display(), "kept the damaged descriptor");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    crate::store::write_atomic(&dir.join("store.bf"), &crate::store::seal_descriptor(descriptor), 0o644)
}
