//! Files whose catalog entry was lost: shards that look whole, no intent marker, and no entry naming them (see
//! [`crate::files::intent`]). With the key they can be read back and checked without any manifest, because a
//! shard header names its store, file, segment and shard, and every segment is authenticated by AES-GCM under
//! the file's own key with its length and "last" flag in the associated data:
//!
//! - segments before the last are full (`segment_size` bytes of plaintext);
//! - the last one's length is one of the 2k lengths whose ciphertext and tag fill k shards of the stored length,
//!   and only the right one (with "last" set) passes the tag check.
//!
//! [`examine`] rebuilds what the manifest said (segments, Merkle leaves and root) from verified shards;
//! [`restore`] publishes it in one catalog record as `lost+found/<file id>` (the name and metadata lived only in
//! the lost entry), leaving the shards where they are.
//!
//! A pack ends with an index of its files ([`crate::format::pack_index`]): a lost pack gives back each of its
//! files under its own name and metadata (under `lost+found/` when that name is taken meanwhile). Packs written
//! before indexes existed cannot be told apart into files without the catalog; they are reported as such.

use std::collections::BTreeMap;

use crate::codec::crypto::TAG_LEN;
use crate::codec::erasure::{self, Codec};
use crate::codec::merkle::{self, leaf_hash, Hash};
use crate::error::{Error, Result};
use crate::files::catalog::{self, Batch};
use crate::files::commit::{segments_manifest, OwnSegments};
use crate::files::pack::packed_body;
use crate::format::manifest::{Data, FileMeta, Manifest, ManifestBody, SegmentEntry, PACK_NAME_TAG};
use crate::format::pack_index::{self, IndexEntry};
use crate::format::shard::{self, Expected, ShardHeader};
use crate::location::LocationExt;
use crate::scrub::{survey_orphans, OrphanKind, OrphanSurvey};
use crate::store::{placement_start, shard_key, Store};

/// Folder of the store that restored files are published under.
pub const LOST_FOUND_DIR: &str = "lost+found";

/// Every shard set that looks like a whole file no catalog entry names (keyless).
pub fn find(store: &Store) -> Result<BTreeMap<[u8; 16], OrphanSurvey>> {
    let k = store.descriptor().k as usize;
    let mut found = survey_orphans(store, &|_| true)?;
    found.retain(|_, s| s.kind(k) == OrphanKind::Unreferenced);
    Ok(found)
}

/// A lost file or pack read back and checked with the key, ready to be published again.
#[derive(Clone, Debug)]
pub struct Lost {
    /// File or pack id.
    pub id: [u8; 16],
    /// A pack (its files follow its own manifest in `manifests`).
    pub pack: bool,
    /// The manifests to publish, with the name each gets (a pack's: none).
    pub manifests: Vec<(Manifest, String)>,
    /// The files: name and plaintext bytes.
    pub files: Vec<(String, u64)>,
}

/// Reads every segment of `id` from the locations in `survey`, checks each shard and decrypts each segment, and
/// rebuilds its manifest. Fails when a segment has fewer than k good shards, or the bytes do not decrypt with
/// this store's key as a whole file (not one of ours, damaged, or missing its last segments).
pub fn examine(store: &Store, id: &[u8; 16], survey: &OrphanSurvey) -> Result<Lost> {
    let key = store.key()?;
    let d = store.descriptor();
    let (k, m) = (d.k as usize, d.m as usize);
    let mut codec = Codec::new(k, m)?;
    let cipher = key.segment_cipher(id);
    let count = survey.segments();
    let what = || format!("lost file {}", hex::encode(id));
    let mut segments = Vec::new();
    let mut leaves = Vec::new();
    for seg in 0..count {
        let last = seg + 1 == count;
        let stripe = read_stripe(store, &mut codec, id, seg, &survey.locations)?;
        if count == 1 {
            if let Some((entries, start)) = pack_index::open(&cipher, &stripe.data)? {
                return examine_pack(store, id, &stripe, &entries, start);
            }
        }
        let Some(plain_len) = open_stripe(&cipher, seg, last, &stripe, d.segment_size, k) else {
            let why = match count {
                1 => "it is neither a file of this key nor a pack with an index (packs written before indexes \
                      cannot be told apart into files without the catalog)"
                    .to_string(),
                _ => format!("segment {seg} does not decrypt as part of a whole file of this key"),
            };
            return Err(Error::corrupt(what(), why));
        };
        leaves.extend(stripe.leaves(id, seg));
        segments.push(SegmentEntry { plain_len: plain_len as u64, shard_len: stripe.shard_len as u32 });
    }
    let size = segments.iter().map(|s| s.plain_len).sum();
    let name = format!("{LOST_FOUND_DIR}/{}", hex::encode(id));
    let meta = FileMeta::file(name.clone(), size, crate::clock::unix_ns() as i64, 0o600);
    let own =
        OwnSegments { file_id: *id, placement_start: placement_start(id, store.locations().len()), segments, leaves };
    let manifest = segments_manifest(store, own, key.name_tag(&name), &meta)?;
    Ok(Lost { id: *id, pack: false, manifests: vec![(manifest, name.clone())], files: vec![(name, size)] })
}

/// A pack's manifest rebuilt from its stripe, and each file its index names, checked by decrypting it. A file
/// whose id the catalog has (it was never lost) is left out; one whose name was taken meanwhile goes under
/// `lost+found/`.
fn examine_pack(store: &Store, id: &[u8; 16], stripe: &Stripe, entries: &[IndexEntry], start: usize) -> Result<Lost> {
    let key = store.key()?;
    let d = store.descriptor();
    let what = || format!("lost pack {}", hex::encode(id));
    let leaves = stripe.leaves(id, 0);
    let end = stripe.data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    if erasure::shard_len(end as u64, d.k as usize) != stripe.shard_len {
        return Err(Error::corrupt(what(), "its length does not match its shards"));
    }
    let body = ManifestBody {
        store_id: d.store_id,
        file_id: *id,
        name_tag: PACK_NAME_TAG,
        committed_unix_ns: entries.iter().map(|e| e.committed_unix_ns).max().unwrap_or_else(crate::clock::unix_ns),
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        placement_start: placement_start(id, store.locations().len()),
        segments: vec![SegmentEntry { plain_len: end as u64, shard_len: stripe.shard_len as u32 }],
        root: merkle::root(&leaves),
        leaves,
        meta_nonce: [0; 12],
        sealed_meta: vec![],
        data: Data::Pack,
    };
    body.validate("restored pack")?;
    let mut lost =
        Lost { id: *id, pack: true, manifests: vec![(Manifest::new(body, key), String::new())], files: vec![] };
    let known: std::collections::BTreeSet<[u8; 16]> = catalog::scan(store)?.into_iter().map(|f| f.file_id).collect();
    for e in entries.iter().filter(|e| !known.contains(&e.file_id)) {
        let (m, name) = packed_manifest(store, id, &stripe.data[..start], e)
            .map_err(|err| Error::corrupt(what(), format!("file {} of its index: {err}", hex::encode(e.file_id))))?;
        lost.files.push((name.clone(), m.body.plain_size()));
        lost.manifests.push((m, name));
    }
    Ok(lost)
}

/// The manifest of one file of a pack's index, its bytes checked, under its own name (or `lost+found/<name>`
/// when that is taken).
fn packed_manifest(store: &Store, pack: &[u8; 16], files: &[u8], e: &IndexEntry) -> Result<(Manifest, String)> {
    let key = store.key()?;
    let at = usize::try_from(e.offset).ok();
    let range = at.and_then(|a| Some(a..a.checked_add(usize::try_from(e.cipher_len).ok()?)?));
    let cipher = range.and_then(|r| files.get(r)).filter(|c| c.len() >= TAG_LEN);
    let cipher = cipher.ok_or_else(|| Error::corrupt("pack index entry", "outside the pack"))?;
    let plain_len = cipher.len() - TAG_LEN;
    if !key.segment_cipher(&e.file_id).open_segment(0, true, &mut cipher.to_vec(), plain_len) {
        return Err(Error::corrupt("packed file", "does not decrypt with this key"));
    }
    let m = Manifest::new(packed_body(store, e, pack, cipher)?, key);
    let mut meta = m.meta(key)?;
    if catalog::find(store, &meta.name).is_err() {
        return Ok((m, meta.name));
    }
    meta.name = format!("{LOST_FOUND_DIR}/{}", meta.name);
    let (sealed_meta, meta_nonce) = meta.seal(key, &e.file_id)?;
    let body = ManifestBody { name_tag: key.name_tag(&meta.name), meta_nonce, sealed_meta, ..m.body.clone() };
    body.validate("restored packed file")?;
    Ok((Manifest::new(body, key), meta.name))
}

/// Publishes what [`examine`] rebuilt in one catalog record; each file's outcome (refused when its name is
/// taken), packs left out.
pub fn restore(store: &Store, lost: &[Lost]) -> Result<Vec<Result<bool>>> {
    let mut batch = Batch::new();
    let mut is_pack = Vec::new();
    for (m, name) in lost.iter().flat_map(|l| l.manifests.iter()) {
        let name = if m.body.is_pack() { "a pack" } else { name.as_str() };
        is_pack.push(m.body.is_pack());
        batch.publish(m.clone(), name, false);
    }
    let outcomes = catalog::apply(store, batch)?;
    Ok(outcomes.into_iter().zip(is_pack).filter(|(_, p)| !p).map(|(o, _)| o).collect())
}

/// Deletes the shards of a lost file for good (the operator's decision: nothing else ever deletes them).
/// Refused when the id is not an unreferenced whole-looking shard set.
pub fn discard(store: &Store, id: &[u8; 16]) -> Result<()> {
    let _lock = store.lock_catalog()?;
    if !find(store)?.contains_key(id) {
        return Err(Error::NotFound(format!("no lost file {}", hex::encode(id))));
    }
    store.remove_shards(id);
    tracing::info!(file_id = %hex::encode(id), "discarded the shards of a lost file");
    Ok(())
}

/// One segment's k+m shard payloads (the missing ones rebuilt), all of `shard_len` bytes.
struct Stripe {
    shard_len: usize,
    /// The k data shards back to back.
    data: Vec<u8>,
    /// The m parity shards back to back.
    parity: Vec<u8>,
}

impl Stripe {
    fn leaves(&self, id: &[u8; 16], seg: u64) -> Vec<Hash> {
        let sl = self.shard_len;
        self.data
            .chunks_exact(sl)
            .chain(self.parity.chunks_exact(sl))
            .enumerate()
            .map(|(i, p)| leaf_hash(id, seg, i as u16, sl as u32, blake3::hash(p).as_bytes()))
            .collect()
    }
}

/// Reads shard `i` of `seg`: from its home first, then from the other locations holding the file. Only a shard
/// whose header names this store, file, segment, shard and layout, and whose payload matches the header, counts.
fn read_shard(store: &Store, id: &[u8; 16], seg: u64, i: usize, holders: &[usize]) -> Option<Vec<u8>> {
    let d = store.descriptor();
    let locs = store.locations();
    let home = store.home(id, seg, i);
    let order = std::iter::once(home).chain(holders.iter().copied().filter(|&h| h != home));
    let key = shard_key(id, seg, i);
    for l in order {
        let Ok(bytes) = locs[l].get(&key) else { continue };
        // No manifest to hold the leaf against: the header's own claims are checked, as verify checks them.
        let Some(h) = ShardHeader::decode(&bytes).ok().filter(|h| (h.k, h.m) == (d.k, d.m)) else { continue };
        let want = Expected {
            store_id: &d.store_id,
            file_id: id,
            segment: seg,
            shard: i as u16,
            len: h.payload_len,
            leaf: &h.leaf(),
        };
        if let Ok(payload) = shard::verify(&bytes, &want) {
            return Some(payload.to_vec());
        }
    }
    None
}

fn read_stripe(store: &Store, codec: &mut Codec, id: &[u8; 16], seg: u64, holders: &[usize]) -> Result<Stripe> {
    let (k, m) = (codec.k(), codec.m());
    let shards: Vec<Option<Vec<u8>>> = (0..k + m).map(|i| read_shard(store, id, seg, i, holders)).collect();
    // The length most good shards agree on (a stray shard of another length cannot outvote k of them).
    let mut lens: BTreeMap<usize, usize> = BTreeMap::new();
    for s in shards.iter().flatten() {
        *lens.entry(s.len()).or_default() += 1;
    }
    let short =
        || Error::corrupt(format!("lost file {}", hex::encode(id)), format!("segment {seg}: fewer than k good shards"));
    let (&sl, _) = lens.iter().filter(|(_, &n)| n >= k).max_by_key(|(_, &n)| n).ok_or_else(short)?;
    if sl == 0 || sl % 2 != 0 {
        return Err(short());
    }
    let mut data = vec![0u8; k * sl];
    let mut have = vec![false; k];
    for (i, s) in shards.iter().enumerate().take(k) {
        if let Some(p) = s.as_ref().filter(|p| p.len() == sl) {
            data[i * sl..(i + 1) * sl].copy_from_slice(p);
            have[i] = true;
        }
    }
    let parity_in = shards
        .iter()
        .enumerate()
        .skip(k)
        .filter_map(|(i, s)| s.as_ref().filter(|p| p.len() == sl).map(|p| (i - k, p.as_slice())));
    codec.reconstruct(&mut data, sl, &have, parity_in)?;
    let mut parity = Vec::new();
    codec.encode(&data, sl, &mut parity)?;
    Ok(Stripe { shard_len: sl, data, parity })
}

/// Decrypts a copy of the stripe's data as segment `seg`; returns its plaintext length when one candidate
/// length authenticates (full for segments before the last; for the last, each length whose ciphertext and tag
/// fill the k shards).
fn open_stripe(
    cipher: &crate::codec::crypto::SegmentCipher,
    seg: u64,
    last: bool,
    stripe: &Stripe,
    segment_size: u64,
    k: usize,
) -> Option<usize> {
    let sl = stripe.shard_len;
    let full = segment_size as usize;
    let candidates: Vec<usize> = if last {
        let top = (k * sl).checked_sub(TAG_LEN)?;
        let bottom = top.saturating_sub(2 * k);
        (bottom..=top.min(full)).rev().filter(|&p| erasure::shard_len((p + TAG_LEN) as u64, k) == sl).collect()
    } else {
        vec![full].into_iter().filter(|&p| erasure::shard_len((p + TAG_LEN) as u64, k) == sl).collect()
    };
    candidates.into_iter().find(|&plain_len| {
        let mut buf = stripe.data[..plain_len + TAG_LEN].to_vec();
        cipher.open_segment(seg, last, &mut buf, plain_len)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::files::commit::CommitRequest;
    use crate::files::session::{Session, SessionOptions};
    use crate::files::tests::reopen;
    use crate::location::Location;
    use crate::scrub::{Health, RunControl, ScrubOptions, ScrubReport, Selection};
    use crate::store::MIN_SEGMENT_SIZE;
    use crate::testing::{mem_store, test_bytes};

    const SEG: usize = MIN_SEGMENT_SIZE as usize;

    /// A repairing whole-store scrub that would delete every orphan it may (no grace period).
    fn eager_scrub(store: &Store) -> ScrubReport {
        let opts = ScrubOptions { repair: true, orphan_grace: std::time::Duration::ZERO, ..Default::default() };
        let ctl = RunControl { max_duration: None, total: None, progress: &|_| {} };
        crate::scrub::run(store, &opts, Selection::All, &ctl).unwrap().0
    }

    #[test]
    fn files_whose_catalog_entry_is_lost_are_reported_kept_and_restored_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ms = mem_store(dir.path(), 4, 2, 6, MIN_SEGMENT_SIZE).unwrap();
        // A short last segment, a full last segment, and a file of a few bytes (all in segments of their own).
        let files = [test_bytes(3 * SEG + 1000, 1), test_bytes(2 * SEG, 2), test_bytes(5, 3)];
        let mut s = Session::new(&ms.store, SessionOptions { pack_threshold: 0, ..Default::default() }).unwrap();
        for (i, f) in files.iter().enumerate() {
            let req = CommitRequest { name: format!("f{i}"), size: Some(f.len() as u64), ..Default::default() };
            s.commit(&mut Cursor::new(f), &req, &|_| {}).unwrap();
        }
        s.flush().unwrap().into_iter().for_each(|r| drop(r.unwrap()));
        // Every copy of the catalog is lost; two shards of one segment are too.
        for l in &ms.mem {
            l.delete_prefix("catalog").unwrap();
        }
        let store = reopen(dir.path(), &ms.store);
        assert!(catalog::scan(&store).unwrap().is_empty());
        let r = eager_scrub(&store);
        assert_eq!(r.orphans.len(), 3, "{r:#?}");
        assert!(r.orphans.iter().all(|o| o.kind == OrphanKind::Unreferenced && !o.deleted), "{r:#?}");
        assert_eq!((r.health(), r.health_after()), (Health::Lost, Health::Lost));
        let big = find(&store).unwrap().into_iter().find(|(_, s)| s.segments() == 4).map(|(id, _)| id);
        let big = big.expect("the four-segment file");
        for i in [0, 5] {
            let home = store.home(&big, 1, i);
            ms.mem[home].delete(&shard_key(&big, 1, i)).unwrap();
        }

        let found = find(&store).unwrap();
        assert_eq!(found.len(), 3);
        let lost: Vec<Lost> = found.iter().map(|(id, s)| examine(&store, id, s).unwrap()).collect();
        assert!(restore(&store, &lost).unwrap().into_iter().all(|r| r.is_ok()));
        let store = reopen(dir.path(), &ms.store);
        for (name, size) in lost.iter().flat_map(|l| l.files.iter()) {
            let back = crate::tests::get(&store, name).unwrap();
            assert!(files.contains(&back), "{name} came back different");
            assert_eq!(back.len() as u64, *size);
        }
        let r = eager_scrub(&store);
        assert!(r.orphans.is_empty(), "{r:#?}");
        assert_eq!(r.health_after(), Health::Healthy, "{r:#?}");
    }

    #[test]
    fn a_lost_pack_gives_back_its_files_under_their_names_from_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let ms = mem_store(dir.path(), 4, 2, 6, 4 * MIN_SEGMENT_SIZE).unwrap();
        let files: Vec<(String, Vec<u8>)> =
            (0..40).map(|i| (format!("s/{i}"), test_bytes(i * 97 % 3000, i as u64))).collect();
        let mut s = Session::new(&ms.store, SessionOptions::default()).unwrap();
        for (name, bytes) in &files {
            let req =
                CommitRequest { name: name.clone(), mode: 0o640, size: Some(bytes.len() as u64), ..Default::default() };
            s.commit(&mut Cursor::new(bytes), &req, &|_| {}).unwrap();
        }
        s.flush().unwrap().into_iter().for_each(|r| drop(r.unwrap()));
        for l in &ms.mem {
            l.delete_prefix("catalog").unwrap();
        }
        let store = reopen(dir.path(), &ms.store);
        // A new file takes one of the lost names meanwhile.
        let mut s = Session::new(&store, SessionOptions::default()).unwrap();
        let req = CommitRequest { name: "s/3".into(), ..Default::default() };
        s.commit(&mut Cursor::new(b"newer"), &req, &|_| {}).unwrap();
        s.flush().unwrap().into_iter().for_each(|r| drop(r.unwrap()));
        let r = eager_scrub(&store);
        assert_eq!(r.health_after(), Health::Lost, "{r:#?}");
        let found = find(&store).unwrap();
        assert!(!found.is_empty());
        let lost: Vec<Lost> = found.iter().map(|(id, s)| examine(&store, id, s).unwrap()).collect();
        assert!(lost.iter().all(|l| l.pack));
        assert_eq!(lost.iter().map(|l| l.files.len()).sum::<usize>(), files.len());
        assert!(restore(&store, &lost).unwrap().into_iter().all(|r| r.is_ok()));
        let store = reopen(dir.path(), &ms.store);
        for (name, bytes) in &files {
            let shown = if name == "s/3" { format!("{LOST_FOUND_DIR}/{name}") } else { name.clone() };
            assert_eq!(&crate::tests::get(&store, &shown).unwrap(), bytes, "{shown}");
            let e = catalog::find(&store, &shown).unwrap();
            assert_eq!(e.meta.unwrap().mode, 0o640, "{shown}: its metadata came back");
        }
        assert_eq!(crate::tests::get(&store, "s/3").unwrap(), b"newer");
        let r = eager_scrub(&store);
        assert!(r.orphans.is_empty() && r.health_after() == Health::Healthy, "{r:#?}");
    }

    #[test]
    fn a_lost_file_is_deleted_only_when_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let ms = mem_store(dir.path(), 2, 1, 3, MIN_SEGMENT_SIZE).unwrap();
        let mut s = Session::new(&ms.store, SessionOptions { pack_threshold: 0, ..Default::default() }).unwrap();
        let req = CommitRequest { name: "f".into(), ..Default::default() };
        s.commit(&mut Cursor::new(test_bytes(SEG + 3, 4)), &req, &|_| {}).unwrap();
        s.flush().unwrap().into_iter().for_each(|r| drop(r.unwrap()));
        assert!(discard(&ms.store, &[9; 16]).is_err(), "nothing of that id");
        for l in &ms.mem {
            l.delete_prefix("catalog").unwrap();
        }
        let store = reopen(dir.path(), &ms.store);
        let id = *find(&store).unwrap().keys().next().unwrap();
        assert_eq!(eager_scrub(&store).orphans.len(), 1);
        assert_eq!(find(&store).unwrap().len(), 1, "scrub --repair kept it");
        discard(&store, &id).unwrap();
        assert!(find(&store).unwrap().is_empty());
        assert_eq!(eager_scrub(&store).health_after(), Health::Healthy);
    }
}
