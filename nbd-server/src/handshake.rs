//! Pure (socket-free) parsing and encoding for the fixed newstyle handshake
//! and option haggling phase.
//!
//! Every parser takes arbitrary bytes and returns an error instead of
//! panicking; the property tests in this module feed them random input.

use crate::proto::*;

/// Why the handshake must end with a hard disconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set client flags this server does not know or did not offer.
    UnknownClientFlags(u32),
    /// An option header did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// Input shorter than the fixed-size structure being parsed.
    Truncated,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownClientFlags(v) => write!(f, "unknown client flags {v:#x}"),
            Self::BadOptionMagic(v) => write!(f, "bad option magic {v:#x}"),
            Self::Truncated => write!(f, "truncated handshake structure"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// The 18-byte greeting the server sends first: `NBDMAGIC`, `IHAVEOPT` and
/// the handshake flags (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`).
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE` was set.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES` was set.
    pub no_zeroes: bool,
}

/// Validate the 32-bit client flags. Unknown bits are a hard error: the
/// spec says the server MUST drop the connection.
pub fn parse_client_flags(raw: u32) -> Result<ClientFlags, HandshakeError> {
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(HandshakeError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags { fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0 })
}

/// Header of one client option: `IHAVEOPT`, option number, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Parse a 16-byte option header.
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, HandshakeError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Err(HandshakeError::Truncated);
    }
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok(OptionHeader { option: be_u32(&buf[8..12]), length: be_u32(&buf[12..16]) })
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (`""` = default export).
    pub name: String,
    /// Information items requested (`NBD_INFO_*`), in client order.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Whether the client asked for information item `info`.
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Query strings (`namespace:leaf`).
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option number: answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

/// An option that was recognised but is malformed: reply `reply` (an
/// `NBD_REP_ERR_*` value) with `message`. For `NBD_OPT_EXPORT_NAME`, which
/// cannot be answered with an error, the server must disconnect instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// `NBD_REP_ERR_*` reply type.
    pub reply: u32,
    /// Human readable explanation sent as the reply data.
    pub message: String,
}

impl OptionError {
    fn invalid(message: impl Into<String>) -> Self {
        Self { reply: NBD_REP_ERR_INVALID, message: message.into() }
    }
}

/// Check that `bytes` is a valid protocol string (UTF-8, no NUL, at most
/// [`MAX_STRING_LEN`] bytes).
pub fn parse_string(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::invalid("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(OptionError::invalid("string contains NUL"));
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(OptionError::invalid("string is not valid UTF-8")),
    }
}

/// A cursor over option data that never reads out of bounds.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], OptionError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| OptionError::invalid(format!("option data too short for {what}")))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> Result<u16, OptionError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, OptionError> {
        Ok(be_u32(self.take(4, what)?))
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.remaining() != 0 {
            return Err(OptionError::invalid("trailing bytes in option data"));
        }
        Ok(())
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32("export name length")? as usize;
    // "MUST be no larger than the option data length - 6".
    if name_len > data.len().saturating_sub(6) {
        return Err(OptionError::invalid("export name length exceeds option length"));
    }
    let name = parse_string(c.take(name_len, "export name")?)?;
    let count = c.u16("information request count")? as usize;
    if c.remaining() != count * 2 {
        return Err(OptionError::invalid("information request count does not match option length"));
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(c.u16("information request")?);
    }
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32("export name length")? as usize;
    let export = parse_string(c.take(name_len, "export name")?)?;
    let count = c.u32("query count")? as usize;
    // Each query needs at least its 4-byte length: bound the allocation.
    if count > c.remaining() / 4 {
        return Err(OptionError::invalid("query count exceeds option length"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32("query length")? as usize;
        queries.push(parse_string(c.take(len, "query")?)?);
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

fn no_data(option: ClientOption, data: &[u8]) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError::invalid("this option takes no data"))
    }
}

/// Parse one option's data. Never panics, whatever `data` holds.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    match option {
        NBD_OPT_EXPORT_NAME => parse_string(data).map(ClientOption::ExportName),
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST => no_data(ClientOption::List, data),
        NBD_OPT_STARTTLS => no_data(ClientOption::StartTls, data),
        NBD_OPT_INFO => parse_info_request(data).map(ClientOption::Info),
        NBD_OPT_GO => parse_info_request(data).map(ClientOption::Go),
        NBD_OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply, data),
        NBD_OPT_LIST_META_CONTEXT => parse_meta_request(data).map(ClientOption::ListMetaContext),
        NBD_OPT_SET_META_CONTEXT => parse_meta_request(data).map(ClientOption::SetMetaContext),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Resolve metadata context queries against the contexts this server knows
/// (only `base:allocation`). `list` selects `NBD_OPT_LIST_META_CONTEXT`
/// semantics (no query = everything, `base:` is a wildcard); otherwise
/// `NBD_OPT_SET_META_CONTEXT` semantics (no query selects nothing, `base:`
/// is ignored). Unknown namespaces and leaves are ignored, as required.
/// Returns `(context id, name)` pairs without duplicates.
pub fn match_meta_contexts(queries: &[String], list: bool) -> Vec<(u32, &'static str)> {
    let all = list && queries.is_empty();
    let selected = all
        || queries.iter().any(|q| match q.split_once(':') {
            Some(("base", "allocation")) => true,
            Some(("base", "")) => list,
            _ => false,
        });
    if selected {
        vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION)]
    } else {
        Vec::new()
    }
}

/// Encode one option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and (unless
/// `no_zeroes`) 124 bytes of zeroes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Data of an `NBD_REP_SERVER` reply: name length, name, description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// Data of an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Data of an `NBD_REP_INFO` reply carrying a string item
/// (`NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info: u16, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + value.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    out
}

/// Data of an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out
}

/// Data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_data(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn greeting_bytes() {
        let g = server_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(3), Ok(ClientFlags { fixed_newstyle: true, no_zeroes: true }));
        assert_eq!(parse_client_flags(0), Ok(ClientFlags::default()));
        assert!(parse_client_flags(4).is_err());
        assert!(parse_client_flags(0x8000_0001).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_option_header(&b), Ok(OptionHeader { option: 7, length: 9 }));
        b[0] ^= 1;
        assert!(matches!(parse_option_header(&b), Err(HandshakeError::BadOptionMagic(_))));
        assert_eq!(parse_option_header(&b[..3]), Err(HandshakeError::Truncated));
    }

    #[test]
    fn go_parsing() {
        let d = info_data(b"disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        match parse_option(NBD_OPT_GO, &d) {
            Ok(ClientOption::Go(r)) => {
                assert_eq!(r.name, "disk");
                assert!(r.wants(NBD_INFO_BLOCK_SIZE));
                assert!(!r.wants(NBD_INFO_DESCRIPTION));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Count says 3 but only 2 present.
        let mut bad = info_data(b"disk", &[1, 2]);
        let n = bad.len();
        bad[n - 6..n - 4].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_option(NBD_OPT_INFO, &bad).unwrap_err().reply, NBD_REP_ERR_INVALID);
        // Name length too large.
        let mut bad = info_data(b"disk", &[]);
        bad[..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_option(NBD_OPT_GO, &bad).unwrap_err().reply, NBD_REP_ERR_INVALID);
        // Trailing byte.
        let mut bad = info_data(b"", &[]);
        bad.push(0);
        assert!(parse_option(NBD_OPT_GO, &bad).is_err());
        assert!(parse_option(NBD_OPT_GO, &[]).is_err());
        assert!(parse_option(NBD_OPT_GO, &info_data(b"a\0b", &[])).is_err());
        assert!(parse_option(NBD_OPT_GO, &info_data(&[0xff, 0xfe], &[])).is_err());
    }

    #[test]
    fn simple_options() {
        assert_eq!(parse_option(NBD_OPT_LIST, &[]), Ok(ClientOption::List));
        assert_eq!(parse_option(NBD_OPT_LIST, &[1]).unwrap_err().reply, NBD_REP_ERR_INVALID);
        assert_eq!(parse_option(NBD_OPT_ABORT, &[1, 2]), Ok(ClientOption::Abort));
        assert_eq!(parse_option(NBD_OPT_STRUCTURED_REPLY, &[]), Ok(ClientOption::StructuredReply));
        assert!(parse_option(NBD_OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert_eq!(parse_option(77, &[1, 2, 3]), Ok(ClientOption::Unknown(77)));
        assert_eq!(parse_option(NBD_OPT_EXPORT_NAME, b"x"), Ok(ClientOption::ExportName("x".into())));
        assert!(parse_option(NBD_OPT_EXPORT_NAME, &vec![b'a'; 4097]).is_err());
    }

    #[test]
    fn meta_parsing_and_matching() {
        let d = meta_data(b"e", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let r = match parse_option(NBD_OPT_SET_META_CONTEXT, &d) {
            Ok(ClientOption::SetMetaContext(r)) => r,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(r.export, "e");
        assert_eq!(r.queries.len(), 2);
        assert_eq!(match_meta_contexts(&r.queries, false), vec![(1, "base:allocation")]);
        assert_eq!(match_meta_contexts(&[], true), vec![(1, "base:allocation")]);
        assert!(match_meta_contexts(&[], false).is_empty());
        assert_eq!(match_meta_contexts(&["base:".into()], true).len(), 1);
        assert!(match_meta_contexts(&["base:".into()], false).is_empty());
        assert!(match_meta_contexts(&["base:foo".into(), "nocolon".into()], true).is_empty());
        // Query running past the end.
        let mut bad = meta_data(b"e", &[b"base:allocation"]);
        bad.truncate(bad.len() - 1);
        assert!(parse_option(NBD_OPT_LIST_META_CONTEXT, &bad).is_err());
        // Absurd query count.
        let mut bad = meta_data(b"e", &[]);
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(NBD_OPT_LIST_META_CONTEXT, &bad).is_err());
    }

    #[test]
    fn encoders() {
        let r = encode_option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(be_u64(&r), OPTION_REPLY_MAGIC);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        assert_eq!(encode_info_export(5, 1).len(), 12);
        assert_eq!(encode_info_block_size(512, 4096, 1 << 25).len(), 14);
        assert_eq!(encode_rep_server("ab", "cd"), vec![0, 0, 0, 2, b'a', b'b', b'c', b'd']);
    }

    proptest! {
        #[test]
        fn parse_option_never_panics(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(option, &data);
        }

        #[test]
        fn parse_option_header_never_panics(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_option_header(&data);
        }

        #[test]
        fn parse_client_flags_never_panics(v in any::<u32>()) {
            let r = parse_client_flags(v);
            prop_assert_eq!(r.is_ok(), v & !3 == 0);
        }

        #[test]
        fn info_roundtrip(name in "[a-z0-9/._-]{0,64}", reqs in proptest::collection::vec(0u16..8, 0..6)) {
            let d = info_data(name.as_bytes(), &reqs);
            let parsed = parse_option(NBD_OPT_INFO, &d);
            prop_assert_eq!(parsed, Ok(ClientOption::Info(InfoRequest { name, requests: reqs })));
        }

        #[test]
        fn meta_roundtrip(name in "[a-z]{0,16}", qs in proptest::collection::vec("[a-z]{1,8}:[a-z]{0,8}", 0..5)) {
            let qb: Vec<&[u8]> = qs.iter().map(|q| q.as_bytes()).collect();
            let d = meta_data(name.as_bytes(), &qb);
            let parsed = parse_option(NBD_OPT_LIST_META_CONTEXT, &d);
            prop_assert_eq!(parsed, Ok(ClientOption::ListMetaContext(MetaContextRequest { export: name, queries: qs })));
        }
    }
}
