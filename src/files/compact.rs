//! Compacting packs: a pack whose files were mostly removed keeps their bytes until its last file goes, so
//! the live files of such packs are moved (their ciphertext unchanged: each is encrypted under its own file
//! key, and its root does not depend on where it lies) into a new pack, and the old packs are dropped, in one
//! catalog record. A file removed or replaced meanwhile is not moved back (see [`Batch::move_packed`]).

use std::collections::BTreeMap;

use crate::codec::erasure::Codec;
use crate::error::{Error, Result};
use crate::files::catalog::{self, Batch};
use crate::files::catalog_log;
use crate::files::pack::Packer;
use crate::files::read::read_pack_stripe;
use crate::format::manifest::{Data, Manifest, ManifestBody};
use crate::store::Store;
use crate::stripe::StripeBuffers;

/// A pack is compacted when its live files hold less than this share of it.
pub const LIVE_BELOW: f64 = 0.5;

/// Most packs one compaction rewrites (each is read whole, one at a time), so that it stays short.
pub const MAX_PACKS: usize = 64;

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Packs emptied and dropped.
    pub packs_dropped: u64,
    /// Files moved into new packs.
    pub files_moved: u64,
    /// Pack bytes freed (dropped packs' size less the bytes moved).
    pub bytes_freed: u64,
}

/// Compacts every pack under [`LIVE_BELOW`] live, at most `max_packs` of them.
pub fn compact(store: &Store, max_packs: usize) -> Result<CompactReport> {
    let st = catalog_log::current(store)?;
    let mut live: BTreeMap<[u8; 16], Vec<&Manifest>> = BTreeMap::new();
    for m in st.entries.values() {
        if let Data::Packed { pack, .. } = m.body.data {
            live.entry(pack).or_default().push(m);
        }
    }
    let victims: Vec<(&ManifestBody, Vec<&Manifest>)> = st
        .entries
        .values()
        .filter(|m| m.body.is_pack())
        .filter_map(|p| {
            let files = live.remove(&p.body.file_id).unwrap_or_default();
            let used: u64 = files.iter().map(|m| cipher_len(&m.body)).sum();
            ((used as f64) < LIVE_BELOW * p.body.plain_size() as f64).then_some((&p.body, files))
        })
        .take(max_packs)
        .collect();
    if victims.is_empty() {
        return Ok(CompactReport::default());
    }
    let key = store.key()?;
    let d = store.descriptor();
    let mut codec = Codec::new(d.k as usize, d.m as usize)?;
    let mut packer = Packer::new(store)?;
    let mut batch = Batch::new();
    let mut report = CompactReport::default();
    let mut sealed = Vec::new();
    for (pack, files) in &victims {
        let data = read_pack(store, &mut codec, pack)?;
        for m in files {
            let Data::Packed { offset, cipher_hash, .. } = m.body.data else { continue };
            let (start, len) = (offset as usize, cipher_len(&m.body) as usize);
            let cipher = data.get(start..start + len).ok_or_else(|| Error::corrupt("pack", "file beyond its pack"))?;
            if *blake3::hash(cipher).as_bytes() != cipher_hash {
                return Err(Error::corrupt(
                    format!("pack {}", hex::encode(pack.file_id)),
                    "a file's bytes do not match",
                ));
            }
            if !packer.fits(len - crate::codec::crypto::TAG_LEN, m.body.sealed_meta.len()) {
                sealed.extend(packer.seal(store, &mut codec)?);
            }
            let body = packer.add_cipher(cipher, &m.body)?;
            batch.move_packed(m.rebuilt(body, key), pack.file_id);
            report.files_moved += 1;
        }
        report.packs_dropped += 1;
        report.bytes_freed += pack.plain_size();
    }
    sealed.extend(packer.seal(store, &mut codec)?);
    report.bytes_freed = report.bytes_freed.saturating_sub(sealed.iter().map(|p| p.manifest.body.plain_size()).sum());
    for p in &sealed {
        batch.publish(p.manifest.clone(), "a pack", false);
    }
    let stored = store.locations().iter().try_for_each(|l| l.sync()).and_then(|_| catalog::apply(store, batch));
    if let Err(e) = stored {
        if !matches!(e, Error::OutcomeUnknown { .. }) {
            for p in &sealed {
                store.remove_shards(&p.manifest.body.file_id);
            }
        }
        return Err(e);
    }
    let named: Vec<[u8; 16]> = sealed.iter().map(|p| p.manifest.body.file_id).collect();
    crate::files::intent::clear_commit(store, &named);
    tracing::info!(
        packs = report.packs_dropped,
        files = report.files_moved,
        bytes = report.bytes_freed,
        "compacted packs"
    );
    Ok(report)
}

fn cipher_len(body: &ManifestBody) -> u64 {
    body.plain_size() + crate::codec::crypto::TAG_LEN as u64
}

/// The verified data of a pack (rebuilt from parity when shards are missing).
fn read_pack(store: &Store, codec: &mut Codec, pack: &ManifestBody) -> Result<Vec<u8>> {
    let mut bufs = StripeBuffers::default();
    read_pack_stripe(store, codec, pack, &mut bufs).map_err(|e| match e {
        crate::stripe::StripeError::Other(e) => e,
        _ => Error::corrupt(format!("pack {}", hex::encode(pack.file_id)), "fewer than k good shards"),
    })?;
    bufs.data.truncate(pack.plain_size() as usize);
    Ok(bufs.data)
}
