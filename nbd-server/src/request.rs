//! Pure (socket-free) parsing and validation of transmission requests.
//!
//! [`validate_request`] is the single place where every request is checked
//! (command, flags, read-only, range, size limits, alignment) before the
//! backend sees it.

use crate::handshake::{be_u32, be_u64};
use crate::proto::*;

/// A transmission request header as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub typ: u16,
    /// Opaque cookie ("handle") echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (for `NBD_CMD_WRITE` also the payload length).
    pub length: u32,
}

impl RequestHeader {
    /// Whether a payload of `length` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.typ == NBD_CMD_WRITE
    }

    /// Encode the header (used by tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.typ.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A request header that cannot be parsed; the stream is out of sync and the
/// connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 28 bytes.
    Truncated,
    /// The magic was not `NBD_REQUEST_MAGIC`.
    BadMagic(u32),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => write!(f, "truncated request header"),
            Self::BadMagic(m) => write!(f, "bad request magic {m:#x}"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Parse a 28-byte request header.
pub fn parse_request_header(buf: &[u8]) -> Result<RequestHeader, HeaderError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Err(HeaderError::Truncated);
    }
    let magic = be_u32(&buf[0..4]);
    if magic != NBD_REQUEST_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        typ: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        length: be_u32(&buf[24..28]),
    })
}

/// What was negotiated for this connection; input to [`validate_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionParams {
    /// Export size in bytes.
    pub size: u64,
    /// The export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` is active for the selected export.
    pub base_allocation: bool,
    /// The client requested `NBD_INFO_BLOCK_SIZE` with `NBD_OPT_GO` and so
    /// promised to honour the advertised minimum block size.
    pub strict_alignment: bool,
    /// Advertised minimum block size (a power of two, 1..=65536).
    pub min_block: u32,
}

/// Validate a backend's (minimum, preferred) block sizes, falling back to
/// the defaults (512, 4096) for values the spec does not allow.
pub fn sanitize_block_sizes(min: u32, preferred: u32) -> (u32, u32) {
    let min = if min.is_power_of_two() && min <= 65536 { min } else { MIN_BLOCK_SIZE };
    let preferred = if preferred.is_power_of_two() && preferred >= min.max(512) && preferred <= MAX_BLOCK_SIZE {
        preferred
    } else {
        PREFERRED_BLOCK_SIZE.max(min)
    };
    (min, preferred)
}

impl TransmissionParams {
    /// Transmission flags advertised for these parameters. `multi_conn` is
    /// the backend's [`can_multi_conn`](crate::BlockBackend::can_multi_conn).
    pub fn transmission_flags(&self, multi_conn: bool) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
        if self.read_only {
            f |= NBD_FLAG_READ_ONLY;
        } else {
            f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
        if self.structured {
            // Every read reply is a single content chunk, so DF is free.
            f |= NBD_FLAG_SEND_DF;
        }
        if multi_conn {
            f |= NBD_FLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// A validated command, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Start offset.
        offset: u64,
        /// Byte count (at most [`MAX_BLOCK_SIZE`]).
        len: u32,
    },
    /// Write the `len`-byte payload at `offset`.
    Write {
        /// Start offset.
        offset: u64,
        /// Payload length (at most [`MAX_BLOCK_SIZE`]).
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Disconnect after in-flight requests complete (no reply).
    Disconnect,
    /// Flush all completed writes.
    Flush,
    /// Trim `len` bytes at `offset`.
    Trim {
        /// Start offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Start offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Start offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// Holes may be punched (no `NBD_CMD_FLAG_NO_HOLE`).
        may_trim: bool,
        /// Force unit access.
        fua: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` unless fast.
        fast: bool,
    },
    /// Query `base:allocation` for `len` bytes at `offset`.
    BlockStatus {
        /// Start offset.
        offset: u64,
        /// Byte count (non-zero).
        len: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: reply with exactly one extent.
        req_one: bool,
    },
}

/// A request rejected before reaching the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// NBD errno (`NBD_E*`).
    pub errno: u32,
    /// Explanation sent in structured error chunks.
    pub message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> RequestError {
    RequestError { errno, message }
}

/// Check one request against the negotiated parameters.
///
/// Checks, in order: command known (else `EINVAL`); flags valid for the
/// command (else `EINVAL`); BLOCK_STATUS only with an active context (else
/// `EINVAL`); writes/trims/zeroing on read-only exports (`EPERM`); READ and
/// WRITE longer than the 32 MiB maximum block size (`EINVAL`, as the spec
/// asks — it reserves `EOVERFLOW` for `NBD_CMD_FLAG_DF`); `offset + length`
/// overflowing (`EINVAL`) or beyond the export size (`ENOSPC` for
/// WRITE/WRITE_ZEROES and `EINVAL` otherwise, per the spec's error section);
/// zero-length BLOCK_STATUS (`EINVAL`); and, for clients that agreed to the
/// block size constraints, alignment to the minimum block size (`EINVAL`).
///
/// `NBD_CMD_DISC` is always accepted (it has no reply), and the reserved
/// offset/length of `NBD_CMD_FLUSH` are ignored for compatibility.
pub fn validate_request(hdr: &RequestHeader, p: &TransmissionParams) -> Result<Command, RequestError> {
    let allowed_flags = match hdr.typ {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_READ if p.structured => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
        _ => return Err(reject(NBD_EINVAL, "unknown command")),
    };
    if hdr.flags & !allowed_flags != 0 {
        return Err(reject(NBD_EINVAL, "invalid command flags for this command"));
    }
    let fua = hdr.flags & NBD_CMD_FLAG_FUA != 0;
    if hdr.typ == NBD_CMD_FLUSH {
        return Ok(Command::Flush);
    }
    if hdr.typ == NBD_CMD_BLOCK_STATUS && !(p.structured && p.base_allocation) {
        return Err(reject(NBD_EINVAL, "block status requires structured replies and base:allocation"));
    }
    let writes = matches!(hdr.typ, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if writes && p.read_only {
        return Err(reject(NBD_EPERM, "export is read-only"));
    }
    if matches!(hdr.typ, NBD_CMD_READ | NBD_CMD_WRITE) && hdr.length > MAX_BLOCK_SIZE {
        return Err(reject(NBD_EINVAL, "request exceeds the maximum block size"));
    }
    let len = u64::from(hdr.length);
    let end = hdr.offset.checked_add(len).ok_or_else(|| reject(NBD_EINVAL, "offset + length overflows"))?;
    if end > p.size {
        return Err(if matches!(hdr.typ, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) {
            reject(NBD_ENOSPC, "write beyond the end of the export")
        } else {
            reject(NBD_EINVAL, "request beyond the end of the export")
        });
    }
    if hdr.typ == NBD_CMD_BLOCK_STATUS && hdr.length == 0 {
        return Err(reject(NBD_EINVAL, "zero-length block status request"));
    }
    if p.strict_alignment {
        let min = u64::from(p.min_block.max(1));
        // The export tail may be shorter than a block if the size is not a
        // multiple of it; allow requests ending exactly at the export end.
        if !hdr.offset.is_multiple_of(min) || (!len.is_multiple_of(min) && end != p.size) {
            return Err(reject(NBD_EINVAL, "request not aligned to the minimum block size"));
        }
    }
    let offset = hdr.offset;
    let l = hdr.length;
    Ok(match hdr.typ {
        NBD_CMD_READ => Command::Read { offset, len: l },
        NBD_CMD_WRITE => Command::Write { offset, len: l, fua },
        NBD_CMD_TRIM => Command::Trim { offset, len: l, fua },
        NBD_CMD_CACHE => Command::Cache { offset, len: l },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len: l,
            may_trim: hdr.flags & NBD_CMD_FLAG_NO_HOLE == 0,
            fua,
            fast: hdr.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        _ => Command::BlockStatus { offset, len: l, req_one: hdr.flags & NBD_CMD_FLAG_REQ_ONE != 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> TransmissionParams {
        TransmissionParams {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: true,
            strict_alignment: false,
            min_block: 512,
        }
    }

    fn hdr(typ: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, typ, cookie: 42, offset, length }
    }

    fn errno(r: Result<Command, RequestError>) -> u32 {
        r.map(|_| 0).unwrap_or_else(|e| e.errno)
    }

    #[test]
    fn header_roundtrip() {
        let h = hdr(NBD_CMD_WRITE, 1, 0x1234_5678_9abc, 4096);
        assert_eq!(parse_request_header(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[0] = 0;
        assert!(matches!(parse_request_header(&b), Err(HeaderError::BadMagic(_))));
        assert_eq!(parse_request_header(&b[..27]), Err(HeaderError::Truncated));
    }

    #[test]
    fn validation() {
        let p = params();
        assert_eq!(validate_request(&hdr(NBD_CMD_READ, 0, 0, 512), &p), Ok(Command::Read { offset: 0, len: 512 }));
        assert_eq!(errno(validate_request(&hdr(99, 0, 0, 0), &p)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 1 << 9, 0, 1), &p)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 1), &p)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &p)), 0);
        let simple = TransmissionParams { structured: false, base_allocation: false, ..p };
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &simple)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &simple)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, (1 << 20) - 1, 2), &p)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_WRITE, 0, (1 << 20) - 1, 2), &p)), NBD_ENOSPC);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_TRIM, 0, u64::MAX, 2), &p)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1), &p)), NBD_EINVAL);
        let ro = TransmissionParams { read_only: true, ..p };
        for t in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert_eq!(errno(validate_request(&hdr(t, 0, 0, 1), &ro)), NBD_EPERM);
        }
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 0, 1), &ro)), 0);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &p)), NBD_EINVAL);
        assert_eq!(validate_request(&hdr(NBD_CMD_DISC, 0xffff, 1, 1), &p), Ok(Command::Disconnect));
        assert_eq!(validate_request(&hdr(NBD_CMD_FLUSH, 0, 5, 5), &p), Ok(Command::Flush));
        assert_eq!(
            validate_request(&hdr(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, 0, 9), &p),
            Ok(Command::WriteZeroes { offset: 0, len: 9, may_trim: false, fua: false, fast: true })
        );
        // Large zero/trim requests are allowed (no payload).
        let big = TransmissionParams { size: 1 << 40, ..p };
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_WRITE_ZEROES, 0, 0, u32::MAX), &big)), 0);
        // Alignment is only enforced once the client agreed to it.
        let strict = TransmissionParams { strict_alignment: true, size: 1000, ..p };
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 1, 512), &strict)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 0, 100), &strict)), NBD_EINVAL);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 512, 488), &strict)), 0);
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 1, 512), &p)), 0);
    }

    #[test]
    fn block_sizes() {
        assert_eq!(sanitize_block_sizes(512, 4096), (512, 4096));
        assert_eq!(sanitize_block_sizes(1, 512), (1, 512));
        assert_eq!(sanitize_block_sizes(4096, 65536), (4096, 65536));
        assert_eq!(sanitize_block_sizes(0, 4096), (512, 4096));
        assert_eq!(sanitize_block_sizes(3, 4096), (512, 4096));
        assert_eq!(sanitize_block_sizes(1 << 17, 4096), (512, 4096));
        assert_eq!(sanitize_block_sizes(8192, 4096), (8192, 8192));
        assert_eq!(sanitize_block_sizes(1, 256), (1, 4096));
        let strict1 = TransmissionParams { strict_alignment: true, min_block: 1, ..params() };
        assert_eq!(errno(validate_request(&hdr(NBD_CMD_READ, 0, 3, 7), &strict1)), 0);
    }

    #[test]
    fn flags() {
        let p = params();
        let f = p.transmission_flags(true);
        assert_eq!(f & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(f & NBD_FLAG_SEND_DF, 0);
        assert_ne!(f & NBD_FLAG_CAN_MULTI_CONN, 0);
        let ro = TransmissionParams { read_only: true, structured: false, ..p };
        let f = ro.transmission_flags(false);
        assert_ne!(f & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(f & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_DF | NBD_FLAG_CAN_MULTI_CONN), 0);
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_request_header(&data);
        }

        #[test]
        fn validated_requests_are_in_range(
            typ in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), length in any::<u32>(),
            size in 0u64..(1 << 42), ro in any::<bool>(), structured in any::<bool>(), strict in any::<bool>(),
        ) {
            let p = TransmissionParams { size, read_only: ro, structured, base_allocation: structured, strict_alignment: strict, min_block: 512 };
            let h = RequestHeader { flags, typ, cookie: 1, offset, length };
            match validate_request(&h, &p) {
                Ok(Command::Disconnect) | Ok(Command::Flush) => {}
                Ok(cmd) => {
                    let (o, l) = match cmd {
                        Command::Read { offset, len } | Command::Cache { offset, len } => (offset, len),
                        Command::Write { offset, len, .. } | Command::Trim { offset, len, .. } => (offset, len),
                        Command::WriteZeroes { offset, len, .. } | Command::BlockStatus { offset, len, .. } => (offset, len),
                        Command::Disconnect | Command::Flush => unreachable!(),
                    };
                    prop_assert!(o.checked_add(u64::from(l)).is_some_and(|e| e <= size));
                    let rw = matches!(cmd, Command::Read { .. } | Command::Write { .. });
                    if rw {
                        prop_assert!(l <= MAX_BLOCK_SIZE);
                    }
                    if ro {
                        let read_like = matches!(cmd, Command::Read { .. } | Command::Cache { .. } | Command::BlockStatus { .. });
                        prop_assert!(read_like, "write-type command accepted on read-only export");
                    }
                }
                Err(e) => prop_assert!([NBD_EINVAL, NBD_EPERM, NBD_ENOSPC].contains(&e.errno)),
            }
        }
    }
}
