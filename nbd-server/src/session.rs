//! One client connection: handshake, then the transmission phase with
//! concurrent request processing.
//!
//! Design of the transmission phase: the calling task reads requests,
//! validates them with [`validate_request`] and spawns one task per request,
//! which runs the blocking backend call with `spawn_blocking` and sends the
//! encoded reply to a single writer task over a channel. Replies may thus be
//! sent out of order (each echoes its cookie). A semaphore bounds the number
//! of requests in flight and a second one the bytes held in payload/read
//! buffers, which gives back-pressure: when full, the reader stops reading
//! from the socket.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace, warn};

use crate::backend::{errno_for, BlockBackend, ExportRegistry, Extent};
use crate::config::ServerConfig;
use crate::conn::{End, Reader, Writer};
use crate::metrics::NbdMetrics;
use crate::negotiation::{greet, haggle, Negotiated, Outcome, TlsState};
use crate::proto::*;
use crate::reply::*;
use crate::request::*;
use crate::tls::TlsMode;

/// Run one client session to completion. Never panics on peer input; all
/// errors end only this session.
pub(crate) async fn run_session<S>(
    stream: S,
    registry: Arc<dyn ExportRegistry>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hs = tokio::select! {
        biased;
        r = tokio::time::timeout(config.handshake_timeout, negotiate(stream, &registry, &config, &shutdown, &peer)) => {
            r.unwrap_or(Err(End::HandshakeTimeout(config.handshake_timeout)))
        }
        // Only reachable if the peer stops reading our option replies.
        _ = grace_expired(&shutdown, config.shutdown_grace) => Err(End::Shutdown),
    };
    let (rd, wr, negotiated) = match hs {
        Ok(Some(ready)) => ready,
        Ok(None) => {
            debug!(%peer, "client ended negotiation");
            return;
        }
        Err(e) => {
            match e {
                End::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(%peer, "client closed during handshake")
                }
                End::Tls(e) => warn!(%peer, error = %e, "TLS handshake failed; connection closed"),
                other => info!(%peer, reason = %other, "handshake ended"),
            }
            return;
        }
    };
    info!(
        %peer,
        export = %negotiated.name,
        size = negotiated.params.size,
        structured = negotiated.params.structured,
        "entering transmission phase"
    );
    let backend = Arc::clone(&negotiated.backend);
    transmission(rd, wr, negotiated, &config, &shutdown, &peer).await;
    // Make everything this session wrote durable before we let go of it.
    let flush = tokio::task::spawn_blocking(move || backend.flush()).await;
    match flush {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(%peer, error = %e, "flush at end of session failed"),
        Err(e) => warn!(%peer, error = %e, "flush at end of session panicked"),
    }
    info!(%peer, "session closed");
}

/// A connection before (`Left`) or after (`Right`) STARTTLS.
type Conn<S> = Either<S, TlsStream<S>>;

/// A negotiated connection, ready for the transmission phase.
type Ready<S> = (Reader<Conn<S>>, Writer<Conn<S>>, Negotiated);

fn buffered<S: AsyncRead + AsyncWrite + Unpin>(conn: Conn<S>) -> (Reader<Conn<S>>, Writer<Conn<S>>) {
    let (rd, wr) = tokio::io::split(conn);
    (BufReader::with_capacity(64 * 1024, rd), BufWriter::with_capacity(64 * 1024, wr))
}

/// The handshake: greeting, option haggling and, when the client sends STARTTLS, the TLS handshake and a
/// second haggling from a fresh state over TLS. `Ok(None)`: the client aborted.
async fn negotiate<S>(
    stream: S,
    registry: &Arc<dyn ExportRegistry>,
    config: &ServerConfig,
    shutdown: &CancellationToken,
    peer: &str,
) -> Result<Option<Ready<S>>, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = match &config.tls {
        None => TlsState::Disabled,
        Some(t) if t.mode() == TlsMode::Require => TlsState::Required,
        Some(_) => TlsState::Offered,
    };
    let (mut rd, mut wr) = buffered(Either::Left(stream));
    let plain = async {
        let cflags = greet(&mut rd, &mut wr, shutdown).await?;
        if tls == TlsState::Required && !cflags.fixed_newstyle {
            return Err(End::Protocol("TLS is required but the client does not use fixed newstyle".into()));
        }
        Ok((cflags, haggle(&mut rd, &mut wr, registry, shutdown, cflags, tls).await?))
    }
    .await;
    let (cflags, outcome) = match plain {
        Ok(x) => x,
        Err(e) => {
            let _ = wr.shutdown().await;
            return Err(e);
        }
    };
    match outcome {
        Outcome::Export(n) => return Ok(Some((rd, wr, n))),
        Outcome::Aborted => return Ok(None),
        Outcome::StartTls => {}
    }
    let Some(tls_config) = &config.tls else {
        return Err(End::Protocol("STARTTLS acknowledged without TLS configured".into()));
    };
    // The client may send nothing between STARTTLS and its TLS ClientHello, which it sends only after our
    // ACK: bytes already buffered were sent before it saw the ACK (or injected by someone in the middle),
    // and must not be taken as TLS-protected.
    if !rd.buffer().is_empty() {
        return Err(End::Protocol("data after NBD_OPT_STARTTLS before the TLS handshake".into()));
    }
    wr.flush().await?;
    let Either::Left(plain) = rd.into_inner().unsplit(wr.into_inner()) else {
        return Err(End::Protocol("STARTTLS on a TLS connection".into()));
    };
    let stream = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(End::Shutdown),
        r = tls_config.acceptor().accept(plain) => r.map_err(End::Tls)?,
    };
    let (_, session) = stream.get_ref();
    info!(
        %peer,
        version = ?session.protocol_version(),
        client_certificate = session.peer_certificates().is_some_and(|c| !c.is_empty()),
        "TLS established"
    );
    let (mut rd, mut wr) = buffered(Either::Right(stream));
    match haggle(&mut rd, &mut wr, registry, shutdown, cflags, TlsState::Active).await {
        Ok(Outcome::Export(n)) => Ok(Some((rd, wr, n))),
        Ok(Outcome::Aborted) => Ok(None),
        Ok(Outcome::StartTls) => Err(End::Protocol("second STARTTLS acknowledged".into())),
        Err(e) => {
            let _ = wr.shutdown().await;
            Err(e)
        }
    }
}

/// One encoded reply plus the resources it holds until it is written.
struct Outgoing {
    head: Vec<u8>,
    data: Option<Vec<u8>>,
    _permits: Permits,
}

/// Result of executing a command on the backend.
enum Output {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

fn execute(backend: &dyn BlockBackend, cmd: Command, payload: Option<Vec<u8>>) -> io::Result<Output> {
    match cmd {
        Command::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            backend.read(offset, &mut buf)?;
            Ok(Output::Data(buf))
        }
        Command::Write { offset, fua, .. } => {
            let data = payload.unwrap_or_default();
            backend.write(offset, &data, fua)?;
            Ok(Output::Done)
        }
        Command::Flush => backend.flush().map(|_| Output::Done),
        Command::Trim { offset, len, fua } => backend.trim(offset, u64::from(len), fua).map(|_| Output::Done),
        Command::Cache { offset, len } => backend.cache(offset, u64::from(len)).map(|_| Output::Done),
        Command::WriteZeroes { offset, len, may_trim, fua, fast } => {
            if fast && !backend.can_fast_zero() {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            backend.write_zeroes(offset, u64::from(len), may_trim, fua).map(|_| Output::Done)
        }
        Command::BlockStatus { offset, len, .. } => backend.block_status(offset, u64::from(len)).map(Output::Extents),
        Command::Disconnect => Ok(Output::Done),
    }
}

/// Encode the reply for `cmd`'s result as (header bytes, optional data).
fn encode_result(
    cookie: u64,
    cmd: &Command,
    structured: bool,
    size: u64,
    result: Result<Output, (u32, String)>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    match result {
        Err((errno, msg)) => error_reply(cookie, structured, errno, &msg),
        Ok(Output::Data(buf)) => {
            let offset = match cmd {
                Command::Read { offset, .. } => *offset,
                _ => 0,
            };
            if !structured {
                (simple_reply(cookie, 0).to_vec(), Some(buf))
            } else {
                match offset_data_header(cookie, offset, buf.len(), true) {
                    Some(h) => (h.to_vec(), Some(buf)),
                    None => (none_chunk(cookie).to_vec(), None),
                }
            }
        }
        Ok(Output::Extents(extents)) => match cmd {
            Command::BlockStatus { offset, len, req_one } => {
                let d = encode_extents(&extents, *offset, *len, size, *req_one);
                (block_status_chunk(cookie, BASE_ALLOCATION_ID, &d), None)
            }
            _ => (simple_reply(cookie, 0).to_vec(), None),
        },
        // Success without payload: a simple reply is allowed even when
        // structured replies are negotiated.
        Ok(Output::Done) => (simple_reply(cookie, 0).to_vec(), None),
    }
}

fn error_reply(cookie: u64, structured: bool, errno: u32, msg: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    if structured {
        (error_chunk(cookie, errno, msg), None)
    } else {
        (simple_reply(cookie, errno).to_vec(), None)
    }
}

/// Read and drop `len` payload bytes so the stream stays in sync.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "payload truncated"));
    }
    Ok(())
}

async fn writer_task<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Outgoing>, dead: CancellationToken) {
    let res: io::Result<()> = async {
        while let Some(msg) = rx.recv().await {
            wr.write_all(&msg.head).await?;
            if let Some(d) = &msg.data {
                wr.write_all(d).await?;
            }
            drop(msg);
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    }
    .await;
    if let Err(e) = res {
        debug!(error = %e, "reply writer stopped");
        dead.cancel();
    }
}

/// Semaphore permits a request holds until its reply is written: one request slot and, for reads and writes,
/// its bytes.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

/// Waits for `f` unless the server shuts down first.
async fn or_shutdown<T>(shutdown: &CancellationToken, f: impl std::future::Future<Output = T>) -> Result<T, End> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(End::Shutdown),
        v = f => Ok(v),
    }
}

fn closed<E>(_: E) -> End {
    End::Protocol("semaphore closed".into())
}

/// The transmission phase of one session: reads requests, runs each as its own task and hands the replies to
/// the writer task.
struct Transmission<'a, S> {
    rd: Reader<S>,
    params: TransmissionParams,
    backend: Arc<dyn BlockBackend>,
    inflight: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    tx: mpsc::Sender<Outgoing>,
    dead: CancellationToken,
    tasks: TaskTracker,
    shutdown: &'a CancellationToken,
    /// The request slots (`inflight`'s permits when nothing is in flight).
    slots: usize,
    idle_timeout: Option<Duration>,
    metrics: Option<Arc<NbdMetrics>>,
}

impl<S> Transmission<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves requests until the client disconnects, the writer fails, the server shuts down or the peer
    /// breaks the protocol; `Ok` carries why it ended normally.
    async fn serve(&mut self) -> Result<&'static str, End> {
        loop {
            let req = match self.read_header().await? {
                Ok(req) => req,
                Err(reason) => return Ok(reason),
            };
            let permit =
                or_shutdown(self.shutdown, Arc::clone(&self.inflight).acquire_owned()).await?.map_err(closed)?;
            let cmd = match validate_request(&req, &self.params) {
                Ok(c) => c,
                Err(e) => {
                    if !self.reject(&req, &e, permit).await? {
                        return Ok("reply writer gone");
                    }
                    continue;
                }
            };
            if cmd == Command::Disconnect {
                return Ok("client sent NBD_CMD_DISC");
            }
            let byte_permit = self.buffer_permit(&cmd).await?;
            let payload = self.read_payload(&cmd).await?;
            self.spawn(req.cookie, cmd, payload, (permit, byte_permit));
        }
    }

    /// The next request header, or (`Ok(Err)`) why there is none.
    async fn read_header(&mut self) -> Result<Result<RequestHeader, &'static str>, End> {
        if let Some(idle) = self.idle_timeout {
            if !self.wait_for_request(idle).await? {
                return Ok(Err("idle timeout"));
            }
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(End::Shutdown),
            _ = self.dead.cancelled() => return Ok(Err("reply writer failed")),
            r = self.rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Err("client closed connection")),
                Err(e) => return Err(End::Io(e)),
            },
        }
        let req = parse_request_header(&hdr).map_err(|e| End::Protocol(e.to_string()))?;
        trace!(?req, "request");
        Ok(Ok(req))
    }

    /// Waits until the next request starts to arrive (or the connection ends); `false` when it sat idle for
    /// `idle`: nothing received and no request of it in flight (a client waiting for a slow reply is not idle).
    async fn wait_for_request(&mut self, idle: Duration) -> Result<bool, End> {
        loop {
            let timed_out = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                _ = self.dead.cancelled() => false,
                // Cancel safe: no byte is consumed when the timer wins.
                r = self.rd.fill_buf() => { r?; false }
                _ = tokio::time::sleep(idle) => true,
            };
            if !timed_out {
                return Ok(true);
            }
            if self.inflight.available_permits() == self.slots {
                info!(idle_s = idle.as_secs_f64(), "closing a connection idle for longer than the idle timeout");
                return Ok(false);
            }
        }
    }

    /// Answers an invalid request with its error (skipping its payload); `false` when the writer is gone.
    async fn reject(
        &mut self,
        req: &RequestHeader,
        e: &RequestError,
        permit: OwnedSemaphorePermit,
    ) -> Result<bool, End> {
        debug!(cookie = req.cookie, typ = req.typ, errno = e.errno, msg = e.message, "request rejected");
        if let Some(m) = &self.metrics {
            blockframe::metrics::add(&m.requests_invalid, 1);
        }
        if req.has_payload() {
            or_shutdown(self.shutdown, discard(&mut self.rd, u64::from(req.length))).await??;
        }
        let (head, data) = error_reply(req.cookie, self.params.structured, e.errno, e.message);
        Ok(self.tx.send(Outgoing { head, data, _permits: (permit, None) }).await.is_ok())
    }

    /// Reserves the buffer bytes of a READ or WRITE (back-pressure on the socket when the budget is spent).
    async fn buffer_permit(&self, cmd: &Command) -> Result<Option<OwnedSemaphorePermit>, End> {
        let buffered = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => *len,
            _ => 0,
        };
        if buffered == 0 {
            return Ok(None);
        }
        let p = or_shutdown(self.shutdown, Arc::clone(&self.bytes).acquire_many_owned(buffered)).await?;
        Ok(Some(p.map_err(closed)?))
    }

    /// Reads the payload of a WRITE.
    async fn read_payload(&mut self, cmd: &Command) -> Result<Option<Vec<u8>>, End> {
        let Command::Write { len, .. } = cmd else { return Ok(None) };
        let mut buf = vec![0u8; *len as usize];
        or_shutdown(self.shutdown, self.rd.read_exact(&mut buf)).await??;
        Ok(Some(buf))
    }

    /// Runs one request on the backend in its own task; its reply goes to the writer.
    fn spawn(&self, cookie: u64, cmd: Command, payload: Option<Vec<u8>>, permits: Permits) {
        let backend = Arc::clone(&self.backend);
        let tx = self.tx.clone();
        let (structured, size) = (self.params.structured, self.params.size);
        let metrics = self.metrics.clone();
        self.tasks.spawn(async move {
            let started = std::time::Instant::now();
            let ran = tokio::task::spawn_blocking(move || execute(backend.as_ref(), cmd, payload)).await;
            if let Some(m) = &metrics {
                m.request(&cmd, matches!(ran, Ok(Ok(_))), started.elapsed());
            }
            let result = match ran {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(e)) => {
                    debug!(cookie, ?cmd, error = %e, "backend error");
                    Err((errno_for(&e), e.to_string()))
                }
                Err(e) => {
                    warn!(cookie, ?cmd, error = %e, "backend call panicked");
                    Err((NBD_EIO, "internal server error".to_owned()))
                }
            };
            let (head, data) = encode_result(cookie, &cmd, structured, size, result);
            let _ = tx.send(Outgoing { head, data, _permits: permits }).await;
        });
    }
}

/// Runs the transmission phase, then finishes every in-flight request and sends its reply before closing.
async fn transmission<S>(
    rd: Reader<S>,
    wr: Writer<S>,
    n: Negotiated,
    config: &ServerConfig,
    shutdown: &CancellationToken,
    peer: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slots = config.max_inflight_requests.max(1);
    let (tx, rx) = mpsc::channel::<Outgoing>(slots + 1);
    let dead = CancellationToken::new();
    let writer = tokio::spawn(writer_task(wr, rx, dead.clone()));
    let mut t = Transmission {
        rd,
        params: n.params,
        backend: n.backend,
        inflight: Arc::new(Semaphore::new(slots)),
        bytes: Arc::new(Semaphore::new(config.max_inflight_bytes.max(MAX_BLOCK_SIZE as usize))),
        tx,
        dead,
        tasks: TaskTracker::new(),
        shutdown,
        slots,
        idle_timeout: config.idle_timeout,
        metrics: config.metrics.clone(),
    };
    let reason = t.serve().await;
    log_end(peer, reason);
    let Transmission { tasks, tx, .. } = t;
    // Once the server is shutting down, finishing is bounded by the grace period.
    tasks.close();
    drop(tx);
    let writer_abort = writer.abort_handle();
    let finish = async {
        tasks.wait().await;
        if let Err(e) = writer.await {
            if !e.is_cancelled() {
                warn!(%peer, error = %e, "reply writer panicked");
            }
        }
    };
    tokio::select! {
        biased;
        _ = finish => {}
        _ = grace_expired(shutdown, config.shutdown_grace) => {
            warn!(%peer, "shutdown grace period expired; dropping connection with requests in flight");
            writer_abort.abort();
        }
    }
}

fn log_end(peer: &str, reason: Result<&'static str, End>) {
    match reason {
        Ok(r) => debug!(%peer, reason = r, "transmission ending"),
        Err(End::Shutdown) => info!(%peer, "server shutting down; finishing in-flight requests"),
        Err(End::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            info!(%peer, error = %e, "client went away mid-request")
        }
        Err(e) => warn!(%peer, reason = %e, "dropping connection"),
    }
}

/// Completes `grace` after `shutdown` is cancelled.
pub(crate) async fn grace_expired(shutdown: &CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}
