//! Scrubbing the catalog log: every object of the current chain (checkpoint, its parts, the records after it)
//! should be on every location, byte for byte the same. Bad or missing copies are counted and, with repair,
//! rewritten from a valid copy; objects off the chain (left by a crash or while a location was away) are
//! deleted by a repairing run.

use serde::{Deserialize, Serialize};

use crate::files::catalog_log::{self, Listing};
use crate::format::catalog::{self as fmt, CatalogName};
use crate::location::LocationExt;

use super::report::CopyCounts;
use super::Scrubber;

/// What a scrub found in the catalog log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CatalogReport {
    /// Objects in the current chain.
    pub objects: u64,
    /// Copies of them, over the usable locations.
    pub copies: CopyCounts,
    /// Objects off the chain deleted by this run.
    pub stale_deleted: u64,
    /// Problems reading the catalog or repairs that failed.
    pub errors: Vec<String>,
}

impl CatalogReport {
    /// Copies that were bad when found.
    pub fn bad(&self) -> u64 {
        self.copies.missing + self.copies.corrupt
    }

    /// Whether every bad copy was rewritten and nothing failed.
    pub fn repaired_all(&self) -> bool {
        self.copies.repaired == self.bad() && self.errors.is_empty()
    }
}

impl Scrubber<'_> {
    /// Checks (and with repair, fixes) the catalog log's copies.
    pub fn catalog(&self) -> CatalogReport {
        let mut report = CatalogReport::default();
        let _lock = match self.store.lock_catalog() {
            Ok(l) => l,
            Err(e) => {
                report.errors.push(e.to_string());
                return report;
            }
        };
        let checked = catalog_log::list(self.store).and_then(|listing| {
            let st = catalog_log::refresh(self.store, &listing, None)?;
            Ok((catalog_log::chain_objects(&listing, &st), listing, st.part_hashes))
        });
        let (chain, listing, part_hashes) = match checked {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(format!("reading the catalog: {e}"));
                return report;
            }
        };
        report.objects = chain.len() as u64;
        for name in &chain {
            let part_hash = match name {
                CatalogName::Part(_, i) => part_hashes.get(*i as usize).copied(),
                _ => None,
            };
            self.catalog_object(name, part_hash, &mut report);
        }
        // Only with every location listed: an object that looks off the chain from part of the store may be
        // the chain as the rest of it sees it.
        if self.opts.repair && listing.answered.len() == self.store.locations().len() {
            self.delete_stale(&listing, &chain, &mut report);
        }
        report
    }

    fn catalog_object(
        &self,
        name: &CatalogName,
        part_hash: Option<crate::codec::merkle::Hash>,
        report: &mut CatalogReport,
    ) {
        let key = fmt::key_of(name);
        let k = self.store.key_opt();
        let valid = |b: &[u8]| match name {
            CatalogName::Record(..) => fmt::open::<fmt::RecordBody>(fmt::MAGIC_CATALOG_RECORD, b, k, &key).map(|v| v.1),
            CatalogName::Checkpoint(..) => {
                fmt::open::<fmt::CheckpointBody>(fmt::MAGIC_CATALOG_CHECKPOINT, b, k, &key).map(|v| v.1)
            }
            CatalogName::Part(..) => fmt::open::<fmt::PartBody>(fmt::MAGIC_CATALOG_PART, b, k, &key).map(|v| v.1),
        };
        let locs = self.store.locations();
        let copies: Vec<Option<Vec<u8>>> = locs
            .iter()
            .map(|loc| {
                let b = loc.get(&key).ok()?;
                // Record and checkpoint names carry a prefix of the body hash, the checkpoint lists each part's
                // hash: a copy must match it.
                let ok = valid(&b).is_ok_and(|h| match name {
                    CatalogName::Record(_, p) | CatalogName::Checkpoint(_, p) => h[..8] == p[..],
                    CatalogName::Part(..) => part_hash == Some(h),
                });
                ok.then_some(b)
            })
            .collect();
        let good = copies.iter().flatten().next().cloned();
        for (i, copy) in copies.iter().enumerate() {
            if !self.writable[i] {
                continue;
            }
            if copy.is_some() {
                report.copies.ok += 1;
                continue;
            }
            match locs[i].get(&key) {
                Err(e) if e.is_not_found() => report.copies.missing += 1,
                _ => report.copies.corrupt += 1,
            }
            self.tally(|t| t[i].1 += 1);
            let Some(bytes) = good.as_ref().filter(|_| self.opts.repair) else { continue };
            let written = locs[i].put(&key, &[bytes]).and_then(|_| locs[i].sync()).and_then(|_| locs[i].get(&key));
            match written {
                Ok(back) if &back == bytes => {
                    report.copies.repaired += 1;
                    self.tally(|t| t[i].2 += 1);
                }
                Ok(_) => report.errors.push(format!("{key} on {} read back wrong", locs[i].name())),
                Err(e) => report.errors.push(format!("rewriting {key} on {}: {e}", locs[i].name())),
            }
        }
        if good.is_none() {
            report.errors.push(format!("{key}: no valid copy"));
        }
    }

    fn delete_stale(&self, listing: &Listing, chain: &[CatalogName], report: &mut CatalogReport) {
        for (name, at) in &listing.names {
            if chain.contains(name) {
                continue;
            }
            let key = fmt::key_of(name);
            for &i in at.iter().filter(|&&i| self.writable[i]) {
                match self.store.locations()[i].delete(&key) {
                    Ok(()) => report.stale_deleted += 1,
                    Err(e) => report.errors.push(format!("deleting stale {key}: {e}")),
                }
            }
        }
    }
}
