//! Reading committed files through the mount: segments decoded (verified, rebuilt, decrypted) by a bounded pool
//! of decoders into the shared cache, with read-ahead for sequential readers.

use super::*;
use std::ops::Range;

/// Bytes read through the mount: a slice of one cached segment (no copy), or bytes of their own.
#[derive(Debug)]
pub enum ReadData {
    /// Bytes of their own (a read from a spool, or one spanning segments).
    Owned(Vec<u8>),
    /// `range` of a decoded segment.
    Segment {
        /// The segment's plaintext.
        data: Bytes,
        /// What was read of it.
        range: Range<usize>,
    },
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Segment { data, range } => &data[range.clone()],
        }
    }
}

impl Vfs {
    /// Reads up to `size` bytes at `offset` (fewer at the end of the file).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        let h = self.file_handle(fh)?;
        let Handle::File(h) = &*h else {
            return Err(Error::fs(FsErrorKind::BadHandle, format!("handle {fh}")));
        };
        if let Some(spool) = h.writer.as_ref().and_then(|w| w.spool()) {
            let len = spool.len();
            let n = (size as u64).min(len.saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; n];
            let got = spool.read_at(offset, &mut buf)?;
            buf.truncate(got);
            return Ok(ReadData::Owned(buf));
        }
        let Some(c) = &h.committed else {
            return Ok(ReadData::Owned(Vec::new()));
        };
        let read =
            |c: &Committed| self.shared.read_committed(h, &c.file(&self.shared.store)?, offset, size as usize, self);
        read(c).or_else(|e| match self.shared.moved(c) {
            // A compaction moved the file to another pack while this handle was open: read it where it is now.
            Some(now) => read(&now),
            None => Err(e),
        })
    }

    pub(super) fn prefetch(&self, file: &Arc<OpenFile>, segments: std::ops::RangeInclusive<u64>) {
        let guard = lock(&self.prefetch);
        let Some(tx) = guard.as_ref() else {
            return;
        };
        for segment in segments {
            if segment >= file.segments() || self.shared.cache.contains(&(file.body.file_id, segment)) {
                continue;
            }
            match tx.try_send(Prefetch { file: file.clone(), segment }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

impl Shared {
    /// The version of packed file `c` the catalog holds now, when a compaction (here or in another process)
    /// moved its bytes to another pack since `c` was read; `None` when they did not move. Its bytes and root are
    /// the same, so segments cached under its file id stay valid.
    pub(super) fn moved(&self, c: &Committed) -> Option<Arc<Committed>> {
        if !matches!(c.entry.manifest.body.data, crate::format::manifest::Data::Packed { .. }) {
            return None;
        }
        let st = crate::files::catalog_log::current(&self.store).ok()?;
        if st.entries.get(&c.key())?.body.data == c.entry.manifest.body.data {
            return None;
        }
        catalog::load(&self.store, &c.entry.file).and_then(Committed::new).ok().map(Arc::new)
    }

    /// The verified plaintext of one segment, from the cache or decoded.
    pub(super) fn segment(&self, file: &OpenFile, segment: u64) -> Result<Bytes> {
        let len = segment_len(file, segment);
        self.cache.get_or_load(&(file.body.file_id, segment), len, || self.decode(file, segment))
    }

    /// Read-ahead of one segment into the cache, skipped when it would evict a segment in use.
    fn prefetch_segment(&self, file: &OpenFile, segment: u64) -> Option<Result<Bytes>> {
        let len = segment_len(file, segment);
        self.cache.prefetch(&(file.body.file_id, segment), len, || self.decode(file, segment))
    }

    fn decode(&self, file: &OpenFile, segment: u64) -> Result<Vec<u8>> {
        self.decoded.fetch_add(1, Ordering::Relaxed);
        // The decoded buffer itself goes into the cache (no copy): the buffer of a segment the cache evicted to
        // make room for this one, or a new one. The decoder keeps none between segments.
        self.decoders.with(file, |r| r.read_into(segment, self.cache.take_spare()), &self.store)
    }

    /// Segment `seg` of `file` and the part of it that bytes `offset..end` of the file cover (marked read
    /// through when that reaches its end).
    fn segment_part(&self, file: &OpenFile, seg: u64, offset: u64, end: u64) -> Result<(Bytes, Range<usize>)> {
        let data = self.segment(file, seg)?;
        let start = seg * file.body.segment_size;
        let a = (offset.max(start) - start) as usize;
        let b = (end.min(start + data.len() as u64) - start) as usize;
        if a >= b {
            return Err(Error::corrupt(
                format!("segment {seg} of {}", file.meta.name),
                "shorter than the manifest says",
            ));
        }
        if b == data.len() {
            self.cache.read_through(&(file.body.file_id, seg));
        }
        Ok((data, a..b))
    }

    pub(super) fn read_committed(
        &self,
        h: &FileHandle,
        file: &Arc<OpenFile>,
        offset: u64,
        size: usize,
        vfs: &Vfs,
    ) -> Result<ReadData> {
        let total = file.meta.size;
        if offset >= total || size == 0 {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let end = offset.saturating_add(size as u64).min(total);
        let seg_size = file.body.segment_size;
        let (first, last) = (offset / seg_size, (end - 1) / seg_size);
        // A read within one segment is a slice of it; one across segments gathers their parts.
        let out = if first == last {
            let (data, range) = self.segment_part(file, first, offset, end)?;
            ReadData::Segment { data, range }
        } else {
            let mut v = Vec::with_capacity((end - offset) as usize);
            for seg in first..=last {
                let (data, range) = self.segment_part(file, seg, offset, end)?;
                v.extend_from_slice(&data[range]);
            }
            ReadData::Owned(v)
        };
        // Read-ahead when this read continues the previous one (the kernel's own read-ahead reorders reads a
        // little, hence the window).
        let prev = h.last_end.swap(end, Ordering::Relaxed);
        if offset.abs_diff(prev) <= 4 << 20 {
            let cache_segments = (self.opts.cache_bytes as u64 / seg_size).max(1);
            let ahead = self.opts.read_ahead_bytes.div_ceil(seg_size).clamp(1, 32).min((cache_segments / 2).max(1));
            vfs.prefetch(file, last + 1..=last + ahead);
        }
        Ok(out)
    }
}

impl DecoderPool {
    /// Frees the buffers of idle decoders (kept between segments of a busy reader; freed when reading pauses).
    fn trim(&self) {
        for (_, bufs) in lock(&self.free).0.iter_mut() {
            *bufs = StripeBuffers::default();
        }
    }

    fn with<R>(
        &self,
        file: &OpenFile,
        f: impl FnOnce(&mut SegmentReader<'_>) -> Result<R>,
        store: &Store,
    ) -> Result<R> {
        let parts = {
            let mut g = lock(&self.free);
            while g.0.is_empty() && g.1 >= self.max {
                g = self.returned.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.1 += 1;
            g.0.pop()
        };
        // Give the slot back however `f` ends.
        struct Slot<'a> {
            pool: &'a DecoderPool,
            parts: Option<(Codec, StripeBuffers)>,
        }
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                let mut g = lock(&self.pool.free);
                g.1 -= 1;
                if let Some(p) = self.parts.take() {
                    g.0.push(p);
                }
                drop(g);
                self.pool.returned.notify_one();
            }
        }
        let mut slot = Slot { pool: self, parts: None };
        let (codec, bufs) = match parts {
            Some(p) => p,
            None => (Codec::new(file.body.k as usize, file.body.m as usize)?, StripeBuffers::default()),
        };
        let mut reader = SegmentReader::with_parts(store, file, codec, bufs)?;
        let r = f(&mut reader);
        slot.parts = Some(reader.into_parts());
        r
    }
}

/// How long the decoders stay idle before their buffers (about 1.5 segments each) are freed.
const DECODERS_IDLE: Duration = Duration::from_secs(1);

pub(super) fn prefetch_loop(shared: &Shared, rx: &Mutex<Receiver<Prefetch>>) {
    loop {
        let job = match lock(rx).recv_timeout(DECODERS_IDLE) {
            Ok(j) => j,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                shared.decoders.trim();
                shared.cache.trim();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if let Some(Err(e)) = shared.prefetch_segment(&job.file, job.segment) {
            tracing::debug!(segment = job.segment, error = %e, "read-ahead failed");
        }
    }
}

/// Plaintext bytes of `segment` of `file` (what its cache entry will hold).
fn segment_len(file: &OpenFile, segment: u64) -> usize {
    file.body.segments.get(segment as usize).map_or(0, |s| s.plain_len as usize)
}
