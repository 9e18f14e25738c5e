//! Locations on S3-compatible object stores (AWS S3, MinIO, Ceph RGW, Garage, Backblaze B2, ...), through the
//! `object_store` crate.
//!
//! Every write is one PUT (or a multipart upload above the configured threshold), which S3 makes visible
//! atomically and durable when acknowledged, so [`Location::sync`] has nothing to do; a create-only put is one
//! conditional PUT (`If-None-Match: *`), which S3 decides atomically. Requests are bounded by
//! per-request timeouts and retried with exponential backoff on 5xx and transport errors; a location whose
//! requests still fail is marked unavailable for [`DOWN_FOR`] so the next requests fail at once instead of each
//! waiting out the timeouts (callers read from, or write to, the other locations meanwhile).
//!
//! `object_store` is async; the [`Location`] trait is blocking (it is called from worker threads of the commit
//! pipeline, the NBD server's blocking pool and FUSE threads). Requests therefore run on one small private tokio
//! runtime and the caller waits on a channel, which is safe from any thread, inside another runtime or not.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, Result};
use crate::location::spec::S3Resolved;
use crate::location::{validate_key, Location};

/// How long a location that failed stays marked unavailable before it is tried again.
pub const DOWN_FOR: Duration = Duration::from_secs(30);
/// Part size of multipart uploads.
const PART_SIZE: usize = 16 << 20;
/// The largest object one PUT may carry (S3's limit); create-only puts are single conditional PUTs.
const MAX_SINGLE_PUT: usize = 5 << 30;
/// How often a create-only put is retried when S3 answers 409 Conflict (another conditional write of the key
/// in flight, or a delete racing it), which AWS documents as retryable.
const CREATE_CONFLICT_RETRIES: u32 = 3;

/// Most bytes of object data copied for uploads in flight at once, over all S3 locations of the process. An
/// upload owns a copy of what it sends (the HTTP client may hold the body past a timeout, so the caller's buffer
/// cannot be lent); without a bound, two commit workers putting k+m shards each held about 100 MiB of copies.
const UPLOAD_BUDGET: usize = 64 << 20;

static UPLOADING: Budget = Budget { used: Mutex::new(0), freed: Condvar::new(), max: UPLOAD_BUDGET };

/// A byte budget shared by threads: [`Budget::take`] waits until its bytes fit (one taker at a time may exceed
/// the budget, so an object larger than it still goes through).
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// Bytes taken from a [`Budget`], given back on drop.
struct Taken<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Budget {
    fn take(&self, bytes: usize) -> Taken<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + bytes > self.max {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
        Taken { budget: self, bytes }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bf-s3")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Config(format!("cannot start the S3 client runtime: {e}")))
}

/// The HTTP client of every S3 location: `object_store`'s own, except that a refused connection is not
/// retried. Nothing listens at the address then (a server that is down); the retries with backoff meant for
/// overloaded servers and dropped connections only cost each request to it about half a second before the
/// location is marked unavailable. A server that answers, even with 503 while it starts, is retried as before.
#[derive(Debug)]
struct RefusedFails;

impl HttpConnector for RefusedFails {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(RefusedFailsClient(ReqwestConnector::default().connect(options)?)))
    }
}

#[derive(Debug)]
struct RefusedFailsClient(HttpClient);

#[async_trait::async_trait]
impl HttpService for RefusedFailsClient {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        match self.0.execute(req).await {
            Err(e) if e.kind() == HttpErrorKind::Connect && refused(&e) => {
                Err(HttpError::new(HttpErrorKind::Unknown, e))
            }
            r => r,
        }
    }
}

/// True when the cause of `e` is a refused TCP connection.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A bucket (and key prefix) on an S3-compatible object store.
pub struct S3Location {
    name: String,
    prefix: String,
    store: Arc<AmazonS3>,
    /// Whole-operation deadline (covers every retry), so no call can hang.
    deadline: Duration,
    multipart_threshold: usize,
    secrets: Vec<String>,
    down: Mutex<Option<(Instant, String)>>,
}

impl std::fmt::Debug for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Location").field("name", &self.name).finish_non_exhaustive()
    }
}

impl S3Location {
    /// A client for the location described by `cfg` (no request is made until the first operation).
    pub fn new(cfg: &S3Resolved) -> Result<S3Location> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: cfg.max_retries,
            retry_timeout: cfg.timeout * (cfg.max_retries as u32 + 1),
        };
        let options = ClientOptions::new()
            .with_allow_http(cfg.allow_http)
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.connect_timeout);
        let mut b = AmazonS3Builder::new()
            .with_http_connector(RefusedFails)
            .with_bucket_name(&cfg.spec.bucket)
            .with_region(&cfg.region)
            .with_retry(retry.clone())
            .with_client_options(options);
        if let Some(e) = &cfg.endpoint {
            // Self-hosted servers (MinIO, Garage, s3s) want path-style requests: http://host/bucket/key.
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        match &cfg.credentials {
            Some((id, secret)) => b = b.with_access_key_id(id).with_secret_access_key(secret),
            None => b = b.with_skip_signature(true),
        }
        if let Some(t) = &cfg.session_token {
            b = b.with_token(t);
        }
        let secrets: Vec<String> = cfg.secrets().into_iter().map(str::to_string).collect();
        let store = b
            .build()
            .map_err(|e| Error::Config(format!("location {}: {}", cfg.spec.url, redact(&e.to_string(), &secrets))))?;
        Ok(S3Location {
            name: cfg.spec.url.clone(),
            prefix: cfg.spec.prefix.clone(),
            store: Arc::new(store),
            deadline: retry.retry_timeout + cfg.timeout,
            multipart_threshold: cfg.multipart_threshold,
            secrets,
            down: Mutex::new(None),
        })
    }

    fn path(&self, key: &str) -> Result<Path> {
        validate_key(key)?;
        Ok(if self.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.prefix)) })
    }

    fn root(&self) -> Option<Path> {
        (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()))
    }

    /// Fails fast while the location is marked unavailable.
    fn check_up(&self) -> Result<()> {
        let Ok(mut down) = self.down.lock() else { return Ok(()) };
        match &*down {
            Some((until, reason)) if Instant::now() < *until => Err(Error::Unavailable {
                location: self.name.clone(),
                reason: format!("marked unavailable after an earlier failure ({reason})"),
            }),
            Some(_) => {
                *down = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Runs one request on the client runtime with the whole-operation deadline; maps errors, marking the
    /// location unavailable on anything but "not found".
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        key: &str,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.check_up()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = self.deadline;
        runtime()?.spawn(async move {
            let r = tokio::time::timeout(deadline, fut).await;
            let _ = tx.send(r);
        });
        let outcome = rx.recv().map_err(|_| self.unavailable(what, key, "the request was dropped".into()))?;
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(object_store::Error::NotFound { .. })) => {
                Err(Error::object_not_found(format!("{what} {}: {key}", self.name)))
            }
            Ok(Err(e)) => Err(self.unavailable(what, key, e.to_string())),
            Err(_) => Err(self.unavailable(what, key, format!("no answer within {} s", deadline.as_secs_f64()))),
        }
    }

    fn unavailable(&self, what: &str, key: &str, reason: String) -> Error {
        let reason = redact(&reason, &self.secrets);
        tracing::warn!(location = %self.name, %what, %key, %reason, "object store request failed");
        if let Ok(mut down) = self.down.lock() {
            *down = Some((Instant::now() + DOWN_FOR, reason.clone()));
        }
        Error::Unavailable { location: self.name.clone(), reason: format!("{what} {key}: {reason}") }
    }

    fn upload(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        let path = self.path(key)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let store = self.store.clone();
        let _copy = UPLOADING.take(total);
        if total <= self.multipart_threshold {
            let payload: PutPayload = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
            return self.run("writing", key, async move { store.put(&path, payload).await.map(|_| ()) });
        }
        // Large objects: a multipart upload, which S3 also makes visible atomically on completion.
        let mut whole = Vec::with_capacity(total);
        for p in parts {
            whole.extend_from_slice(p);
        }
        let whole = Bytes::from(whole);
        self.run("writing (multipart)", key, async move {
            let mut up = store.put_multipart(&path).await?;
            for chunk in (0..whole.len()).step_by(PART_SIZE) {
                let part = whole.slice(chunk..(chunk + PART_SIZE).min(whole.len()));
                if let Err(e) = up.put_part(part.into()).await {
                    let _ = up.abort().await;
                    return Err(e);
                }
            }
            match up.complete().await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let _ = up.abort().await;
                    Err(e)
                }
            }
        })
    }
}

/// What a conditional create found.
enum Created {
    /// The object was stored.
    Stored,
    /// An object exists under the key; nothing was written.
    Exists,
}

/// Copies `chunk`, found at offset `at` of an object, into the parts of `head` then `body` it covers; bytes
/// past their end are dropped (the caller compares the length).
fn fill_split(head: &mut [u8], body: &mut [u8], at: usize, chunk: &[u8]) {
    let end = at + chunk.len();
    let h = head.len();
    if at < h {
        let n = end.min(h) - at;
        head[at..at + n].copy_from_slice(&chunk[..n]);
    }
    let (from, to) = (at.max(h), end.min(h + body.len()));
    if from < to {
        body[from - h..to - h].copy_from_slice(&chunk[from - at..to - at]);
    }
}

/// One conditional PUT (`If-None-Match: *`), retried on 409 conflicts. "Exists" is only reported for the answers
/// that mean it (412 Precondition Failed, 304 Not Modified, which object_store turns into `AlreadyExists` with
/// the precondition error as its source) or for a conflict that outlasts the retries.
async fn create_object(store: &AmazonS3, path: &Path, payload: PutPayload) -> object_store::Result<Created> {
    let mut conflicts = 0;
    loop {
        match store.put_opts(path, payload.clone(), PutOptions::from(PutMode::Create)).await {
            Ok(_) => return Ok(Created::Stored),
            Err(object_store::Error::AlreadyExists { source, .. }) => {
                let precondition = matches!(
                    source.downcast_ref::<object_store::Error>(),
                    Some(object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. })
                );
                if precondition || conflicts == CREATE_CONFLICT_RETRIES {
                    return Ok(Created::Exists);
                }
                conflicts += 1;
                tokio::time::sleep(Duration::from_millis(50 << conflicts)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Replaces every secret in `text` by `***` (errors from the HTTP stack may echo request details).
fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}

impl Location for S3Location {
    fn name(&self) -> &str {
        &self.name
    }

    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.upload(key, parts)
    }

    /// One conditional PUT (`If-None-Match: *`), whatever the multipart threshold: S3 decides atomically which
    /// of racing creators wins. Objects above 5 GiB (S3's single-PUT limit) are refused. Servers that ignore the
    /// header overwrite instead, and some (s3s-fs) check for the object before writing, so racing creators
    /// may both succeed there.
    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        let path = self.path(key)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > MAX_SINGLE_PUT {
            return Err(Error::InvalidArgument(format!(
                "{}: {key}: a create-only put is one request, at most {MAX_SINGLE_PUT} bytes ({total} given)",
                self.name
            )));
        }
        let _copy = UPLOADING.take(total);
        let payload: PutPayload = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let store = self.store.clone();
        match self.run("creating", key, async move { create_object(&store, &path, payload).await })? {
            Created::Stored => Ok(()),
            Created::Exists => Err(Error::already_exists_object(format!("creating {}: {key}", self.name))),
        }
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        let store = self.store.clone();
        // The caller's buffer travels into the request and back, and the body streams straight into it: no
        // second whole-object copy, and the buffer's capacity is reused from one shard to the next.
        let mut out = std::mem::take(buf);
        out.clear();
        let filled = self.run("reading", key, async move {
            let got = store.get(&path).await?;
            // Sized once from the object's length, so the buffer never doubles past it while the body arrives.
            out.reserve_exact(usize::try_from(got.meta.size).unwrap_or(0));
            let mut body = got.into_stream();
            while let Some(chunk) = body.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok(out)
        })?;
        *buf = filled;
        Ok(())
    }

    /// Copies the body into `head` and `body` as it arrives (a few chunks in flight): no buffer of the whole
    /// object. The request runs on a helper thread while this one copies.
    fn get_split_into(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> Result<u64> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        std::thread::scope(|s| {
            let fetch = s.spawn(move || {
                self.run("reading", key, async move {
                    let mut stream = store.get(&path).await?.into_stream();
                    while let Some(chunk) = stream.next().await {
                        if tx.send(chunk?).await.is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            });
            let mut at = 0usize;
            while let Some(chunk) = rx.blocking_recv() {
                fill_split(head, body, at, &chunk);
                at += chunk.len();
            }
            fetch.join().map_err(|_| Error::internal("object reader panicked"))??;
            Ok(at as u64)
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let path = self.path(key)?;
        let store = self.store.clone();
        let bytes = self.run("reading", key, async move {
            let range = GetRange::Bounded(offset..offset + len as u64);
            match store.get_opts(&path, GetOptions { range: Some(range), ..Default::default() }).await {
                Ok(r) => r.bytes().await,
                // S3 refuses a range that starts at or past the end; our contract is "fewer bytes at the end".
                Err(e) => match store.head(&path).await {
                    Ok(meta) if offset >= meta.size => Ok(Bytes::new()),
                    _ => Err(e),
                },
            }
        })?;
        Ok(bytes.to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix)?;
        let store = self.store.clone();
        // object_store follows the continuation tokens, so long listings arrive whole.
        let listing = self.run("listing", prefix, async move { store.list_with_delimiter(Some(&path)).await })?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .chain(listing.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let store = self.store.clone();
        match self.run("deleting", key, async move { store.delete(&path).await }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.path(from)?, self.path(to)?);
        let store = self.store.clone();
        self.run("renaming", from, async move { store.rename(&src, &dst).await })
    }

    fn cheap_rename(&self) -> bool {
        false
    }

    fn remote(&self) -> bool {
        true
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let path = self.path(prefix)?;
        let store = self.store.clone();
        self.run("deleting", prefix, async move {
            // List completely before deleting: some servers cannot continue a listing whose continuation key
            // was deleted meanwhile.
            let keys: Vec<Path> = store.list(Some(&path)).map_ok(|m| m.location).try_collect().await?;
            let keys = futures::stream::iter(keys.into_iter().map(Ok)).boxed();
            let results: Vec<_> = store.delete_stream(keys).collect().await;
            for r in results {
                match r {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn probe(&self) -> Result<()> {
        let root = self.root();
        let store = self.store.clone();
        self.run("listing", "/", async move { store.list_with_delimiter(root.as_ref()).await.map(|_| ()) })
    }

    fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        let path = self.path(key)?;
        let store = self.store.clone();
        // An object's own time, else (a "directory") the newest object directly under it.
        let newest = self.run("reading", key, async move {
            match store.head(&path).await {
                Ok(meta) => Ok(Some(meta.last_modified)),
                Err(object_store::Error::NotFound { .. }) => {
                    let l = store.list_with_delimiter(Some(&path)).await?;
                    Ok(l.objects.iter().map(|o| o.last_modified).max())
                }
                Err(e) => Err(e),
            }
        })?;
        match newest {
            Some(t) => Ok(Some(SystemTime::from(t))),
            None => Err(Error::object_not_found(format!("reading {}: {key}", self.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request to an address where nothing listens comes back as an error the retry loop does not retry
    /// (kind Unknown), its cause kept; the plain client's own error would have been retried (kind Connect).
    #[test]
    fn a_refused_connection_is_not_retried() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = ClientOptions::new().with_allow_http(true);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let request = || {
            http::Request::get(format!("http://127.0.0.1:{port}/bucket/key"))
                .body(object_store::client::HttpRequestBody::empty())
                .unwrap()
        };
        let plain = ReqwestConnector::default().connect(&options).unwrap();
        let e = rt.block_on(plain.execute(request())).unwrap_err();
        assert_eq!(e.kind(), HttpErrorKind::Connect);
        assert!(refused(&e), "{e:?}");
        let ours = RefusedFails.connect(&options).unwrap();
        let e = rt.block_on(ours.execute(request())).unwrap_err();
        assert_eq!(e.kind(), HttpErrorKind::Unknown);
        assert!(refused(&e), "the cause is kept: {e:?}");
        // Any other failure to connect keeps its kind, and so its retries.
        let other = HttpError::new(HttpErrorKind::Connect, std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!refused(&other));
    }

    #[test]
    fn a_taker_past_the_budget_waits_for_bytes_given_back_and_an_oversized_one_goes_alone() {
        let budget = Budget { used: Mutex::new(0), freed: Condvar::new(), max: 100 };
        let order = Mutex::new(Vec::new());
        let first = budget.take(60);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let _second = budget.take(60);
                order.lock().unwrap().push("second taken");
            });
            std::thread::sleep(Duration::from_millis(50));
            let _fits = budget.take(40); // 60 + 40 fit beside the first
            order.lock().unwrap().push("first given back");
            drop(_fits);
            drop(first);
            t.join().unwrap();
        });
        assert_eq!(*order.lock().unwrap(), ["first given back", "second taken"]);
        let huge = budget.take(500);
        assert_eq!(*budget.used.lock().unwrap(), 500, "an object larger than the budget still goes through");
        drop(huge);
        assert_eq!(*budget.used.lock().unwrap(), 0);
    }

    #[test]
    fn chunks_land_in_head_then_body_whatever_their_boundaries() {
        let object: Vec<u8> = (0..50u8).collect();
        for cut in [1, 3, 7, 10, 13, 49, 64] {
            let (mut head, mut body) = ([0u8; 10], [0u8; 40]);
            let mut at = 0;
            for chunk in object.chunks(cut) {
                fill_split(&mut head, &mut body, at, chunk);
                at += chunk.len();
            }
            assert_eq!((&head[..], &body[..]), (&object[..10], &object[10..]), "chunks of {cut}");
        }
        // A longer object fills both and the rest is dropped.
        let (mut head, mut body) = ([0u8; 4], [0u8; 4]);
        fill_split(&mut head, &mut body, 0, &object[..20]);
        assert_eq!((&head[..], &body[..]), (&object[..4], &object[4..8]));
    }

    #[test]
    fn redacts_secrets() {
        let s = vec!["AKIDEXAMPLE".to_string(), "wJalrXUtnFEMI".to_string()];
        assert_eq!(redact("auth AKIDEXAMPLE/wJalrXUtnFEMI failed", &s), "auth ***/*** failed");
    }
}
