//! Self-describing on-disk records: the envelope shared by manifests, store and location descriptors and key
//! files.
//!
//! Layout (little endian): `magic[8] | version u16 | reserved u16 (0) | payload_len u32 | payload |
//! blake3(everything before)[32]`. The payload is `postcard`-encoded. Parsing never panics: any byte string
//! either decodes or yields [`Error::Corrupt`].

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

/// Current version of every envelope-framed record.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const ENVELOPE_HEADER_LEN: usize = 16;
/// Bytes after the payload.
pub const ENVELOPE_TRAILER_LEN: usize = 32;
/// Largest payload accepted (manifests of multi-TiB files stay far below this).
pub const MAX_PAYLOAD_LEN: usize = 1 << 30;

/// Magic of a file manifest copy.
pub const MAGIC_MANIFEST: [u8; 8] = *b"BFMANIF\0";
/// Magic of the store descriptor (`store.bf`).
pub const MAGIC_STORE: [u8; 8] = *b"BFSTORE\0";
/// Magic of a location marker.
pub const MAGIC_LOCATION: [u8; 8] = *b"BFLOCAT\0";
/// Magic of the scrub state record (`scrub.state`).
pub const MAGIC_SCRUB_STATE: [u8; 8] = *b"BFSCRUB\0";
/// Magic of a pending-repair record (`pending/<id>` on the locations).
pub const MAGIC_PENDING: [u8; 8] = *b"BFPEND\0\0";
/// Magic of a key file.
pub const MAGIC_KEY: [u8; 8] = *b"BFKEY\0\0\0";
/// Magic of an intent marker (`shards/<id>/commit-intent` or `remove-intent`).
pub const MAGIC_INTENT: [u8; 8] = *b"BFINTNT\0";

/// Frames `payload` (already encoded) in an envelope.
pub fn seal_bytes(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
    seal_bytes_version(magic, FORMAT_VERSION, payload)
}

/// Frames `payload` in an envelope of a given format version (records whose layout changed).
pub fn seal_bytes_version(magic: [u8; 8], version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len() + ENVELOPE_TRAILER_LEN);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks magic, version, length and checksum; returns the payload.
pub fn open_bytes<'a>(magic: [u8; 8], what: &str, bytes: &'a [u8]) -> Result<&'a [u8]> {
    Ok(open_bytes_version(magic, what, bytes, FORMAT_VERSION..=FORMAT_VERSION)?.1)
}

/// Like [`open_bytes`] for a record read in several format versions: returns the version and the payload.
pub fn open_bytes_version<'a>(
    magic: [u8; 8],
    what: &str,
    bytes: &'a [u8],
    versions: std::ops::RangeInclusive<u16>,
) -> Result<(u16, &'a [u8])> {
    let bad = |detail: String| Error::corrupt(what, detail);
    if bytes.len() < ENVELOPE_HEADER_LEN + ENVELOPE_TRAILER_LEN {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    if bytes[..8] != magic {
        return Err(bad("bad magic".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if !versions.contains(&version) {
        return Err(bad(format!("unsupported format version {version}")));
    }
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if len > MAX_PAYLOAD_LEN || bytes.len() != ENVELOPE_HEADER_LEN + len + ENVELOPE_TRAILER_LEN {
        return Err(bad(format!("length mismatch: header says {len}, record has {}", bytes.len())));
    }
    let body_end = ENVELOPE_HEADER_LEN + len;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(bad("checksum mismatch".into()));
    }
    Ok((version, &bytes[ENVELOPE_HEADER_LEN..body_end]))
}

/// Encodes `value` with postcard and frames it.
pub fn seal<T: Serialize>(magic: [u8; 8], value: &T) -> Vec<u8> {
    // postcard only fails on unsupported serde features, which our record types do not use.
    let payload = postcard::to_allocvec(value).expect("record types are postcard-serialisable");
    seal_bytes(magic, &payload)
}

/// Opens an envelope and decodes its payload.
pub fn open<T: DeserializeOwned>(magic: [u8; 8], what: &str, bytes: &[u8]) -> Result<T> {
    let payload = open_bytes(magic, what, bytes)?;
    postcard::from_bytes(payload).map_err(|e| Error::corrupt(what, format!("undecodable payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let sealed = seal(MAGIC_STORE, &(7u32, String::from("x")));
        let back: (u32, String) = open(MAGIC_STORE, "t", &sealed).unwrap();
        assert_eq!(back, (7, "x".into()));
    }

    #[test]
    fn detects_wrong_magic_and_every_flipped_bit() {
        let sealed = seal(MAGIC_STORE, &42u64);
        assert!(open::<u64>(MAGIC_MANIFEST, "t", &sealed).is_err());
        for bit in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(open::<u64>(MAGIC_STORE, "t", &b).is_err(), "bit {bit} flip undetected");
        }
        assert!(open::<u64>(MAGIC_STORE, "t", &sealed[..sealed.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open::<(u64, Vec<u8>)>(MAGIC_MANIFEST, "t", &bytes);
        }
    }
}
