//! Streaming a file's byte ranges: the pieces of a response (literal text such as multipart headers, and
//! byte ranges of the file), and the producer that reads the segments those ranges touch (each once, one
//! segment read ahead) and sends them chunk by chunk into the response body.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use blockframe::files::read::OpenFile;
use blockframe::store::Store;

use crate::body::{Body, BodyAbort};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::range::ByteRange;
use crate::segments::{self, Layout, Segment, SegmentPool};

/// Bytes per body chunk.
pub const CHUNK_BYTES: usize = 256 << 10;

/// Chunks queued between the producer and the connection.
const QUEUE_CHUNKS: usize = 4;

/// One piece of a response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Literal bytes.
    Text(Bytes),
    /// A range of the file.
    Data(ByteRange),
}

/// The pieces of a `multipart/byteranges` body for `ranges` of a file of `total` bytes, and its length.
pub fn multipart(ranges: &[ByteRange], content_type: &str, total: u64, boundary: &str) -> (Vec<Piece>, u64) {
    let mut pieces = Vec::with_capacity(ranges.len() * 2 + 1);
    for (i, r) in ranges.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: {}\r\n\r\n",
            r.content_range(total)
        );
        pieces.push(Piece::Text(Bytes::from(head)));
        pieces.push(Piece::Data(*r));
    }
    pieces.push(Piece::Text(Bytes::from(format!("\r\n--{boundary}--\r\n"))));
    let len = pieces
        .iter()
        .map(|p| match p {
            Piece::Text(b) => b.len() as u64,
            Piece::Data(r) => r.len(),
        })
        .sum();
    (pieces, len)
}

/// What a response reads from.
#[derive(Clone)]
pub struct Source {
    /// The store.
    pub store: Arc<Store>,
    /// The opened file.
    pub file: Arc<OpenFile>,
    /// Where its segments start.
    pub layout: Arc<Layout>,
    /// The shared segment buffers.
    pub pool: Arc<SegmentPool>,
    /// How long a client may leave a chunk unread before the response is dropped.
    pub send_timeout: Duration,
    /// Where bytes sent and aborted responses are counted.
    pub metrics: Arc<Metrics>,
}

/// The segments the data pieces touch, in order, each run of the same segment once.
fn segment_sequence(pieces: &[Piece], layout: &Layout) -> Vec<u64> {
    let mut seq: Vec<u64> = Vec::new();
    for p in pieces {
        let Piece::Data(r) = p else { continue };
        for s in layout.segment_of(r.start)..=layout.segment_of(r.end - 1) {
            if seq.last() != Some(&s) {
                seq.push(s);
            }
        }
    }
    seq
}

/// A segment read running in its own task (so it proceeds while the previous segment is being sent); aborted
/// when dropped before it is awaited.
struct Ahead(Option<tokio::task::JoinHandle<Result<Segment, ServeError>>>);

impl Ahead {
    fn start(src: &Source, index: Option<&u64>) -> Self {
        Ahead(index.map(|&i| {
            let src = src.clone();
            tokio::spawn(async move { segments::read(&src.pool, &src.store, &src.file, i).await })
        }))
    }

    async fn get(&mut self) -> Option<Result<Segment, ServeError>> {
        let h = self.0.take()?;
        Some(h.await.map_err(ServeError::from).and_then(|r| r))
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Starts streaming `pieces` (`len` bytes in all). The first segment is read before this returns, so a file
/// whose first needed segment is beyond repair gets an error status instead of a started response; later
/// failures abort the body.
pub async fn start(src: Source, pieces: Vec<Piece>, len: u64) -> Result<Body, ServeError> {
    let seq = segment_sequence(&pieces, &src.layout);
    let mut ahead = Ahead::start(&src, seq.first());
    let first = match ahead.get().await {
        Some(r) => Some(r?),
        None => None,
    };
    let ahead = Ahead::start(&src, seq.get(1));
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    tokio::spawn(async move {
        let mut p = Producer { src, tx, seq, next: 2, cur: first, ahead, sent: 0 };
        if let Err(why) = p.run(&pieces).await {
            p.abort(why).await;
        }
    });
    Ok(Body::Stream { rx, remaining: len })
}

/// Why a producer stopped early.
enum Stop {
    /// The client went away or stopped reading: nothing more to say to it.
    Client(String),
    /// A read failed: the body is aborted with this error.
    Read(ServeError),
}

struct Producer {
    src: Source,
    tx: mpsc::Sender<Result<Bytes, BodyAbort>>,
    seq: Vec<u64>,
    next: usize,
    cur: Option<Segment>,
    ahead: Ahead,
    sent: u64,
}

impl Producer {
    async fn run(&mut self, pieces: &[Piece]) -> Result<(), Stop> {
        for p in pieces {
            match p {
                Piece::Text(b) => self.send(b.clone()).await?,
                Piece::Data(r) => self.send_range(*r).await?,
            }
        }
        Ok(())
    }

    async fn send_range(&mut self, r: ByteRange) -> Result<(), Stop> {
        let layout = self.src.layout.clone();
        let mut pos = r.start;
        while pos < r.end {
            let index = layout.segment_of(pos);
            let base = layout.start(index);
            // One chunk is copied at a time, and sent before the next: the segment itself stays in its slot.
            let chunk = {
                let bytes = self.segment(index).await?.bytes();
                let from = (pos - base) as usize;
                let to = ((r.end - base) as usize).min(bytes.len()).min(from + CHUNK_BYTES);
                if from >= to {
                    return Err(Stop::Read(ServeError::Task(format!(
                        "segment {index} is shorter than the manifest says ({} bytes)",
                        bytes.len()
                    ))));
                }
                Bytes::copy_from_slice(&bytes[from..to])
            };
            let n = chunk.len() as u64;
            pos += n;
            self.send(chunk).await?;
            self.src.metrics.bytes_sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The verified segment `index`: the current one, or the next of the sequence (starting the read after it).
    async fn segment(&mut self, index: u64) -> Result<&Segment, Stop> {
        if self.cur.as_ref().is_none_or(|s| s.index != index) {
            // Free this response's slot before waiting for the next one: a response never holds two slots
            // while it waits, so responses cannot deadlock each other on the pool.
            self.cur = None;
            let seg = match self.ahead.get().await {
                Some(r) => r.map_err(Stop::Read)?,
                None => {
                    segments::read(&self.src.pool, &self.src.store, &self.src.file, index).await.map_err(Stop::Read)?
                }
            };
            self.ahead = Ahead::start(&self.src, self.seq.get(self.next));
            self.next += 1;
            self.cur = Some(seg);
        }
        match &self.cur {
            Some(s) if s.index == index => Ok(s),
            _ => Err(Stop::Read(ServeError::Task(format!("segment {index} was not read in order")))),
        }
    }

    async fn send(&mut self, chunk: Bytes) -> Result<(), Stop> {
        let n = chunk.len() as u64;
        match tokio::time::timeout(self.src.send_timeout, self.tx.send(Ok(chunk))).await {
            Ok(Ok(())) => {
                self.sent += n;
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Client("the client closed the connection".into())),
            Err(_) => Err(Stop::Client(format!("the client read nothing for {:?}", self.src.send_timeout))),
        }
    }

    async fn abort(&mut self, why: Stop) {
        let name = &self.src.file.meta.name;
        match why {
            Stop::Client(why) => tracing::debug!(file = %name, sent = self.sent, "response ended: {why}"),
            Stop::Read(e) => {
                self.src.metrics.responses_aborted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    file = %name, sent = self.sent, error = %e,
                    "aborting the response: a segment cannot be read and verified (nothing unverified is sent)"
                );
                let _ = self.tx.send(Err(BodyAbort(e.to_string()))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_length_is_exact() {
        let ranges = [ByteRange { start: 0, end: 10 }, ByteRange { start: 20, end: 25 }];
        let (pieces, len) = multipart(&ranges, "text/plain", 100, "B");
        let text: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(b) => b.len(),
                Piece::Data(r) => r.len() as usize,
            })
            .sum();
        assert_eq!(len as usize, text);
        assert_eq!(pieces.len(), 5);
        assert_eq!(
            pieces[0],
            Piece::Text(Bytes::from("--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-9/100\r\n\r\n"))
        );
        assert_eq!(pieces[4], Piece::Text(Bytes::from("\r\n--B--\r\n")));
    }
}
