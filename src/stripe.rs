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

/// Like [`fetch_shard`], but reads shard `i`'s payload straight into `out` (its length) and its header apart,
/// then verifies both against `leaf` as far as `check` says. `out` holds the payload only on success.
fn fetch_shard_into(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    leaf: &Hash,
    out: &mut [u8],
    check: PayloadCheck,
    search: Search,
) -> std::result::Result<(), ShardProblem> {
    let key = (addr.key_of)(i);
    let want = addr.expected(store, i, leaf);
    let mut head = [0u8; shard::HEADER_LEN];
    let found = find_shard_in(store, addr, i, search, |loc| {
        let len = loc.get_split_into(&key, &mut head, out)?;
        Ok(if len == (head.len() + out.len()) as u64 {
            match check {
                PayloadCheck::Hashed => shard::verify_split(&head, out, &want),
                PayloadCheck::HeaderOnly => shard::verify_header(&head, out.len(), &want).map(|_| ()),
            }
        } else if len < head.len() as u64 {
            Err(ShardFault::BadHeader("truncated".into()))
        } else {
            Err(ShardFault::BadLength)
        })
    });
    found.0.map(|_| ())
}

/// How far a stripe read checks each shard before using it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadCheck {
    /// The payload is hashed and checked against its Merkle leaf: the stripe's bytes are right when the read
    /// succeeds.
    Hashed,
    /// Only the header is checked against the leaf (it names the shard and records the payload's hash), and a
    /// rebuilt shard is not hashed either: for a caller that authenticates the stripe's bytes itself (a file
    /// segment's AES-GCM tag), and reads again with [`PayloadCheck::Hashed`] when that fails, to find the bad
    /// shard and rebuild around it. Saves hashing every byte read a second time.
    HeaderOnly,
}

/// Tries shard `i`'s home location first, then every other one (a repair may have put it elsewhere when home was
/// gone or read-only, and a damaged copy can stay behind at home), until `read` gets a copy that verifies;
/// returns what `read` made of it and the location, plus the home location. A location without the object is
/// skipped; the first problem seen is reported when no good copy exists anywhere.
fn find_shard<T>(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    read: impl FnMut(&dyn Location) -> Result<std::result::Result<T, ShardFault>>,
) -> (std::result::Result<(T, usize), ShardProblem>, usize) {
    find_shard_in(store, addr, i, Search::Everywhere, read)
}

/// Where [`find_shard_in`] looks for a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Search {
    /// Its home location only.
    Home,
    /// Every location but its home, after the home had no good copy.
    Elsewhere,
    /// Home first, then every other location.
    Everywhere,
}

/// [`find_shard`] over the locations `search` names.
fn find_shard_in<T>(
    store: &Store,
    addr: &StripeAddr<'_>,
    i: usize,
    search: Search,
    mut read: impl FnMut(&dyn Location) -> Result<std::result::Result<T, ShardFault>>,
) -> (std::result::Result<(T, usize), ShardProblem>, usize) {
    let locations = store.locations();
    let n = locations.len();
    let home = addr.home(store, i);
    let (from, to) = match search {
        Search::Home => (0, 1.min(n)),
        Search::Elsewhere => (1, n),
        Search::Everywhere => (0, n),
    };
    let mut first_problem = None;
    for loc in (from..to).map(|j| (home + j) % n) {
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

/// The order a stripe read tries its shards in: the k data shards at home, then the parity shards at home,
/// then, for each of those whose home had no good copy, the other locations (where a repair may have put it).
/// Only as many tries run at once as can still be needed: a parity shard is tried only once a data shard
/// failed, so a healthy stripe reads exactly its k data shards, and a degraded one reads at home what it needs
/// before it searches the other locations one by one.
struct Tries {
    k: usize,
    queue: std::collections::VecDeque<(usize, Search)>,
    good: Vec<bool>,
    problem: Vec<Option<ShardProblem>>,
    running: usize,
}

impl Tries {
    fn new(k: usize, m: usize) -> Tries {
        Tries {
            k,
            queue: (0..k + m).map(|i| (i, Search::Home)).collect(),
            good: vec![false; k + m],
            problem: vec![None; k + m],
            running: 0,
        }
    }

    fn good_count(&self) -> usize {
        self.good.iter().filter(|g| **g).count()
    }

    /// The next try to start, if one could still be needed and at most `limit` are running.
    fn next(&mut self, limit: usize) -> Option<(usize, Search)> {
        if self.running >= limit || self.good_count() + self.running >= self.k {
            return None;
        }
        let t = self.queue.pop_front()?;
        self.running += 1;
        Some(t)
    }

    fn done(&mut self, i: usize, search: Search, r: std::result::Result<(), ShardProblem>) {
        self.running -= 1;
        match r {
            Ok(()) => {
                self.good[i] = true;
                self.problem[i] = None;
            }
            Err(p) => {
                // The home's problem says most (found corrupt, unreadable); "missing" only if nowhere had it.
                let first = self.problem[i].take();
                self.problem[i] = Some(match first {
                    Some(f) if f != ShardProblem::Missing => f,
                    _ => p,
                });
                if search == Search::Home {
                    self.queue.push_back((i, Search::Elsewhere));
                }
            }
        }
    }
}

/// Fetches and verifies shards of a stripe until k are good, each straight into its place: data shard i in
/// `data`, parity shard j in `parity` (one shard length each), in the order of [`Tries`]. Tries run concurrently
/// (k reads in flight keep a disk's queue or a network busy) and a failed one starts the next at once, so a
/// stripe with a location down costs one round trip, not one for the data shards and one more for parity.
fn gather_shards<'b>(
    store: &Store,
    addr: &StripeAddr<'_>,
    leaves: &[Hash],
    data: &'b mut [u8],
    parity: &'b mut Vec<u8>,
    k: usize,
    check: PayloadCheck,
) -> Tries {
    let sl = addr.shard_len;
    let m = leaves.len() - k;
    let mut tries = Tries::new(k, m);
    if sl == 0 {
        tries.good.iter_mut().take(k).for_each(|g| *g = true);
        return tries;
    }
    let mut slots: Vec<Option<&'b mut [u8]>> = data.chunks_exact_mut(sl).map(Some).collect();
    // The parity buffer is sized only once a parity shard is needed: a healthy read never holds one.
    let mut parity = Some(parity);
    let mut slot = |i: usize, slots: &mut Vec<Option<&'b mut [u8]>>| take_slot(i, k, m * sl, sl, &mut parity, slots);
    let fetch =
        |i: usize, search: Search, out: &mut [u8]| fetch_shard_into(store, addr, i, &leaves[i], out, check, search);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let fetch = &fetch;
        loop {
            while let Some((i, search)) = tries.next(leaves.len()) {
                let Some(out) = slot(i, &mut slots) else {
                    tries.done(i, search, Err(ShardProblem::Unreadable("no buffer for the shard".into())));
                    continue;
                };
                let tx = tx.clone();
                s.spawn(move || {
                    // Every try sends its answer, even one that panicked, or the loop would wait for ever.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fetch(i, search, &mut *out)))
                        .unwrap_or_else(|_| Err(ShardProblem::Unreadable("shard reader panicked".into())));
                    let _ = tx.send((i, search, out, r));
                });
            }
            if tries.running == 0 {
                break;
            }
            match rx.recv() {
                Ok((i, search, out, r)) => {
                    slots[i] = Some(out);
                    tries.done(i, search, r);
                }
                Err(_) => break,
            }
        }
    });
    tries
}

/// Takes shard `i`'s buffer out of `slots` (data shards first, then parity); the parity buffer is sized to
/// `parity_len` and split into slots the first time a parity shard needs one.
fn take_slot<'b>(
    i: usize,
    k: usize,
    parity_len: usize,
    sl: usize,
    parity: &mut Option<&'b mut Vec<u8>>,
    slots: &mut Vec<Option<&'b mut [u8]>>,
) -> Option<&'b mut [u8]> {
    if i >= k {
        if let Some(p) = parity.take() {
            p.resize(parity_len, 0);
            slots.extend(p.chunks_exact_mut(sl).map(Some));
        }
    }
    slots.get_mut(i).and_then(Option::take)
}

/// What one stripe read found, for the store's [`Store::read_stats`]; counted by [`ReadTally::count`] once the
/// caller knows the read stands (a [`PayloadCheck::HeaderOnly`] read that is done again is not counted twice).
#[derive(Debug, Default)]
#[must_use]
pub struct ReadTally {
    failures: Vec<ShardFailure>,
    rebuilt: bool,
    lost: bool,
}

impl ReadTally {
    /// Adds what the read found to the store's counters.
    pub fn count(self, store: &Store) {
        let stats = store.read_stats();
        for f in self.failures {
            stats.shard_failed(f);
        }
        if self.rebuilt {
            stats.stripe_rebuilt();
        }
        if self.lost {
            stats.stripe_lost();
        }
    }
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
    let (r, tally) = read_stripe_checked(store, codec, addr, leaves, bufs, PayloadCheck::Hashed);
    tally.count(store);
    r
}

/// [`read_stripe`] checking shards as far as `check` says; returns what it found for the caller to count.
pub fn read_stripe_checked(
    store: &Store,
    codec: &mut Codec,
    addr: &StripeAddr<'_>,
    leaves: &[Hash],
    bufs: &mut StripeBuffers,
    check: PayloadCheck,
) -> (std::result::Result<(), StripeError>, ReadTally) {
    let mut tally = ReadTally::default();
    let r = read_stripe_into(store, codec, addr, leaves, bufs, check, &mut tally);
    (r, tally)
}

fn read_stripe_into(
    store: &Store,
    codec: &mut Codec,
    addr: &StripeAddr<'_>,
    leaves: &[Hash],
    bufs: &mut StripeBuffers,
    check: PayloadCheck,
    tally: &mut ReadTally,
) -> std::result::Result<(), StripeError> {
    let (k, m) = (codec.k(), codec.m());
    let sl = addr.shard_len;
    if leaves.len() != k + m {
        return Err(StripeError::Other(Error::corrupt("stripe", "leaf count differs from k+m")));
    }
    bufs.data.resize(k * sl, 0);
    let tries = gather_shards(store, addr, leaves, &mut bufs.data, &mut bufs.parity, k, check);
    let name = |i: usize| store.locations()[addr.home(store, i)].name().to_string();
    let mut bad = Vec::new();
    for (i, p) in tries.problem.iter().enumerate() {
        if let (Some(p), false) = (p, tries.good[i]) {
            tally.failures.push(p.failure());
            bad.push(format!("{i}@{}: {p}", name(i)));
        }
    }
    let have = &tries.good[..k];
    let good = tries.good_count();
    if have.iter().all(|h| *h) {
        return Ok(());
    }
    if good < k {
        tally.lost = true;
        return Err(StripeError::Lost { have: good, bad });
    }
    let parity_ok: Vec<usize> = (0..m).filter(|&j| tries.good[k + j]).collect();
    tracing::debug!(segment = addr.segment, missing = %bad.join(", "), "rebuilding stripe from parity");
    let parity = &bufs.parity;
    codec
        .reconstruct(&mut bufs.data, sl, have, parity_ok.iter().map(|&j| (j, &parity[j * sl..(j + 1) * sl])))
        .map_err(StripeError::Other)?;
    if check == PayloadCheck::Hashed {
        // Pair assertion: every rebuilt shard must match its Merkle leaf before it is trusted.
        for (i, _) in have.iter().enumerate().filter(|(_, h)| !**h) {
            let payload = &bufs.data[i * sl..(i + 1) * sl];
            let hash = blake3::hash(payload);
            let leaf =
                crate::codec::merkle::leaf_hash(addr.file_id, addr.segment, i as u16, sl as u32, hash.as_bytes());
            if leaf != leaves[i] {
                tally.lost = true;
                return Err(StripeError::Mismatch);
            }
        }
    }
    tally.rebuilt = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut Tries, limit: usize) -> Vec<(usize, Search)> {
        std::iter::from_fn(|| t.next(limit)).collect()
    }

    #[test]
    fn a_healthy_stripe_tries_only_its_data_shards_at_home() {
        let mut t = Tries::new(4, 2);
        let first = drain(&mut t, 6);
        assert_eq!(first, (0..4).map(|i| (i, Search::Home)).collect::<Vec<_>>());
        for (i, s) in first {
            t.done(i, s, Ok(()));
        }
        assert_eq!(t.next(6), None, "k good shards: nothing more to read");
        assert_eq!(t.good_count(), 4);
    }

    #[test]
    fn a_failed_home_read_starts_parity_at_home_before_any_search_elsewhere() {
        let mut t = Tries::new(4, 2);
        drain(&mut t, 6);
        t.done(1, Search::Home, Err(ShardProblem::Missing));
        // One data shard failed while three still run: exactly one parity shard starts, at once.
        assert_eq!(drain(&mut t, 6), vec![(4, Search::Home)]);
        t.done(4, Search::Home, Err(ShardProblem::Fault(ShardFault::BadPayload)));
        assert_eq!(drain(&mut t, 6), vec![(5, Search::Home)]);
        t.done(5, Search::Home, Err(ShardProblem::Unreadable("down".into())));
        // Homes exhausted: now the failed shards are looked for on the other locations, in the order they failed.
        assert_eq!(drain(&mut t, 6), vec![(1, Search::Elsewhere)]);
        t.done(1, Search::Elsewhere, Err(ShardProblem::Missing));
        assert_eq!(drain(&mut t, 6), vec![(4, Search::Elsewhere)]);
        t.done(4, Search::Elsewhere, Ok(()));
        for i in [0, 2, 3] {
            t.done(i, Search::Home, Ok(()));
        }
        assert_eq!(t.next(6), None);
        assert_eq!(t.good, vec![true, false, true, true, true, false]);
        // A problem found at home is what is reported, not a later "missing" elsewhere; a shard found elsewhere
        // has none.
        assert_eq!(t.problem[1], Some(ShardProblem::Missing));
        assert_eq!(t.problem[4], None);
        assert_eq!(t.problem[5], Some(ShardProblem::Unreadable("down".into())));
    }

    #[test]
    fn one_at_a_time_the_tries_come_in_the_same_order() {
        let mut t = Tries::new(2, 1);
        assert_eq!(t.next(1), Some((0, Search::Home)));
        assert_eq!(t.next(1), None, "one running");
        t.done(0, Search::Home, Err(ShardProblem::Missing));
        assert_eq!(t.next(1), Some((1, Search::Home)));
        t.done(1, Search::Home, Ok(()));
        assert_eq!(t.next(1), Some((2, Search::Home)));
        t.done(2, Search::Home, Err(ShardProblem::Missing));
        assert_eq!(t.next(1), Some((0, Search::Elsewhere)));
        t.done(0, Search::Elsewhere, Err(ShardProblem::Missing));
        assert_eq!(t.next(1), Some((2, Search::Elsewhere)));
        t.done(2, Search::Elsewhere, Err(ShardProblem::Missing));
        assert_eq!(t.next(1), None, "nothing left to try");
        assert_eq!(t.good_count(), 1);
    }
}
