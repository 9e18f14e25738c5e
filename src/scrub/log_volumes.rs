//! Scrubbing a log-structured volume without the key: checkpoint copies (the newest generation on every
//! location), map page copies (against the hashes in the checkpoint), and every shard of every stripe the
//! checkpoint lists or a replay would read (header, payload hash, and data part against the hashes in the
//! stripe's record). With repair, and when the volume is not in use, bad shards are rebuilt from k good ones,
//! parity re-encoded, and written back to their home location with the stripe's record, then read back.

use crate::codec::erasure::Codec;
use crate::error::Error;
use crate::format::log::*;
use crate::format::shard::{ShardHeader, HEADER_LEN};
use crate::location::LocationExt;
use crate::log::{complete_parts, list_stripes, load_checkpoint, Layout};
use crate::store::Store;

use super::repair::rewrite_copies;
use super::report::{ShardIssue, ShardStatus};
use super::volumes::VolumeReport;
use crate::volume::try_lock_volume;

/// Scrubs one log volume.
pub fn scrub_log_volume(store: &Store, id: &[u8; 16], repair: bool) -> VolumeReport {
    let mut r = VolumeReport { id: hex::encode(id), label: format!("id:{}", hex::encode(id)), ..Default::default() };
    let lock = try_lock_volume(store, id).ok();
    r.exclusive = lock.is_some();
    let repair = repair && r.exclusive;
    let ckpt = match load_checkpoint(store, id) {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(format!("no valid checkpoint: {e}"));
            return r;
        }
    };
    if let Some(name) = label(store, &ckpt) {
        r.label = name;
    }
    let span = tracing::info_span!("scrub_volume", volume = %r.label);
    let _enter = span.enter();
    r.generation = ckpt.generation;
    r.stripe_bytes = ckpt.stripe_blocks as u64 * crate::format::log::BLOCK as u64;
    check_checkpoints(store, &ckpt, repair, &mut r);
    for (page, pref) in ckpt.pages.iter().enumerate() {
        if pref.gen != 0 {
            check_page(store, &ckpt, page as u32, repair, &mut r);
        }
    }
    let layout = Layout { vol_id: *id, k: ckpt.k, m: ckpt.m };
    let mut codec = match Codec::new(ckpt.k as usize, ckpt.m as usize) {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    let mut seqs: Vec<u64> = ckpt.stripes.iter().map(|s| s.seq).collect();
    seqs.extend(list_stripes(store, &layout, ckpt.seq).into_keys());
    for seq in seqs {
        r.stripes += 1;
        check_stripe(store, &layout, seq, repair, &mut codec, &mut r);
    }
    drop(lock);
    r
}

fn label(store: &Store, c: &CheckpointBody) -> Option<String> {
    let key = store.key_opt()?;
    crate::format::volume::VolumeMeta::open(key, &c.vol_id, &c.meta_nonce, &c.sealed_meta).ok().map(|m| m.name)
}

/// Every location should hold the newest checkpoint; rewrites stale, missing or corrupt copies (the bytes are
/// MACed, so copying them needs no key).
fn check_checkpoints(store: &Store, ckpt: &CheckpointBody, repair: bool, r: &mut VolumeReport) {
    let key = checkpoint_key(&ckpt.vol_id);
    let mut best: Option<Vec<u8>> = None;
    let mut bad = Vec::new();
    for (i, loc) in store.locations().iter().enumerate() {
        let what = format!("checkpoint on {}", loc.name());
        match loc.get(&key).and_then(|b| decode_checkpoint(&b, store.key_opt(), &what).map(|c| (c, b))) {
            Ok((c, b)) if c.generation == ckpt.generation => {
                best.get_or_insert(b);
            }
            _ => bad.push(i),
        }
    }
    r.superblocks_bad = bad.len() as u64;
    rewrite_copies(store, &key, best.as_deref(), &bad, repair, &mut r.superblocks_repaired);
}

/// Counts and repairs the copies of one map page.
fn check_page(store: &Store, ckpt: &CheckpointBody, page: u32, repair: bool, r: &mut VolumeReport) {
    let pref = ckpt.pages[page as usize];
    let key = log_page_key(&ckpt.vol_id, page, pref.gen);
    let mut good: Option<Vec<u8>> = None;
    let mut bad = Vec::new();
    for (i, loc) in store.locations().iter().enumerate() {
        let what = format!("map page {page} on {}", loc.name());
        let ok = loc
            .get(&key)
            .and_then(|b| LogMapPage::decode(&b, &pref, &ckpt.vol_id, page, ckpt.entries_per_page, &what).map(|_| b));
        match ok {
            Ok(b) => {
                good.get_or_insert(b);
            }
            Err(_) => bad.push(i),
        }
    }
    r.pages_bad += bad.len() as u64;
    if good.is_none() {
        r.errors.push(format!("no valid copy of map page {page}"));
    }
    rewrite_copies(store, &key, good.as_deref(), &bad, repair, &mut r.pages_repaired);
}

/// One shard as found: its data part and record bytes when its header and payload hash check out.
type Found = std::result::Result<(Vec<u8>, Vec<u8>), (ShardStatus, String)>;

fn fetch(store: &Store, layout: &Layout, seq: u64, i: usize) -> Found {
    let key = stripe_key(&layout.vol_id, seq, i);
    let bytes = match layout.on_holders(store, seq, i, |loc| loc.get(&key)) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Err((ShardStatus::Missing, "missing".into())),
        Err(e) => return Err((ShardStatus::Corrupt, e.to_string())),
    };
    let corrupt = |d: &str| Err((ShardStatus::Corrupt, d.to_string()));
    let Ok(header) = ShardHeader::decode(&bytes) else { return corrupt("bad shard header") };
    if header.file_id != layout.vol_id || header.segment != seq || header.shard as usize != i {
        return Err((ShardStatus::Misplaced, "header names another shard".into()));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != header.payload_len as usize || header.payload_hash != *blake3::hash(payload).as_bytes() {
        return corrupt("payload hash mismatch");
    }
    match split_shard_payload(payload, "log shard") {
        Ok((data, rec)) => Ok((data.to_vec(), rec.to_vec())),
        Err(_) => corrupt("no record"),
    }
}

/// Checks (and repairs) every shard of one log stripe.
fn check_stripe(store: &Store, layout: &Layout, seq: u64, repair: bool, codec: &mut Codec, r: &mut VolumeReport) {
    let (k, m) = (layout.k as usize, layout.m as usize);
    let found: Vec<Found> = (0..k + m).map(|i| fetch(store, layout, seq, i)).collect();
    let record = found.iter().flatten().find_map(|(_, rec)| {
        decode_record(rec, store.key_opt(), "log record").ok().filter(|b| b.seq == seq).map(|b| (b, rec.clone()))
    });
    let Some((rec, rec_bytes)) = record else {
        r.stripes_lost.push(seq);
        r.errors.push(format!("log stripe {seq}: no shard with a valid record"));
        return;
    };
    let mut parts: Vec<Option<Vec<u8>>> = vec![None; k + m];
    let mut issues = Vec::new();
    for (i, f) in found.into_iter().enumerate() {
        let checked = f.and_then(|(data, _)| {
            if rec.shard_hashes[i] == *blake3::hash(&data).as_bytes() {
                Ok(data)
            } else {
                Err((ShardStatus::Corrupt, "data differs from the record".into()))
            }
        });
        match checked {
            Ok(data) => {
                r.bytes_verified += (HEADER_LEN + data.len()) as u64;
                parts[i] = Some(data);
            }
            Err((status, detail)) => issues.push(ShardIssue {
                segment: seq,
                shard: i as u16,
                location: layout.home(store, seq, i),
                status,
                detail,
                repaired_to: None,
            }),
        }
    }
    let good = parts.iter().filter(|p| p.is_some()).count();
    r.shards.ok += good as u64;
    for issue in &issues {
        r.shards.add_status(issue.status);
    }
    if good < k {
        r.stripes_lost.push(seq);
    } else if good == k && good < k + m {
        r.stripes_at_risk.push(seq);
    }
    if repair && !issues.is_empty() && good >= k {
        match complete_parts(codec, &rec, &mut parts) {
            Ok(()) => repair_shards(store, layout, &rec, &rec_bytes, &parts, &mut issues, r),
            Err(e) => r.errors.push(format!("log stripe {seq}: {e}")),
        }
    }
    r.issues.extend(issues);
}

fn repair_shards(
    store: &Store,
    layout: &Layout,
    rec: &RecordBody,
    rec_bytes: &[u8],
    parts: &[Option<Vec<u8>>],
    issues: &mut [ShardIssue],
    r: &mut VolumeReport,
) {
    for issue in issues.iter_mut() {
        let i = issue.shard as usize;
        let Some(data) = &parts[i] else { continue };
        let written = crate::log::put_shard(store, layout, rec.seq, i, data, rec_bytes).and_then(|()| {
            match fetch(store, layout, rec.seq, i) {
                Ok((back, _)) if back == *data => Ok(()),
                _ => Err(Error::corrupt(format!("log stripe {} shard {i}", rec.seq), "read back wrong")),
            }
        });
        match written {
            Ok(()) => {
                issue.repaired_to = Some(issue.location);
                r.shards_repaired += 1;
            }
            Err(e) => r.errors.push(format!("log stripe {} shard {i}: {e}", rec.seq)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scrub::report::Health;
    use crate::store::{InitOptions, KeySource, MIN_SEGMENT_SIZE};
    use crate::testing::test_bytes;
    use crate::volume::{self, Volume, VolumeOptions};

    fn log_files(dir: &std::path::Path, part: &str) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> =
            crate::tests::all_files(dir).into_iter().filter(|p| p.to_string_lossy().contains(part)).collect();
        v.sort();
        v
    }

    #[test]
    fn keyless_scrub_finds_and_repairs_log_volume_damage() {
        let d = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            k: 3,
            m: 2,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(d.path().join("store/master.key")),
        };
        let st = Arc::new(Store::init(&d.path().join("store"), opts).unwrap());
        volume::create(&st, "v", 8 << 20, 256 << 10).unwrap();
        let data = test_bytes(3 << 20, 5);
        {
            let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
            v.write(4096, &data, false).unwrap();
            v.flush().unwrap();
        }
        let locs = d.path().join("store/locations");
        let shards0 = log_files(&locs.join("loc-00"), "/log/");
        let shards1 = log_files(&locs.join("loc-01"), "/log/");
        assert!(!shards0.is_empty() && !shards1.is_empty());
        for f in &shards0 {
            std::fs::remove_file(f).unwrap();
        }
        let mut b = std::fs::read(&shards1[0]).unwrap();
        b[HEADER_LEN + 100] ^= 0x20;
        std::fs::write(&shards1[0], &b).unwrap();
        std::fs::remove_file(&log_files(&locs.join("loc-02"), "checkpoint")[0]).unwrap();
        let page = log_files(&locs.join("loc-03"), "/map/");
        assert!(!page.is_empty());
        std::fs::remove_file(&page[0]).unwrap();

        let keyless = Store::open(&d.path().join("store")).unwrap();
        let id = volume::log_ids(&keyless)[0];
        let r = scrub_log_volume(&keyless, &id, false);
        assert_eq!(r.shards.missing, shards0.len() as u64, "{r:?}");
        assert_eq!(r.shards.corrupt, 1, "{r:?}");
        assert_eq!((r.superblocks_bad, r.pages_bad), (1, 1), "{r:?}");
        assert_eq!(r.health(), Health::Degraded);
        // A whole-store run records the volume's result, for `bf status` and the metrics.
        let whole = |repair: bool| {
            let opts = crate::scrub::ScrubOptions { repair, ..Default::default() };
            let ctl = crate::scrub::RunControl { max_duration: None, total: None, progress: &|_| {} };
            crate::scrub::run(&keyless, &opts, crate::scrub::Selection::All, &ctl).unwrap();
            crate::scrub::state::ScrubState::load(keyless.dir(), &keyless.descriptor().store_id).unwrap().unwrap()
        };
        let rec = whole(false);
        let last = rec.last.as_ref().unwrap();
        assert_eq!((last.volumes, last.shards_bad), (1, shards0.len() as u64 + 1), "{last:?}");
        assert_eq!(rec.volumes[&hex::encode(id)].health, Health::Degraded, "{rec:?}");
        assert_eq!(rec.at_risk().1, 1, "the degraded volume counts among the unhealthy");
        let r = scrub_log_volume(&keyless, &id, true);
        assert_eq!(r.shards_repaired, shards0.len() as u64 + 1, "{r:?}");
        assert_eq!((r.superblocks_repaired, r.pages_repaired), (1, 1), "{r:?}");
        assert_eq!(r.health_after(), Health::Healthy, "{r:?}");
        let r = scrub_log_volume(&keyless, &id, false);
        assert_eq!((r.health(), r.shards.bad()), (Health::Healthy, 0), "{r:?}");
        assert_eq!(whole(false).volumes[&hex::encode(id)].health, Health::Healthy);
        // Repaired shards are what they were: losing two other locations still reads back every byte.
        std::fs::remove_dir_all(locs.join("loc-03")).unwrap();
        std::fs::remove_dir_all(locs.join("loc-04")).unwrap();
        std::fs::create_dir(locs.join("loc-03")).unwrap();
        std::fs::create_dir(locs.join("loc-04")).unwrap();
        let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read(4096, &mut back).unwrap();
        assert!(back == data);
    }
}
