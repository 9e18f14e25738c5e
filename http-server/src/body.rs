//! Response bodies: empty, one buffer, or a stream of chunks fed through a bounded channel by a producer task
//! (so a slow client slows the producer instead of growing memory). A stream that ends in an error makes hyper
//! abort the connection without completing the body: the client sees a short or truncated response, never
//! padding.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// Why a streamed body was cut short (the response is aborted).
#[derive(Debug, thiserror::Error)]
#[error("response aborted: {0}")]
pub struct BodyAbort(pub String);

/// A response body.
pub enum Body {
    /// Nothing (HEAD, 304, ...).
    Empty,
    /// One buffer (listings, error texts).
    Full(Option<Bytes>),
    /// Chunks from a producer, `len` bytes in all.
    Stream {
        /// The producer's side sends chunks, or an error to abort.
        rx: mpsc::Receiver<Result<Bytes, BodyAbort>>,
        /// Bytes still to come (the `Content-Length` set on the response).
        remaining: u64,
    },
}

impl Body {
    /// A body of one buffer.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyAbort;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyAbort>>> {
        match &mut *self {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream { rx, remaining } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    *remaining = remaining.saturating_sub(chunk.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                // The producer ended: complete only when every promised byte was sent.
                Poll::Ready(None) if *remaining == 0 => Poll::Ready(None),
                Poll::Ready(None) => {
                    Poll::Ready(Some(Err(BodyAbort(format!("the body ended {remaining} bytes early")))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
