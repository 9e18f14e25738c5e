//! Pure (socket-free) encoding of transmission replies: simple replies,
//! structured reply chunks and `base:allocation` block status descriptors.

use crate::backend::Extent;
use crate::proto::*;

/// Largest descriptor length used when splitting long extents: fits the
/// 32-bit descriptor length field and is a multiple of every allowed minimum
/// block size (powers of two up to 64 KiB).
pub const MAX_DESCRIPTOR_LEN: u64 = (u32::MAX as u64 / 65536) * 65536;

/// Maximum number of descriptors sent in one block status chunk.
pub const MAX_DESCRIPTORS: usize = 1024;

/// Maximum length of an error message in a structured error chunk.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Simple reply header (16 bytes); READ data follows on success.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Structured reply chunk header (20 bytes); `length` payload bytes follow.
pub fn structured_header(flags: u16, typ: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&typ.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// `NBD_REPLY_TYPE_NONE` chunk with `NBD_REPLY_FLAG_DONE`.
pub fn none_chunk(cookie: u64) -> [u8; 20] {
    structured_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0)
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (chunk header + 64-bit
/// offset); `data_len` (1..=2^32-9) data bytes follow. Returns `None` if
/// `data_len` cannot be described by one chunk.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: usize, done: bool) -> Option<[u8; 28]> {
    if data_len == 0 {
        return None;
    }
    let len = u32::try_from(data_len.checked_add(8)?).ok()?;
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    let mut out = [0u8; 28];
    out[..20].copy_from_slice(&structured_header(flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, len));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    Some(out)
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk with `NBD_REPLY_FLAG_DONE`.
/// The message is truncated to [`MAX_ERROR_MESSAGE`] bytes on a character
/// boundary. `error` must be non-zero (zero is replaced by `NBD_EIO`).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let error = if error == 0 { NBD_EIO } else { error };
    let mut cut = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let payload_len = 6 + msg.len();
    let mut out = Vec::with_capacity(20 + payload_len);
    out.extend_from_slice(&structured_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, payload_len as u32));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with
/// `NBD_REPLY_FLAG_DONE` for one context. `descriptors` are
/// `(length, status flags)` pairs and must not be empty.
pub fn block_status_chunk(cookie: u64, context_id: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let payload_len = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(20 + payload_len);
    out.extend_from_slice(&structured_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        payload_len as u32,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for (len, flags) in descriptors {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

fn state_flags(e: &Extent) -> u32 {
    let mut f = 0;
    if e.hole {
        f |= NBD_STATE_HOLE;
    }
    if e.zero {
        f |= NBD_STATE_ZERO;
    }
    f
}

/// Turn backend extents into spec-conforming `base:allocation` descriptors
/// for a request of `len` (> 0) bytes at `offset` on an export of `size`
/// bytes.
///
/// Guarantees, whatever the backend returned: at least one descriptor; all
/// lengths non-zero; descriptors consecutive from `offset` and never past the
/// export end; adjacent descriptors with equal flags merged; the first N-1
/// descriptors sum to less than `len`; with `req_one` exactly one descriptor
/// no longer than `len`; at most [`MAX_DESCRIPTORS`] descriptors. Extents are
/// taken in order; one not covering the current position (a gap or
/// unsorted data) ends the list. If nothing usable covers `offset`, the whole
/// request is reported with status 0 (allocated, contents unknown), which is
/// always safe.
pub fn encode_extents(extents: &[Extent], offset: u64, len: u32, size: u64, req_one: bool) -> Vec<(u32, u32)> {
    let req_end = offset.saturating_add(u64::from(len)).min(size);
    // With REQ_ONE the descriptor may not exceed the request; otherwise the
    // last one may extend past the request but not past the export.
    let limit = if req_one { req_end } else { size };
    let mut runs: Vec<(u64, u32)> = Vec::new(); // (length, flags)
    let mut pos = offset;
    for e in extents {
        if pos >= req_end {
            break;
        }
        let e_end = e.offset.saturating_add(e.length);
        if e.length == 0 || e_end <= pos {
            continue;
        }
        if e.offset > pos {
            break; // gap
        }
        let end = e_end.min(limit);
        if end <= pos {
            break;
        }
        let flags = state_flags(e);
        match runs.last_mut() {
            Some((l, f)) if *f == flags => *l += end - pos,
            _ => runs.push((end - pos, flags)),
        }
        pos = end;
    }
    if runs.is_empty() {
        let l = (req_end.saturating_sub(offset)).clamp(1, MAX_DESCRIPTOR_LEN);
        return vec![(l as u32, 0)];
    }
    let mut out = Vec::new();
    let mut covered = 0u64;
    'outer: for (mut l, flags) in runs {
        while l > 0 {
            let piece = l.min(MAX_DESCRIPTOR_LEN);
            out.push((piece as u32, flags));
            covered += piece;
            l -= piece;
            if req_one || covered >= u64::from(len) || out.len() >= MAX_DESCRIPTORS {
                break 'outer;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(offset: u64, length: u64, hole: bool) -> Extent {
        Extent { offset, length, hole, zero: hole }
    }

    #[test]
    fn headers() {
        let s = simple_reply(7, 22);
        assert_eq!(&s[..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[4..8], &22u32.to_be_bytes());
        assert_eq!(&s[8..], &7u64.to_be_bytes());
        let h = offset_data_header(1, 4096, 512, true).unwrap();
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert!(offset_data_header(1, 0, 0, true).is_none());
        let e = error_chunk(3, 0, "x");
        assert_eq!(e.len(), 27);
        assert_eq!(&e[20..24], &NBD_EIO.to_be_bytes());
        let long = "é".repeat(3000);
        let e = error_chunk(3, 5, &long);
        let mlen = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(mlen <= MAX_ERROR_MESSAGE && std::str::from_utf8(&e[26..26 + mlen]).is_ok());
        let b = block_status_chunk(9, 1, &[(512, 3), (1024, 0)]);
        assert_eq!(b.len(), 20 + 4 + 16);
    }

    #[test]
    fn extents() {
        let exts = [ext(0, 4096, false), ext(4096, 4096, false), ext(8192, 4096, true)];
        assert_eq!(encode_extents(&exts, 0, 12288, 1 << 20, false), vec![(8192, 0), (4096, 3)]);
        assert_eq!(encode_extents(&exts, 1024, 1024, 1 << 20, true), vec![(1024, 0)]);
        // Last extent may run past the request, not past the export.
        assert_eq!(encode_extents(&exts, 0, 512, 1 << 20, false), vec![(4096, 0)]);
        assert_eq!(encode_extents(&exts, 8192, 512, 10000, false), vec![(1808, 3)]);
        // Stops once the request is covered.
        assert_eq!(encode_extents(&exts, 0, 8192, 1 << 20, false), vec![(8192, 0)]);
        // Gap / nothing covering the offset.
        assert_eq!(encode_extents(&[ext(4096, 10, true)], 0, 100, 1 << 20, false), vec![(100, 0)]);
        assert_eq!(encode_extents(&[], 0, 100, 1 << 20, false), vec![(100, 0)]);
        // Huge extent gets split into 32-bit descriptors.
        let d = encode_extents(&[ext(0, 1 << 40, true)], 0, u32::MAX, 1 << 40, false);
        assert_eq!(d.len(), 2);
        assert_eq!(u64::from(d[0].0), MAX_DESCRIPTOR_LEN);
    }

    proptest! {
        #[test]
        fn extent_invariants(
            raw in proptest::collection::vec((0u64..1 << 22, 0u64..1 << 20, any::<bool>(), any::<bool>()), 0..20),
            offset in 0u64..(1 << 22), len in 1u32..(1 << 21), size_extra in 0u64..(1 << 22), req_one in any::<bool>(),
        ) {
            let size = offset + u64::from(len) + size_extra;
            let exts: Vec<Extent> = raw.iter().map(|&(o, l, h, z)| Extent { offset: o, length: l, hole: h, zero: z }).collect();
            let d = encode_extents(&exts, offset, len, size, req_one);
            prop_assert!(!d.is_empty());
            prop_assert!(d.len() <= MAX_DESCRIPTORS);
            prop_assert!(d.iter().all(|&(l, _)| l > 0));
            let total: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
            prop_assert!(offset + total <= size);
            let before_last: u64 = d[..d.len() - 1].iter().map(|&(l, _)| u64::from(l)).sum();
            prop_assert!(before_last < u64::from(len));
            if req_one {
                prop_assert_eq!(d.len(), 1);
                prop_assert!(d[0].0 <= len);
            }
        }
    }
}
