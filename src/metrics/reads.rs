//! What the verified read path met: shards it could not use (missing, failing verification, on a location that
//! could not be read) and the stripes (file segments, volume stripes) it rebuilt from parity or found beyond
//! repair. One [`ReadStats`] per open store ([`crate::store::Store::read_stats`]); the stripe readers bump it,
//! every metrics endpoint renders it. Lock-free counters; rendering is pure.

use std::sync::atomic::AtomicU64;

use super::{add, family, get, sample, single};

/// Why a shard that a read wanted could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardFailure {
    /// Not found on any location.
    Missing,
    /// Found, but its header, checksum or Merkle leaf did not verify.
    Corrupt,
    /// Its location could not be read.
    Unreadable,
}

impl ShardFailure {
    /// Every reason, in the order of the rendered label values.
    pub const ALL: [ShardFailure; 3] = [ShardFailure::Missing, ShardFailure::Corrupt, ShardFailure::Unreadable];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            ShardFailure::Missing => "missing",
            ShardFailure::Corrupt => "corrupt",
            ShardFailure::Unreadable => "unreadable",
        }
    }
}

/// The read path's counters of one open store.
#[derive(Default, Debug)]
pub struct ReadStats {
    shard_failures: [AtomicU64; ShardFailure::ALL.len()],
    stripes_rebuilt: AtomicU64,
    stripes_lost: AtomicU64,
}

/// A snapshot of [`ReadStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// Shards not found, by the order of [`ShardFailure::ALL`]: missing, corrupt, unreadable.
    pub shard_failures: [u64; ShardFailure::ALL.len()],
    /// Stripes rebuilt from parity (some data shard missing or bad, k good shards found).
    pub stripes_rebuilt: u64,
    /// Stripes with fewer than k good shards (the read failed).
    pub stripes_lost: u64,
}

impl ReadStats {
    /// Counts one shard a read could not use.
    pub fn shard_failed(&self, why: ShardFailure) {
        add(&self.shard_failures[why as usize], 1);
    }

    /// Counts one stripe rebuilt from parity.
    pub fn stripe_rebuilt(&self) {
        add(&self.stripes_rebuilt, 1);
    }

    /// Counts one stripe found beyond repair.
    pub fn stripe_lost(&self) {
        add(&self.stripes_lost, 1);
    }

    /// The counters now.
    pub fn counts(&self) -> ReadCounts {
        ReadCounts {
            shard_failures: self.shard_failures.each_ref().map(get),
            stripes_rebuilt: get(&self.stripes_rebuilt),
            stripes_lost: get(&self.stripes_lost),
        }
    }
}

impl ReadCounts {
    /// Shards that failed for `why`.
    pub fn shards(&self, why: ShardFailure) -> u64 {
        self.shard_failures[why as usize]
    }

    /// Appends the text exposition of the counters to `out`.
    pub fn render(&self, out: &mut String) {
        let name = "bf_read_shard_failures_total";
        family(out, name, "counter", "Shards a verified read could not use, by reason (rebuilt from parity).");
        for why in ShardFailure::ALL {
            sample(out, name, &format!("reason=\"{}\"", why.label()), self.shards(why));
        }
        single(
            out,
            "bf_read_stripes_rebuilt_total",
            "counter",
            "File segments and volume stripes that reads rebuilt from parity.",
            self.stripes_rebuilt,
        );
        single(
            out,
            "bf_read_stripes_lost_total",
            "counter",
            "File segments and volume stripes that reads found beyond repair (fewer than k good shards).",
            self.stripes_lost,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_renders_them() {
        let s = ReadStats::default();
        s.shard_failed(ShardFailure::Missing);
        s.shard_failed(ShardFailure::Missing);
        s.shard_failed(ShardFailure::Corrupt);
        s.stripe_rebuilt();
        s.stripe_lost();
        s.stripe_lost();
        let c = s.counts();
        assert_eq!(c.shards(ShardFailure::Missing), 2);
        assert_eq!(c.shards(ShardFailure::Unreadable), 0);
        let mut text = String::new();
        c.render(&mut text);
        for line in [
            "bf_read_shard_failures_total{reason=\"missing\"} 2",
            "bf_read_shard_failures_total{reason=\"corrupt\"} 1",
            "bf_read_shard_failures_total{reason=\"unreadable\"} 0",
            "bf_read_stripes_rebuilt_total 1",
            "bf_read_stripes_lost_total 2",
            "# TYPE bf_read_stripes_lost_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
