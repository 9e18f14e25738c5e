//! `bf recover`: rebuild a lost store descriptor from the locations and the key file.

use anyhow::{bail, Result};

use blockframe::recover::{recover, Fallback};
use blockframe::store::{self};

use crate::cli::RecoverArgs;
use crate::settings::Settings;
use crate::EXIT_OK;

/// `bf recover`.
pub(crate) fn recover_cmd(a: &RecoverArgs, s: &Settings) -> Result<u8> {
    let key_path = s.key_path();
    if !key_path.exists() {
        bail!(
            "recover needs the key file to check the manifests and rebuild the key check value: {} not found \
             (set --key-file)",
            key_path.display()
        );
    }
    let key = store::read_key_file(&key_path)?;
    let segment_size = a.segment_size_mb.map(|mb| (mb * 1048576.0).round() as u64);
    let fallback = Fallback { k: a.data_shards, m: a.parity_shards, segment_size };
    let r = recover(&s.store, &a.locations, &key, &fallback)?;
    let d = &r.descriptor;
    eprintln!(
        "bf: rebuilt {} (k={}, m={}, segment {} KiB, {} locations) from {} authenticated manifest copies",
        s.store.join("store.bf").display(),
        d.k,
        d.m,
        d.segment_size >> 10,
        d.locations.len(),
        r.manifests_checked
    );
    for l in &r.new_locations {
        eprintln!("bf: {l} had no marker and replaces a lost location; run `bf scrub --repair`");
    }
    Ok(EXIT_OK)
}
