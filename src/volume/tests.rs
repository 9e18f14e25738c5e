//! The volume API over both formats: byte-granular I/O on log volumes against a model, listing, exclusive open,
//! removal, and copy-on-write volumes still working beside log ones.

use std::sync::Arc;

use super::*;
use crate::store::{InitOptions, KeySource, MIN_SEGMENT_SIZE};
use crate::testing::test_bytes;

fn store(dir: &std::path::Path) -> Arc<Store> {
    let opts = InitOptions {
        k: 2,
        m: 1,
        segment_size: MIN_SEGMENT_SIZE,
        locations: vec![],
        zones: vec![],
        key: KeySource::NewKeyFile(dir.join("store/master.key")),
    };
    Arc::new(Store::init(&dir.join("store"), opts).unwrap())
}

const SIZE: u64 = 4 << 20;

#[test]
fn unaligned_io_on_a_log_volume_matches_a_model_across_reopens() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "v", SIZE, 64 << 10).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut x = 7u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..3 {
        let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        assert!(matches!(v, Volume::Log(_)));
        for i in 0..150u64 {
            let off = next(SIZE - 20_000);
            let len = 1 + next(19_000);
            match next(4) {
                0 | 1 => {
                    let data = test_bytes(len as usize, round * 1000 + i);
                    v.write(off, &data, next(10) == 0).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                2 => {
                    v.zero(off, len, false, false).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    v.read(off, &mut buf).unwrap();
                    assert!(buf == model[off as usize..(off + len) as usize], "round {round} op {i}: read differs");
                }
            }
        }
        let mut all = vec![0u8; SIZE as usize];
        v.read(0, &mut all).unwrap();
        assert!(all == model, "round {round}: volume differs from the model");
        if round == 1 {
            v.flush().unwrap();
        }
    }
    let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    v.read(0, &mut all).unwrap();
    assert!(all == model, "after the last reopen");
    assert!(v.read(SIZE - 1, &mut [0u8; 2]).is_err() && v.write(SIZE, &[1], false).is_err());
}

#[test]
fn both_formats_list_open_and_remove_side_by_side() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    cow::create(&st, "old", 1 << 20, 64 << 10).unwrap();
    create(&st, "new", 2 << 20, DEFAULT_STRIPE_SIZE).unwrap();
    assert!(matches!(create(&st, "old", 1 << 20, DEFAULT_STRIPE_SIZE), Err(Error::AlreadyExists(_))));
    assert!(matches!(cow::create(&st, "new", 1 << 20, 64 << 10), Err(Error::AlreadyExists(_))));
    assert!(create(&st, "bad/name", 1 << 20, DEFAULT_STRIPE_SIZE).is_err());
    assert!(create(&st, "odd", 1000, DEFAULT_STRIPE_SIZE).is_err());
    let vols = list(&st).unwrap();
    let shown: Vec<(&str, &str, u64)> = vols.iter().map(|v| (v.name.as_str(), v.format.as_str(), v.size)).collect();
    assert_eq!(shown, [("new", "log", 2 << 20), ("old", "cow", 1 << 20)]);
    for name in ["old", "new"] {
        let v = Volume::open(st.clone(), name, VolumeOptions::default()).unwrap();
        assert!(matches!(Volume::open(st.clone(), name, VolumeOptions::default()), Err(Error::InUse(_))));
        v.write(4096, b"hello", true).unwrap();
        let mut buf = [0u8; 5];
        v.read(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(v.block_status(0, 12288).unwrap().iter().filter(|r| r.2).count(), 1, "{name}");
    }
    remove(&st, "new").unwrap();
    remove(&st, "old").unwrap();
    assert!(list(&st).unwrap().is_empty());
    assert!(matches!(Volume::open(st.clone(), "new", VolumeOptions::default()), Err(Error::NotFound(_))));
}

#[test]
fn log_volume_data_is_encrypted_and_survives_m_lost_locations() {
    let d = tempfile::tempdir().unwrap();
    let st = store(d.path());
    create(&st, "v", SIZE, 64 << 10).unwrap();
    let marker = b"PLAINTEXT-MARKER-that-must-not-appear-at-rest".repeat(100);
    {
        let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
        v.write(8192, &marker, true).unwrap();
    }
    for f in crate::tests::all_files(&d.path().join("store")) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(32).any(|w| w == &marker[..32]), "plaintext found in {}", f.display());
    }
    std::fs::remove_dir_all(d.path().join("store/locations/loc-01")).unwrap();
    std::fs::create_dir(d.path().join("store/locations/loc-01")).unwrap();
    let v = Volume::open(st.clone(), "v", VolumeOptions::default()).unwrap();
    let mut buf = vec![0u8; marker.len()];
    v.read(8192, &mut buf).unwrap();
    assert!(buf == marker);
}
