//! Conditional requests (RFC 9110 section 13): `If-Match`, `If-Unmodified-Since`, `If-None-Match`,
//! `If-Modified-Since` and `If-Range`, evaluated in the RFC's order against a file's strong entity tag (its
//! Merkle root) and its modification time. Pure logic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The validators of one file.
#[derive(Clone, Debug)]
pub struct Validators {
    /// The strong entity tag, quoted (`"<hex root>"`).
    pub etag: String,
    /// The modification time, in whole seconds (HTTP dates have no finer resolution).
    pub last_modified: SystemTime,
}

impl Validators {
    /// Validators of a file with Merkle root `root_hex` modified at `mtime_unix_ns`.
    pub fn new(root_hex: &str, mtime_unix_ns: i64) -> Self {
        let secs = u64::try_from(mtime_unix_ns.div_euclid(1_000_000_000)).unwrap_or(0);
        Validators { etag: format!("\"{root_hex}\""), last_modified: UNIX_EPOCH + Duration::from_secs(secs) }
    }

    /// The `Last-Modified` header value.
    pub fn last_modified_header(&self) -> String {
        httpdate::fmt_http_date(self.last_modified)
    }
}

/// The conditional headers of a request (raw values; absent ones `None`).
#[derive(Clone, Debug, Default)]
pub struct Conditions<'a> {
    /// `If-Match`.
    pub if_match: Option<&'a str>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a str>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a str>,
    /// `If-Unmodified-Since`.
    pub if_unmodified_since: Option<&'a str>,
    /// `If-Range`.
    pub if_range: Option<&'a str>,
}

/// What the preconditions decide for a GET or HEAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Serve the file; honour the `Range` header only when `use_range`.
    Serve {
        /// False when `If-Range` does not match (the whole file is sent).
        use_range: bool,
    },
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates the preconditions of a GET or HEAD in the order of RFC 9110 section 13.2.2.
pub fn evaluate(c: &Conditions<'_>, v: &Validators) -> Outcome {
    if let Some(h) = c.if_match {
        if !matches_any(h, &v.etag, Compare::Strong) {
            return Outcome::Failed;
        }
    } else if let Some(t) = c.if_unmodified_since.and_then(parse_date) {
        if v.last_modified > t {
            return Outcome::Failed;
        }
    }
    if let Some(h) = c.if_none_match {
        if matches_any(h, &v.etag, Compare::Weak) {
            return Outcome::NotModified;
        }
    } else if let Some(t) = c.if_modified_since.and_then(parse_date) {
        if v.last_modified <= t {
            return Outcome::NotModified;
        }
    }
    Outcome::Serve { use_range: c.if_range.is_none_or(|h| if_range_matches(h, v)) }
}

/// `If-Range`: an entity tag must match strongly; a date must equal `Last-Modified` exactly.
fn if_range_matches(h: &str, v: &Validators) -> bool {
    let h = h.trim();
    if h.starts_with('"') || h.starts_with("W/") {
        return !h.starts_with("W/") && h == v.etag;
    }
    parse_date(h).is_some_and(|t| t == v.last_modified)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    Strong,
    Weak,
}

/// Whether a `#entity-tag` list (or `*`) names `etag` (a strong tag of ours, quoted).
fn matches_any(list: &str, etag: &str, how: Compare) -> bool {
    if list.trim() == "*" {
        return true;
    }
    entity_tags(list).any(|(weak, tag)| tag == etag && !(weak && how == Compare::Strong))
}

/// The entity tags of a list as (weak, quoted tag); malformed elements are skipped.
fn entity_tags(list: &str) -> impl Iterator<Item = (bool, &str)> {
    let mut rest = list;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return None;
        }
        let (weak, body) = match rest.strip_prefix("W/") {
            Some(b) => (true, b),
            None => (false, rest),
        };
        if !body.starts_with('"') {
            // Not a tag: skip to the next element.
            rest = body.find(',').map_or("", |i| &body[i..]);
            continue;
        }
        let Some(close) = body[1..].find('"') else {
            rest = "";
            return None;
        };
        let tag = &body[..close + 2];
        rest = &body[close + 2..];
        return Some((weak, tag));
    })
}

fn parse_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators {
        Validators::new("ab12", 1_700_000_000_123_456_789)
    }

    fn at(secs: u64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    const SERVE: Outcome = Outcome::Serve { use_range: true };

    proptest::proptest! {
        #[test]
        fn any_header_is_evaluated_without_panicking(h in "(W/)?[\"*, a-z0-9é]{0,30}") {
            let v = v();
            let c = Conditions {
                if_match: Some(&h),
                if_none_match: Some(&h),
                if_modified_since: Some(&h),
                if_unmodified_since: Some(&h),
                if_range: Some(&h),
            };
            let _ = evaluate(&c, &v);
            let _ = entity_tags(&h).count();
        }
    }

    #[test]
    fn validators_are_a_quoted_root_and_whole_seconds() {
        let v = v();
        assert_eq!(v.etag, "\"ab12\"");
        assert_eq!(v.last_modified_header(), "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(Validators::new("x", -5).last_modified, UNIX_EPOCH);
    }

    #[test]
    fn if_none_match_gives_304_and_weak_tags_match() {
        let v = v();
        let c = |h| Conditions { if_none_match: Some(h), ..Default::default() };
        assert_eq!(evaluate(&c("\"ab12\""), &v), Outcome::NotModified);
        assert_eq!(evaluate(&c("W/\"ab12\""), &v), Outcome::NotModified);
        assert_eq!(evaluate(&c("\"zz\", \"ab12\""), &v), Outcome::NotModified);
        assert_eq!(evaluate(&c("*"), &v), Outcome::NotModified);
        assert_eq!(evaluate(&c("\"zz\""), &v), SERVE);
        assert_eq!(evaluate(&c("garbage, \"ab"), &v), SERVE);
    }

    #[test]
    fn if_match_is_strong_and_gives_412() {
        let v = v();
        let c = |h| Conditions { if_match: Some(h), ..Default::default() };
        assert_eq!(evaluate(&c("\"ab12\""), &v), SERVE);
        assert_eq!(evaluate(&c("*"), &v), SERVE);
        assert_eq!(evaluate(&c("W/\"ab12\""), &v), Outcome::Failed);
        assert_eq!(evaluate(&c("\"other\""), &v), Outcome::Failed);
    }

    #[test]
    fn dates_compare_in_whole_seconds() {
        let v = v();
        let ims =
            |t: u64| Conditions { if_modified_since: Some(Box::leak(at(t).into_boxed_str())), ..Default::default() };
        assert_eq!(evaluate(&ims(1_700_000_000), &v), Outcome::NotModified);
        assert_eq!(evaluate(&ims(1_800_000_000), &v), Outcome::NotModified);
        assert_eq!(evaluate(&ims(1_699_999_999), &v), SERVE);
        let ius =
            |t: u64| Conditions { if_unmodified_since: Some(Box::leak(at(t).into_boxed_str())), ..Default::default() };
        assert_eq!(evaluate(&ius(1_699_999_999), &v), Outcome::Failed);
        assert_eq!(evaluate(&ius(1_700_000_000), &v), SERVE);
        // An unparsable date is ignored, as the RFC says.
        let bad = Conditions { if_modified_since: Some("yesterday"), ..Default::default() };
        assert_eq!(evaluate(&bad, &v), SERVE);
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        let v = v();
        let c = Conditions {
            if_none_match: Some("\"other\""),
            if_modified_since: Some(Box::leak(at(1_800_000_000).into_boxed_str())),
            ..Default::default()
        };
        assert_eq!(evaluate(&c, &v), SERVE);
    }

    #[test]
    fn if_range_needs_a_strong_match_or_the_exact_date() {
        let v = v();
        let c = |h: &'static str| Conditions { if_range: Some(h), ..Default::default() };
        assert_eq!(evaluate(&c("\"ab12\""), &v), SERVE);
        assert_eq!(evaluate(&c("W/\"ab12\""), &v), Outcome::Serve { use_range: false });
        assert_eq!(evaluate(&c("\"old\""), &v), Outcome::Serve { use_range: false });
        assert_eq!(evaluate(&c(Box::leak(at(1_700_000_000).into_boxed_str())), &v), SERVE);
        assert_eq!(
            evaluate(&c(Box::leak(at(1_600_000_000).into_boxed_str())), &v),
            Outcome::Serve { use_range: false }
        );
    }
}
