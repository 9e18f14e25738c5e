//! Reading files back: fetch and verify shards, rebuild missing ones from parity, authenticate and decrypt
//! segments. Every segment is checked before a byte of it is returned: each shard's header against its Merkle
//! leaf, and the segment's bytes against its AES-GCM tag; when the tag fails, every shard is read again and its
//! payload hashed against its leaf, so the bad one is found and rebuilt around.

use std::io::Write;
use std::ops::Range;
use std::sync::mpsc::sync_channel;

use crate::codec::crypto::{SegmentCipher, TAG_LEN};
use crate::codec::erasure::Codec;
use crate::error::{Error, Result};
use crate::files::catalog::{self, Entry};
use crate::format::manifest::{Data, FileMeta, ManifestBody};
use crate::format::shard::HEADER_LEN;
use crate::store::{shard_key, Store};
pub use crate::stripe::ShardProblem;
/// The buffers a [`SegmentReader`] decodes into; servers keep a bounded pool of them
/// ([`SegmentReader::with_parts`]).
pub use crate::stripe::StripeBuffers;
use crate::stripe::{self, read_stripe, read_stripe_checked, HomeRule, PayloadCheck, StripeAddr, StripeError};

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

/// Reads shard `shard` of `segment` of a file into `io` and verifies it; returns the payload range within `io`
/// and the location that served it, plus the shard's home location (see [`stripe::fetch_shard`]).
pub fn fetch_shard(
    store: &Store,
    body: &ManifestBody,
    segment: u64,
    shard: usize,
    io: &mut Vec<u8>,
) -> (std::result::Result<(Range<usize>, usize), ShardProblem>, usize) {
    let home = store.home(&body.file_id, segment, shard);
    let (Some(leaf), Some(entry)) = (body.leaf(segment, shard), body.segments.get(segment as usize)) else {
        return (Err(ShardProblem::Missing), home);
    };
    let key_of = |i: usize| shard_key(&body.file_id, segment, i);
    let addr = segment_addr(body, segment, entry.shard_len as usize, &key_of);
    stripe::fetch_shard(store, &addr, shard, leaf, io)
}

fn segment_addr<'a>(
    body: &'a ManifestBody,
    segment: u64,
    shard_len: usize,
    key_of: &'a (dyn Fn(usize) -> String + Sync),
) -> StripeAddr<'a> {
    StripeAddr { file_id: &body.file_id, segment, rule: HomeRule::ById, shard_len, key_of, deferred: false }
}

/// A committed file opened for reading.
pub struct OpenFile {
    /// Manifest body.
    pub body: ManifestBody,
    /// Metadata.
    pub meta: FileMeta,
    cipher: SegmentCipher,
    /// The pack holding a packed file's ciphertext.
    pack: Option<ManifestBody>,
}

impl OpenFile {
    /// Opens a catalog entry (needs the key).
    pub fn new(store: &Store, entry: &Entry) -> Result<Self> {
        let key = store.key()?;
        let meta = match &entry.meta {
            Some(m) => m.clone(),
            None => entry.manifest.meta(key)?,
        };
        let pack = match entry.manifest.body.data {
            Data::Packed { pack, .. } => Some(catalog::pack_of(store, &pack)?),
            _ => None,
        };
        Ok(OpenFile {
            body: entry.manifest.body.clone(),
            cipher: key.segment_cipher(&entry.manifest.body.file_id),
            meta,
            pack,
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
    bufs: StripeBuffers,
}

impl<'a> SegmentReader<'a> {
    /// A reader for `file`.
    pub fn new(store: &'a Store, file: &'a OpenFile) -> Result<Self> {
        let codec = Codec::new(file.body.k as usize, file.body.m as usize)?;
        Ok(SegmentReader { store, file, codec, bufs: StripeBuffers::default() })
    }

    /// A reader for `file` that reuses a codec and buffers kept by the caller (a pool bounds how many segment
    /// buffers exist at once); the codec is replaced when its k and m differ from the file's.
    pub fn with_parts(store: &'a Store, file: &'a OpenFile, codec: Codec, bufs: StripeBuffers) -> Result<Self> {
        let (k, m) = (file.body.k as usize, file.body.m as usize);
        let codec = if codec.k() == k && codec.m() == m { codec } else { Codec::new(k, m)? };
        Ok(SegmentReader { store, file, codec, bufs })
    }

    /// Gives the codec and buffers back for reuse.
    pub fn into_parts(self) -> (Codec, StripeBuffers) {
        (self.codec, self.bufs)
    }

    /// Like [`SegmentReader::read`], but hands the plaintext over in `out` by swapping buffers instead of
    /// copying (the reader keeps `out`'s old allocation for its next segment).
    pub fn read_swap(&mut self, segment: u64, out: &mut Vec<u8>) -> Result<()> {
        let len = self.read(segment)?.len();
        std::mem::swap(&mut self.bufs.data, out);
        out.truncate(len);
        Ok(())
    }

    /// Like [`SegmentReader::read`], but fills `buf` (reusing its allocation) and hands it back: the reader
    /// keeps no segment buffer afterwards.
    pub fn read_into(&mut self, segment: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.bufs.data = buf;
        let len = self.read(segment)?.len();
        let mut out = std::mem::take(&mut self.bufs.data);
        out.truncate(len);
        Ok(out)
    }

    /// Returns the verified plaintext of `segment`.
    pub fn read(&mut self, segment: u64) -> Result<&[u8]> {
        if let (Some(pack), Data::Packed { offset, .. }) = (&self.file.pack, self.file.body.data) {
            return self.read_packed(pack, offset);
        }
        let body = &self.file.body;
        let entry = *body
            .segments
            .get(segment as usize)
            .ok_or_else(|| Error::internal(format!("segment {segment} out of range")))?;
        let width = body.width();
        let leaves = &body.leaves[segment as usize * width..(segment as usize + 1) * width];
        let key_of = |i: usize| shard_key(&body.file_id, segment, i);
        let addr = segment_addr(body, segment, entry.shard_len as usize, &key_of);
        let name = || self.file.meta.name.clone();
        let plain = entry.plain_len as usize;
        let last = segment + 1 == self.file.segments();
        // First the cheap way: shards checked by their headers only, the bytes by the segment's tag. Only when
        // the tag fails is every shard read again and hashed, to find the bad one and rebuild around it.
        let mut check = PayloadCheck::HeaderOnly;
        loop {
            let (r, tally) = read_stripe_checked(self.store, &mut self.codec, &addr, leaves, &mut self.bufs, check);
            let authentic = r.is_ok()
                && self.file.cipher.open_segment(segment, last, &mut self.bufs.data[..plain + TAG_LEN], plain);
            if authentic || r.is_err() || check == PayloadCheck::Hashed {
                tally.count(self.store);
            }
            match r {
                Ok(()) if authentic => return Ok(&self.bufs.data[..plain]),
                Ok(()) if check == PayloadCheck::HeaderOnly => check = PayloadCheck::Hashed,
                Ok(()) => return Err(Error::Authentication { file: name(), segment }),
                Err(StripeError::Lost { have, bad }) => {
                    return Err(Error::TooManyLost {
                        file: name(),
                        segment,
                        have,
                        need: body.k as usize,
                        bad: bad.join(", "),
                    })
                }
                Err(StripeError::Mismatch) => return Err(Error::Authentication { file: name(), segment }),
                Err(StripeError::Other(e)) => return Err(e),
            }
        }
    }
}

impl SegmentReader<'_> {
    /// A packed file: its ciphertext is read straight from the pack's data shards and authenticated by its tag;
    /// only when that fails (a missing or damaged shard) is the whole pack read, verified and rebuilt.
    fn read_packed(&mut self, pack: &ManifestBody, offset: u64) -> Result<&[u8]> {
        let plain = self.file.body.plain_size() as usize;
        let len = plain + TAG_LEN;
        let fast = read_pack_range(self.store, pack, offset, len, &mut self.bufs.data);
        if fast.is_ok() && self.file.cipher.open_segment(0, true, &mut self.bufs.data[..len], plain) {
            return Ok(&self.bufs.data[..plain]);
        }
        tracing::debug!(file = %self.file.meta.name, "packed file not readable directly; reading its whole pack");
        let name = || self.file.meta.name.clone();
        match read_pack_stripe(self.store, &mut self.codec, pack, &mut self.bufs) {
            Ok(()) => {}
            Err(StripeError::Lost { have, bad }) => {
                return Err(Error::TooManyLost {
                    file: name(),
                    segment: 0,
                    have,
                    need: pack.k as usize,
                    bad: bad.join(", "),
                })
            }
            Err(StripeError::Mismatch) => return Err(Error::Authentication { file: name(), segment: 0 }),
            Err(StripeError::Other(e)) => return Err(e),
        }
        let start = offset as usize;
        if start + len > self.bufs.data.len() {
            return Err(Error::corrupt(format!("pack of {}", name()), "the file lies beyond its pack"));
        }
        self.bufs.data.copy_within(start..start + len, 0);
        if !self.file.cipher.open_segment(0, true, &mut self.bufs.data[..len], plain) {
            return Err(Error::Authentication { file: name(), segment: 0 });
        }
        Ok(&self.bufs.data[..plain])
    }
}

/// Fills `bufs.data` with a pack's k verified data shards (its data, zero-padded), rebuilding missing ones.
pub(crate) fn read_pack_stripe(
    store: &Store,
    codec: &mut Codec,
    pack: &ManifestBody,
    bufs: &mut StripeBuffers,
) -> std::result::Result<(), StripeError> {
    let sl = pack.segments.first().map(|s| s.shard_len as usize).unwrap_or(0);
    let key_of = |i: usize| shard_key(&pack.file_id, 0, i);
    let addr = segment_addr(pack, 0, sl, &key_of);
    read_stripe(store, codec, &addr, &pack.leaves, bufs)
}

/// Reads `len` bytes at `offset` of a pack's data from its data shards' home locations into `out` (unverified:
/// the caller authenticates them).
fn read_pack_range(store: &Store, pack: &ManifestBody, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
    let sl = pack.segments.first().map(|s| s.shard_len as u64).unwrap_or(0);
    if sl == 0 || offset + len as u64 > sl * pack.k as u64 {
        return Err(Error::corrupt("pack", "range outside the pack"));
    }
    out.clear();
    let mut at = offset;
    while out.len() < len {
        let shard = (at / sl) as usize;
        let within = at % sl;
        let take = ((sl - within) as usize).min(len - out.len());
        let key = shard_key(&pack.file_id, 0, shard);
        let home = store.home(&pack.file_id, 0, shard);
        let bytes = store.from_holders(home, |loc| loc.get_range(&key, HEADER_LEN as u64 + within, take))?;
        if bytes.len() != take {
            return Err(Error::corrupt("pack shard", "short read"));
        }
        out.extend_from_slice(&bytes);
        at += take as u64;
    }
    Ok(())
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
            // Rendezvous hand-over and buffer swapping: each worker owns at most two segment buffers (one it
            // fills, one the writer drains), so memory stays at about 2 segments per worker.
            let (tx, rx) = sync_channel::<Result<Vec<u8>>>(0);
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
                let mut spare = Some(Vec::new());
                while seg < segments {
                    // The second buffer is allocated once; after that, wait for the writer to hand one back.
                    let mut out = match spare.take() {
                        Some(v) => v,
                        None => match back_rx.recv() {
                            Ok(v) => v,
                            Err(_) => return,
                        },
                    };
                    let r = reader.read_swap(seg, &mut out).map(|()| out);
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
            let plain = rx.recv().map_err(|_| Error::internal("reader thread ended early"))??;
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
    if let Data::Packed { pack, .. } = body.data {
        // A packed file's shards are its pack's.
        return match catalog::pack_of(store, &pack) {
            Ok(p) => verify_file(store, &p),
            Err(_) => vec![(0..body.width())
                .map(|i| ShardCheck { shard: i, location: 0, outcome: Err(ShardProblem::Missing) })
                .collect()],
        };
    }
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
