//! `Range: bytes=...` (RFC 9110 section 14): parsing, resolving against a length, coalescing. Pure logic.
//!
//! Policy: a range unit other than `bytes` is ignored (the whole file is served, as the RFC requires); a
//! `bytes` specifier that does not parse is rejected (416, with the reason), so a client bug shows up instead of
//! silently downloading everything; more than [`MAX_RANGES`] ranges after coalescing are ignored (200), which
//! bounds the work and the multipart overhead a single request can ask for.

/// Most ranges served as one `multipart/byteranges` response; more (after coalescing) are answered with the
/// whole file.
pub const MAX_RANGES: usize = 64;

/// Most range specs read from one header (a longer list is not parsed at all).
pub const MAX_SPECS: usize = 1024;

/// Ranges separated by fewer bytes than this are merged: a part header costs about as much.
pub const MERGE_GAP_BYTES: u64 = 80;

/// One `range-spec` as written by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `first-last` or `first-` (`last` is inclusive).
    From {
        /// First byte position.
        first: u64,
        /// Last byte position, inclusive; `None` means to the end.
        last: Option<u64>,
    },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// A byte range of a file: `start..end` (end exclusive, never empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: ranges are never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The `Content-Range` value for this range of a file of `total` bytes.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{total}", self.start, self.end - 1)
    }
}

/// Why a `Range` header was not used as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not a `bytes` range: ignored (the whole file is served).
    #[error("range unit is not bytes")]
    UnknownUnit,
    /// More specs than [`MAX_SPECS`].
    #[error("more than {MAX_SPECS} ranges")]
    TooManySpecs,
    /// A syntax error in a `bytes` range set.
    #[error("invalid byte range {spec:?}: {why}")]
    Invalid {
        /// The offending spec (or the whole set).
        spec: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// What to send for a request's `Range` header against a file of a given length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangePlan {
    /// 200: the whole file (no header, an unknown unit, too many ranges, an empty file).
    Full,
    /// 206 with one `Content-Range`.
    Single(ByteRange),
    /// 206 `multipart/byteranges`, in this order.
    Multi(Vec<ByteRange>),
    /// 416 with `Content-Range: bytes */len`: no range overlaps the file.
    NotSatisfiable,
    /// 416 with the reason: a `bytes` range set that does not parse.
    Invalid(RangeError),
}

/// Decides what to send for `header` (the `Range` value, if any) on a file of `len` bytes.
pub fn plan(header: Option<&str>, len: u64) -> RangePlan {
    let Some(header) = header else { return RangePlan::Full };
    let specs = match parse(header) {
        Ok(s) => s,
        Err(RangeError::UnknownUnit) | Err(RangeError::TooManySpecs) => return RangePlan::Full,
        Err(e) => return RangePlan::Invalid(e),
    };
    if len == 0 {
        // Nothing to select from: an empty file is sent whole (empty), whatever was asked.
        return RangePlan::Full;
    }
    let ranges = resolve(&specs, len);
    if ranges.is_empty() {
        return RangePlan::NotSatisfiable;
    }
    let mut ranges = coalesce(ranges);
    match ranges.len() {
        1 => RangePlan::Single(ranges.remove(0)),
        n if n > MAX_RANGES => RangePlan::Full,
        _ => RangePlan::Multi(ranges),
    }
}

/// Parses a `Range` header value (`bytes=0-99, 200-, -50`).
pub fn parse(header: &str) -> Result<Vec<RangeSpec>, RangeError> {
    let (unit, set) = header.trim().split_once('=').ok_or(RangeError::UnknownUnit)?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Err(RangeError::UnknownUnit);
    }
    let mut specs = Vec::new();
    // RFC 9110's `1#range-spec`: empty list elements are allowed and skipped, at least one must be present.
    for part in set.split(',').map(|p| p.trim_matches([' ', '\t'])).filter(|p| !p.is_empty()) {
        if specs.len() == MAX_SPECS {
            return Err(RangeError::TooManySpecs);
        }
        specs.push(parse_spec(part)?);
    }
    if specs.is_empty() {
        return Err(RangeError::Invalid { spec: set.to_string(), why: "no range given" });
    }
    Ok(specs)
}

fn parse_spec(spec: &str) -> Result<RangeSpec, RangeError> {
    let bad = |why| RangeError::Invalid { spec: spec.to_string(), why };
    let (first, last) = spec.split_once('-').ok_or(bad("no '-'"))?;
    if first.is_empty() {
        let n = digits(last).ok_or(bad("the suffix length is not a number"))?;
        return if n == 0 { Err(bad("a suffix of zero bytes")) } else { Ok(RangeSpec::Suffix(n)) };
    }
    let first = digits(first).ok_or(bad("the first position is not a number"))?;
    let last = match last {
        "" => None,
        l => Some(digits(l).ok_or(bad("the last position is not a number"))?),
    };
    if last.is_some_and(|l| l < first) {
        return Err(bad("the last position is before the first"));
    }
    Ok(RangeSpec::From { first, last })
}

/// A run of ASCII digits as a number, saturating at `u64::MAX` (any such position is past every file's end).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0'))))
}

/// The satisfiable specs as ranges of a file of `len` (> 0) bytes, in request order; the others are dropped.
pub fn resolve(specs: &[RangeSpec], len: u64) -> Vec<ByteRange> {
    specs
        .iter()
        .filter_map(|s| match *s {
            RangeSpec::From { first, .. } if first >= len => None,
            RangeSpec::From { first, last } => {
                Some(ByteRange { start: first, end: last.map_or(len, |l| l.saturating_add(1).min(len)) })
            }
            RangeSpec::Suffix(n) => Some(ByteRange { start: len.saturating_sub(n), end: len }),
        })
        .collect()
}

/// Merges overlapping ranges, and ranges closer than [`MERGE_GAP_BYTES`]. When no two ranges overlap the
/// request order is kept (only neighbours in that order are merged); when some overlap, or merging neighbours in
/// request order would make a range overlap an earlier one, the ranges are sorted and merged (RFC 9110 section
/// 14.2 allows coalescing regardless of order), which also defuses requests that ask for the same bytes many
/// times.
pub fn coalesce(ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    let mut sorted = ranges.clone();
    sorted.sort();
    if !overlapping(&sorted) {
        let in_order = merge_neighbours(ranges);
        if !overlapping_unsorted(&in_order) {
            return in_order;
        }
    }
    merge_neighbours(sorted)
}

/// Merges each range into the previous one when it starts within or just after it.
fn merge_neighbours(ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(prev) if r.start >= prev.start && r.start <= prev.end.saturating_add(MERGE_GAP_BYTES) => {
                prev.end = prev.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

/// True when two ranges of a sorted list overlap.
fn overlapping(sorted: &[ByteRange]) -> bool {
    sorted.windows(2).any(|w| w[1].start < w[0].end)
}

fn overlapping_unsorted(ranges: &[ByteRange]) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    overlapping(&sorted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn parses_the_forms_of_rfc_9110() {
        assert_eq!(
            parse("bytes=0-499, 500-, -200,, 7-7").unwrap(),
            vec![
                RangeSpec::From { first: 0, last: Some(499) },
                RangeSpec::From { first: 500, last: None },
                RangeSpec::Suffix(200),
                RangeSpec::From { first: 7, last: Some(7) },
            ]
        );
        assert_eq!(parse("Bytes = 1-2").unwrap(), vec![RangeSpec::From { first: 1, last: Some(2) }]);
        assert_eq!(parse("items=0-1"), Err(RangeError::UnknownUnit));
        assert_eq!(parse("0-1"), Err(RangeError::UnknownUnit));
    }

    #[test]
    fn rejects_what_does_not_parse() {
        for h in [
            "bytes=",
            "bytes=,",
            "bytes=5",
            "bytes=a-b",
            "bytes=5-2",
            "bytes=-0",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=--1",
        ] {
            assert!(matches!(parse(h), Err(RangeError::Invalid { .. })), "{h}");
            assert!(matches!(plan(Some(h), 100), RangePlan::Invalid(_)), "{h}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_SPECS + 1].join(","));
        assert_eq!(parse(&many), Err(RangeError::TooManySpecs));
        assert_eq!(plan(Some(&many), 10), RangePlan::Full);
    }

    #[test]
    fn plans_single_multi_suffix_and_past_the_end() {
        assert_eq!(plan(None, 10), RangePlan::Full);
        assert_eq!(plan(Some("bytes=0-0"), 10), RangePlan::Single(r(0, 1)));
        assert_eq!(plan(Some("bytes=5-"), 10), RangePlan::Single(r(5, 10)));
        assert_eq!(plan(Some("bytes=5-999999999999999999999999"), 10), RangePlan::Single(r(5, 10)));
        assert_eq!(plan(Some("bytes=-3"), 10), RangePlan::Single(r(7, 10)));
        assert_eq!(plan(Some("bytes=-30"), 10), RangePlan::Single(r(0, 10)));
        assert_eq!(plan(Some("bytes=10-"), 10), RangePlan::NotSatisfiable);
        assert_eq!(plan(Some("bytes=10-20, 30-"), 10), RangePlan::NotSatisfiable);
        assert_eq!(plan(Some("bytes=10-20, 2-3"), 10), RangePlan::Single(r(2, 4)));
        assert_eq!(plan(Some("bytes=0-0,-1"), 10_000), RangePlan::Multi(vec![r(0, 1), r(9999, 10_000)]));
        assert_eq!(plan(Some("bytes=0-5"), 0), RangePlan::Full);
        assert_eq!(plan(Some("furlongs=0-5"), 10), RangePlan::Full);
        assert_eq!(r(0, 1).content_range(10), "bytes 0-0/10");
    }

    #[test]
    fn coalesces_overlaps_and_small_gaps_only() {
        // In order, far apart: kept as asked.
        assert_eq!(coalesce(vec![r(1000, 1100), r(0, 10)]), vec![r(1000, 1100), r(0, 10)]);
        // A small gap merges neighbours.
        assert_eq!(coalesce(vec![r(0, 10), r(50, 60)]), vec![r(0, 60)]);
        // Overlaps anywhere: sorted and merged.
        assert_eq!(coalesce(vec![r(500, 600), r(0, 100), r(50, 150)]), vec![r(0, 150), r(500, 600)]);
        // No overlap as asked, but merging neighbours in request order would make one (a range grown over an
        // earlier one): sorted and merged instead (found by the property test below).
        assert_eq!(coalesce(vec![r(114, 115), r(43, 84), r(115, 116)]), vec![r(43, 116)]);
        // The same bytes a thousand times are one range.
        let dup = format!("bytes={}", vec!["0-99999"; 1000].join(","));
        assert_eq!(plan(Some(&dup), 1 << 20), RangePlan::Single(r(0, 100_000)));
        // Too many separate ranges: the whole file.
        let spread =
            format!("bytes={}", (0..100).map(|i| format!("{}-{}", i * 1000, i * 1000)).collect::<Vec<_>>().join(","));
        assert_eq!(plan(Some(&spread), 1 << 20), RangePlan::Full);
    }

    fn covered(ranges: &[ByteRange]) -> std::collections::BTreeSet<u64> {
        ranges.iter().flat_map(|r| r.start..r.end).collect()
    }

    proptest! {
        #[test]
        fn any_header_is_planned_without_panicking(h in "(bytes|BYTES|x)?=?[-0-9, \t=a+]{0,40}", len in 0u64..1000) {
            match plan(Some(&h), len) {
                RangePlan::Single(r) => prop_assert!(r.start < r.end && r.end <= len),
                RangePlan::Multi(rs) => prop_assert!(rs.iter().all(|r| r.start < r.end && r.end <= len)),
                _ => {}
            }
        }

        #[test]
        fn resolved_ranges_lie_in_the_file(specs in prop::collection::vec(
            prop_oneof![
                (0u64..300, prop::option::of(0u64..300)).prop_map(|(f, l)| RangeSpec::From {
                    first: f, last: l.map(|l| l.max(f)) }),
                (1u64..300).prop_map(RangeSpec::Suffix),
            ], 1..12), len in 1u64..256) {
            for x in resolve(&specs, len) {
                prop_assert!(x.start < x.end && x.end <= len);
            }
        }

        #[test]
        fn coalescing_keeps_every_byte_and_adds_few(ranges in prop::collection::vec((0u64..2000, 1u64..200), 1..20)) {
            let ranges: Vec<ByteRange> = ranges.into_iter().map(|(s, l)| r(s, s + l)).collect();
            let out = coalesce(ranges.clone());
            let before = covered(&ranges);
            let after = covered(&out);
            prop_assert!(before.is_subset(&after));
            // Only gaps shorter than MERGE_GAP_BYTES are filled in.
            prop_assert!(after.len() as u64 <= before.len() as u64 + MERGE_GAP_BYTES * ranges.len() as u64);
            prop_assert!(out.len() <= ranges.len());
            let mut sorted = out.clone();
            sorted.sort();
            for w in sorted.windows(2) {
                prop_assert!(w[0].end <= w[1].start, "overlap left: {:?}", out);
            }
        }

        #[test]
        fn printed_ranges_parse_back(first in 0u64..1 << 40, n in 0u64..1 << 20, suffix in 1u64..1 << 30) {
            let h = format!("bytes={first}-{}, -{suffix}, {first}-", first + n);
            prop_assert_eq!(parse(&h).unwrap(), vec![
                RangeSpec::From { first, last: Some(first + n) },
                RangeSpec::Suffix(suffix),
                RangeSpec::From { first, last: None },
            ]);
        }
    }
}
