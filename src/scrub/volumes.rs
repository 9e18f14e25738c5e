//! Scrub of block volumes: keyless verification (and repair) of superblock copies, map pages and every shard
//! of every allocated stripe, walking the volume's hash tree (superblock → page hashes → stripe leaves).
//!
//! Repair needs the volume's lock file (no server may be writing it); while a server holds it the volume is
//! only verified, and a shard found missing is re-checked against a freshly loaded superblock (the server may
//! have rewritten the stripe and recycled the old shards in the meantime) before it is reported.

use serde::Serialize;

use super::repair::{rewrite_copies, write_rebuilt};
use super::{classify, Counts, Health, ShardIssue};
use crate::codec::erasure::Codec;
use crate::codec::merkle::{leaf_hash, Hash};
use crate::error::{Error, Result};
use crate::format::shard::{ShardHeader, HEADER_LEN};
use crate::format::volume::{page_key, stripe_shard_key, superblock_key, MapPage, SuperBody, Superblock};
use crate::location::LocationExt;
use crate::store::Store;
use crate::stripe::{fetch_shard, HomeRule, StripeAddr};
use crate::volume::cow::{load_superblock, scan_ids};
use crate::volume::try_lock_volume;

/// Result of scrubbing one volume.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VolumeReport {
    /// Volume id (hex).
    pub id: String,
    /// Name when the key is loaded, else `id:<hex>`.
    pub label: String,
    /// Committed generation that was checked.
    pub generation: u64,
    /// Whether repair was possible (the volume was not in use).
    pub exclusive: bool,
    /// Allocated stripes checked.
    pub stripes: u64,
    /// Shard tallies.
    pub shards: Counts,
    /// Stripes with exactly k good shards.
    pub stripes_at_risk: Vec<u64>,
    /// Stripes with fewer than k good shards.
    pub stripes_lost: Vec<u64>,
    /// Bad shards rewritten.
    pub shards_repaired: u64,
    /// Superblock copies missing, corrupt or outdated (and how many were rewritten).
    pub superblocks_bad: u64,
    /// Superblock copies rewritten.
    pub superblocks_repaired: u64,
    /// Map page copies missing or corrupt.
    pub pages_bad: u64,
    /// Map page copies rewritten.
    pub pages_repaired: u64,
    /// Every bad shard.
    pub issues: Vec<ShardIssue>,
    /// What could not be checked or repaired.
    pub errors: Vec<String>,
    /// Shard bytes verified.
    pub bytes_verified: u64,
    /// Data bytes one full stripe holds (0 when the volume's layout could not be read).
    pub stripe_bytes: u64,
}

impl VolumeReport {
    /// Health before repair.
    pub fn health(&self) -> Health {
        if !self.stripes_lost.is_empty() || self.errors.iter().any(|e| e.contains("no valid")) {
            Health::Lost
        } else if self.shards.bad() > 0 || self.superblocks_bad > 0 || self.pages_bad > 0 || !self.errors.is_empty() {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }
}

impl VolumeReport {
    /// Data bytes still without full redundancy after this run's repairs (at most: a stripe may be partly
    /// full).
    pub fn bytes_at_risk_after(&self) -> u64 {
        match self.health_after() {
            Health::Healthy => 0,
            _ => self.stripes_at_risk.len() as u64 * self.stripe_bytes,
        }
    }

    /// Data bytes in stripes beyond repair (at most: a stripe may be partly full).
    pub fn bytes_lost(&self) -> u64 {
        self.stripes_lost.len() as u64 * self.stripe_bytes
    }

    /// Health after this run's repairs.
    pub fn health_after(&self) -> Health {
        if !self.stripes_lost.is_empty() || self.errors.iter().any(|e| e.contains("no valid")) {
            Health::Lost
        } else if self.shards.bad() == self.shards_repaired
            && self.superblocks_bad == self.superblocks_repaired
            && self.pages_bad == self.pages_repaired
            && self.errors.is_empty()
        {
            Health::Healthy
        } else {
            Health::Degraded
        }
    }
}

/// Scrubs every volume of the store.
pub fn scrub_volumes(store: &Store, repair: bool) -> Vec<VolumeReport> {
    let logs =
        crate::volume::log_ids(store).into_iter().map(|id| super::log_volumes::scrub_log_volume(store, &id, repair));
    let cows = scan_ids(store).into_iter().map(|id| scrub_volume(store, &id, repair));
    logs.chain(cows).collect()
}

/// Scrubs one copy-on-write volume.
pub fn scrub_volume(store: &Store, id: &[u8; 16], repair: bool) -> VolumeReport {
    let mut r = VolumeReport { id: hex::encode(id), label: format!("id:{}", hex::encode(id)), ..Default::default() };
    let lock = try_lock_volume(store, id).ok();
    r.exclusive = lock.is_some();
    let repair = repair && r.exclusive;
    let sb = match load_superblock(store, id) {
        Ok(sb) => sb,
        Err(e) => {
            r.errors.push(format!("no valid superblock: {e}"));
            return r;
        }
    };
    if let Some(k) = store.key_opt() {
        if let Ok(meta) = sb.meta(k) {
            r.label = meta.name;
        }
    }
    let span = tracing::info_span!("scrub_volume", volume = %r.label);
    let _enter = span.enter();
    r.generation = sb.body.generation;
    r.stripe_bytes = sb.body.stripe_size as u64;
    check_superblocks(store, &sb.body, repair, &mut r);
    let mut codec = match Codec::new(sb.body.k as usize, sb.body.m as usize) {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    for (p, pref) in sb.body.pages.iter().enumerate() {
        if pref.gen == 0 {
            continue;
        }
        let Some(page) = check_page(store, &sb.body, p as u32, repair, &mut r) else { continue };
        for (idx, e) in page.entries.iter().enumerate() {
            if e.gen == 0 {
                continue;
            }
            let stripe = p as u64 * sb.body.entries_per_page as u64 + idx as u64;
            r.stripes += 1;
            check_stripe(store, &sb.body, stripe, e.gen, &e.leaves, repair, &mut codec, &mut r);
        }
    }
    drop(lock);
    r
}

/// Every location should hold the newest superblock; rewrite stale, missing or corrupt copies (the bytes are
/// MACed, so copying them needs no key).
fn check_superblocks(store: &Store, body: &SuperBody, repair: bool, r: &mut VolumeReport) {
    let key = superblock_key(&body.vol_id);
    let mut best: Option<Vec<u8>> = None;
    let mut bad = Vec::new();
    for (i, loc) in store.locations().iter().enumerate() {
        let what = format!("superblock on {}", loc.name());
        match loc.get(&key).and_then(|b| Superblock::decode(&b, store.key_opt(), &what).map(|s| (s, b))) {
            Ok((s, b)) if s.body.generation == body.generation => {
                best.get_or_insert(b);
            }
            _ => bad.push(i),
        }
    }
    r.superblocks_bad = bad.len() as u64;
    rewrite_copies(store, &key, best.as_deref(), &bad, repair, &mut r.superblocks_repaired);
}

/// Loads a map page from any good copy (its hash is in the superblock), counting and repairing bad copies.
fn check_page(store: &Store, sb: &SuperBody, page: u32, repair: bool, r: &mut VolumeReport) -> Option<MapPage> {
    let pref = sb.pages[page as usize];
    let key = page_key(&sb.vol_id, page, pref.gen);
    let mut good: Option<(MapPage, Vec<u8>)> = None;
    let mut bad = Vec::new();
    for (i, loc) in store.locations().iter().enumerate() {
        let what = format!("map page {key} on {}", loc.name());
        match loc.get(&key).and_then(|b| MapPage::decode(&b, &pref, sb, page, &what).map(|p| (p, b))) {
            Ok(x) => {
                good.get_or_insert(x);
            }
            Err(_) => bad.push(i),
        }
    }
    // Pages are replicated to every location, at least m+1 of them when written.
    r.pages_bad += bad.len() as u64;
    let Some((page_v, bytes)) = good else {
        r.errors.push(format!("no valid copy of map page {page}"));
        return None;
    };
    rewrite_copies(store, &key, Some(&bytes), &bad, repair, &mut r.pages_repaired);
    Some(page_v)
}

#[allow(clippy::too_many_arguments)]
fn check_stripe(
    store: &Store,
    sb: &SuperBody,
    stripe: u64,
    gen: u64,
    leaves: &[Hash],
    repair: bool,
    codec: &mut Codec,
    r: &mut VolumeReport,
) {
    let (k, m) = (sb.k as usize, sb.m as usize);
    let sl = sb.shard_len();
    let id = sb.vol_id;
    let key_of = move |i: usize| stripe_shard_key(&id, stripe, gen, i);
    let addr = StripeAddr {
        file_id: &id,
        segment: stripe,
        rule: HomeRule::CowVolume,
        shard_len: sl,
        key_of: &key_of,
        deferred: false,
    };
    let mut shards = vec![0u8; (k + m) * sl];
    let mut have = vec![false; k + m];
    let mut issues = Vec::new();
    let mut io = Vec::new();
    for (i, slot) in have.iter_mut().enumerate() {
        match fetch_shard(store, &addr, i, &leaves[i], &mut io) {
            (Ok((range, _)), _) => {
                shards[i * sl..(i + 1) * sl].copy_from_slice(&io[range]);
                *slot = true;
                r.bytes_verified += (sl + HEADER_LEN) as u64;
            }
            (Err(p), home) => issues.push(ShardIssue {
                segment: stripe,
                shard: i as u16,
                location: home,
                status: classify(&p),
                detail: p.to_string(),
                repaired_to: None,
            }),
        }
    }
    if !issues.is_empty() && !r.exclusive {
        // A served volume may have moved on: only report what the current superblock still references.
        match load_superblock(store, &id) {
            Ok(now) if now.body.generation != sb.generation => return,
            _ => {}
        }
    }
    let good = have.iter().filter(|h| **h).count();
    r.shards.ok += good as u64;
    for issue in &issues {
        r.shards.add_status(issue.status);
    }
    if good < k {
        r.stripes_lost.push(stripe);
    } else if good == k && good < k + m {
        r.stripes_at_risk.push(stripe);
    }
    if repair && !issues.is_empty() && good >= k {
        match rebuild(codec, &mut shards, &have, sl, k, m, &id, stripe, leaves) {
            Ok(()) => {
                for issue in issues.iter_mut() {
                    let i = issue.shard as usize;
                    let payload = &shards[i * sl..(i + 1) * sl];
                    let header =
                        ShardHeader::for_payload(sb.store_id, sb.vol_id, stripe, i as u16, (sb.k, sb.m), payload);
                    let targets = volume_repair_targets(store, &addr, i, k + m);
                    match write_rebuilt(store, &(addr.key_of)(i), &header, payload, &leaves[i], &targets) {
                        Ok(loc) => {
                            issue.repaired_to = Some(loc);
                            r.shards_repaired += 1;
                        }
                        Err(e) => r.errors.push(format!("stripe {stripe} shard {i}: {e}")),
                    }
                }
            }
            Err(e) => r.errors.push(format!("stripe {stripe}: {e}")),
        }
    }
    r.issues.extend(issues);
}

/// Where a rebuilt shard `i` of a volume stripe may go: its home, else a location that is home to none of the
/// stripe's shards (none when the stripe spans every location). Never beside another shard of the stripe: two
/// shards on one location would silently lower the tolerance below m lost locations; a shard that cannot go
/// home stays missing (reported) until a later repair finds home writable.
fn volume_repair_targets(store: &Store, addr: &StripeAddr<'_>, i: usize, width: usize) -> Vec<usize> {
    let n = store.locations().len();
    let home = addr.home(store, i);
    let taken: std::collections::BTreeSet<usize> = (0..width).map(|j| addr.home(store, j)).collect();
    (0..n).map(|j| (home + j) % n).filter(|&t| t == home || !taken.contains(&t)).collect()
}

/// Rebuilds missing data shards, regenerates parity, and checks every shard against its leaf.
#[allow(clippy::too_many_arguments)]
fn rebuild(
    codec: &mut Codec,
    shards: &mut [u8],
    have: &[bool],
    sl: usize,
    k: usize,
    m: usize,
    id: &[u8; 16],
    stripe: u64,
    leaves: &[Hash],
) -> Result<()> {
    let (data, parity) = shards.split_at_mut(k * sl);
    codec.reconstruct(
        data,
        sl,
        &have[..k],
        (0..m).filter(|j| have[k + j]).map(|j| (j, &parity[j * sl..(j + 1) * sl])),
    )?;
    codec.encode_with(data, sl, |fresh| {
        for (j, p) in fresh.iter().enumerate() {
            parity[j * sl..(j + 1) * sl].copy_from_slice(p);
        }
    })?;
    for (i, leaf) in leaves.iter().enumerate() {
        let payload = &shards[i * sl..(i + 1) * sl];
        if leaf_hash(id, stripe, i as u16, sl as u32, blake3::hash(payload).as_bytes()) != *leaf {
            return Err(Error::corrupt(
                format!("stripe {stripe} shard {i}"),
                "rebuilt shard does not match its leaf; nothing written",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{InitOptions, KeySource, MIN_SEGMENT_SIZE};
    use crate::volume::{self, Volume, VolumeOptions};

    const SS: u32 = 64 << 10;

    fn files(dir: &std::path::Path, pred: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = crate::tests::all_files(dir)
            .into_iter()
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keyless_scrub_finds_and_repairs_volume_damage() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let st = Store::init(
            &dir,
            InitOptions {
                k: 4,
                m: 2,
                segment_size: MIN_SEGMENT_SIZE,
                locations: vec![],
                zones: vec![],
                key: KeySource::NewKeyFile(dir.join("master.key")),
            },
        )
        .unwrap();
        let st = Arc::new(st);
        volume::cow::create(&st, "v", 16 * SS as u64, SS).unwrap();
        let data: Vec<u8> = (0..6 * SS as usize).map(|i| (i * 13 % 251) as u8).collect();
        {
            let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
            v.write(0, &data, true).unwrap();
        }
        // A keyless store handle, as an untrusted scrub node would have.
        let keyless = Store::open(&dir).unwrap();
        let clean = scrub_volume(&keyless, &scrub_ids(&keyless), false);
        assert_eq!(clean.health(), Health::Healthy, "{clean:?}");
        assert_eq!(clean.stripes, 6);
        assert_eq!(clean.shards.ok, 36);
        // Damage: delete every shard on location 1, flip a byte in every shard on location 3 (2 per stripe = m),
        // remove one superblock copy and garble one map page copy.
        let loc = |i: usize| dir.join(format!("locations/loc-{i:02}/volumes"));
        for f in files(&loc(1), |n| n.contains('-') && n.contains('.')) {
            std::fs::remove_file(f).unwrap();
        }
        for f in files(&loc(3), |n| n.contains('-') && n.contains('.')) {
            let mut b = std::fs::read(&f).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            std::fs::write(&f, b).unwrap();
        }
        std::fs::remove_file(files(&loc(0), |n| n == "superblock")[0].clone()).unwrap();
        let page = files(&loc(5), |n| !n.contains('.') && n.contains('-'))[0].clone();
        std::fs::write(&page, b"garbage").unwrap();
        let before = scrub_volume(&keyless, &scrub_ids(&keyless), false);
        assert_eq!(before.shards.bad(), 12, "{before:?}");
        assert_eq!(before.stripes_at_risk.len(), 6);
        assert!(before.stripes_lost.is_empty());
        assert_eq!((before.superblocks_bad, before.pages_bad), (1, 1));
        assert_eq!(before.health(), Health::Degraded);
        let fixed = scrub_volume(&keyless, &scrub_ids(&keyless), true);
        assert_eq!(fixed.shards_repaired, 12, "{:?}", fixed.errors);
        assert_eq!((fixed.superblocks_repaired, fixed.pages_repaired), (1, 1));
        let after = scrub_volume(&keyless, &scrub_ids(&keyless), false);
        assert_eq!(after.health(), Health::Healthy, "{after:?}");
        let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read(0, &mut back).unwrap();
        assert_eq!(back, data);
        // While the volume is open elsewhere, scrub only verifies.
        let busy = scrub_volume(&keyless, &scrub_ids(&keyless), true);
        assert!(!busy.exclusive);
        drop(v);
        // A third bad shard in a stripe: reported lost, nothing written over the survivors.
        for f in files(&loc(2), |n| n.starts_with("0000000000-")) {
            std::fs::remove_file(f).unwrap();
        }
        for f in files(&loc(1), |n| n.starts_with("0000000000-"))
            .into_iter()
            .chain(files(&loc(3), |n| n.starts_with("0000000000-")))
        {
            std::fs::remove_file(f).unwrap();
        }
        let lost = scrub_volume(&keyless, &scrub_ids(&keyless), true);
        assert_eq!(lost.stripes_lost, vec![0]);
        assert_eq!(lost.health(), Health::Lost);
        assert_eq!(lost.shards_repaired, 0);
    }

    #[test]
    fn a_volume_shard_whose_home_cannot_be_written_is_never_put_beside_another_of_its_stripe() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let opts = InitOptions {
            k: 2,
            m: 1,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(dir.join("master.key")),
        };
        let st = Arc::new(Store::init(&dir, opts).unwrap());
        volume::cow::create(&st, "v", 16 * SS as u64, SS).unwrap();
        let data: Vec<u8> = (0..3 * SS as usize).map(|i| (i * 7 % 253) as u8).collect();
        Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap().write(0, &data, true).unwrap();
        let keyless = Store::open(&dir).unwrap();
        let id = scrub_ids(&keyless);
        // Location 1 loses the volume's shards and cannot take new ones (a file where its folder was).
        let vol = |i: usize| dir.join(format!("locations/loc-{i:02}/volumes/{}", hex::encode(id)));
        let shards_on = |i: usize| files(&vol(i), |n| n.contains('-') && n.contains('.'));
        let lost = shards_on(1).len();
        assert!(lost > 0);
        let keep = d.path().join("loc1-volume");
        std::fs::rename(vol(1), &keep).unwrap();
        std::fs::write(vol(1), b"not a folder").unwrap();
        let r = scrub_volume(&keyless, &id, true);
        assert_eq!(r.shards_repaired, 0, "nowhere to go but beside another shard of its stripe: {r:?}");
        for i in [0, 2] {
            let mut stripes: Vec<String> = shards_on(i)
                .iter()
                .filter_map(|p| p.file_name()?.to_str()?.split('-').next().map(str::to_string))
                .collect();
            let all = stripes.len();
            stripes.dedup();
            assert_eq!(stripes.len(), all, "location {i} holds two shards of one stripe");
        }
        assert_eq!(scrub_volume(&keyless, &id, false).health(), Health::Degraded);
        // Home is back: the repair puts them there, and the volume is whole.
        std::fs::remove_file(vol(1)).unwrap();
        std::fs::rename(&keep, vol(1)).unwrap();
        shards_on(1).into_iter().for_each(|f| std::fs::remove_file(f).unwrap());
        let fixed = scrub_volume(&keyless, &id, true);
        assert_eq!(fixed.shards_repaired as usize, lost, "{fixed:?}");
        assert_eq!(scrub_volume(&keyless, &id, false).health(), Health::Healthy);
        let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read(0, &mut back).unwrap();
        assert_eq!(back, data);
    }

    fn scrub_ids(st: &Store) -> [u8; 16] {
        scan_ids(st)[0]
    }
}
