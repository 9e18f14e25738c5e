//! Directory listings: HTML in the shape of nginx's autoindex (plain `<a href>` links relative to the
//! directory, subdirectories ending in `/`), which browsers show and which `rclone`'s http remote and
//! `httpdirfs` parse, and JSON for scripts. Pure logic.

use serde::Serialize;

use crate::names::{encode_segment, html_escape, url_path};

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Item {
    /// The entry's own name (the last part of its store name).
    pub name: String,
    /// A subdirectory (else a file).
    #[serde(rename = "dir")]
    pub is_dir: bool,
    /// Plaintext size in bytes (0 for a directory).
    pub size: u64,
    /// Modification time, seconds since the epoch (files; directories made through the mount carry theirs too).
    pub mtime: Option<i64>,
    /// A file's Merkle root (its `ETag` without the quotes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// The JSON listing of directory `dir` (a store name, `""` for the root).
#[derive(Serialize)]
struct JsonListing<'a> {
    path: String,
    entries: &'a [Item],
}

/// The listing as JSON: `{"path": "/a/", "entries": [{"name", "dir", "size", "mtime", "root"}...]}`.
pub fn json(dir: &str, items: &[Item]) -> String {
    let listing = JsonListing { path: url_path(dir, true), entries: items };
    serde_json::to_string_pretty(&listing).unwrap_or_else(|_| "{}".into())
}

/// The listing as an HTML page.
pub fn html(dir: &str, items: &[Item]) -> String {
    let title = html_escape(&format!("Index of /{}{}", dir, if dir.is_empty() { "" } else { "/" }));
    let mut out = format!(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" \
         content=\"width=device-width\">\n<title>{title}</title>\n<style>body{{font-family:sans-serif}}\
         td{{padding:0 1em 0 0}}td.n{{text-align:right}}</style>\n</head>\n<body>\n<h1>{title}</h1>\n<hr>\n\
         <table>\n"
    );
    if !dir.is_empty() {
        out.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>\n");
    }
    for it in items {
        let slash = if it.is_dir { "/" } else { "" };
        let href = format!("{}{slash}", encode_segment(&it.name));
        let shown = html_escape(&format!("{}{slash}", it.name));
        let date = it.mtime.map(date).unwrap_or_default();
        let size = if it.is_dir { "-".to_string() } else { it.size.to_string() };
        out.push_str(&format!(
            "<tr><td><a href=\"{href}\">{shown}</a></td><td>{date}</td><td class=\"n\">{size}</td></tr>\n"
        ));
    }
    out.push_str("</table>\n<hr>\n</body>\n</html>\n");
    out
}

/// A listing date (`2024-01-31 12:00`, UTC) as nginx's autoindex shows it.
fn date(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", secs / 3600, secs % 3600 / 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Item> {
        vec![
            Item { name: "sub dir".into(), is_dir: true, size: 0, mtime: None, root: None },
            Item {
                name: "<b>&#?.txt".into(),
                is_dir: false,
                size: 12,
                mtime: Some(1_700_000_000),
                root: Some("ab".into()),
            },
        ]
    }

    #[test]
    fn html_links_are_encoded_and_names_escaped() {
        let page = html("a/b", &items());
        assert!(page.contains("<title>Index of /a/b/</title>"), "{page}");
        assert!(page.contains("<a href=\"../\">../</a>"));
        assert!(page.contains("<a href=\"sub%20dir/\">sub dir/</a>"));
        assert!(page.contains("<a href=\"%3Cb%3E%26%23%3F.txt\">&lt;b&gt;&amp;#?.txt</a>"), "{page}");
        assert!(page.contains("2023-11-14 22:13"));
        assert!(!page.contains("<b>"));
        assert!(!html("", &items()).contains("../"), "the root has no parent link");
    }

    #[test]
    fn json_carries_every_field() {
        let v: serde_json::Value = serde_json::from_str(&json("x y", &items())).unwrap();
        assert_eq!(v["path"], "/x%20y/");
        assert_eq!(v["entries"][0]["name"], "sub dir");
        assert_eq!(v["entries"][0]["dir"], true);
        assert_eq!(v["entries"][1]["size"], 12);
        assert_eq!(v["entries"][1]["root"], "ab");
        assert_eq!(v["entries"][1]["mtime"], 1_700_000_000);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(date(0), "1970-01-01 00:00");
        assert_eq!(date(951_782_400), "2000-02-29 00:00");
        assert_eq!(date(-1), "1969-12-31 23:59");
    }
}
