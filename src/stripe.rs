//! Writing and reading one erasure-coded stripe (a file segment or a volume stripe) on the store's locations:
//! shard headers, placement, verification against Merkle leaves and reconstruction from parity. Files and
//! volumes differ only in how they name shards and where their leaves are kept.

use std::ops::Range;

use crate::codec::erasure::Codec;
use crate::codec::merkle::Hash;
use crate::error::{Error, LocationFailure, Result};
use crate::format::shard::{self, Expected, ShardFault, ShardHeader};
use crate::location::Location;
use crate::metrics::reads::ShardFailure;
use crate::store::Store;

/// Where a stripe's shards live and how they are named.
pub struct StripeAddr<'a> {
    /// File or volume id (in every shard header).
    pub file_id: &'a [u8; 16],
    /// Segment or stripe index.
    pub segment: u64,
    /// Whose placement rule places the shards.
    pub rule: HomeRule,
    /// Bytes per shard.
    pub shard_len: usize,
    /// Object key of shard `i`.
    pub key_of: &'a (dyn Fn(usize) -> String + Sync),
    /// Write with [`crate::location::Location::put_deferred`]: the caller syncs the locations before anything
    /// references the shards.
    pub deferred: bool,
}

impl StripeAddr<'_> {
    /// Home location index of shard `i`.
    pub fn home(&self, store: &Store, i: usize) -> usize {
        match self.rule {
            HomeRule::ById => store.home(self.file_id, self.segment, i),
            HomeRule::CowVolume => store.cow_home(self.file_id, self.segment, i),
        }
    }

    /// What shard `i`'s header and payload must say, its Merkle leaf being `leaf`.
    fn expected<'a>(&'a self, store: &'a Store, i: usize, leaf: &'a Hash) -> Expected<'a> {
        Expected {
            store_id: &store.descriptor().store_id,
            file_id: self.file_id,
            segment: self.segment,
            shard: i as u16,
            len: self.shard_len as u32,
            leaf,
        }
    }
}

/// How the home of a stripe's shards follows from its id (see [`Store::home`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HomeRule {
    /// Files, packs and log volumes.
    ById,
    /// Copy-on-write volumes.
    CowVolume,
}

/// What [`write_stripe`] stored.
#[derive(Debug)]
pub struct StripeWrite {
    /// The k+m Merkle leaves (known for every shard, stored or not).
    pub leaves: Vec<Hash>,
    /// Shards that could not be stored (at most k+m minus the store's `min_shards_written`), with the reason:
    /// `bf scrub --repair` rebuilds them.
    pub missing: Vec<(usize, Error)>,
}

/// Encodes parity for `data` (k data shards of `shard_len`), then hashes and writes all k+m shards concurrently
/// (hashing is CPU work and each write ends in an fsync). Succeeds when at least the store's
/// [`Store::min_shards_written`] shards were stored; otherwise fails with [`Error::WriteQuorum`], leaving the
/// stored ones for the caller to clean up.
pub fn write_stripe(store: &Store, codec: &mut Codec, addr: &StripeAddr<'_>, data: &[u8]) -> Result<StripeWrite> {
    let sl = addr.shard_len;
    let outcomes = codec.encode_with(data, sl, |parity| {
        let shards: Vec<&[u8]> = data.chunks_exact(sl).chain(parity.iter().copied()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = shards
                .iter()
                .enumerate()
                .map(|(i, payload)| s.spawn(move || write_shard(store, addr, i, payload)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| Error::internal("shard writer panicked")))
                .collect::<Result<Vec<(Hash, Result<()>)>>>()
        })
    })??;
    let mut leaves = Vec::with_capacity(outcomes.len());
    let mut missing = Vec::new();
    for (i, (leaf, r)) in outcomes.into_iter().enumerate() {
        leaves.push(leaf);
        if let Err(e) = r {
            missing.push((i, e));
        }
    }
    let stored = leaves.len() - missing.len();
    let need = store.min_shards_written().min(leaves.len());
    if stored < need {
        let failures = missing
            .into_iter()
            .map(|(i, e)| {
                LocationFailure::new(format!("shard {i}@{}", store.locations()[addr.home(store, i)].name()), e)
            })
            .collect();
        let what = format!("the shards of stripe {}", addr.segment);
        return Err(Error::write_quorum(what, stored, need, failures));
    }
    for (i, e) in &missing {
        tracing::warn!(segment = addr.segment, shard = i, error = %e, "shard not stored; left for scrub --repair");
    }
    Ok(StripeWrite { leaves, missing })
}

/// Writes one shard (header + payload) to its home location; returns its leaf (known whether or not the write
/// succeeded) and the write's outcome.
pub fn write_shard(store: &Store, addr: &StripeAddr<'_>, i: usize, payload: &[u8]) -> (Hash, Result<()>) {
    let d = store.descriptor();
    let header = ShardHeader::for_payload(d.store_id, *addr.file_id, addr.segment, i as u16, (d.k, d.m), payload);
    let loc = &store.locations()[addr.home(store, i)];
    let parts: [&[u8]; 2] = [&header.encode(), payload];
    let r =
        if addr.deferred { loc.put_deferred(&(addr.key_of)(i), &parts) } else { loc.put(&(addr.key_of)(i), &parts) };
    (header.leaf(), r)
}

/// Reads shard `i` into `io` and verifies it against `leaf`; returns the payload range within `io` and the
/// location that served it, plus the home location. Looks on the home location first, then on the others, where a
/// repair may have put it (see [`find_shard`]).
pub fn fetch_shard(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    leaf: &Hash,
    io: &mut Vec<u8>,
) -> (std::result::Result<(Range<usize>, usize), ShardProblem>, usize) {
    let key = (addr.key_of)(i);
    let want = addr.expected(store, i, leaf);
    find_shard(store, addr, i, |loc| {
        loc.get_into(&key, io)?;
        Ok(shard::verify(io, &want).map(|p| {
            let start = p.as_ptr() as usize - io.as_ptr() as usize;
            start..start + p.len()
        }))
    })
}

/// Like [`fetch_shard`], for a remote store: reads shard `i`'s payload straight into `out` (its length) and its
/// header apart, then verifies both against `leaf`. `out` holds the payload only on success.
fn fetch_shard_into(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    leaf: &Hash,
    out: &mut [u8],
) -> std::result::Result<(), ShardProblem> {
    let key = (addr.key_of)(i);
    let want = addr.expected(store, i, leaf);
    let mut head = [0u8; shard::HEADER_LEN];
    let found = find_shard(store, addr, i, |loc| {
        let len = loc.get_split_into(&key, &mut head, out)?;
        Ok(if len == (head.len() + out.len()) as u64 {
            shard::verify_split(&head, out, &want)
        } else if len < head.len() as u64 {
            Err(ShardFault::BadHeader("truncated".into()))
        } else {
            Err(ShardFault::BadLength)
        })
    });
    found.0.map(|_| ())
}

/// Tries shard `i`'s home location first, then every other one (a repair may have put it elsewhere when home was
/// gone or read-only, and a damaged copy can stay behind at home), until `read` gets a copy that verifies;
/// returns what `read` made of it and the location, plus the home location. A location without the object is
/// skipped; the first problem seen is reported when no good copy exists anywhere.
fn find_shard<T>(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    mut read: impl FnMut(&dyn Location) -> Result<std::result::Result<T, ShardFault>>,
) -> (std::result::Result<(T, usize), ShardProblem>, usize) {
    let locations = store.locations();
    let n = locations.len();
    let home = addr.home(store, i);
    let mut first_problem = None;
    for loc in (0..n).map(|j| (home + j) % n) {
        match read(locations[loc].as_ref()) {
            Ok(Ok(v)) => return (Ok((v, loc)), home),
            Ok(Err(f)) => {
                first_problem.get_or_insert(ShardProblem::Fault(f));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                first_problem.get_or_insert(ShardProblem::Unreadable(e.to_string()));
            }
        }
    }
    (Err(first_problem.unwrap_or(ShardProblem::Missing)), home)
}

/// Why a shard could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardProblem {
    /// Not found on its location (nor elsewhere).
    Missing,
    /// Found but failed verification.
    Fault(ShardFault),
    /// The location could not be read.
    Unreadable(String),
}

impl ShardProblem {
    /// The reason the read path's counters file it under.
    pub fn failure(&self) -> ShardFailure {
        match self {
            ShardProblem::Missing => ShardFailure::Missing,
            ShardProblem::Fault(_) => ShardFailure::Corrupt,
            ShardProblem::Unreadable(_) => ShardFailure::Unreadable,
        }
    }
}

impl std::fmt::Display for ShardProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardProblem::Missing => f.write_str("missing"),
            ShardProblem::Fault(x) => write!(f, "{x}"),
            ShardProblem::Unreadable(e) => write!(f, "unreadable ({e})"),
        }
    }
}

/// Reusable buffers for [`read_stripe`].
#[derive(Default)]
pub struct StripeBuffers {
    /// The k data shards, back to back, after a successful read.
    pub data: Vec<u8>,
    io: Vec<u8>,
    parity: Vec<u8>,
}

/// Why a stripe could not be read.
#[derive(Debug)]
pub enum StripeError {
    /// Fewer than k verified shards: `bad` lists `shard@location: problem`.
    Lost {
        /// Good shards found.
        have: usize,
        /// Missing or corrupt shards.
        bad: Vec<String>,
    },
    /// A rebuilt shard did not match its leaf (should be impossible: inputs were verified).
    Mismatch,
    /// Any other failure.
    Other(Error),
}

/// Fetches and verifies the k data shards into `bufs.data` (sized k x shard length): one after another through
/// `bufs.io` from local disks, or concurrently and each straight into its place when a location is remote, so a
/// stripe pays one network round trip instead of k and no buffer per shard.
fn fetch_data_shards(
    store: &Store,
    addr: &StripeAddr<'_>,
    leaves: &[Hash],
    bufs: &mut StripeBuffers,
) -> Vec<std::result::Result<(), ShardProblem>> {
    let sl = addr.shard_len;
    let StripeBuffers { data, io, .. } = bufs;
    if !store.locations().iter().any(|l| l.remote()) {
        return (0..leaves.len())
            .map(|i| {
                let (r, _) = fetch_shard(store, addr, i, &leaves[i], io).0?;
                data[i * sl..(i + 1) * sl].copy_from_slice(&io[r]);
                Ok(())
            })
            .collect();
    }
    // Remote: each shard's payload goes straight into its place in the stripe buffer as it arrives.
    fetch_concurrently(store, addr, 0, leaves, data)
}

/// Fetches shards `first..first + leaves.len()` concurrently, each straight into its place in `out` (one shard
/// length each).
fn fetch_concurrently(
    store: &Store,
    addr: &StripeAddr<'_>,
    first: usize,
    leaves: &[Hash],
    out: &mut [u8],
) -> Vec<std::result::Result<(), ShardProblem>> {
    let sl = addr.shard_len;
    if sl == 0 {
        return leaves.iter().map(|_| Ok(())).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_exact_mut(sl)
            .zip(leaves)
            .enumerate()
            .map(|(j, (out, leaf))| s.spawn(move || fetch_shard_into(store, addr, first + j, leaf, out)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ShardProblem::Unreadable("shard reader panicked".into()))))
            .collect()
    })
}

/// Fills `bufs.data` with the k verified data shards of a stripe, rebuilding missing ones from parity.
/// `leaves` are the stripe's k+m Merkle leaves. Counts the shards it could not use, and the stripe when it was
/// rebuilt or lost, in the store's [`Store::read_stats`].
pub fn read_stripe(
    store: &Store,
    codec: &mut Codec,
    addr: &StripeAddr<'_>,
    leaves: &[Hash],
    bufs: &mut StripeBuffers,
) -> std::result::Result<(), StripeError> {
    let (k, m) = (codec.k(), codec.m());
    let sl = addr.shard_len;
    if leaves.len() != k + m {
        return Err(StripeError::Other(Error::corrupt("stripe", "leaf count differs from k+m")));
    }
    bufs.data.resize(k * sl, 0);
    let mut have = vec![false; k];
    let mut bad = Vec::new();
    let stats = store.read_stats();
    let name = |i: usize| store.locations()[addr.home(store, i)].name().to_string();
    let fetched = fetch_data_shards(store, addr, &leaves[..k], bufs);
    for (i, (slot, r)) in have.iter_mut().zip(fetched).enumerate() {
        match r {
            Ok(()) => *slot = true,
            Err(p) => {
                stats.shard_failed(p.failure());
                bad.push(format!("{i}@{}: {p}", name(i)));
            }
        }
    }
    let mut good = have.iter().filter(|h| **h).count();
    if good == k {
        return Ok(());
    }
    bufs.parity.resize(m * sl, 0);
    let mut parity_ok = Vec::new();
    // From remote locations, the parity shards the stripe lacks are fetched at once, as its data shards were;
    // any further one (one of those failed too) after them.
    let mut tried = vec![false; m];
    if store.locations().iter().any(|l| l.remote()) {
        let want = (k - good).min(m);
        let first = fetch_concurrently(store, addr, k, &leaves[k..k + want], &mut bufs.parity[..want * sl]);
        for (j, r) in first.into_iter().enumerate() {
            tried[j] = true;
            match r {
                Ok(()) => {
                    parity_ok.push(j);
                    good += 1;
                }
                Err(p) => {
                    stats.shard_failed(p.failure());
                    bad.push(format!("{}@{}: {p}", k + j, name(k + j)));
                }
            }
        }
    }
    for j in 0..m {
        if good == k {
            break;
        }
        if tried[j] {
            continue;
        }
        match fetch_shard(store, addr, k + j, &leaves[k + j], &mut bufs.io) {
            (Ok((r, _)), _) => {
                bufs.parity[j * sl..(j + 1) * sl].copy_from_slice(&bufs.io[r]);
                parity_ok.push(j);
                good += 1;
            }
            (Err(p), _) => {
                stats.shard_failed(p.failure());
                bad.push(format!("{}@{}: {p}", k + j, name(k + j)));
            }
        }
    }
    if good < k {
        stats.stripe_lost();
        return Err(StripeError::Lost { have: good, bad });
    }
    tracing::debug!(segment = addr.segment, missing = %bad.join(", "), "rebuilding stripe from parity");
    let parity = &bufs.parity;
    codec
        .reconstruct(&mut bufs.data, sl, &have, parity_ok.iter().map(|&j| (j, &parity[j * sl..(j + 1) * sl])))
        .map_err(StripeError::Other)?;
    // Pair assertion: every rebuilt shard must match its Merkle leaf before it is trusted.
    for (i, h) in have.iter().enumerate() {
        let payload = &bufs.data[i * sl..(i + 1) * sl];
        let leaf = crate::codec::merkle::leaf_hash(
            addr.file_id,
            addr.segment,
            i as u16,
            sl as u32,
            blake3::hash(payload).as_bytes(),
        );
        if !*h && leaf != leaves[i] {
            stats.stripe_lost();
            return Err(StripeError::Mismatch);
        }
    }
    stats.stripe_rebuilt();
    Ok(())
}
