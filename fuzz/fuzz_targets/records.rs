//! The checksummed, MACed records read from locations: manifests, catalog records, checkpoints and parts,
//! volume superblocks, log-store records and checkpoints, pack indexes and intent markers. The first byte picks
//! the record; the rest is tried both as the object's bytes (framing: magic, version, checksum) and as a body
//! sealed into a valid envelope (so the body decoders and their validation are reached), keyless and with a key
//! (MAC checked).
#![no_main]

use blockframe::crypto::MasterKey;
use blockframe::format::{self, catalog, log, manifest::Manifest, volume::Superblock};
use libfuzzer_sys::fuzz_target;

fn try_all(bytes: &[u8], which: u8, key: Option<&MasterKey>) {
    let what = "fuzz";
    // The index at the end of a pack (framing read before the tag is checked) and intent markers.
    if let Some(k) = key {
        let _ = format::pack_index::open(&k.segment_cipher(&[3; 16]), bytes);
    }
    let _ = blockframe::files::intent::decode(bytes);
    match which % 7 {
        0 => {
            if let Ok(m) = Manifest::decode(bytes, key, what) {
                let _ = m.encode();
                if let Some(k) = key {
                    let _ = m.meta(k);
                }
            }
        }
        1 => {
            let _ = catalog::open::<catalog::RecordBody>(catalog::MAGIC_CATALOG_RECORD, bytes, key, what);
        }
        2 => {
            let _ = catalog::open::<catalog::CheckpointBody>(catalog::MAGIC_CATALOG_CHECKPOINT, bytes, key, what);
        }
        3 => {
            let _ = catalog::open::<catalog::PartBody>(catalog::MAGIC_CATALOG_PART, bytes, key, what);
        }
        4 => {
            if let Ok(sb) = Superblock::decode(bytes, key, what) {
                if let Some(k) = key {
                    let _ = sb.meta(k);
                }
            }
        }
        5 => {
            let _ = log::decode_record(bytes, key, what);
            let _ = log::split_shard_payload(bytes, what);
        }
        _ => {
            let _ = log::decode_checkpoint(bytes, key, what);
        }
    }
}

/// The magic of record kind `which`.
fn magic(which: u8) -> [u8; 8] {
    match which % 7 {
        0 => format::MAGIC_MANIFEST,
        1 => catalog::MAGIC_CATALOG_RECORD,
        2 => catalog::MAGIC_CATALOG_CHECKPOINT,
        3 => catalog::MAGIC_CATALOG_PART,
        4 => format::volume::MAGIC_SUPERBLOCK,
        5 => log::MAGIC_LOG_RECORD,
        _ => log::MAGIC_CHECKPOINT,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let key = MasterKey::from_bytes([7; 32]);
    try_all(body, which, None);
    try_all(body, which, Some(&key));
    // The body inside a valid envelope, with the MAC the key gives it (so it opens with and without the key).
    let mac = match which % 7 {
        0 => key.manifest_mac(body),
        1..=3 => key.catalog_mac(body),
        4 => key.volume_mac(body),
        _ => key.log_mac(body),
    };
    let sealed = if which % 7 == 0 {
        let payload = postcard::to_allocvec(&(body, &mac)).unwrap_or_default();
        format::seal_bytes_version(magic(which), 3, &payload)
    } else {
        format::seal(magic(which), &(body, &mac))
    };
    try_all(&sealed, which, None);
    try_all(&sealed, which, Some(&key));
});
