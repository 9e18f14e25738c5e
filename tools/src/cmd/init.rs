//! `bf init`: create a store, its locations and its key.

use anyhow::{bail, Result};

use blockframe::store::{self, InitOptions, KeySource, Store};

use crate::cli::InitArgs;
use crate::open::passphrase;
use crate::settings::Settings;

pub(crate) fn init(a: &InitArgs, s: &Settings) -> Result<Store> {
    let f = &s.file;
    let k = a.data_shards.or(f.data_shards).unwrap_or(store::DEFAULT_DATA_SHARDS);
    let m = a.parity_shards.or(f.parity_shards).unwrap_or(store::DEFAULT_PARITY_SHARDS);
    let segment_size = match a.segment_size_mb.or(f.segment_size_mb) {
        Some(mb) if mb.is_finite() && mb > 0.0 => (mb * 1048576.0).round() as u64,
        Some(mb) => bail!("invalid segment size {mb} MiB"),
        None => store::DEFAULT_SEGMENT_SIZE,
    };
    let locations = if a.locations.is_empty() {
        f.locations.iter().flatten().map(|l| l.spec().to_string()).collect()
    } else {
        a.locations.clone()
    };
    let zones = a.zones.clone();
    if !zones.is_empty() && zones.len() != locations.len() {
        bail!("{} --zone for {} locations: give one zone per location, or none", zones.len(), locations.len());
    }
    let width = k as usize + m as usize;
    if !locations.is_empty() && locations.len() < width {
        tracing::warn!(
            "{} locations for {width} shards per segment: some locations hold several shards of a segment, \
             so losing one of them costs more than one shard",
            locations.len()
        );
    }
    let key = if a.passphrase {
        let p = passphrase("New passphrase: ")?;
        if std::env::var("BF_PASSPHRASE").is_err() && passphrase("Repeat passphrase: ")? != p {
            bail!("the passphrases differ");
        }
        KeySource::Passphrase(p)
    } else {
        KeySource::NewKeyFile(s.key_path())
    };
    let mut st = Store::init(&s.store, InitOptions { k, m, segment_size, locations, zones, key })?;
    crate::open::apply_write_policy(&mut st, s)?;
    let d = st.descriptor();
    eprintln!(
        "bf: created store {} (k={}, m={}, segment {} KiB, {} locations)",
        s.store.display(),
        d.k,
        d.m,
        d.segment_size >> 10,
        d.locations.len()
    );
    if !d.zones.iter().all(String::is_empty) {
        eprintln!("bf: {}", super::location::tolerance_line(&st.zone_tolerance()));
    }
    if !a.passphrase {
        eprintln!(
            "bf: master key written to {} — back it up: without it the data cannot be read",
            s.key_path().display()
        );
    }
    Ok(st)
}
