//! The commit pipeline: stream a file through encrypt → erasure-code → hash → place, then publish its
//! manifest. Memory is bounded by `workers + 2` segment buffers whatever the input size.
//!
//! Threads: the caller reads the input sequentially into pooled buffers (so pipes work too); `workers` threads
//! each take a whole segment, encrypt it in place, compute parity, and write its k+m shards concurrently. The
//! commit is all-or-nothing: on any failure the shards written so far are deleted and no manifest is published.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::codec::crypto::{random_bytes, SegmentCipher, TAG_LEN};
use crate::codec::erasure::{self, Codec};
use crate::codec::merkle::{self, leaf_hash, Hash};
use crate::error::{Error, IoContext, Result};
use crate::files::session::{Session, SessionOptions};
use crate::format::manifest::{EntryKind, FileMeta, Manifest, ManifestBody, SegmentEntry};
use crate::store::{shard_key, Store};
use crate::stripe::{write_stripe, HomeRule, StripeAddr};

/// What to commit and how.
#[derive(Clone, Debug, Default)]
pub struct CommitRequest {
    /// Name in the store (relative path, `/`-separated).
    pub name: String,
    /// Source modification time, nanoseconds since the epoch.
    pub mtime_unix_ns: i64,
    /// Source permission bits.
    pub mode: u32,
    /// Replace an existing file of the same name instead of refusing.
    pub replace: bool,
    /// Segments processed in parallel (each holds about 1.5 segment sizes of memory).
    pub workers: usize,
    /// Input size when known in advance (a regular file): saves one segment buffer of look-ahead, and a file
    /// that grows or shrinks during the commit is detected and the commit refused.
    pub size: Option<u64>,
    /// File, directory or symbolic link (the last two with empty input).
    pub kind: EntryKind,
    /// Owner and group to record (`None`: not recorded).
    pub owner: Option<(u32, u32)>,
    /// Last access (`None`: the modification time).
    pub atime_unix_ns: Option<i64>,
    /// Last metadata change (`None`: the modification time).
    pub ctime_unix_ns: Option<i64>,
}

impl CommitRequest {
    /// The metadata sealed into the manifest of this request's `size` bytes.
    pub fn meta(&self, size: u64) -> FileMeta {
        FileMeta {
            kind: self.kind.clone(),
            owner: self.owner,
            atime_unix_ns: self.atime_unix_ns.unwrap_or(self.mtime_unix_ns),
            ctime_unix_ns: self.ctime_unix_ns.unwrap_or(self.mtime_unix_ns),
            ..FileMeta::file(self.name.clone(), size, self.mtime_unix_ns, self.mode)
        }
    }
}

/// Outcome of a commit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CommitReport {
    /// Name in the store.
    pub name: String,
    /// Merkle root (hex): the file's identity.
    pub root: String,
    /// Plaintext bytes.
    pub size: u64,
    /// Segment count.
    pub segments: u64,
    /// Whether an older version was replaced.
    pub replaced: bool,
    /// Shards that could not be stored because their location failed (the write policy allowed it): the file
    /// is readable but has less redundancy until `bf scrub --repair` rebuilds them.
    pub shards_not_stored: u64,
    /// Names of the locations that failed writes.
    pub failed_locations: Vec<String>,
}

struct Job {
    segment: u64,
    buf: Vec<u8>,
    len: usize,
    last: bool,
}

struct Done {
    segment: u64,
    entry: SegmentEntry,
    leaves: Vec<Hash>,
    /// Location indices of shards that were not stored.
    missing: Vec<usize>,
}

/// Shared state of one commit's worker threads.
struct Pipeline<'a> {
    store: &'a Store,
    cipher: SegmentCipher,
    file_id: [u8; 16],
    placement_start: u32,
    /// Shards are written without their own fsync; whoever publishes syncs the locations first.
    deferred: bool,
    failure: Mutex<Option<Error>>,
    abort: AtomicBool,
    done_bytes: AtomicU64,
    results: Mutex<Vec<Done>>,
}

impl Pipeline<'_> {
    fn fail(&self, e: Error) {
        self.abort.store(true, Ordering::SeqCst);
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }

    fn worker(&self, jobs: &Mutex<Receiver<Job>>, free: &SyncSender<Vec<u8>>, progress: &(dyn Fn(u64) + Sync)) {
        let d = self.store.descriptor();
        let mut codec = match Codec::new(d.k as usize, d.m as usize) {
            Ok(c) => c,
            Err(e) => return self.fail(e),
        };
        loop {
            let job = match jobs.lock() {
                Ok(rx) => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
                Err(_) => return,
            };
            let Job { segment, mut buf, len, last } = job;
            if !self.abort.load(Ordering::SeqCst) {
                match self.encode_segment(&mut codec, segment, &mut buf, len, last) {
                    Ok(done) => {
                        if let Ok(mut r) = self.results.lock() {
                            r.push(done);
                        }
                        progress(self.done_bytes.fetch_add(len as u64, Ordering::Relaxed) + len as u64);
                    }
                    Err(e) => self.fail(e),
                }
            }
            // The pool channel has room for every buffer, so this never blocks.
            let _ = free.try_send(buf);
        }
    }

    fn encode_segment(&self, codec: &mut Codec, segment: u64, buf: &mut [u8], len: usize, last: bool) -> Result<Done> {
        let d = self.store.descriptor();
        let k = d.k as usize;
        let stored = len + TAG_LEN;
        let sl = erasure::shard_len(stored as u64, k);
        self.cipher.seal_segment(segment, last, buf, len)?;
        buf[stored..k * sl].fill(0);
        let key_of = |i: usize| shard_key(&self.file_id, segment, i);
        let addr = StripeAddr {
            file_id: &self.file_id,
            segment,
            rule: HomeRule::ById,
            shard_len: sl,
            key_of: &key_of,
            deferred: self.deferred,
        };
        let written = write_stripe(self.store, codec, &addr, &buf[..k * sl])?;
        let missing = written.missing.iter().map(|(i, _)| addr.home(self.store, *i)).collect();
        let entry = SegmentEntry { plain_len: len as u64, shard_len: sl as u32 };
        Ok(Done { segment, entry, leaves: written.leaves, missing })
    }
}

/// Fills `buf` from `input` until full or end of input; returns the bytes read.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(r) => n += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Commits `input` under `req.name` as a session of one file (see [`crate::files::session`]): a small file goes
/// into a pack of its own, a large one into its own segments; returns once the manifest is durable.
/// `progress` receives the plaintext bytes stored so far.
pub fn commit(
    store: &Store,
    input: &mut dyn Read,
    req: &CommitRequest,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<CommitReport> {
    let mut session = Session::new(store, SessionOptions::default())?;
    session.commit(input, req, progress)?;
    session.flush()?.pop().unwrap_or_else(|| Err(Error::internal("a session of one file gave no report")))
}

/// Stores `input` in segments of its own and returns its manifest, not yet published, with its report. Three
/// steps: pick a file id, stream (encode and store every segment), seal the manifest; when anything fails, the
/// shards written are deleted. With `deferred`, the shards are not made durable here: the caller syncs every
/// location before publishing (one syncfs for a whole batch instead of k+m fsyncs per segment).
pub(crate) fn store_file(
    store: &Store,
    input: &mut dyn Read,
    req: &CommitRequest,
    name_tag: Hash,
    deferred: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, CommitReport)> {
    let key = store.key()?;
    let file_id: [u8; 16] = random_bytes()?;
    let mut pipeline = Pipeline::new(store, key.segment_cipher(&file_id), file_id);
    pipeline.deferred = deferred;
    crate::files::intent::mark_commit(store, &file_id);
    let span = tracing::info_span!("commit", name = %req.name);
    let _enter = span.enter();
    let stored = stream(&pipeline, input, req, progress).and_then(|results| {
        let placement_start = pipeline.placement_start;
        finish(store, req, Stored { file_id, name_tag, placement_start, results }, deferred)
    });
    if stored.is_err() {
        store.remove_shards(&file_id);
    }
    stored
}

impl<'a> Pipeline<'a> {
    fn new(store: &'a Store, cipher: SegmentCipher, file_id: [u8; 16]) -> Self {
        let n = store.locations().len();
        Pipeline {
            store,
            cipher,
            file_id,
            placement_start: crate::store::placement_start(&file_id, n),
            deferred: false,
            failure: Mutex::new(None),
            abort: AtomicBool::new(false),
            done_bytes: AtomicU64::new(0),
            results: Mutex::new(Vec::new()),
        }
    }
}

/// Reads `input` segment by segment into pooled buffers and hands them to the workers, which store them;
/// returns every segment's result in order, or the first failure.
fn stream(
    pipeline: &Pipeline<'_>,
    input: &mut dyn Read,
    req: &CommitRequest,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Done>> {
    let d = pipeline.store.descriptor();
    let seg_size = d.segment_size as usize;
    let buf_cap = d.k as usize * erasure::shard_len((seg_size + TAG_LEN) as u64, d.k as usize);
    let workers = req.workers.clamp(1, 64);
    let pool = workers + if req.size.is_some() { 1 } else { 2 };
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(pool);
    for _ in 0..pool {
        let _ = free_tx.try_send(Vec::new());
    }
    let (job_tx, job_rx) = sync_channel::<Job>(workers);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| pipeline.worker(&job_rx, &free_tx, progress));
        }
        let mut feed = Feed { pipeline, input, free: &free_rx, jobs: job_tx, seg_size, buf_cap, segment: 0 };
        match req.size {
            Some(size) => feed.known_size(size),
            None => feed.unknown_size(),
        }
    });
    if let Some(e) = pipeline.failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    let mut results = std::mem::take(&mut *pipeline.results.lock().map_err(|_| Error::internal("results poisoned"))?);
    results.sort_by_key(|r| r.segment);
    if results.is_empty() || results.iter().enumerate().any(|(i, r)| r.segment != i as u64) {
        return Err(Error::internal("segments missing from the commit pipeline"));
    }
    Ok(results)
}

/// The reading side of [`stream`]: cuts the input into segments and sends them to the workers.
struct Feed<'p, 'a, 'i> {
    pipeline: &'p Pipeline<'a>,
    input: &'i mut dyn Read,
    free: &'p Receiver<Vec<u8>>,
    jobs: SyncSender<Job>,
    seg_size: usize,
    buf_cap: usize,
    segment: u64,
}

impl Feed<'_, '_, '_> {
    /// The next segment's bytes in a pooled buffer, or `None` after a failure (recorded in the pipeline).
    fn next_chunk(&mut self) -> Option<(Vec<u8>, usize)> {
        let mut buf = self.free.recv().ok()?;
        if buf.capacity() == 0 {
            // Zeroed by the allocator (fresh pages, untouched until read into), not written with zeros.
            buf = vec![0; self.buf_cap];
        }
        buf.resize(self.buf_cap, 0);
        match read_full(self.input, &mut buf[..self.seg_size]).ctx(|| "reading the input".into()) {
            Ok(len) => Some((buf, len)),
            Err(e) => {
                self.pipeline.fail(e);
                None
            }
        }
    }

    fn send(&mut self, buf: Vec<u8>, len: usize, last: bool) -> bool {
        let ok = self.jobs.send(Job { segment: self.segment, buf, len, last }).is_ok();
        self.segment += 1;
        ok
    }

    fn aborted(&self) -> bool {
        self.pipeline.abort.load(Ordering::SeqCst)
    }

    /// Known size: a segment is last when it reaches the size; one more read, of a single byte (a segment
    /// buffer for it would be one more segment of memory), confirms the end.
    fn known_size(&mut self, size: u64) {
        let mut offset = 0u64;
        while !self.aborted() {
            let Some((buf, len)) = self.next_chunk() else { break };
            let end = offset + len as u64;
            let last = len < self.seg_size || end >= size;
            let changed = if end > size {
                Some("the input grew while it was being committed")
            } else if last && end < size {
                Some("the input shrank while it was being committed")
            } else {
                None
            };
            if let Some(why) = changed {
                self.pipeline.fail(Error::InvalidArgument(why.into()));
                break;
            }
            if !self.send(buf, len, last) {
                break;
            }
            if last {
                match read_full(self.input, &mut [0u8; 1]).ctx(|| "reading the input".into()) {
                    Ok(0) => {}
                    Ok(_) => {
                        self.pipeline.fail(Error::InvalidArgument("the input grew while it was being committed".into()))
                    }
                    Err(e) => self.pipeline.fail(e),
                }
                break;
            }
            offset = end;
        }
    }

    /// Unknown size (a pipe): hold one segment back until the next read shows whether it is the last.
    fn unknown_size(&mut self) {
        let mut pending: Option<(Vec<u8>, usize)> = None;
        while !self.aborted() {
            let Some((buf, len)) = self.next_chunk() else { break };
            if let Some((pbuf, plen)) = pending.take() {
                if !self.send(pbuf, plen, len == 0) || len == 0 {
                    break;
                }
            }
            if len < self.seg_size {
                self.send(buf, len, true);
                break;
            }
            pending = Some((buf, len));
        }
    }
}

/// What [`stream`] stored: everything the manifest needs besides the metadata.
struct Stored {
    file_id: [u8; 16],
    name_tag: Hash,
    placement_start: u32,
    results: Vec<Done>,
}

/// Makes every shard durable (unless `deferred`), then seals the manifest and reports what was stored.
fn finish(store: &Store, req: &CommitRequest, stored: Stored, deferred: bool) -> Result<(Manifest, CommitReport)> {
    if !deferred {
        for loc in store.locations() {
            loc.sync()?;
        }
    }
    let manifest = seal_manifest(store, req, &stored)?;
    let mut failed: Vec<usize> = stored.results.iter().flat_map(|r| r.missing.iter().copied()).collect();
    let shards_not_stored = failed.len() as u64;
    failed.sort_unstable();
    failed.dedup();
    let report = CommitReport {
        name: req.name.clone(),
        root: manifest.body.root_hex(),
        size: manifest.body.segments.iter().map(|s| s.plain_len).sum(),
        segments: manifest.body.segments.len() as u64,
        replaced: false,
        shards_not_stored,
        failed_locations: failed.iter().map(|&l| store.locations()[l].name().to_string()).collect(),
    };
    Ok((manifest, report))
}

/// Builds, validates and MACs the manifest of what was stored.
fn seal_manifest(store: &Store, req: &CommitRequest, stored: &Stored) -> Result<Manifest> {
    let segments: Vec<SegmentEntry> = stored.results.iter().map(|r| r.entry).collect();
    let leaves: Vec<Hash> = stored.results.iter().flat_map(|r| r.leaves.iter().copied()).collect();
    let size: u64 = segments.iter().map(|s| s.plain_len).sum();
    let own = OwnSegments { file_id: stored.file_id, placement_start: stored.placement_start, segments, leaves };
    segments_manifest(store, own, stored.name_tag, &req.meta(size))
}

/// Where the bytes of a file in its own segments are: what its manifest says besides the name and metadata.
pub(crate) struct OwnSegments {
    /// File id.
    pub file_id: [u8; 16],
    /// Placement rotation start.
    pub placement_start: u32,
    /// Each segment's plaintext and shard lengths.
    pub segments: Vec<SegmentEntry>,
    /// The k+m Merkle leaves of every segment.
    pub leaves: Vec<Hash>,
}

/// Seals `meta`, then builds, validates and MACs the manifest of a file in its own segments.
pub(crate) fn segments_manifest(store: &Store, own: OwnSegments, name_tag: Hash, meta: &FileMeta) -> Result<Manifest> {
    let key = store.key()?;
    let d = store.descriptor();
    let (sealed_meta, meta_nonce) = meta.seal(key, &own.file_id)?;
    let body = ManifestBody {
        store_id: d.store_id,
        file_id: own.file_id,
        name_tag,
        committed_unix_ns: crate::clock::unix_ns(),
        k: d.k,
        m: d.m,
        segment_size: d.segment_size,
        placement_start: own.placement_start,
        root: merkle::root(&own.leaves),
        segments: own.segments,
        leaves: own.leaves,
        meta_nonce,
        sealed_meta,
        data: crate::format::manifest::Data::Segments,
    };
    body.validate("new manifest")?;
    Ok(Manifest::new(body, key))
}

/// Leaf of a shard as the commit computes it (exposed for tests that forge shards).
pub fn shard_leaf(file_id: &[u8; 16], segment: u64, shard: u16, payload: &[u8]) -> Hash {
    leaf_hash(file_id, segment, shard, payload.len() as u32, blake3::hash(payload).as_bytes())
}
