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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace, warn};

use crate::backend::{errno_for, BlockBackend, ExportRegistry, Extent};
use crate::handshake::*;
use crate::proto::*;
use crate::reply::*;
use crate::request::*;
use crate::server::ServerConfig;

/// Largest option payload accepted; larger ones are treated as a denial of
/// service attempt and end the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

type Reader<S> = BufReader<tokio::io::ReadHalf<S>>;
type Writer<S> = BufWriter<tokio::io::WriteHalf<S>>;

/// Why a session ended early; only used for logging.
#[derive(Debug)]
enum End {
    Io(io::Error),
    Protocol(String),
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Io(e) => write!(f, "I/O error: {e}"),
            End::Protocol(m) => write!(f, "protocol violation: {m}"),
            End::Shutdown => write!(f, "server shutdown"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

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
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let hs = tokio::select! {
        biased;
        r = handshake(&mut rd, &mut wr, &registry, &shutdown) => r,
        // Only reachable if the peer stops reading our option replies.
        _ = grace_expired(&shutdown, config.shutdown_grace) => Err(End::Shutdown),
    };
    let negotiated = match hs {
        Ok(Some(n)) => n,
        Ok(None) => {
            debug!(%peer, "client ended negotiation");
            return;
        }
        Err(e) => {
            match e {
                End::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(%peer, "client closed during handshake")
                }
                other => info!(%peer, reason = %other, "handshake ended"),
            }
            let _ = wr.shutdown().await;
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

/// Result of a successful handshake.
struct Negotiated {
    name: String,
    backend: Arc<dyn BlockBackend>,
    params: TransmissionParams,
}

/// Per-connection negotiation state.
struct HandshakeState {
    no_zeroes: bool,
    structured: bool,
    /// Export name of the last successful `NBD_OPT_SET_META_CONTEXT` that
    /// selected `base:allocation`.
    meta_export: Option<String>,
    /// Last export opened, reused by later options naming the same export.
    cached: Option<(String, Arc<dyn BlockBackend>)>,
}

async fn read_exact_or_shutdown<R: AsyncRead + Unpin>(
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

async fn send_option_reply<W: AsyncWrite + Unpin>(wr: &mut W, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    wr.write_all(&encode_option_reply(option, reply, data)).await
}

async fn open_export(
    registry: &Arc<dyn ExportRegistry>,
    st: &mut HandshakeState,
    name: &str,
) -> Result<Arc<dyn BlockBackend>, (u32, String)> {
    if let Some((n, b)) = &st.cached {
        if n == name {
            return Ok(Arc::clone(b));
        }
    }
    let reg = Arc::clone(registry);
    let n = name.to_owned();
    let opened = tokio::task::spawn_blocking(move || reg.open(&n))
        .await
        .map_err(|e| (NBD_REP_ERR_UNKNOWN, format!("opening export failed: {e}")))?;
    match opened {
        None => Err((NBD_REP_ERR_UNKNOWN, format!("export '{name}' not found"))),
        Some(Err(e)) => {
            warn!(export = name, error = %e, "failed to open export");
            Err((NBD_REP_ERR_UNKNOWN, format!("export '{name}' is not available: {e}")))
        }
        Some(Ok(b)) => {
            st.cached = Some((name.to_owned(), Arc::clone(&b)));
            Ok(b)
        }
    }
}

fn params_for(st: &HandshakeState, name: &str, backend: &dyn BlockBackend, strict: bool) -> TransmissionParams {
    let (min_block, _) = sanitize_block_sizes(backend.min_block_size(), backend.preferred_block_size());
    TransmissionParams {
        size: backend.size(),
        read_only: backend.is_read_only(),
        structured: st.structured,
        base_allocation: st.structured && st.meta_export.as_deref() == Some(name),
        strict_alignment: strict,
        min_block,
    }
}

/// Fixed newstyle handshake and option haggling. `Ok(None)` = client
/// aborted cleanly.
async fn handshake<S>(
    rd: &mut Reader<S>,
    wr: &mut Writer<S>,
    registry: &Arc<dyn ExportRegistry>,
    shutdown: &CancellationToken,
) -> Result<Option<Negotiated>, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    wr.write_all(&server_greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    read_exact_or_shutdown(rd, &mut flags, shutdown).await?;
    let cflags = parse_client_flags(u32::from_be_bytes(flags)).map_err(|e| End::Protocol(e.to_string()))?;
    let mut st = HandshakeState { no_zeroes: cflags.no_zeroes, structured: false, meta_export: None, cached: None };
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        read_exact_or_shutdown(rd, &mut hdr, shutdown).await?;
        let oh = parse_option_header(&hdr).map_err(|e| End::Protocol(e.to_string()))?;
        if oh.length > MAX_OPTION_LEN {
            return Err(End::Protocol(format!(
                "option {} with {} bytes of data exceeds the {} byte limit",
                oh.option, oh.length, MAX_OPTION_LEN
            )));
        }
        let mut data = vec![0u8; oh.length as usize];
        read_exact_or_shutdown(rd, &mut data, shutdown).await?;
        debug!(option = oh.option, len = oh.length, "option");
        let opt = oh.option;
        if shutdown.is_cancelled() && opt != NBD_OPT_ABORT {
            if opt == NBD_OPT_EXPORT_NAME {
                return Err(End::Shutdown);
            }
            send_option_reply(wr, opt, NBD_REP_ERR_SHUTDOWN, b"server is shutting down").await?;
            wr.flush().await?;
            continue;
        }
        let parsed = match parse_option(opt, &data) {
            Ok(p) => p,
            Err(e) => {
                if opt == NBD_OPT_EXPORT_NAME {
                    return Err(End::Protocol(format!("bad NBD_OPT_EXPORT_NAME: {}", e.message)));
                }
                send_option_reply(wr, opt, e.reply, e.message.as_bytes()).await?;
                wr.flush().await?;
                continue;
            }
        };
        match parsed {
            ClientOption::Abort => {
                send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                wr.flush().await?;
                let _ = wr.shutdown().await;
                return Ok(None);
            }
            ClientOption::ExportName(name) => {
                let backend = match open_export(registry, &mut st, &name).await {
                    Ok(b) => b,
                    // Cannot be answered with an error: hard disconnect.
                    Err((_, msg)) => return Err(End::Protocol(msg)),
                };
                let params = params_for(&st, &name, backend.as_ref(), false);
                let flags = params.transmission_flags(backend.can_multi_conn());
                wr.write_all(&encode_export_name_reply(params.size, flags, st.no_zeroes)).await?;
                wr.flush().await?;
                return Ok(Some(Negotiated { name, backend, params }));
            }
            ClientOption::List => {
                let reg = Arc::clone(registry);
                let exports = tokio::task::spawn_blocking(move || reg.list()).await.unwrap_or_default();
                for e in exports {
                    send_option_reply(wr, opt, NBD_REP_SERVER, &encode_rep_server(&e.name, &e.description)).await?;
                }
                send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            }
            ClientOption::StartTls => {
                send_option_reply(wr, opt, NBD_REP_ERR_UNSUP, b"TLS is not supported").await?;
            }
            ClientOption::StructuredReply => {
                st.structured = true;
                send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = opt == NBD_OPT_GO;
                let backend = match open_export(registry, &mut st, &req.name).await {
                    Ok(b) => b,
                    Err((code, msg)) => {
                        send_option_reply(wr, opt, code, msg.as_bytes()).await?;
                        wr.flush().await?;
                        continue;
                    }
                };
                let strict = go && req.wants(NBD_INFO_BLOCK_SIZE);
                let params = params_for(&st, &req.name, backend.as_ref(), strict);
                let flags = params.transmission_flags(backend.can_multi_conn());
                send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_export(params.size, flags)).await?;
                if req.wants(NBD_INFO_NAME) {
                    send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_string(NBD_INFO_NAME, &req.name)).await?;
                }
                if req.wants(NBD_INFO_DESCRIPTION) {
                    let reg = Arc::clone(registry);
                    let n = req.name.clone();
                    let desc = tokio::task::spawn_blocking(move || reg.description(&n))
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    if !desc.is_empty() && desc.len() <= MAX_STRING_LEN {
                        send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_string(NBD_INFO_DESCRIPTION, &desc))
                            .await?;
                    }
                }
                // Always advertised (the default minimum, 512, is above the
                // protocol's default of 1).
                let (min, preferred) = sanitize_block_sizes(backend.min_block_size(), backend.preferred_block_size());
                send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_block_size(min, preferred, MAX_BLOCK_SIZE))
                    .await?;
                send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
                wr.flush().await?;
                if go {
                    return Ok(Some(Negotiated { name: req.name, backend, params }));
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = opt == NBD_OPT_SET_META_CONTEXT;
                if set {
                    // Replaces the previous selection even if this one fails.
                    st.meta_export = None;
                    if !st.structured {
                        send_option_reply(wr, opt, NBD_REP_ERR_INVALID, b"structured replies must be negotiated first")
                            .await?;
                        wr.flush().await?;
                        continue;
                    }
                }
                if let Err((code, msg)) = open_export(registry, &mut st, &req.export).await {
                    send_option_reply(wr, opt, code, msg.as_bytes()).await?;
                    wr.flush().await?;
                    continue;
                }
                let contexts = match_meta_contexts(&req.queries, !set);
                for (id, name) in &contexts {
                    send_option_reply(wr, opt, NBD_REP_META_CONTEXT, &encode_meta_context(*id, name)).await?;
                }
                if set && !contexts.is_empty() {
                    st.meta_export = Some(req.export.clone());
                }
                send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            }
            ClientOption::Unknown(o) => {
                send_option_reply(wr, o, NBD_REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
        wr.flush().await?;
    }
}

/// One encoded reply plus the resources it holds until it is written.
struct Outgoing {
    head: Vec<u8>,
    data: Option<Vec<u8>>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
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

async fn transmission<S>(
    mut rd: Reader<S>,
    wr: Writer<S>,
    n: Negotiated,
    config: &ServerConfig,
    shutdown: &CancellationToken,
    peer: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let params = n.params;
    let backend = n.backend;
    let inflight = Arc::new(Semaphore::new(config.max_inflight_requests.max(1)));
    let byte_budget = config.max_inflight_bytes.max(MAX_BLOCK_SIZE as usize);
    let bytes = Arc::new(Semaphore::new(byte_budget));
    let (tx, rx) = mpsc::channel::<Outgoing>(config.max_inflight_requests.max(1) + 1);
    let dead = CancellationToken::new();
    let writer = tokio::spawn(writer_task(wr, rx, dead.clone()));
    let tasks = TaskTracker::new();

    let reason: Result<&'static str, End> = async {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(End::Shutdown),
                _ = dead.cancelled() => return Ok("reply writer failed"),
                r = rd.read_exact(&mut hdr) => match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok("client closed connection"),
                    Err(e) => return Err(End::Io(e)),
                },
            }
            let req = parse_request_header(&hdr).map_err(|e| End::Protocol(e.to_string()))?;
            trace!(?req, "request");
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(End::Shutdown),
                p = Arc::clone(&inflight).acquire_owned() => p.map_err(|_| End::Protocol("semaphore closed".into()))?,
            };
            let cmd = match validate_request(&req, &params) {
                Ok(c) => c,
                Err(e) => {
                    debug!(cookie = req.cookie, typ = req.typ, errno = e.errno, msg = e.message, "request rejected");
                    if req.has_payload() {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Err(End::Shutdown),
                            r = discard(&mut rd, u64::from(req.length)) => r?,
                        }
                    }
                    let (head, data) = error_reply(req.cookie, params.structured, e.errno, e.message);
                    let out = Outgoing { head, data, _permits: (permit, None) };
                    if tx.send(out).await.is_err() {
                        return Ok("reply writer gone");
                    }
                    continue;
                }
            };
            if cmd == Command::Disconnect {
                return Ok("client sent NBD_CMD_DISC");
            }
            let buffered = match cmd {
                Command::Read { len, .. } | Command::Write { len, .. } => len,
                _ => 0,
            };
            let byte_permit = if buffered > 0 {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Err(End::Shutdown),
                    p = Arc::clone(&bytes).acquire_many_owned(buffered) => {
                        Some(p.map_err(|_| End::Protocol("semaphore closed".into()))?)
                    }
                }
            } else {
                None
            };
            let payload = if let Command::Write { len, .. } = cmd {
                let mut buf = vec![0u8; len as usize];
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Err(End::Shutdown),
                    r = rd.read_exact(&mut buf) => { r?; }
                }
                Some(buf)
            } else {
                None
            };
            let backend = Arc::clone(&backend);
            let tx = tx.clone();
            let cookie = req.cookie;
            let structured = params.structured;
            let size = params.size;
            tasks.spawn(async move {
                let b = Arc::clone(&backend);
                let result = match tokio::task::spawn_blocking(move || execute(b.as_ref(), cmd, payload)).await {
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
                let _ = tx.send(Outgoing { head, data, _permits: (permit, byte_permit) }).await;
            });
        }
    }
    .await;
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
    // Finish every in-flight request and send its reply, then close. Once
    // the server is shutting down this is bounded by the grace period.
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

/// Completes `grace` after `shutdown` is cancelled.
pub(crate) async fn grace_expired(shutdown: &CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}
