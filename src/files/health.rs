//! How healthy a file is, and the quick check `bf ls` makes (which shards exist, without reading them).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::format::manifest::ManifestBody;
use crate::store::{parse_shard_name, shard_prefix, Store};

/// How healthy something is; ordered from best to worst.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Every shard and manifest copy verified.
    #[default]
    Healthy,
    /// Data intact but redundancy reduced (bad shards or manifest copies, or an unusable location).
    Degraded,
    /// Some segment has fewer than k good shards, or a manifest has no valid copy.
    Lost,
}

/// Health of a file from the presence of its shards on the locations, at home or where a repair or a layout
/// change left them (cheap: no payload is read, so corrupt shards count as present; `bf verify` and `bf scrub`
/// read them).
pub fn quick_health(store: &Store, body: &ManifestBody) -> Health {
    // A packed file is as healthy as its pack.
    let Ok(body) = crate::files::catalog::shards_body(store, body) else { return Health::Lost };
    let body = &body;
    let listed: Vec<Option<HashSet<(u64, u16)>>> = store
        .locations()
        .iter()
        .map(|l| {
            let names = l.list(&shard_prefix(&body.file_id)).ok()?;
            Some(names.iter().filter_map(|name| parse_shard_name(name)).collect())
        })
        .collect();
    let mut worst = Health::Healthy;
    for seg in 0..body.segments.len() as u64 {
        let present =
            (0..body.width()).filter(|&i| listed.iter().flatten().any(|set| set.contains(&(seg, i as u16)))).count();
        if present < body.k as usize {
            return Health::Lost;
        }
        if present < body.width() {
            worst = Health::Degraded;
        }
    }
    worst
}
