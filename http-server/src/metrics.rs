//! Counters of one server, rendered in the Prometheus text exposition format (version 0.0.4) for
//! `--metrics-listen`. Lock-free counters; the rendering is pure.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// Status classes counted (1xx..5xx).
const CLASSES: usize = 5;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; CLASSES],
    duration_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    /// Body bytes of files sent.
    pub bytes_sent: AtomicU64,
    /// Responses cut short because a segment could not be read and verified.
    pub responses_aborted: AtomicU64,
    /// Segments read and verified.
    pub segment_reads: AtomicU64,
    /// Segment reads that failed (beyond repair, unreadable).
    pub segment_read_failures: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections closed at once because of the connection limit.
    pub connections_refused: AtomicU64,
    /// Uploads committed.
    pub uploads_committed: AtomicU64,
    /// Uploads not committed.
    pub uploads_failed: AtomicU64,
}

impl Metrics {
    /// Counts one request answered with `status` after `took` (until its response head was ready).
    pub fn request(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, CLASSES) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (b, bound) in self.duration_buckets.iter().zip(DURATION_BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us.fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// The text exposition, with the segment buffer gauges given by the caller.
    pub fn render(&self, buffers_in_use: usize, buffers_max: usize) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        family(&mut out, "bf_http_requests_total", "counter", "HTTP requests answered, by status class.");
        for (i, c) in self.requests.iter().enumerate() {
            let _ = writeln!(out, "bf_http_requests_total{{code=\"{}xx\"}} {}", i + 1, get(c));
        }
        family(&mut out, "bf_http_request_duration_seconds", "histogram", "Time until a response's head was ready.");
        for (b, bound) in self.duration_buckets.iter().zip(DURATION_BUCKETS) {
            let _ = writeln!(out, "bf_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}", get(b));
        }
        let count = get(&self.duration_count);
        let _ = writeln!(out, "bf_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "bf_http_request_duration_seconds_sum {}", get(&self.duration_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "bf_http_request_duration_seconds_count {count}");
        let simple: [(&str, &str, &str, u64); 10] = [
            ("bf_http_response_bytes_total", "counter", "File bytes sent in response bodies.", get(&self.bytes_sent)),
            (
                "bf_http_responses_aborted_total",
                "counter",
                "Responses cut short by a segment beyond repair.",
                get(&self.responses_aborted),
            ),
            ("bf_http_segment_reads_total", "counter", "Segments read and verified.", get(&self.segment_reads)),
            (
                "bf_http_segment_read_failures_total",
                "counter",
                "Segment reads that failed verification or repair.",
                get(&self.segment_read_failures),
            ),
            ("bf_http_connections_open", "gauge", "Client connections open.", get(&self.connections_open)),
            (
                "bf_http_connections_refused_total",
                "counter",
                "Connections closed at the connection limit.",
                get(&self.connections_refused),
            ),
            ("bf_http_uploads_committed_total", "counter", "Uploads (PUT) committed.", get(&self.uploads_committed)),
            ("bf_http_uploads_failed_total", "counter", "Uploads (PUT) not committed.", get(&self.uploads_failed)),
            ("bf_http_segment_buffers_in_use", "gauge", "Segment buffers held by responses.", buffers_in_use as u64),
            ("bf_http_segment_buffers_max", "gauge", "The cap on segment buffers.", buffers_max as u64),
        ];
        for (name, kind, help, v) in simple {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

/// The HELP and TYPE lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request(200, Duration::from_millis(3));
        m.request(206, Duration::from_millis(70));
        m.request(416, Duration::from_micros(10));
        m.bytes_sent.fetch_add(1234, Ordering::Relaxed);
        let text = m.render(1, 4);
        for line in [
            "bf_http_requests_total{code=\"2xx\"} 2",
            "bf_http_requests_total{code=\"4xx\"} 1",
            "bf_http_request_duration_seconds_bucket{le=\"0.001\"} 1",
            "bf_http_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "bf_http_request_duration_seconds_bucket{le=\"0.1\"} 3",
            "bf_http_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "bf_http_request_duration_seconds_count 3",
            "bf_http_response_bytes_total 1234",
            "bf_http_segment_buffers_in_use 1",
            "# TYPE bf_http_request_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
