//! Keys and ciphers: the master key, keys derived from it, AES-256-GCM per segment, manifest MACs.
//!
//! Every subkey is derived from the 256-bit master key with BLAKE3's `derive_key` under a context string that
//! names its purpose, so keys for different purposes never coincide. Each committed file gets a random 128-bit
//! file id and its own AES key; segment nonces are the segment index, so a (key, nonce) pair is never reused.
//!
//! AES-256-GCM is `ring`'s (AES-NI/VAES with carry-less multiply: several GB/s per core here, about four times
//! the portable `aes-gcm` crate, which was the slowest stage of every commit and read). GCM is a standard, so
//! the bytes at rest are the same whichever implementation wrote them; a test checks that against `aes-gcm`.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};

/// Bytes of an AES-GCM tag appended to each encrypted segment.
pub const TAG_LEN: usize = 16;

const CTX_KEY_CHECK: &str = "blockframe 2026-11 key check value";
const CTX_MANIFEST_MAC: &str = "blockframe 2026-11 manifest mac key";
const CTX_NAME_TAG: &str = "blockframe 2026-11 name tag key";
const CTX_FILE_KEY: &str = "blockframe 2026-11 file segment key";
const CTX_META_KEY: &str = "blockframe 2026-11 file metadata key";
const CTX_VOLUME_MAC: &str = "blockframe 2026-11 volume superblock mac key";
const CTX_XTS_DATA: &str = "blockframe 2026-11 volume xts data key";
const CTX_XTS_TWEAK: &str = "blockframe 2026-11 volume xts tweak key";
const CTX_LOG_MAC: &str = "blockframe 2026-12 log record and checkpoint mac key";
const CTX_CATALOG_MAC: &str = "blockframe 2026-12 catalog log mac key";

/// The store's 256-bit master key; zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Argon2id parameters and salt for a passphrase-derived key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Random salt.
    pub salt: [u8; 16],
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

impl KdfParams {
    /// Fresh parameters with a random salt (64 MiB, 3 passes: the Argon2 RFC's second recommendation).
    pub fn generate() -> Result<Self> {
        Ok(KdfParams { salt: random_bytes()?, m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 })
    }
}

impl MasterKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// A new random key from the OS generator.
    pub fn generate() -> Result<Self> {
        Ok(MasterKey(random_bytes()?))
    }

    /// Derives a key from a passphrase with Argon2id.
    pub fn from_passphrase(passphrase: &[u8], params: &KdfParams) -> Result<Self> {
        let p = argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
            .map_err(|e| Error::Config(format!("argon2 parameters: {e}")))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
        let mut out = [0u8; 32];
        a.hash_password_into(passphrase, &params.salt, &mut out).map_err(|e| Error::Config(format!("argon2: {e}")))?;
        Ok(MasterKey(out))
    }

    /// Raw bytes (for writing the key file).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn derive(&self, context: &str, extra: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(&self.0);
        h.update(extra);
        *h.finalize().as_bytes()
    }

    /// The value stored in the store descriptor to recognise this key.
    pub fn check_value(&self) -> [u8; 32] {
        self.derive(CTX_KEY_CHECK, &[])
    }

    /// Fails with [`Error::WrongKey`] unless this key produced `expected`.
    pub fn verify_check_value(&self, expected: &[u8; 32]) -> Result<()> {
        if constant_time_eq(&self.check_value(), expected) {
            Ok(())
        } else {
            Err(Error::WrongKey)
        }
    }

    /// MAC over a manifest body.
    pub fn manifest_mac(&self, body: &[u8]) -> [u8; 32] {
        let key = self.derive(CTX_MANIFEST_MAC, &[]);
        *blake3::keyed_hash(&key, body).as_bytes()
    }

    /// MAC over a volume superblock body.
    pub fn volume_mac(&self, body: &[u8]) -> [u8; 32] {
        let key = self.derive(CTX_VOLUME_MAC, &[]);
        *blake3::keyed_hash(&key, body).as_bytes()
    }

    /// MAC over a log stripe record or log checkpoint body.
    pub fn log_mac(&self, body: &[u8]) -> [u8; 32] {
        let key = self.derive(CTX_LOG_MAC, &[]);
        *blake3::keyed_hash(&key, body).as_bytes()
    }

    /// MAC over a catalog record, checkpoint or checkpoint part body.
    pub fn catalog_mac(&self, body: &[u8]) -> [u8; 32] {
        let key = self.derive(CTX_CATALOG_MAC, &[]);
        *blake3::keyed_hash(&key, body).as_bytes()
    }

    /// The AES-256-XTS cipher of one volume (two independent derived keys).
    pub fn volume_xts(&self, vol_id: &[u8; 16]) -> crate::codec::xts::Xts {
        let mut d = self.derive(CTX_XTS_DATA, vol_id);
        let mut t = self.derive(CTX_XTS_TWEAK, vol_id);
        let x = crate::codec::xts::Xts::new(&d, &t);
        d.zeroize();
        t.zeroize();
        x
    }

    /// Deterministic tag of a file name: finds a name's manifests without revealing the name.
    pub fn name_tag(&self, name: &str) -> [u8; 32] {
        let key = self.derive(CTX_NAME_TAG, &[]);
        *blake3::keyed_hash(&key, name.as_bytes()).as_bytes()
    }

    /// The cipher for the segments of one file.
    pub fn segment_cipher(&self, file_id: &[u8; 16]) -> SegmentCipher {
        let mut k = self.derive(CTX_FILE_KEY, file_id);
        let c = SegmentCipher { aead: gcm_key(&k), file_id: *file_id };
        k.zeroize();
        c
    }

    /// Encrypts a file's private metadata (name, size, times) with a random nonce.
    pub fn seal_metadata(&self, file_id: &[u8; 16], plain: &[u8]) -> Result<(Vec<u8>, [u8; 12])> {
        let mut k = self.derive(CTX_META_KEY, file_id);
        let aead = gcm_key(&k);
        k.zeroize();
        let nonce: [u8; 12] = random_bytes()?;
        let mut buf = plain.to_vec();
        let tag = aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(file_id), &mut buf)
            .map_err(|_| Error::InvalidArgument("metadata too large to encrypt".into()))?;
        buf.extend_from_slice(tag.as_ref());
        Ok((buf, nonce))
    }

    /// Decrypts metadata sealed by [`MasterKey::seal_metadata`].
    pub fn open_metadata(&self, file_id: &[u8; 16], nonce: &[u8; 12], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < TAG_LEN {
            return Err(Error::corrupt("file metadata", "truncated"));
        }
        let mut k = self.derive(CTX_META_KEY, file_id);
        let aead = gcm_key(&k);
        k.zeroize();
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let tag = Tag::try_from(tag).map_err(|_| Error::corrupt("file metadata", "truncated"))?;
        let mut buf = body.to_vec();
        aead.open_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(file_id), tag, &mut buf, 0..)
            .map_err(|_| Error::corrupt("file metadata", "authentication failed"))?;
        Ok(buf)
    }
}

/// AES-256-GCM for the segments of one file. Nonce = segment index; the associated data binds the file id,
/// the segment index, its length and whether it is the last one, so segments cannot be swapped, truncated or
/// moved between files without detection.
pub struct SegmentCipher {
    aead: LessSafeKey,
    file_id: [u8; 16],
}

/// An AES-256-GCM key. (ring's `LessSafeKey` only because the nonces are ours: segment indexes, or random for
/// metadata; ring's nonce-sequence wrapper would add nothing.)
fn gcm_key(k: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always the right length for AES-256; ring fails only on a wrong length.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte AES-256 key"))
}

impl SegmentCipher {
    fn nonce_and_aad(&self, segment: u64, plain_len: u64, last: bool) -> ([u8; 12], [u8; 33]) {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&segment.to_le_bytes());
        let mut aad = [0u8; 33];
        aad[..16].copy_from_slice(&self.file_id);
        aad[16..24].copy_from_slice(&segment.to_le_bytes());
        aad[24..32].copy_from_slice(&plain_len.to_le_bytes());
        aad[32] = last as u8;
        (nonce, aad)
    }

    /// Encrypts `buf[..plain_len]` in place and writes the tag to `buf[plain_len..plain_len + 16]`.
    pub fn seal_segment(&self, segment: u64, last: bool, buf: &mut [u8], plain_len: usize) -> Result<()> {
        if buf.len() < plain_len + TAG_LEN {
            return Err(Error::internal("segment buffer too small for the tag"));
        }
        let (nonce, aad) = self.nonce_and_aad(segment, plain_len as u64, last);
        let tag = self
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf[..plain_len])
            .map_err(|_| Error::InvalidArgument("segment too large for AES-GCM".into()))?;
        buf[plain_len..plain_len + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts in place what [`SegmentCipher::seal_segment`] produced; `buf` holds ciphertext and tag.
    /// Returns false when authentication fails (the buffer is then unspecified).
    pub fn open_segment(&self, segment: u64, last: bool, buf: &mut [u8], plain_len: usize) -> bool {
        if buf.len() < plain_len + TAG_LEN {
            return false;
        }
        let (nonce, aad) = self.nonce_and_aad(segment, plain_len as u64, last);
        let (body, rest) = buf.split_at_mut(plain_len);
        let Ok(tag) = Tag::try_from(&rest[..TAG_LEN]) else { return false };
        self.aead
            .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), tag, body, 0..)
            .is_ok()
    }
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::io("reading the OS random generator", std::io::Error::other(e.to_string())))?;
    Ok(b)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    #[test]
    fn wrong_key_is_detected() {
        let check = key(1).check_value();
        assert!(key(1).verify_check_value(&check).is_ok());
        assert!(matches!(key(2).verify_check_value(&check), Err(Error::WrongKey)));
    }

    #[test]
    fn passphrase_derivation_is_deterministic_and_salted() {
        let mut p = KdfParams { salt: [5; 16], m_cost_kib: 64, t_cost: 1, p_cost: 1 };
        let a = MasterKey::from_passphrase(b"pw", &p).unwrap();
        let b = MasterKey::from_passphrase(b"pw", &p).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        p.salt = [6; 16];
        let c = MasterKey::from_passphrase(b"pw", &p).unwrap();
        assert_ne!(a.as_bytes(), c.as_bytes());
    }

    #[test]
    fn metadata_round_trip_and_tamper() {
        let k = key(3);
        let (sealed, nonce) = k.seal_metadata(&[1; 16], b"hello").unwrap();
        assert_eq!(k.open_metadata(&[1; 16], &nonce, &sealed).unwrap(), b"hello");
        assert!(k.open_metadata(&[2; 16], &nonce, &sealed).is_err());
        assert!(key(4).open_metadata(&[1; 16], &nonce, &sealed).is_err());
    }

    /// The bytes at rest do not depend on the AES-GCM implementation: what `ring` seals, the portable
    /// `aes-gcm` crate (which sealed every store before) opens, and the other way round, for segments and for
    /// metadata.
    #[test]
    fn ring_and_aes_gcm_crate_agree_on_the_bytes() {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        let master = key(11);
        let file_id = [5u8; 16];
        let c = master.segment_cipher(&file_id);
        let other = aes_gcm::Aes256Gcm::new((&master.derive(CTX_FILE_KEY, &file_id)).into());
        for (seg, len, last) in [(0u64, 0usize, true), (3, 1, false), (7, 4096, true), (9, 100_003, false)] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + seg as usize) as u8).collect();
            let (nonce, aad) = c.nonce_and_aad(seg, len as u64, last);
            // ring seals, aes-gcm opens.
            let mut buf = plain.clone();
            buf.resize(len + TAG_LEN, 0);
            c.seal_segment(seg, last, &mut buf, len).unwrap();
            let mut theirs = buf[..len].to_vec();
            let tag = aes_gcm::Tag::clone_from_slice(&buf[len..]);
            other.decrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), &aad, &mut theirs, &tag).unwrap();
            assert_eq!(theirs, plain);
            // aes-gcm seals (as stores written before did), ring opens: identical bytes.
            let mut old = plain.clone();
            let tag = other.encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), &aad, &mut old).unwrap();
            old.extend_from_slice(&tag);
            assert_eq!(old, buf, "segment {seg}: same ciphertext and tag");
            assert!(c.open_segment(seg, last, &mut old, len));
            assert_eq!(&old[..len], &plain[..]);
        }
        let meta = aes_gcm::Aes256Gcm::new((&master.derive(CTX_META_KEY, &file_id)).into());
        let (sealed, nonce) = master.seal_metadata(&file_id, b"name and times").unwrap();
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut plain = body.to_vec();
        meta.decrypt_in_place_detached(
            aes_gcm::Nonce::from_slice(&nonce),
            &file_id,
            &mut plain,
            aes_gcm::Tag::from_slice(tag),
        )
        .unwrap();
        assert_eq!(plain, b"name and times");
        let mut old = b"written before".to_vec();
        let tag = meta.encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), &file_id, &mut old).unwrap();
        old.extend_from_slice(&tag);
        assert_eq!(master.open_metadata(&file_id, &nonce, &old).unwrap(), b"written before");
    }

    proptest! {
        #[test]
        fn segment_round_trip_and_binding(data in proptest::collection::vec(any::<u8>(), 0..3000),
                                          seg in 0u64..1000, flip in any::<usize>()) {
            let c = key(9).segment_cipher(&[7; 16]);
            let n = data.len();
            let mut buf = data.clone();
            buf.resize(n + TAG_LEN, 0);
            c.seal_segment(seg, true, &mut buf, n).unwrap();
            if n >= 16 { prop_assert_ne!(&buf[..n], &data[..]); }
            let sealed = buf.clone();
            prop_assert!(c.open_segment(seg, true, &mut buf, n));
            prop_assert_eq!(&buf[..n], &data[..]);
            // Other segment index, other last flag, other file, flipped bit: all rejected.
            let mut b = sealed.clone();
            prop_assert!(!c.open_segment(seg + 1, true, &mut b, n));
            let mut b = sealed.clone();
            prop_assert!(!c.open_segment(seg, false, &mut b, n));
            let mut b = sealed.clone();
            prop_assert!(!key(9).segment_cipher(&[8; 16]).open_segment(seg, true, &mut b, n));
            let mut b = sealed.clone();
            let bit = flip % (b.len() * 8);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!c.open_segment(seg, true, &mut b, n));
        }
    }
}
