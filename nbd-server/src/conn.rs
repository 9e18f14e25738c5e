//! What both phases of a session share: the buffered halves of the connection and why a session ended.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader, BufWriter};
use tokio_util::sync::CancellationToken;

pub(crate) type Reader<S> = BufReader<tokio::io::ReadHalf<S>>;
pub(crate) type Writer<S> = BufWriter<tokio::io::WriteHalf<S>>;

/// Why a session ended early; only used for logging.
#[derive(Debug)]
pub(crate) enum End {
    Io(io::Error),
    Protocol(String),
    HandshakeTimeout(std::time::Duration),
    Tls(io::Error),
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Io(e) => write!(f, "I/O error: {e}"),
            End::Protocol(m) => write!(f, "protocol violation: {m}"),
            End::HandshakeTimeout(t) => {
                write!(f, "no export chosen within the {} s handshake timeout", t.as_secs_f64())
            }
            End::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            End::Shutdown => write!(f, "server shutdown"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

/// Reads exactly `buf.len()` bytes unless the server shuts down first.
pub(crate) async fn read_exact_or_shutdown<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    shutdown: &CancellationToken,
) -> Result<(), End> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(End::Shutdown),
        r = rd.read_exact(buf) => { r?; Ok(()) }
    }
}
