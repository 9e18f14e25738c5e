//! Counters and the Prometheus text exposition format (version 0.0.4), shared by the servers' `--metrics-listen`
//! endpoints (`bf serve`, `bf nbd serve`, `bf mount`). Lock-free atomics that the hot paths bump; rendering is
//! pure and writes into a `String`. No registry and no labels beyond what a caller writes itself: each server
//! keeps its own struct of counters and renders it with [`family`], [`sample`] and [`Histogram::render`].
//!
//! [`reads`] holds the read path's counters of a store (shards rebuilt on the fly, verification failures); the
//! store's section of every endpoint (those counters and the last scrub's results) is [`store::StoreMetrics`].

pub mod reads;
pub mod store;

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const DURATION_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// A latency histogram with the [`DURATION_BUCKETS`] bounds.
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `took`.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(DURATION_BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// How many observations were counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes the histogram's samples (cumulative buckets, `+Inf`, sum and count) under `name`; `labels` is
    /// empty or `key="value",...` without braces, and goes before `le`. The family lines are the caller's.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let braces = |l: &str| if l.is_empty() { String::new() } else { format!("{{{l}}}") };
        for (b, bound) in self.buckets.iter().zip(DURATION_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}", b.load(Ordering::Relaxed));
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family (`kind`: counter, gauge, histogram).
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line; `labels` is empty or `key="value",...` without braces.
pub fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A family of one unlabelled sample: its HELP and TYPE lines and the value.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    sample(out, name, "", value);
}

/// Reads a counter (relaxed: the exposition is a snapshot, not a consistent cut).
pub fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Adds `n` to a counter.
pub fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_go_before_le() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "op=\"read\"");
        for line in [
            "x_seconds_bucket{op=\"read\",le=\"0.001\"} 1",
            "x_seconds_bucket{op=\"read\",le=\"0.005\"} 1",
            "x_seconds_bucket{op=\"read\",le=\"0.01\"} 2",
            "x_seconds_bucket{op=\"read\",le=\"30\"} 2",
            "x_seconds_bucket{op=\"read\",le=\"+Inf\"} 3",
            "x_seconds_count{op=\"read\"} 3",
            "x_seconds_sum{op=\"read\"} 60.0075",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        let mut plain = String::new();
        h.render(&mut plain, "y", "");
        assert!(plain.lines().any(|l| l == "y_bucket{le=\"+Inf\"} 3" || l == "y_count 3"), "{plain}");
        assert!(plain.lines().any(|l| l == "y_count 3"), "{plain}");
    }

    #[test]
    fn samples_and_families() {
        let mut out = String::new();
        single(&mut out, "a_total", "counter", "As.", 4);
        sample(&mut out, "b", "k=\"v\"", 2);
        assert_eq!(out, "# HELP a_total As.\n# TYPE a_total counter\na_total 4\nb{k=\"v\"} 2\n");
    }
}
