//! Volume tests against a byte-array model: reads, writes, zeroing, flush, crash (drop without flush), reopen.

use std::sync::Arc;

use super::*;
use crate::store::{InitOptions, KeySource, Store, MIN_SEGMENT_SIZE};

const SS: u32 = 64 << 10;

fn store(dir: &std::path::Path) -> Arc<Store> {
    let s = Store::init(
        &dir.join("store"),
        InitOptions {
            k: 4,
            m: 2,
            segment_size: MIN_SEGMENT_SIZE,
            locations: vec![],
            zones: vec![],
            key: KeySource::NewKeyFile(dir.join("store/master.key")),
        },
    )
    .unwrap();
    Arc::new(s)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn small_cache() -> VolumeOptions {
    VolumeOptions { cache_bytes: 3 * SS as usize }
}

#[test]
fn random_io_matches_model_and_survives_crash_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    let size = 40 * SS as u64;
    create(&st, "v", size, SS).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut flushed = model.clone();
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let vol = CowVolume::open(st.clone(), "v", small_cache()).unwrap();
        for op in 0..120 {
            let off = rng.below(size - 1);
            let len = 1 + rng.below((size - off).min(3 * SS as u64));
            match rng.below(10) {
                0..=5 => {
                    let data: Vec<u8> = (0..len).map(|i| (i ^ seed ^ op) as u8).collect();
                    let fua = rng.below(20) == 0;
                    vol.write(off, &data, fua).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    if fua {
                        // FUA commits everything written before it too.
                        flushed.clone_from(&model);
                    }
                }
                6 => {
                    vol.zero(off, len, rng.below(2) == 0, false).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                7 => {
                    vol.flush().unwrap();
                    flushed.clone_from(&model);
                }
                _ => {
                    let mut got = vec![0u8; len as usize];
                    vol.read(off, &mut got).unwrap();
                    assert_eq!(got, &model[off as usize..(off + len) as usize], "seed {seed} op {op}");
                }
            }
        }
        if seed % 2 == 0 {
            vol.flush().unwrap();
            flushed.clone_from(&model);
        }
        // Crash: drop without flushing. Only what was flushed may be visible on reopen.
        drop(vol);
        let vol = CowVolume::open(st.clone(), "v", small_cache()).unwrap();
        let mut got = vec![0u8; size as usize];
        vol.read(0, &mut got).unwrap();
        assert!(got == flushed, "seed {seed}: reopened volume differs from its state at the last flush");
        model.clone_from(&got);
    }
}

#[test]
fn unflushed_writes_vanish_flushed_ones_stay_and_garbage_is_collected() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "v", 8 * SS as u64, SS).unwrap();
    let vol = CowVolume::open(st.clone(), "v", small_cache()).unwrap();
    vol.write(0, &vec![1u8; 5 * SS as usize], false).unwrap();
    vol.flush().unwrap();
    // Dirty more stripes than the cache holds, so some are written back (uncommitted) before the "crash".
    vol.write(0, &vec![2u8; 6 * SS as usize], false).unwrap();
    drop(vol);
    let vol = CowVolume::open(st.clone(), "v", small_cache()).unwrap();
    let mut got = vec![0u8; 8 * SS as usize];
    vol.read(0, &mut got).unwrap();
    assert!(got[..5 * SS as usize].iter().all(|b| *b == 1));
    assert!(got[5 * SS as usize..].iter().all(|b| *b == 0));
    // Only the 5 committed stripes' shards remain (6 shards each): uncommitted ones were collected.
    let shards: usize = (0..6)
        .map(|i| {
            let loc = d.path().join(format!("store/locations/loc-{i:02}/volumes"));
            crate::tests::count_files(&loc, |n| n.contains('-') && n.contains('.'))
        })
        .sum();
    assert_eq!(shards, 5 * 6);
}

#[test]
fn holes_trim_and_block_status() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "v", 16 * SS as u64, SS).unwrap();
    let vol = CowVolume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
    assert_eq!(vol.block_status(0, 16 * SS as u64).unwrap(), vec![(0, 16 * SS as u64, false)]);
    vol.write(SS as u64 + 5, b"x", false).unwrap();
    assert_eq!(
        vol.block_status(0, 4 * SS as u64).unwrap(),
        vec![(0, SS as u64, false), (SS as u64, SS as u64, true), (2 * SS as u64, 2 * SS as u64, false)]
    );
    vol.flush().unwrap();
    vol.zero(0, 4 * SS as u64, false, true).unwrap();
    assert_eq!(vol.block_status(0, 4 * SS as u64).unwrap(), vec![(0, 4 * SS as u64, false)]);
    let mut b = [9u8; 10];
    vol.read(SS as u64, &mut b).unwrap();
    assert_eq!(b, [0; 10]);
    assert!(vol.read(16 * SS as u64 - 1, &mut [0u8; 2]).is_err());
}

#[test]
fn reads_survive_m_lost_locations_and_data_is_encrypted() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "v", 8 * SS as u64, SS).unwrap();
    let marker = b"VOLUME-PLAINTEXT-MARKER!";
    let data: Vec<u8> = marker.iter().copied().cycle().take(4 * SS as usize).collect();
    {
        let vol = CowVolume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        vol.write(0, &data, true).unwrap();
    }
    for f in crate::tests::all_files(&d.path().join("store/locations")) {
        let b = std::fs::read(&f).unwrap();
        assert!(!b.windows(marker.len()).any(|w| w == marker), "plaintext in {}", f.display());
    }
    std::fs::remove_dir_all(d.path().join("store/locations/loc-01")).unwrap();
    std::fs::remove_dir_all(d.path().join("store/locations/loc-04")).unwrap();
    let vol = CowVolume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
    let mut got = vec![0u8; 4 * SS as usize];
    vol.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn names_listing_removal_and_exclusive_open() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "a", 4 * SS as u64, SS).unwrap();
    create(&st, "b", 8 * SS as u64, SS).unwrap();
    assert!(matches!(create(&st, "a", 4 * SS as u64, SS), Err(Error::AlreadyExists(_))));
    assert!(create(&st, "c", 1000, SS).is_err());
    let names: Vec<String> = list(&st).unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b"]);
    let v = CowVolume::open(st.clone(), "a", VolumeOptions::default()).unwrap();
    assert!(CowVolume::open(st.clone(), "a", VolumeOptions::default()).is_err(), "second open must be refused");
    drop(v);
    remove(&st, "a").unwrap();
    assert!(matches!(CowVolume::open(st.clone(), "a", VolumeOptions::default()), Err(Error::NotFound(_))));
    assert_eq!(list(&st).unwrap().len(), 1);
}
