//! Optional writes (`--writable`): `PUT` of a whole file and `DELETE`, each all-or-nothing as `bf commit` and
//! `bf rm` are. A `PUT` body is streamed into the commit (a bounded channel read by the blocking commit), so
//! an upload never sits in memory whole; a body that ends early or breaks fails the commit, which then
//! publishes nothing. One commit runs at a time (commits hold segment buffers of their own, outside the read
//! pool); further uploads wait.

use std::future::poll_fn;
use std::io::Read;
use std::pin::Pin;

use bytes::{Buf, Bytes};
use http::{HeaderMap, StatusCode};
use tokio::sync::mpsc;

use blockframe::files::catalog::{self, Entry};
use blockframe::files::commit::{commit, CommitRequest};
use blockframe::{Error, ErrorKind};

use crate::conditional::Validators;

/// Chunks queued between an upload and its commit.
const QUEUE_CHUNKS: usize = 4;

/// What a write decided, as a status, a text and (after a PUT) the new entity tag.
pub struct Outcome {
    /// The status to send.
    pub status: StatusCode,
    /// A short text for the body.
    pub message: String,
    /// The stored file's `ETag` (PUT).
    pub etag: Option<String>,
}

impl Outcome {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Outcome { status, message: message.into(), etag: None }
    }
}

/// A `std::io::Read` over the chunks of an upload (the commit runs on a blocking thread).
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(format!("the upload broke: {e}"))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Preconditions of a PUT against the current version (`None`: no file of that name): `If-None-Match: *`
/// creates only, `If-Match` replaces only the version named.
pub fn put_precondition(h: &HeaderMap, current: Option<&Validators>) -> Result<(), Outcome> {
    let inm = h.get(http::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::trim);
    if inm == Some("*") && current.is_some() {
        return Err(Outcome::new(StatusCode::PRECONDITION_FAILED, "the file exists (If-None-Match: *)"));
    }
    if let Some(im) = h.get(http::header::IF_MATCH).and_then(|v| v.to_str().ok()).map(str::trim) {
        let ok = match current {
            None => false,
            Some(_) if im == "*" => true,
            Some(v) => im.split(',').any(|t| t.trim() == v.etag),
        };
        if !ok {
            return Err(Outcome::new(StatusCode::PRECONDITION_FAILED, "the current version does not match If-Match"));
        }
    }
    Ok(())
}

/// Commits the body of a PUT as `name` (replacing a file of that name when `replace`).
pub async fn put<B>(
    store: &std::sync::Arc<blockframe::store::Store>,
    name: &str,
    size: Option<u64>,
    replace: bool,
    mut body: B,
) -> Outcome
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if let Err(e) = catalog::validate_name(name) {
        return Outcome::new(StatusCode::BAD_REQUEST, e.to_string());
    }
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let st = store.clone();
    let req = CommitRequest {
        name: name.to_string(),
        mtime_unix_ns: i64::try_from(blockframe::clock::unix_ns()).unwrap_or(i64::MAX),
        mode: 0o644,
        replace,
        workers: 2,
        size,
        ..Default::default()
    };
    let committing = tokio::task::spawn_blocking(move || {
        let mut input = ChannelReader { rx, cur: Bytes::new() };
        commit(&st, &mut input, &req, &|_| {})
    });
    // Feed the commit until the body ends, breaks, or the commit stops reading (it failed).
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let item = match frame {
            None => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => Ok(d),
                Err(_) => continue, // trailers
            },
            Some(Err(e)) => Err(e.to_string()),
        };
        let broke = item.is_err();
        if tx.send(item).await.is_err() || broke {
            break;
        }
    }
    drop(tx);
    match committing.await {
        Ok(Ok(report)) => {
            let status = if report.replaced { StatusCode::OK } else { StatusCode::CREATED };
            tracing::info!(file = %report.name, size = report.size, root = %report.root, "committed an upload");
            Outcome {
                status,
                message: format!("{} {} {} bytes\n", report.root, report.name, report.size),
                etag: Some(format!("\"{}\"", report.root)),
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(file = %name, error = %e, "an upload was not committed");
            Outcome::new(status_of(&e), format!("not committed: {e}\n"))
        }
        Err(e) => Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the commit task failed: {e}\n")),
    }
}

/// Removes `entry` (one catalog record, then its shards).
pub async fn delete(store: &std::sync::Arc<blockframe::store::Store>, entry: Entry) -> Outcome {
    let st = store.clone();
    let name = entry.label();
    match tokio::task::spawn_blocking(move || catalog::remove(&st, &entry)).await {
        Ok(Ok(())) => {
            tracing::info!(file = %name, "removed");
            Outcome::new(StatusCode::OK, format!("removed {name}\n"))
        }
        Ok(Err(e)) => Outcome::new(status_of(&e), format!("not removed: {e}\n")),
        Err(e) => Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the removal task failed: {e}\n")),
    }
}

fn status_of(e: &Error) -> StatusCode {
    match e.kind() {
        ErrorKind::AlreadyExists => StatusCode::PRECONDITION_FAILED,
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable | ErrorKind::ReadOnly => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
