//! Location specs: how a store names its locations (`/path`, `file:///path` or `s3://bucket/prefix`), and the
//! connection settings of object-store locations. Pure parsing, no I/O.
//!
//! A spec is the location's identity and is kept in the store descriptor, so it must never carry a secret:
//! credentials come from `config.toml` (`[[locations]]` tables, matched by URL) or the usual AWS environment
//! variables, and are redacted wherever a settings value is printed.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use crate::error::{Error, Result};

/// A parsed location spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocationSpec {
    /// A local directory (relative paths are inside the store directory).
    Local(PathBuf),
    /// A bucket (and key prefix) on an S3-compatible object store.
    S3(S3Spec),
}

/// The non-secret address of an S3 location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Spec {
    /// The spec as written (`s3://bucket/prefix?endpoint=...`): name in messages and key for settings.
    pub url: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Endpoint URL from the spec's `endpoint=` query, if given.
    pub endpoint: Option<String>,
    /// Region from the spec's `region=` query, if given.
    pub region: Option<String>,
}

const SECRET_QUERY_KEYS: [&str; 4] = ["access_key_id", "secret_access_key", "session_token", "password"];

/// Parses a location spec: a path, `file:///absolute/path`, or `s3://bucket[/prefix][?endpoint=URL&region=R]`.
pub fn parse(spec: &str) -> Result<LocationSpec> {
    let bad = |why: &str| Err(Error::Config(format!("location {:?}: {why}", redact_url(spec))));
    if let Some(path) = spec.strip_prefix("file://") {
        if !path.starts_with('/') {
            return bad("a file:// location needs an absolute path (file:///path)");
        }
        return Ok(LocationSpec::Local(PathBuf::from(path)));
    }
    if !spec.starts_with("s3://") {
        if spec.contains("://") {
            return bad("unknown scheme (use a path, file:///path or s3://bucket/prefix)");
        }
        if spec.is_empty() {
            return bad("empty location");
        }
        return Ok(LocationSpec::Local(PathBuf::from(spec)));
    }
    // Checked on the raw text: URL parsing would quietly resolve `..`.
    let raw_path = spec["s3://".len()..].split(['?', '#']).next().unwrap_or_default();
    if raw_path.split('/').skip(1).any(|c| c == "." || c == "..") {
        return bad("the key prefix must not contain '.' or '..' parts");
    }
    let Ok(url) = url::Url::parse(spec) else {
        return bad("not a valid URL");
    };
    if !url.username().is_empty() || url.password().is_some() {
        return bad("credentials do not belong in a location URL (they would be stored in store.bf); put them in \
                    config.toml [[locations]] or the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables");
    }
    let bucket = url.host_str().unwrap_or_default().to_string();
    if bucket.is_empty() {
        return bad("missing bucket name (s3://bucket/prefix)");
    }
    let prefix = url.path().trim_matches('/').to_string();
    if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
        return bad("the key prefix must not contain '.', '..' or empty parts");
    }
    let (mut endpoint, mut region) = (None, None);
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "endpoint" => endpoint = Some(v.into_owned()),
            "region" => region = Some(v.into_owned()),
            k if SECRET_QUERY_KEYS.contains(&k) => {
                return bad("credentials do not belong in a location URL (they would be stored in store.bf); put \
                            them in config.toml [[locations]] or the AWS_* environment variables")
            }
            other => return bad(&format!("unknown option {other:?} (use endpoint= or region=)")),
        }
    }
    Ok(LocationSpec::S3(S3Spec { url: spec.to_string(), bucket, prefix, endpoint, region }))
}

/// A URL without its `user:password@` part and query, for messages about a spec that was refused.
pub fn redact_url(spec: &str) -> String {
    let spec = spec.split('?').next().unwrap_or_default();
    match (spec.find("://"), spec.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &spec[..s], &spec[at + 1..]),
        _ => spec.to_string(),
    }
}

/// Connection settings of one object-store location (a `[[locations]]` table of `config.toml`).
#[derive(Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// The location spec these settings apply to (matched exactly against the store descriptor).
    pub url: String,
    /// Endpoint URL (MinIO, Garage, Ceph RGW, ...); default AWS, or `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region; default `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id; default `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Secret access key; default `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Session token; default `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (default: true when the endpoint is http).
    pub allow_http: Option<bool>,
    /// Timeout of one request in seconds (default 30).
    pub timeout_secs: Option<f64>,
    /// Connect timeout in seconds (default 5).
    pub connect_timeout_secs: Option<f64>,
    /// Retries of a failed request (5xx, timeouts), with exponential backoff (default 3).
    pub max_retries: Option<usize>,
    /// Objects larger than this many MiB are uploaded in parts (default 64).
    pub multipart_threshold_mb: Option<usize>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("S3Settings")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &hidden(&self.access_key_id))
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("timeout_secs", &self.timeout_secs)
            .finish_non_exhaustive()
    }
}

/// Settings resolved for one location: the spec's own values, then the matching `[[locations]]` table, then the
/// environment, then defaults.
#[derive(Clone)]
pub struct S3Resolved {
    /// The address.
    pub spec: S3Spec,
    /// Endpoint (None: AWS).
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Access key id and secret, when given.
    pub credentials: Option<(String, String)>,
    /// Session token.
    pub session_token: Option<String>,
    /// Whether http:// endpoints are allowed.
    pub allow_http: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Retries per request.
    pub max_retries: usize,
    /// Multipart upload threshold in bytes.
    pub multipart_threshold: usize,
}

impl std::fmt::Debug for S3Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Resolved")
            .field("url", &self.spec.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl S3Resolved {
    /// The secret strings of these settings (for redaction of messages that might echo them).
    pub fn secrets(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        if let Some((id, secret)) = &self.credentials {
            v.extend([id.as_str(), secret.as_str()]);
        }
        v.extend(self.session_token.as_deref());
        v.into_iter().filter(|s| s.len() >= 4).collect()
    }
}

fn secs(v: Option<f64>, default: f64) -> Duration {
    Duration::from_secs_f64(v.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(default))
}

/// Resolves the settings of `spec` from `table` (the matching `[[locations]]` entry, if any) and `env` (a
/// lookup of environment variables).
pub fn resolve_s3(spec: &S3Spec, table: Option<&S3Settings>, env: &dyn Fn(&str) -> Option<String>) -> S3Resolved {
    let t = table.cloned().unwrap_or_default();
    let endpoint = spec.endpoint.clone().or(t.endpoint).or_else(|| env("AWS_ENDPOINT_URL"));
    let region = spec
        .region
        .clone()
        .or(t.region)
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let id = t.access_key_id.or_else(|| env("AWS_ACCESS_KEY_ID"));
    let secret = t.secret_access_key.or_else(|| env("AWS_SECRET_ACCESS_KEY"));
    let allow_http = t.allow_http.unwrap_or_else(|| endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    S3Resolved {
        spec: spec.clone(),
        endpoint,
        region,
        credentials: id.zip(secret),
        session_token: t.session_token.or_else(|| env("AWS_SESSION_TOKEN")),
        allow_http,
        timeout: secs(t.timeout_secs, 30.0),
        connect_timeout: secs(t.connect_timeout_secs, 5.0),
        max_retries: t.max_retries.unwrap_or(3),
        multipart_threshold: t.multipart_threshold_mb.unwrap_or(64).max(5) << 20,
    }
}

static CONFIGURED: RwLock<Vec<S3Settings>> = RwLock::new(Vec::new());

/// Installs the `[[locations]]` settings of this process (the `bf` binary calls this once after reading
/// `config.toml`); stores opened afterwards use them.
pub fn configure(settings: Vec<S3Settings>) {
    if let Ok(mut c) = CONFIGURED.write() {
        *c = settings;
    }
}

/// The settings installed by [`configure`] for `url`, if any.
pub fn configured(url: &str) -> Option<S3Settings> {
    CONFIGURED.read().ok().and_then(|c| c.iter().find(|s| s.url == url).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_urls() {
        assert_eq!(parse("locations/loc-00").unwrap(), LocationSpec::Local("locations/loc-00".into()));
        assert_eq!(parse("/mnt/a").unwrap(), LocationSpec::Local("/mnt/a".into()));
        assert_eq!(parse("file:///mnt/a").unwrap(), LocationSpec::Local("/mnt/a".into()));
        assert!(parse("file://rel").is_err());
        assert!(parse("ftp://x").is_err());
        assert!(parse("").is_err());
        let LocationSpec::S3(s) = parse("s3://bkt/some/prefix/?endpoint=http://127.0.0.1:9001&region=eu").unwrap()
        else {
            panic!("not s3")
        };
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bkt", "some/prefix"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9001"));
        assert_eq!(s.region.as_deref(), Some("eu"));
        let LocationSpec::S3(s) = parse("s3://bkt").unwrap() else { panic!("not s3") };
        assert_eq!(s.prefix, "");
        assert!(parse("s3:///x").is_err());
        assert!(parse("s3://b/x?colour=red").is_err());
        assert!(parse("s3://b/a/../c").is_err());
    }

    #[test]
    fn refuses_credentials_without_echoing_them() {
        for spec in ["s3://AKIDX:hunter2secret@bkt/p", "s3://bkt/p?secret_access_key=hunter2secret"] {
            let e = parse(spec).unwrap_err().to_string();
            assert!(e.contains("credentials"), "{e}");
            assert!(!e.contains("hunter2secret"), "{e}");
        }
    }

    #[test]
    fn resolution_order_and_redacted_debug() {
        let LocationSpec::S3(spec) = parse("s3://bkt/p?region=spec-region").unwrap() else { panic!() };
        let table = S3Settings {
            url: spec.url.clone(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("table-region".into()),
            access_key_id: Some("table-id".into()),
            secret_access_key: Some("table-secret".into()),
            timeout_secs: Some(2.0),
            ..Default::default()
        };
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("env-id".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_string()),
            "AWS_ENDPOINT_URL" => Some("https://env.example".to_string()),
            _ => None,
        };
        let r = resolve_s3(&spec, Some(&table), &env);
        assert_eq!(r.region, "spec-region");
        assert_eq!(r.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert!(r.allow_http);
        assert_eq!(r.credentials, Some(("table-id".into(), "table-secret".into())));
        assert_eq!(r.timeout, Duration::from_secs(2));
        let r = resolve_s3(&spec, None, &env);
        assert_eq!(r.credentials, Some(("env-id".into(), "env-secret".into())));
        assert_eq!(r.endpoint.as_deref(), Some("https://env.example"));
        assert!(!r.allow_http);
        for dbg in [format!("{table:?}"), format!("{r:?}")] {
            assert!(!dbg.contains("secret\"") && !dbg.contains("table-secret") && !dbg.contains("env-secret"), "{dbg}");
        }
        assert_eq!(r.secrets(), vec!["env-id", "env-secret"]);
    }
}
