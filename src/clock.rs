//! The one home of "now": wall-clock time as the records store it (seconds or nanoseconds since the Unix epoch).
//! A clock before 1970 reads as 0 rather than failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch of `t` (0 before the epoch).
pub fn secs_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs() -> u64 {
    secs_of(SystemTime::now())
}

/// Nanoseconds since the Unix epoch, now (fits in u64 until the year 2554).
pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_nanoseconds_agree() {
        let (s, ns) = (unix_secs(), unix_ns());
        assert!(s > 1_700_000_000, "{s}");
        assert!((ns / 1_000_000_000).abs_diff(s) <= 1);
        assert_eq!(secs_of(UNIX_EPOCH - std::time::Duration::from_secs(5)), 0);
    }
}
