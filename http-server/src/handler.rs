//! Requests to responses: method and authentication checks, the path to a file or directory, preconditions,
//! ranges, and the response headers. Every failure becomes a status with a short text; nothing a client sends
//! can make this panic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use blockframe::files::catalog::Entry;
use blockframe::files::read::OpenFile;
use blockframe::store::Store;
use blockframe::ErrorKind;

use crate::auth::TokenSet;
use crate::body::Body;
use crate::conditional::{self, Conditions, Outcome, Validators};
use crate::error::ServeError;
use crate::listing;
use crate::metrics::Metrics;
use crate::names::{self, Target};
use crate::range::{self, ByteRange, RangePlan};
use crate::segments::{Layout, SegmentPool};
use crate::stream::{self, Piece, Source};
use crate::tree::{Catalog, Snapshot};
use crate::writes;
use std::sync::atomic::Ordering;

/// What every request shares.
pub struct State {
    /// The store served.
    pub store: Arc<Store>,
    /// Its catalog, as a refreshed snapshot.
    pub catalog: Catalog,
    /// The segment buffers.
    pub pool: Arc<SegmentPool>,
    /// Accepted tokens (`None`: no authentication).
    pub tokens: Option<TokenSet>,
    /// How long a client may leave a body chunk unread.
    pub send_timeout: Duration,
    /// `PUT` and `DELETE` are served.
    pub writable: bool,
    /// One commit at a time.
    pub commits: tokio::sync::Semaphore,
    /// The counters.
    pub metrics: Arc<Metrics>,
}

type Resp = Response<Body>;

/// Answers one request.
pub async fn handle<B>(state: Arc<State>, req: Request<B>) -> Result<Resp, Infallible>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let resp = respond(&state, req).await;
    state.metrics.request(resp.status().as_u16(), started.elapsed());
    tracing::info!(%method, path = %path, status = resp.status().as_u16(), "request");
    Ok(resp)
}

async fn respond<B>(state: &State, req: Request<B>) -> Resp
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let m = req.method();
    let write = state.writable && (m == Method::PUT || m == Method::DELETE);
    if m != Method::GET && m != Method::HEAD && !write {
        let (allow, msg) = if state.writable {
            ("GET, HEAD, PUT, DELETE", "only GET, HEAD, PUT and DELETE are served\n")
        } else {
            ("GET, HEAD", "only GET and HEAD are served (writes need bf serve --writable)\n")
        };
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, msg);
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    if let Some(tokens) = &state.tokens {
        if !tokens.authorizes(header_str(req.headers(), header::AUTHORIZATION)) {
            return unauthorized();
        }
    }
    let target = match names::parse_path(req.uri().path()) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("bad path: {e}\n")),
    };
    let snap = match state.catalog.snapshot().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the catalog cannot be read");
            return text(StatusCode::SERVICE_UNAVAILABLE, &format!("the catalog cannot be read: {e}\n"));
        }
    };
    if write {
        return write_response(state, req, target, &snap).await;
    }
    let req = &req;
    let query = req.uri().query();
    match target {
        Target::Dir(name) => match snap.list(&name) {
            Some(items) => listing_response(req, &name, &items),
            None => not_found(),
        },
        Target::File(name) => match snap.file(&name) {
            Some(entry) => file_response(state, req, entry.clone()).await,
            None if snap.is_dir(&name) => {
                let loc =
                    format!("{}{}", names::url_path(&name, true), query.map(|q| format!("?{q}")).unwrap_or_default());
                redirect(&loc)
            }
            None => not_found(),
        },
    }
}

/// `PUT` (commit the body as the file) and `DELETE` (remove the file).
async fn write_response<B>(state: &State, req: Request<B>, target: Target, snap: &Snapshot) -> Resp
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let Target::File(name) = target else {
        return text(StatusCode::CONFLICT, "a directory cannot be written: directories follow from file names\n");
    };
    if snap.is_dir(&name) {
        return text(StatusCode::CONFLICT, "a directory of that name exists\n");
    }
    let current = snap.file(&name).cloned();
    let req_was_put = req.method() == Method::PUT;
    let outcome = if !req_was_put {
        match current {
            Some(entry) => writes::delete(&state.store, (*entry).clone()).await,
            None => return not_found(),
        }
    } else {
        let validators = current
            .as_ref()
            .and_then(|e| e.meta.as_ref().map(|m| Validators::new(&e.manifest.body.root_hex(), m.mtime_unix_ns)));
        if let Err(o) = writes::put_precondition(req.headers(), validators.as_ref()) {
            return text(o.status, &format!("{}\n", o.message));
        }
        let size = header_str(req.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        let Ok(_permit) = state.commits.acquire().await else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
        };
        writes::put(&state.store, &name, size, true, req.into_body()).await
    };
    state.catalog.invalidate().await;
    if let Some(etag) = &outcome.etag {
        tracing::debug!(%etag, "upload committed");
        state.metrics.uploads_committed.fetch_add(1, Ordering::Relaxed);
    } else if req_was_put {
        state.metrics.uploads_failed.fetch_add(1, Ordering::Relaxed);
    }
    let mut r = text(outcome.status, &outcome.message);
    if let Some(etag) = &outcome.etag {
        set(&mut r, header::ETAG, etag);
    }
    r
}

fn listing_response<B>(req: &Request<B>, dir: &str, items: &[listing::Item]) -> Resp {
    let query = req.uri().query();
    let accept = header_str(req.headers(), header::ACCEPT).unwrap_or("");
    let json = names::query_value(query, "format") == Some("json")
        || (accept.contains("application/json") && !accept.contains("text/html"));
    let (body, ctype) = if json {
        (listing::json(dir, items), "application/json")
    } else {
        (listing::html(dir, items), "text/html; charset=utf-8")
    };
    let mut r = response(StatusCode::OK);
    set(&mut r, header::CONTENT_TYPE, ctype);
    set(&mut r, header::CONTENT_LENGTH, &body.len().to_string());
    set(&mut r, header::CACHE_CONTROL, "no-cache");
    set(&mut r, header::VARY, "Accept");
    if req.method() == Method::GET {
        *r.body_mut() = Body::full(body);
    }
    r
}

/// The parts of a file response that do not depend on the range.
struct FileInfo {
    name: String,
    size: u64,
    content_type: String,
    validators: Validators,
}

async fn file_response<B>(state: &State, req: &Request<B>, entry: Arc<Entry>) -> Resp {
    let store = state.store.clone();
    let opened = tokio::task::spawn_blocking(move || OpenFile::new(&store, &entry)).await;
    let file = match opened.map_err(ServeError::from).and_then(|r| r.map_err(ServeError::from)) {
        Ok(f) => Arc::new(f),
        Err(e) => return read_failure(&e, "opening"),
    };
    let info = FileInfo {
        name: file.meta.name.clone(),
        size: file.meta.size,
        content_type: mime_guess::from_path(&file.meta.name).first_or_octet_stream().essence_str().to_string(),
        validators: Validators::new(&file.body.root_hex(), file.meta.mtime_unix_ns),
    };
    let h = req.headers();
    let conditions = Conditions {
        if_match: header_str(h, header::IF_MATCH),
        if_none_match: header_str(h, header::IF_NONE_MATCH),
        if_modified_since: header_str(h, header::IF_MODIFIED_SINCE),
        if_unmodified_since: header_str(h, header::IF_UNMODIFIED_SINCE),
        if_range: header_str(h, header::IF_RANGE),
    };
    let use_range = match conditional::evaluate(&conditions, &info.validators) {
        Outcome::NotModified => return with_validators(response(StatusCode::NOT_MODIFIED), &info),
        Outcome::Failed => return text(StatusCode::PRECONDITION_FAILED, "precondition failed\n"),
        Outcome::Serve { use_range } => use_range,
    };
    let range_header = if use_range { header_str(h, header::RANGE) } else { None };
    let plan = range::plan(range_header, info.size);
    let download = names::query_value(req.uri().query(), "download").is_some();
    let head = req.method() == Method::HEAD;
    let layout = Arc::new(Layout::of(&file));
    if layout.len() != info.size {
        tracing::error!(file = %info.name, "the manifest's segments do not add up to the file's size");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "the file's manifest is inconsistent\n");
    }
    let src = Source {
        store: state.store.clone(),
        file,
        layout,
        pool: state.pool.clone(),
        send_timeout: state.send_timeout,
        metrics: state.metrics.clone(),
    };
    let mut r = match planned(src, plan, &info, head).await {
        Ok(r) => r,
        Err(e) => return read_failure(&e, "reading"),
    };
    if download {
        set(&mut r, header::CONTENT_DISPOSITION, &names::attachment(&info.name));
    }
    r
}

/// The response for a range plan; the body starts streaming (its first segment read) unless `head`.
async fn planned(src: Source, plan: RangePlan, info: &FileInfo, head: bool) -> Result<Resp, ServeError> {
    let total = info.size;
    let (status, pieces, len, ctype, content_range) = match plan {
        RangePlan::Full => {
            let pieces = if total == 0 { vec![] } else { vec![Piece::Data(ByteRange { start: 0, end: total })] };
            (StatusCode::OK, pieces, total, info.content_type.clone(), None)
        }
        RangePlan::Single(r) => (
            StatusCode::PARTIAL_CONTENT,
            vec![Piece::Data(r)],
            r.len(),
            info.content_type.clone(),
            Some(r.content_range(total)),
        ),
        RangePlan::Multi(ranges) => {
            let boundary = boundary();
            let (pieces, len) = stream::multipart(&ranges, &info.content_type, total, &boundary);
            (StatusCode::PARTIAL_CONTENT, pieces, len, format!("multipart/byteranges; boundary={boundary}"), None)
        }
        RangePlan::NotSatisfiable => return Ok(not_satisfiable(total, "no requested range overlaps the file\n")),
        RangePlan::Invalid(e) => return Ok(not_satisfiable(total, &format!("{e}\n"))),
    };
    let mut r = with_validators(response(status), info);
    set(&mut r, header::CONTENT_TYPE, &ctype);
    set(&mut r, header::CONTENT_LENGTH, &len.to_string());
    if let Some(cr) = content_range {
        set(&mut r, header::CONTENT_RANGE, &cr);
    }
    if !head && len > 0 {
        *r.body_mut() = stream::start(src, pieces, len).await?;
    }
    Ok(r)
}

fn boundary() -> String {
    let mut raw = [0u8; 12];
    if getrandom::getrandom(&mut raw).is_err() {
        // Any boundary works when the parts carry Content-Range; randomness only avoids one in the data.
        raw = *b"bf-byterange";
    }
    format!("bf{}", hex::encode(raw))
}

/// Status for a file that cannot be opened or whose first segment cannot be read.
fn read_failure(e: &ServeError, doing: &str) -> Resp {
    let kind = match e {
        ServeError::Store(e) => Some(e.kind()),
        _ => None,
    };
    tracing::error!(error = %e, "{doing} a file failed");
    let status = match kind {
        Some(ErrorKind::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
        Some(ErrorKind::NotFound) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let what = match kind {
        Some(ErrorKind::DataLost) | Some(ErrorKind::Corrupt) => "data cannot be read and verified",
        _ => "the file cannot be read",
    };
    text(status, &format!("{what}: {e}\n"))
}

fn with_validators(mut r: Resp, info: &FileInfo) -> Resp {
    set(&mut r, header::ETAG, &info.validators.etag);
    set(&mut r, header::LAST_MODIFIED, &info.validators.last_modified_header());
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    r
}

fn not_satisfiable(total: u64, why: &str) -> Resp {
    let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, why);
    set(&mut r, header::CONTENT_RANGE, &format!("bytes */{total}"));
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    r
}

fn unauthorized() -> Resp {
    let mut r = text(StatusCode::UNAUTHORIZED, "a bearer token is needed (Authorization: Bearer <token>)\n");
    let h = r.headers_mut();
    h.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"bf\""));
    h.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"bf\", charset=\"UTF-8\""));
    r
}

fn not_found() -> Resp {
    text(StatusCode::NOT_FOUND, "not found\n")
}

fn redirect(location: &str) -> Resp {
    let mut r = text(StatusCode::MOVED_PERMANENTLY, "a directory: its URL ends in /\n");
    set(&mut r, header::LOCATION, location);
    r
}

/// A short plain-text response.
pub fn text(status: StatusCode, msg: &str) -> Resp {
    let mut r = response(status);
    set(&mut r, header::CONTENT_TYPE, "text/plain; charset=utf-8");
    set(&mut r, header::CONTENT_LENGTH, &msg.len().to_string());
    *r.body_mut() = Body::full(Bytes::copy_from_slice(msg.as_bytes()));
    r
}

fn response(status: StatusCode) -> Resp {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// Sets a header; a value that is not a valid header value (it never is one here) is left out and logged.
fn set(r: &mut Resp, name: header::HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            r.headers_mut().insert(name, v);
        }
        Err(_) => tracing::warn!(header = %name, "left out a header whose value is not valid"),
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}
