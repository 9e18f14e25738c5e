//! Opening a store for a command: with or without its key, with the configured write policy.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};

use blockframe::store::{self, Store};

use crate::settings::Settings;

pub(crate) fn passphrase(prompt: &str) -> Result<Vec<u8>> {
    if let Ok(p) = std::env::var("BF_PASSPHRASE") {
        return Ok(p.into_bytes());
    }
    if !std::io::stdin().is_terminal() {
        bail!("this needs a passphrase: set BF_PASSPHRASE or run on a terminal");
    }
    Ok(rpassword::prompt_password(prompt).context("reading the passphrase")?.into_bytes())
}

/// Opens the store without a key.
pub(crate) fn open_keyless(s: &Settings) -> Result<Store> {
    let mut st = Store::open(&s.store)?;
    apply_write_policy(&mut st, s)?;
    Ok(st)
}

pub(crate) fn apply_write_policy(st: &mut Store, s: &Settings) -> Result<()> {
    if let Some(n) = s.file.min_shards_written {
        st.set_min_shards_written(n).context("config min_shards_written")?;
    }
    Ok(())
}

/// Opens the store and loads its key.
pub(crate) fn open_keyed(s: &Settings) -> Result<Store> {
    let mut st = open_keyless(s)?;
    unlock(&mut st, s)?;
    Ok(st)
}

pub(crate) fn unlock(st: &mut Store, s: &Settings) -> Result<()> {
    if st.descriptor().kdf.is_some() && s.key_file.is_none() {
        let p = passphrase("Passphrase: ")?;
        st.unlock_with_passphrase(&p)?;
    } else {
        let path = s.key_path();
        if !path.exists() {
            bail!("key file {} not found (set --key-file, BF_KEY_FILE or encryption_key_path)", path.display());
        }
        st.unlock(store::read_key_file(&path)?)?;
    }
    Ok(())
}

/// Opens the store, loading the key only when one is available (scrub needs none).
pub(crate) fn open_optional_key(s: &Settings) -> Result<Store> {
    let mut st = open_keyless(s)?;
    let keyed =
        if st.descriptor().kdf.is_some() { std::env::var("BF_PASSPHRASE").is_ok() } else { s.key_path().exists() };
    if keyed {
        unlock(&mut st, s)?;
    }
    Ok(st)
}
