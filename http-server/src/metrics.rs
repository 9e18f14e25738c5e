//! Counters of one server, rendered in the Prometheus text exposition format (version 0.0.4) for
//! `--metrics-listen` with the helpers of [`blockframe::metrics`]. Lock-free counters; the rendering is pure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockframe::metrics::{family, get, sample, single, Histogram};

pub use blockframe::metrics::DURATION_BUCKETS;

/// Status classes counted (1xx..5xx).
const CLASSES: usize = 5;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; CLASSES],
    duration: Histogram,
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
        self.duration.observe(took);
    }

    /// The text exposition, with the segment buffer gauges given by the caller.
    pub fn render(&self, buffers_in_use: usize, buffers_max: usize) -> String {
        let mut out = String::new();
        family(&mut out, "bf_http_requests_total", "counter", "HTTP requests answered, by status class.");
        for (i, c) in self.requests.iter().enumerate() {
            sample(&mut out, "bf_http_requests_total", &format!("code=\"{}xx\"", i + 1), get(c));
        }
        family(&mut out, "bf_http_request_duration_seconds", "histogram", "Time until a response's head was ready.");
        self.duration.render(&mut out, "bf_http_request_duration_seconds", "");
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
            single(&mut out, name, kind, help, v);
        }
        out
    }
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
