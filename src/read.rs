//! Reading files back: fetch and verify shards, rebuild missing ones from parity, authenticate and decrypt
//! segments. Every segment is checked (each shard against its Merkle leaf, the segment against its AES-GCM tag)
//! before a byte of it is returned.

use std::io::Write;
use std::ops::Range;
use std::sync::mpsc::sync_channel;

use crate::catalog::Entry;
use crate::crypto::{SegmentCipher, TAG_LEN};
use crate::erasure::Codec;
use crate::error::{Error, Result};
use crate::manifest::{FileMeta, ManifestBody};
use crate::shard::{self, Expected, ShardFault};
use crate::store::{placement, shard_key, Store};

/// Why a shard could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardProblem {
    /// Not found on its location (nor elsewhere).
    Missing,
    /// Found but failed verification.
    Fault(ShardFault),
    /// The location could not be read.
    Unreadable(String),
}

impl std::fmt::Display for ShardProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardProblem::Missing => f.write_str("missing"),
            ShardProblem::Fault(x) => write!(f, "{x}"),
            ShardProblem::Unreadable(e) => write!(f, "unreadable ({e})"),
        }
    }
}

/// Result of looking for one shard.
#[derive(Clone, Debug)]
pub struct ShardCheck {
    /// Shard index.
    pub shard: usize,
    /// Location it is expected on.
    pub location: usize,
    /// `Ok(location it was found on)` or the problem.
    pub outcome: std::result::Result<usize, ShardProblem>,
}

/// Reads shard `shard` of `segment` into `io` and verifies it; returns the payload range within `io` and the
/// location that served it. Looks on the expected location first, then (if it is missing there) on the others,
/// where a repair may have moved it.
pub fn fetch_shard(
    store: &Store,
    body: &ManifestBody,
    segment: u64,
    shard: usize,
    io: &mut Vec<u8>,
) -> (std::result::Result<(Range<usize>, usize), ShardProblem>, usize) {
    let locations = store.locations();
    let n = locations.len();
    let home = placement(body.placement_start, segment, shard, n);
    let key = shard_key(&body.file_id, segment, shard);
    let Some(leaf) = body.leaf(segment, shard) else {
        return (Err(ShardProblem::Missing), home);
    };
    let len = body.segments.get(segment as usize).map(|s| s.shard_len).unwrap_or(0);
    let want = Expected { store_id: &body.store_id, file_id: &body.file_id, segment, shard: shard as u16, len, leaf };
    let mut first_problem = None;
    for i in (0..n).map(|j| (home + j) % n) {
        match locations[i].get_into(&key, io) {
            Ok(()) => match shard::verify(io, &want) {
                Ok(p) => {
                    let start = p.as_ptr() as usize - io.as_ptr() as usize;
                    return (Ok((start..start + p.len(), i)), home);
                }
                Err(f) => {
                    first_problem.get_or_insert(ShardProblem::Fault(f));
                }
            },
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                first_problem.get_or_insert(ShardProblem::Unreadable(e.to_string()));
            }
        }
        // Only search elsewhere when the home copy is simply absent.
        if i == home && first_problem.is_some() {
            break;
        }
    }
    (Err(first_problem.unwrap_or(ShardProblem::Missing)), home)
}

/// A committed file opened for reading.
pub struct OpenFile {
    /// Manifest body.
    pub body: ManifestBody,
    /// Metadata.
    pub meta: FileMeta,
    cipher: SegmentCipher,
}

impl OpenFile {
    /// Opens a catalog entry (needs the key).
    pub fn new(store: &Store, entry: &Entry) -> Result<Self> {
        let key = store.key()?;
        let meta = match &entry.meta {
            Some(m) => m.clone(),
            None => entry.manifest.meta(key)?,
        };
        Ok(OpenFile {
            body: entry.manifest.body.clone(),
            cipher: key.segment_cipher(&entry.manifest.body.file_id),
            meta,
        })
    }

    /// Segment count.
    pub fn segments(&self) -> u64 {
        self.body.segments.len() as u64
    }
}

/// Reads segments of one file, reusing its buffers between calls.
pub struct SegmentReader<'a> {
    store: &'a Store,
    file: &'a OpenFile,
    codec: Codec,
    buf: Vec<u8>,
    io: Vec<u8>,
    parity: Vec<u8>,
}

impl<'a> SegmentReader<'a> {
    /// A reader for `file`.
    pub fn new(store: &'a Store, file: &'a OpenFile) -> Result<Self> {
        let codec = Codec::new(file.body.k as usize, file.body.m as usize)?;
        Ok(SegmentReader { store, file, codec, buf: Vec::new(), io: Vec::new(), parity: Vec::new() })
    }

    /// Returns the verified plaintext of `segment`.
    pub fn read(&mut self, segment: u64) -> Result<&[u8]> {
        let body = &self.file.body;
        let entry = *body
            .segments
            .get(segment as usize)
            .ok_or_else(|| Error::Config(format!("segment {segment} out of range")))?;
        let (k, m) = (body.k as usize, body.m as usize);
        let sl = entry.shard_len as usize;
        let plain = entry.plain_len as usize;
        self.buf.resize(k * sl, 0);
        let mut have = vec![false; k];
        let mut bad = Vec::new();
        for (i, slot) in have.iter_mut().enumerate() {
            match fetch_shard(self.store, body, segment, i, &mut self.io) {
                (Ok((r, _)), _) => {
                    self.buf[i * sl..(i + 1) * sl].copy_from_slice(&self.io[r]);
                    *slot = true;
                }
                (Err(p), home) => bad.push(format!("{i}@{}: {p}", self.store.locations()[home].name())),
            }
        }
        let mut good = have.iter().filter(|h| **h).count();
        if good < k {
            self.parity.resize(m * sl, 0);
            let mut parity_ok = Vec::new();
            for j in 0..m {
                if good == k {
                    break;
                }
                match fetch_shard(self.store, body, segment, k + j, &mut self.io) {
                    (Ok((r, _)), _) => {
                        self.parity[j * sl..(j + 1) * sl].copy_from_slice(&self.io[r]);
                        parity_ok.push(j);
                        good += 1;
                    }
                    (Err(p), home) => bad.push(format!("{}@{}: {p}", k + j, self.store.locations()[home].name())),
                }
            }
            if good < k {
                return Err(Error::TooManyLost {
                    file: self.file.meta.name.clone(),
                    segment,
                    have: good,
                    need: k,
                    bad: bad.join(", "),
                });
            }
            tracing::debug!(segment, missing = %bad.join(", "), "rebuilding segment from parity");
            let parity = &self.parity;
            self.codec.reconstruct(
                &mut self.buf,
                sl,
                &have,
                parity_ok.iter().map(|&j| (j, &parity[j * sl..(j + 1) * sl])),
            )?;
            // Pair assertion: every rebuilt shard must match its Merkle leaf before it is trusted.
            for (i, h) in have.iter().enumerate() {
                let leaf = crate::commit::shard_leaf(&body.file_id, segment, i as u16, &self.buf[i * sl..(i + 1) * sl]);
                if !*h && Some(&leaf) != body.leaf(segment, i) {
                    return Err(Error::Authentication { file: self.file.meta.name.clone(), segment });
                }
            }
        }
        let last = segment + 1 == self.file.segments();
        if !self.file.cipher.open_segment(segment, last, &mut self.buf[..plain + TAG_LEN], plain) {
            return Err(Error::Authentication { file: self.file.meta.name.clone(), segment });
        }
        Ok(&self.buf[..plain])
    }
}

/// Writes the whole plaintext of `file` to `out` in order, `workers` segments at a time. A segment reaches
/// `out` only after it verified. `progress` receives the bytes written so far.
pub fn read_to(
    store: &Store,
    file: &OpenFile,
    out: &mut dyn Write,
    workers: usize,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let workers = workers.clamp(1, 64).min(file.segments() as usize);
    let segments = file.segments();
    std::thread::scope(|s| -> Result<()> {
        let mut lanes = Vec::new();
        for w in 0..workers {
            let (tx, rx) = sync_channel::<Result<Vec<u8>>>(1);
            let (back_tx, back_rx) = sync_channel::<Vec<u8>>(2);
            s.spawn(move || {
                let mut reader = match SegmentReader::new(store, file) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut seg = w as u64;
                while seg < segments {
                    let mut out = back_rx.try_recv().unwrap_or_default();
                    let r = reader.read(seg).map(|p| {
                        out.clear();
                        out.extend_from_slice(p);
                        out
                    });
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    seg += workers as u64;
                }
            });
            lanes.push((rx, back_tx));
        }
        let mut written = 0u64;
        for seg in 0..segments {
            let (rx, back) = &lanes[(seg % workers as u64) as usize];
            let plain = rx.recv().map_err(|_| Error::Config("reader thread ended early".into()))??;
            out.write_all(&plain).map_err(|e| Error::io("writing output", e))?;
            written += plain.len() as u64;
            progress(written);
            let _ = back.try_send(plain);
        }
        Ok(())
        // Dropping the lanes on error unblocks and ends the workers.
    })
}

/// Checks every shard of every segment of a file without the key. Returns one entry per segment with a check
/// per shard.
pub fn verify_file(store: &Store, body: &ManifestBody) -> Vec<Vec<ShardCheck>> {
    let mut io = Vec::new();
    (0..body.segments.len() as u64)
        .map(|seg| {
            (0..body.width())
                .map(|i| {
                    let (res, home) = fetch_shard(store, body, seg, i, &mut io);
                    ShardCheck { shard: i, location: home, outcome: res.map(|(_, loc)| loc) }
                })
                .collect()
        })
        .collect()
}
