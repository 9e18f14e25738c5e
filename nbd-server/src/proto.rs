//! Wire constants of the NBD protocol (fixed newstyle negotiation and
//! transmission phase), as defined by the NBD project's `doc/proto.md`.
//!
//! All multi-byte values on the wire are big-endian ("network byte order").

/// `NBDMAGIC`: first 8 bytes sent by the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic preceding every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic number starting every option reply during fixed newstyle haggling.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client supports fixed newstyle negotiation.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported on reads (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA effects are visible across all connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (no error reporting).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: query an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: select an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: enable structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: description of one export (`NBD_OPT_LIST`).
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one information item (`NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: syntactically or semantically invalid option.
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// Option error: TLS required.
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option error: unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: client must request block size constraints.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Option error: request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information item: export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information item: human readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information item: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Magic of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (followed by payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim / discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status query.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch a hole (write zeroes).
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment the structured read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: return only one extent (block status).
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast with `ENOTSUP` unless zeroing is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: final chunk of a reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk: no payload.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured reply chunk: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: a hole (zeroes) at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: block status descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk: error without offset.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply chunk: error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` state flag: the extent is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Name of the only metadata context this server implements.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Metadata context id assigned to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Advertised minimum block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised maximum block size (and maximum READ/WRITE payload).
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;

/// Maximum length of a protocol string (export names, queries), per spec.
pub const MAX_STRING_LEN: usize = 4096;
/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
