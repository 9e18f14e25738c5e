//! Counters of an NBD server for `bf nbd serve --metrics-listen`, rendered with the helpers of
//! [`blockframe::metrics`]: requests and errors by command, bytes read and written, latency histograms of
//! reads, writes and flushes, connections. The session code bumps them; [`NbdMetrics::render`] is pure.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use blockframe::metrics::{add, family, get, sample, single, Histogram};

use crate::request::Command;

/// The commands counted, in the order of [`NbdMetrics`]' arrays (the label values).
pub const COMMANDS: [&str; 7] = ["read", "write", "flush", "trim", "write_zeroes", "block_status", "cache"];

/// The operations with a latency histogram.
const TIMED: [&str; 3] = ["read", "write", "flush"];

/// One server's counters (shared by every connection).
#[derive(Default, Debug)]
pub struct NbdMetrics {
    requests: [AtomicU64; COMMANDS.len()],
    errors: [AtomicU64; COMMANDS.len()],
    latency: [Histogram; TIMED.len()],
    /// Bytes returned by READ.
    pub bytes_read: AtomicU64,
    /// Bytes stored by WRITE.
    pub bytes_written: AtomicU64,
    /// Requests refused before reaching the backend (out of range, bad flags, read-only export).
    pub requests_invalid: AtomicU64,
    /// Connections in the transmission phase or handshaking now.
    pub connections_open: AtomicU64,
    /// Connections accepted in all.
    pub connections_total: AtomicU64,
    /// Connections closed at once because of the connection limit.
    pub connections_refused: AtomicU64,
}

/// The index of a command in [`COMMANDS`]; `None` for DISC.
fn index(cmd: &Command) -> Option<usize> {
    Some(match cmd {
        Command::Read { .. } => 0,
        Command::Write { .. } => 1,
        Command::Flush => 2,
        Command::Trim { .. } => 3,
        Command::WriteZeroes { .. } => 4,
        Command::BlockStatus { .. } => 5,
        Command::Cache { .. } => 6,
        Command::Disconnect => return None,
    })
}

impl NbdMetrics {
    /// Counts one request the backend ran for `took`, successful or not.
    pub fn request(&self, cmd: &Command, ok: bool, took: Duration) {
        let Some(i) = index(cmd) else { return };
        add(&self.requests[i], 1);
        if !ok {
            add(&self.errors[i], 1);
        }
        if let Some(h) = TIMED.iter().position(|t| *t == COMMANDS[i]) {
            self.latency[h].observe(took);
        }
        match (cmd, ok) {
            (Command::Read { len, .. }, true) => add(&self.bytes_read, u64::from(*len)),
            (Command::Write { len, .. }, true) => add(&self.bytes_written, u64::from(*len)),
            _ => {}
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        family(&mut out, "bf_nbd_requests_total", "counter", "NBD requests run, by command.");
        for (c, n) in COMMANDS.iter().zip(&self.requests) {
            sample(&mut out, "bf_nbd_requests_total", &format!("command=\"{c}\""), get(n));
        }
        family(
            &mut out,
            "bf_nbd_request_errors_total",
            "counter",
            "NBD requests that failed in the backend, by command.",
        );
        for (c, n) in COMMANDS.iter().zip(&self.errors) {
            sample(&mut out, "bf_nbd_request_errors_total", &format!("command=\"{c}\""), get(n));
        }
        family(&mut out, "bf_nbd_request_duration_seconds", "histogram", "Time the backend took for a request.");
        for (op, h) in TIMED.iter().zip(&self.latency) {
            h.render(&mut out, "bf_nbd_request_duration_seconds", &format!("command=\"{op}\""));
        }
        let simple = [
            ("bf_nbd_read_bytes_total", "counter", "Bytes returned by READ.", get(&self.bytes_read)),
            ("bf_nbd_written_bytes_total", "counter", "Bytes stored by WRITE.", get(&self.bytes_written)),
            (
                "bf_nbd_requests_invalid_total",
                "counter",
                "Requests refused before the backend (range, flags, read-only).",
                get(&self.requests_invalid),
            ),
            ("bf_nbd_connections_open", "gauge", "Client connections open.", get(&self.connections_open)),
            ("bf_nbd_connections_total", "counter", "Client connections accepted.", get(&self.connections_total)),
            (
                "bf_nbd_connections_refused_total",
                "counter",
                "Connections closed at the connection limit.",
                get(&self.connections_refused),
            ),
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
    fn counts_commands_bytes_errors_and_latencies() {
        let m = NbdMetrics::default();
        m.request(&Command::Read { offset: 0, len: 4096 }, true, Duration::from_micros(200));
        m.request(&Command::Read { offset: 0, len: 512 }, false, Duration::from_millis(2));
        m.request(&Command::Write { offset: 0, len: 1000, fua: false }, true, Duration::from_millis(20));
        m.request(&Command::Flush, true, Duration::from_millis(3));
        m.request(&Command::Disconnect, true, Duration::ZERO);
        let text = m.render();
        for line in [
            "bf_nbd_requests_total{command=\"read\"} 2",
            "bf_nbd_requests_total{command=\"write\"} 1",
            "bf_nbd_requests_total{command=\"flush\"} 1",
            "bf_nbd_request_errors_total{command=\"read\"} 1",
            "bf_nbd_read_bytes_total 4096",
            "bf_nbd_written_bytes_total 1000",
            "bf_nbd_request_duration_seconds_bucket{command=\"read\",le=\"0.001\"} 1",
            "bf_nbd_request_duration_seconds_count{command=\"read\"} 2",
            "bf_nbd_request_duration_seconds_bucket{command=\"write\",le=\"0.01\"} 0",
            "bf_nbd_request_duration_seconds_bucket{command=\"write\",le=\"0.05\"} 1",
            "# TYPE bf_nbd_request_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
