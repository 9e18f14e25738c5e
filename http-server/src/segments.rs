//! Verified segments for responses: the same read path as `bf get` ([`SegmentReader`]: every shard checked
//! against its Merkle leaf, missing or corrupt ones rebuilt from parity, the segment authenticated before a byte
//! of it is used), run on blocking threads, with a global cap on the segment buffers in existence.
//!
//! Memory: each [`Segment`] holds one permit of the pool's semaphore and one slot (the decoder and its
//! buffers, about 1.3 segment sizes); slots are reused, and at most `buffers` exist whatever the number of
//! requests, so many concurrent range requests on a large file wait for a slot instead of multiplying memory.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use blockframe::erasure::Codec;
use blockframe::files::read::{OpenFile, SegmentReader, StripeBuffers};
use blockframe::store::Store;

use crate::error::ServeError;
use crate::metrics::Metrics;

/// The pool of segment buffers shared by every response.
pub struct SegmentPool {
    permits: Arc<Semaphore>,
    spare: Mutex<Vec<Slot>>,
    buffers: usize,
    metrics: Arc<Metrics>,
}

/// A decoder and its buffers.
#[derive(Default)]
struct Slot {
    codec: Option<Codec>,
    bufs: StripeBuffers,
}

impl SegmentPool {
    /// A pool of at most `buffers` (≥ 1) segment buffers.
    pub fn new(buffers: usize) -> Arc<Self> {
        Self::with_metrics(buffers, Arc::default())
    }

    /// A pool that counts its reads and read failures in `metrics`.
    pub fn with_metrics(buffers: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        let buffers = buffers.max(1);
        let permits = Arc::new(Semaphore::new(buffers));
        Arc::new(SegmentPool { permits, spare: Mutex::new(Vec::new()), buffers, metrics })
    }

    /// Segment buffers not in use right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The cap.
    pub fn buffers(&self) -> usize {
        self.buffers
    }

    fn take_slot(&self) -> Slot {
        self.spare.lock().map(|mut s| s.pop()).ok().flatten().unwrap_or_default()
    }

    fn give_back(&self, slot: Slot) {
        if let Ok(mut s) = self.spare.lock() {
            if s.len() < self.buffers {
                s.push(slot);
            }
        }
    }
}

/// One verified segment's plaintext, holding its slot of the pool until dropped.
pub struct Segment {
    /// The segment's index in its file.
    pub index: u64,
    len: usize,
    slot: Option<Slot>,
    pool: Arc<SegmentPool>,
    _permit: OwnedSemaphorePermit,
}

impl Segment {
    /// The verified plaintext.
    pub fn bytes(&self) -> &[u8] {
        // The reader leaves the plaintext at the start of its data buffer (`SegmentReader::read`).
        self.slot.as_ref().and_then(|s| s.bufs.data.get(..self.len)).unwrap_or(&[])
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.give_back(slot);
        }
    }
}

/// Reads and verifies segment `index` of `file` once a slot is free (waiting for one otherwise).
pub async fn read(
    pool: &Arc<SegmentPool>,
    store: &Arc<Store>,
    file: &Arc<OpenFile>,
    index: u64,
) -> Result<Segment, ServeError> {
    let permit = pool.permits.clone().acquire_owned().await.map_err(|e| ServeError::Task(e.to_string()))?;
    let slot = pool.take_slot();
    let (store, file) = (store.clone(), file.clone());
    // The permit travels with the slot: should this future be dropped (the client went away), the blocking
    // read still runs to its end, and its buffers count against the cap until then.
    let (slot, result, permit) = tokio::task::spawn_blocking(move || {
        let (slot, result) = read_blocking(&store, &file, index, slot);
        (slot, result, permit)
    })
    .await?;
    let len = match result {
        Ok(len) => {
            pool.metrics.segment_reads.fetch_add(1, Ordering::Relaxed);
            len
        }
        Err(e) => {
            pool.metrics.segment_read_failures.fetch_add(1, Ordering::Relaxed);
            pool.give_back(slot);
            return Err(e.into());
        }
    };
    Ok(Segment { index, len, slot: Some(slot), pool: pool.clone(), _permit: permit })
}

/// Reads one segment into `slot`; gives the slot back whatever happens, with the plaintext length on success.
fn read_blocking(store: &Store, file: &OpenFile, index: u64, mut slot: Slot) -> (Slot, blockframe::Result<usize>) {
    let codec = match slot.codec.take() {
        Some(c) => c,
        None => match Codec::new(file.body.k as usize, file.body.m as usize) {
            Ok(c) => c,
            Err(e) => return (slot, Err(e)),
        },
    };
    let mut reader = match SegmentReader::with_parts(store, file, codec, std::mem::take(&mut slot.bufs)) {
        Ok(r) => r,
        Err(e) => return (slot, Err(e)),
    };
    let result = reader.read(index).map(<[u8]>::len);
    let (codec, bufs) = reader.into_parts();
    (Slot { codec: Some(codec), bufs }, result)
}

/// Where each segment of a file starts in its plaintext, plus the file's length at the end.
#[derive(Clone, Debug)]
pub struct Layout {
    starts: Vec<u64>,
}

impl Layout {
    /// The layout of `file`.
    pub fn of(file: &OpenFile) -> Self {
        let mut starts = Vec::with_capacity(file.body.segments.len() + 1);
        let mut at = 0u64;
        starts.push(0);
        for s in &file.body.segments {
            at += s.plain_len;
            starts.push(at);
        }
        Layout { starts }
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segment holding byte `offset` (< len).
    pub fn segment_of(&self, offset: u64) -> u64 {
        (self.starts.partition_point(|&s| s <= offset).saturating_sub(1)) as u64
    }

    /// Where segment `index` starts.
    pub fn start(&self, index: u64) -> u64 {
        self.starts.get(index as usize).copied().unwrap_or_else(|| self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_finds_segments() {
        let l = Layout { starts: vec![0, 10, 20, 25] };
        assert_eq!(l.len(), 25);
        assert_eq!(l.segment_of(0), 0);
        assert_eq!(l.segment_of(9), 0);
        assert_eq!(l.segment_of(10), 1);
        assert_eq!(l.segment_of(24), 2);
        assert_eq!(l.start(2), 20);
        assert_eq!(l.start(9), 25);
    }
}
