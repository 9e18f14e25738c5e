//! Pure scrub policy: throttling, where a rebuilt shard goes, when an orphan may be deleted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Default orphan grace period: 24 hours.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How long to sleep so that `done` bytes after `elapsed` do not exceed `rate` bytes per second.
pub fn throttle_delay(done: u64, rate: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(done as f64 / rate as f64).saturating_sub(elapsed)
}

/// A shared byte-rate limiter.
#[derive(Debug)]
pub(crate) struct Throttle {
    pub(crate) rate: Option<u64>,
    pub(crate) start: Instant,
    pub(crate) done: AtomicU64,
}

impl Throttle {
    /// Counts `bytes` more done, sleeping as long as the rate needs; returns the bytes done so far.
    pub(crate) fn consume(&self, bytes: u64) -> u64 {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(rate) = self.rate {
            let d = throttle_delay(done, rate, self.start.elapsed());
            if !d.is_zero() {
                std::thread::sleep(d);
            }
        }
        done
    }
}

/// Candidate locations for a rebuilt shard, best first: home when writable, then writable locations holding
/// no shard of the segment (in rotation order after home), then the other writable ones, least loaded first.
pub fn repair_targets(home: usize, writable: &[bool], occupied: &[u32]) -> Vec<usize> {
    let n = writable.len();
    let order: Vec<usize> = (0..n).map(|j| (home + j) % n).filter(|&i| writable[i]).collect();
    let mut out: Vec<usize> = order.iter().copied().filter(|&i| i == home).collect();
    out.extend(order.iter().copied().filter(|&i| i != home && occupied[i] == 0));
    let mut rest: Vec<usize> = order.iter().copied().filter(|&i| i != home && occupied[i] > 0).collect();
    rest.sort_by_key(|&i| occupied[i]);
    out.extend(rest);
    out
}

/// Whether an orphan whose newest change was at `changed` may be deleted at `now`.
pub fn orphan_due(changed: SystemTime, now: SystemTime, grace: Duration) -> bool {
    now.duration_since(changed).is_ok_and(|age| age >= grace)
}

/// What a shard set that no catalog entry names is (see [`crate::files::intent`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrphanKind {
    /// Left by a cut commit or removal (an intent marker says so): deleted after the grace period.
    Leftover,
    /// Unmarked, and some segment has fewer than k shards: nothing whole can be made of it (shards a
    /// removal could not delete on a location that was away, leftovers of versions without markers).
    #[default]
    Fragment,
    /// Unmarked and whole-looking (every segment from 0 to the last has k shards): a file whose catalog entry
    /// was lost. Damage: kept, and restorable with the key (`bf lost-found`).
    Unreferenced,
}

/// Classifies an orphan from the `(segment, shard)` names found on all locations and whether any location
/// holds an intent marker for it.
pub fn classify_orphan(shards: &std::collections::BTreeSet<(u64, u16)>, marked: bool, k: usize) -> OrphanKind {
    if marked {
        return OrphanKind::Leftover;
    }
    let Some(&(last, _)) = shards.iter().next_back() else { return OrphanKind::Fragment };
    let whole = (0..=last).all(|s| shards.range((s, 0)..=(s, u16::MAX)).count() >= k);
    if whole {
        OrphanKind::Unreferenced
    } else {
        OrphanKind::Fragment
    }
}
