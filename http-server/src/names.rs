//! Store names in URLs: request paths percent-decoded into names, names percent-encoded into links, and names
//! escaped for HTML. Pure logic.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What a path segment keeps unencoded: RFC 3986's unreserved characters. Everything else, `/`, `%`, `#`,
/// `?`, spaces and non-ASCII included, is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A request path taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A directory: its name in the store without a trailing `/` (`""` is the root).
    Dir(String),
    /// A file (or a directory asked for without its trailing `/`): its name in the store.
    File(String),
}

/// Why a request path names nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// A percent-escape that does not decode to UTF-8.
    #[error("the path is not UTF-8 once decoded")]
    NotUtf8,
    /// An empty, `.` or `..` segment, or one holding `/` or NUL once decoded: store names have none.
    #[error("the path has an empty, '.' or '..' segment, or an encoded '/' or NUL")]
    BadSegment,
}

/// Decodes the path of a request URI (without its query) into what it names.
pub fn parse_path(path: &str) -> Result<Target, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if rest.is_empty() {
        return Ok(Target::Dir(String::new()));
    }
    let (rest, dir) = match rest.strip_suffix('/') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let mut parts = Vec::new();
    for seg in rest.split('/') {
        let s = percent_decode_str(seg).decode_utf8().map_err(|_| PathError::NotUtf8)?;
        if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\0']) {
            return Err(PathError::BadSegment);
        }
        parts.push(s.into_owned());
    }
    let name = parts.join("/");
    Ok(if dir { Target::Dir(name) } else { Target::File(name) })
}

/// One path segment (a name part) percent-encoded for a URL.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// A store name (`a/b c`) as an absolute URL path (`/a/b%20c`), each part encoded; `dir` adds the trailing `/`.
pub fn url_path(name: &str, dir: bool) -> String {
    let mut out = String::from("/");
    if !name.is_empty() {
        out.push_str(&name.split('/').map(encode_segment).collect::<Vec<_>>().join("/"));
        if dir {
            out.push('/');
        }
    }
    out
}

/// Text escaped for HTML content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\0' => out.push('\u{fffd}'),
            c if c.is_control() => out.push_str(&format!("&#{};", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// A `Content-Disposition: attachment` value for a file's last name part: an ASCII fallback and the exact
/// name as RFC 8187 `filename*`.
pub fn attachment(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let ascii: String =
        base.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{}", encode_segment(base))
}

/// The value of `key` in a query string (`a=1&download&format=json`): `Some("")` for a bare key.
pub fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_decode_into_names() {
        assert_eq!(parse_path("/"), Ok(Target::Dir(String::new())));
        assert_eq!(parse_path("/a/b%20c"), Ok(Target::File("a/b c".into())));
        assert_eq!(parse_path("/a/b/"), Ok(Target::Dir("a/b".into())));
        assert_eq!(parse_path("/%23%3F%25/%C3%A9t%C3%A9"), Ok(Target::File("#?%/été".into())));
        assert_eq!(parse_path("a"), Err(PathError::NotAbsolute));
        assert_eq!(parse_path("/a//b"), Err(PathError::BadSegment));
        assert_eq!(parse_path("/a/../b"), Err(PathError::BadSegment));
        assert_eq!(parse_path("/a/%2e%2e/b"), Err(PathError::BadSegment));
        assert_eq!(parse_path("/a%2Fb"), Err(PathError::BadSegment));
        assert_eq!(parse_path("/a%00"), Err(PathError::BadSegment));
        assert_eq!(parse_path("/%ff"), Err(PathError::NotUtf8));
    }

    #[test]
    fn names_encode_into_urls() {
        assert_eq!(url_path("", true), "/");
        assert_eq!(url_path("dir/a b#?%.txt", false), "/dir/a%20b%23%3F%25.txt");
        assert_eq!(url_path("été", true), "/%C3%A9t%C3%A9/");
    }

    #[test]
    fn html_and_headers_are_escaped() {
        assert_eq!(html_escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(html_escape("a\nb"), "a&#10;b");
        assert_eq!(
            attachment("dir/naïve \"x\".txt"),
            "attachment; filename=\"na_ve _x_.txt\"; filename*=UTF-8''na%C3%AFve%20%22x%22.txt"
        );
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("download"), "download"), Some(""));
        assert_eq!(query_value(Some("a=1&format=json"), "format"), Some("json"));
        assert_eq!(query_value(Some("a=1"), "format"), None);
        assert_eq!(query_value(None, "format"), None);
    }

    proptest! {
        #[test]
        fn any_path_parses_without_panicking(p in "/?[a-z%0-9A-F/.é]{0,30}") {
            if let Ok(Target::File(n) | Target::Dir(n)) = parse_path(&p) {
                prop_assert!(!n.starts_with('/') && !n.ends_with('/'));
            }
        }

        #[test]
        fn every_valid_name_round_trips(parts in prop::collection::vec("[^/\u{0}]{1,12}", 1..4), dir in any::<bool>()) {
            prop_assume!(parts.iter().all(|p| p != "." && p != ".."));
            let name = parts.join("/");
            let url = url_path(&name, dir);
            prop_assert!(url.bytes().all(|b| b.is_ascii_graphic()));
            let want = if dir { Target::Dir(name) } else { Target::File(name) };
            prop_assert_eq!(parse_path(&url), Ok(want));
        }
    }
}
