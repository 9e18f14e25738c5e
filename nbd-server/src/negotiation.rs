//! The handshake phase of a session: the fixed newstyle greeting, then option haggling with one handler per
//! option, until the client chooses an export (GO or EXPORT_NAME) or aborts.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{BlockBackend, ExportRegistry};
use crate::conn::{read_exact_or_shutdown, End, Reader, Writer};
use crate::handshake::*;
use crate::proto::*;
use crate::request::{sanitize_block_sizes, TransmissionParams};

/// Largest option payload accepted; larger ones are treated as a denial of
/// service attempt and end the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Result of a successful handshake.
pub(crate) struct Negotiated {
    pub(crate) name: String,
    pub(crate) backend: Arc<dyn BlockBackend>,
    pub(crate) params: TransmissionParams,
}

/// How a negotiation phase ended.
pub(crate) enum Outcome {
    /// Enter transmission with this export.
    Export(Negotiated),
    /// The client aborted (`NBD_OPT_ABORT`).
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then a fresh negotiation.
    StartTls,
}

/// Where TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsState {
    /// The server has no TLS: STARTTLS is refused by policy.
    Disabled,
    /// The client may upgrade (`--tls on`).
    Offered,
    /// The client must upgrade before anything but ABORT (`--tls require`).
    Required,
    /// The connection runs over TLS.
    Active,
}

/// Per-connection negotiation state. Everything here is forgotten at STARTTLS (a fresh state serves the
/// TLS phase): options a man in the middle injected before TLS must not survive into it (CVE-2021-3716).
struct HandshakeState {
    no_zeroes: bool,
    fixed_newstyle: bool,
    tls: TlsState,
    structured: bool,
    /// Export name of the last successful `NBD_OPT_SET_META_CONTEXT` that
    /// selected `base:allocation`.
    meta_export: Option<String>,
    /// Last export opened, reused by later options naming the same export.
    cached: Option<(String, Arc<dyn BlockBackend>)>,
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

/// What one option handler tells the negotiation loop.
enum Step {
    /// Read the next option.
    Next,
    /// This negotiation phase is over.
    Done(Outcome),
}

/// Sends the fixed newstyle greeting and reads the client flags.
pub(crate) async fn greet<S>(
    rd: &mut Reader<S>,
    wr: &mut Writer<S>,
    shutdown: &CancellationToken,
) -> Result<ClientFlags, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    wr.write_all(&server_greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    read_exact_or_shutdown(rd, &mut flags, shutdown).await?;
    parse_client_flags(u32::from_be_bytes(flags)).map_err(|e| End::Protocol(e.to_string()))
}

/// Option haggling, from a fresh state, until the client chooses an export, aborts or starts TLS.
pub(crate) async fn haggle<S>(
    rd: &mut Reader<S>,
    wr: &mut Writer<S>,
    registry: &Arc<dyn ExportRegistry>,
    shutdown: &CancellationToken,
    cflags: ClientFlags,
    tls: TlsState,
) -> Result<Outcome, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = HandshakeState {
        no_zeroes: cflags.no_zeroes,
        fixed_newstyle: cflags.fixed_newstyle,
        tls,
        structured: false,
        meta_export: None,
        cached: None,
    };
    loop {
        let (opt, data) = read_option(rd, shutdown).await?;
        let step = if shutdown.is_cancelled() && opt != NBD_OPT_ABORT {
            refuse_during_shutdown(wr, opt).await?
        } else if tls == TlsState::Required && opt != NBD_OPT_ABORT && opt != NBD_OPT_STARTTLS {
            refuse_before_tls(wr, opt).await?
        } else {
            match parse_option(opt, &data) {
                Ok(parsed) => dispatch(wr, registry, &mut st, opt, parsed).await?,
                Err(e) if opt == NBD_OPT_EXPORT_NAME => {
                    return Err(End::Protocol(format!("bad NBD_OPT_EXPORT_NAME: {}", e.message)))
                }
                Err(e) => {
                    send_option_reply(wr, opt, e.reply, e.message.as_bytes()).await?;
                    Step::Next
                }
            }
        };
        wr.flush().await?;
        if let Step::Done(outcome) = step {
            return Ok(outcome);
        }
    }
}

/// Reads one option header and its data (bounded by [`MAX_OPTION_LEN`]).
async fn read_option<R: AsyncRead + Unpin>(rd: &mut R, shutdown: &CancellationToken) -> Result<(u32, Vec<u8>), End> {
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
    Ok((oh.option, data))
}

/// While the server shuts down, every option but ABORT is refused (EXPORT_NAME cannot be, so it disconnects).
async fn refuse_during_shutdown<W: AsyncWrite + Unpin>(wr: &mut W, opt: u32) -> Result<Step, End> {
    if opt == NBD_OPT_EXPORT_NAME {
        return Err(End::Shutdown);
    }
    send_option_reply(wr, opt, NBD_REP_ERR_SHUTDOWN, b"server is shutting down").await?;
    Ok(Step::Next)
}

/// `--tls require` before STARTTLS: every option but ABORT and STARTTLS is refused, without looking at it
/// (FORCEDTLS); EXPORT_NAME cannot be refused, so it ends the connection.
async fn refuse_before_tls<W: AsyncWrite + Unpin>(wr: &mut W, opt: u32) -> Result<Step, End> {
    if opt == NBD_OPT_EXPORT_NAME {
        return Err(End::Protocol("NBD_OPT_EXPORT_NAME without TLS, which this server requires".into()));
    }
    send_option_reply(wr, opt, NBD_REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first").await?;
    Ok(Step::Next)
}

/// `NBD_OPT_STARTTLS`: acknowledged when TLS is offered and not yet active; the caller runs the TLS handshake.
async fn start_tls<W: AsyncWrite + Unpin>(wr: &mut W, st: &HandshakeState, opt: u32) -> Result<Step, End> {
    let refusal: Option<(u32, &[u8])> = match st.tls {
        TlsState::Disabled => Some((NBD_REP_ERR_POLICY, b"TLS is not enabled on this server")),
        TlsState::Active => Some((NBD_REP_ERR_INVALID, b"TLS is already active")),
        // The protocol allows TLS only after fixed newstyle negotiation.
        _ if !st.fixed_newstyle => Some((NBD_REP_ERR_POLICY, b"TLS needs fixed newstyle negotiation")),
        TlsState::Offered | TlsState::Required => None,
    };
    match refusal {
        Some((reply, msg)) => {
            send_option_reply(wr, opt, reply, msg).await?;
            Ok(Step::Next)
        }
        None => {
            send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            Ok(Step::Done(Outcome::StartTls))
        }
    }
}

/// Runs the handler of one parsed option.
async fn dispatch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut HandshakeState,
    opt: u32,
    parsed: ClientOption,
) -> Result<Step, End> {
    match parsed {
        ClientOption::Abort => {
            send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            wr.flush().await?;
            let _ = wr.shutdown().await;
            Ok(Step::Done(Outcome::Aborted))
        }
        ClientOption::ExportName(name) => export_name(wr, registry, st, name).await,
        ClientOption::List => {
            list(wr, registry, opt).await?;
            Ok(Step::Next)
        }
        ClientOption::StartTls => start_tls(wr, st, opt).await,
        ClientOption::StructuredReply => {
            st.structured = true;
            send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
            Ok(Step::Next)
        }
        ClientOption::Info(req) | ClientOption::Go(req) => info_or_go(wr, registry, st, opt, req).await,
        ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
            meta_context(wr, registry, st, opt, req).await?;
            Ok(Step::Next)
        }
        ClientOption::Unknown(o) => {
            send_option_reply(wr, o, NBD_REP_ERR_UNSUP, b"option not supported").await?;
            Ok(Step::Next)
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: the old way in; a failure cannot be answered, so it disconnects.
async fn export_name<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut HandshakeState,
    name: String,
) -> Result<Step, End> {
    let backend = open_export(registry, st, &name).await.map_err(|(_, msg)| End::Protocol(msg))?;
    let params = params_for(st, &name, backend.as_ref(), false);
    let flags = params.transmission_flags(backend.can_multi_conn());
    wr.write_all(&encode_export_name_reply(params.size, flags, st.no_zeroes)).await?;
    Ok(Step::Done(Outcome::Export(Negotiated { name, backend, params })))
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then ACK.
async fn list<W: AsyncWrite + Unpin>(wr: &mut W, registry: &Arc<dyn ExportRegistry>, opt: u32) -> io::Result<()> {
    let reg = Arc::clone(registry);
    let exports = tokio::task::spawn_blocking(move || reg.list()).await.unwrap_or_default();
    for e in exports {
        send_option_reply(wr, opt, NBD_REP_SERVER, &encode_rep_server(&e.name, &e.description)).await?;
    }
    send_option_reply(wr, opt, NBD_REP_ACK, &[]).await
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's size, flags, name, description and block sizes; GO then enters
/// transmission.
async fn info_or_go<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut HandshakeState,
    opt: u32,
    req: InfoRequest,
) -> Result<Step, End> {
    let go = opt == NBD_OPT_GO;
    let backend = match open_export(registry, st, &req.name).await {
        Ok(b) => b,
        Err((code, msg)) => {
            send_option_reply(wr, opt, code, msg.as_bytes()).await?;
            return Ok(Step::Next);
        }
    };
    let strict = go && req.wants(NBD_INFO_BLOCK_SIZE);
    let params = params_for(st, &req.name, backend.as_ref(), strict);
    let flags = params.transmission_flags(backend.can_multi_conn());
    send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_export(params.size, flags)).await?;
    if req.wants(NBD_INFO_NAME) {
        send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_string(NBD_INFO_NAME, &req.name)).await?;
    }
    if req.wants(NBD_INFO_DESCRIPTION) {
        let desc = description(registry, &req.name).await;
        if !desc.is_empty() && desc.len() <= MAX_STRING_LEN {
            send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_string(NBD_INFO_DESCRIPTION, &desc)).await?;
        }
    }
    // Always advertised (the default minimum, 512, is above the protocol's default of 1).
    let (min, preferred) = sanitize_block_sizes(backend.min_block_size(), backend.preferred_block_size());
    send_option_reply(wr, opt, NBD_REP_INFO, &encode_info_block_size(min, preferred, MAX_BLOCK_SIZE)).await?;
    send_option_reply(wr, opt, NBD_REP_ACK, &[]).await?;
    Ok(if go { Step::Done(Outcome::Export(Negotiated { name: req.name, backend, params })) } else { Step::Next })
}

async fn description(registry: &Arc<dyn ExportRegistry>, name: &str) -> String {
    let reg = Arc::clone(registry);
    let n = name.to_owned();
    tokio::task::spawn_blocking(move || reg.description(&n)).await.ok().flatten().unwrap_or_default()
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: the contexts matching the queries (only
/// `base:allocation` exists); SET selects them for the export.
async fn meta_context<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut HandshakeState,
    opt: u32,
    req: MetaContextRequest,
) -> io::Result<()> {
    let set = opt == NBD_OPT_SET_META_CONTEXT;
    if set {
        // Replaces the previous selection even if this one fails.
        st.meta_export = None;
        if !st.structured {
            return send_option_reply(wr, opt, NBD_REP_ERR_INVALID, b"structured replies must be negotiated first")
                .await;
        }
    }
    if let Err((code, msg)) = open_export(registry, st, &req.export).await {
        return send_option_reply(wr, opt, code, msg.as_bytes()).await;
    }
    let contexts = match_meta_contexts(&req.queries, !set);
    for (id, name) in &contexts {
        send_option_reply(wr, opt, NBD_REP_META_CONTEXT, &encode_meta_context(*id, name)).await?;
    }
    if set && !contexts.is_empty() {
        st.meta_export = Some(req.export.clone());
    }
    send_option_reply(wr, opt, NBD_REP_ACK, &[]).await
}
