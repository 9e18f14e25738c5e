//! AES-256-XTS per 4 KiB sector, tweak = sector number (little endian), as dm-crypt's `aes-xts-plain64`.
//!
//! Hand-written because the `xts-mode` crate encrypts one block at a time (about 0.3 GB/s here), while
//! computing a whole sector's tweaks first and calling `aes`'s batched `encrypt_blocks` lets AES-NI pipeline
//! eight blocks at once (about 10x faster). The output is byte-identical to `xts-mode` (tested below). Sector
//! sizes are whole multiples of 16 bytes, so ciphertext stealing is never needed.

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

/// Bytes per encrypted sector.
pub const SECTOR: usize = 4096;
const BLOCKS: usize = SECTOR / 16;
type Block = GenericArray<u8, aes::cipher::consts::U16>;

/// An AES-256-XTS key pair (data key, tweak key).
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

/// Multiplies a tweak by x in GF(2^128) (little-endian convention of IEEE 1619).
fn mul_x(t: u128) -> u128 {
    let carry = t >> 127;
    (t << 1) ^ (carry * 0x87)
}

impl Xts {
    /// Builds from two 256-bit keys; they must differ (IEEE 1619 requires it).
    pub fn new(data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Self {
        Xts { data: Aes256::new(data_key.into()), tweak: Aes256::new(tweak_key.into()) }
    }

    fn tweaks(&self, sector: u64, out: &mut [u128; BLOCKS]) {
        let mut t = GenericArray::from((sector as u128).to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut v = u128::from_le_bytes(t.into());
        for slot in out.iter_mut() {
            *slot = v;
            v = mul_x(v);
        }
    }

    fn xor(buf: &mut [u8], tweaks: &[u128; BLOCKS]) {
        for (block, t) in buf.chunks_exact_mut(16).zip(tweaks) {
            let x = u128::from_le_bytes(block.try_into().expect("16-byte block")) ^ t;
            block.copy_from_slice(&x.to_le_bytes());
        }
    }

    fn blocks(buf: &mut [u8]) -> &mut [Block] {
        let (blocks, rest) = buf.as_chunks_mut::<16>();
        debug_assert!(rest.is_empty());
        let len = blocks.len();
        // SAFETY: `GenericArray<u8, U16>` is `#[repr(transparent)]` over `[u8; 16]` (same size, alignment 1),
        // and the new slice covers exactly the bytes of `blocks` for the same lifetime.
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut Block, len) }
    }

    /// Encrypts whole sectors in place; `buf.len()` must be a multiple of [`SECTOR`]; the first sector is
    /// `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        let mut tw = [0u128; BLOCKS];
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            self.tweaks(first_sector + i as u64, &mut tw);
            Self::xor(sector, &tw);
            self.data.encrypt_blocks(Self::blocks(sector));
            Self::xor(sector, &tw);
        }
    }

    /// Decrypts whole sectors in place (inverse of [`Xts::encrypt`]).
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        let mut tw = [0u128; BLOCKS];
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            self.tweaks(first_sector + i as u64, &mut tw);
            Self::xor(sector, &tw);
            self.data.decrypt_blocks(Self::blocks(sector));
            Self::xor(sector, &tw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(k1: &[u8; 32], k2: &[u8; 32]) -> xts_mode::Xts128<Aes256> {
        xts_mode::Xts128::new(Aes256::new(k1.into()), Aes256::new(k2.into()))
    }

    proptest! {
        #[test]
        fn matches_xts_mode_and_round_trips(k1 in any::<[u8; 32]>(), k2 in any::<[u8; 32]>(),
                                            first in any::<u64>(), sectors in 1usize..4, seed in any::<u8>()) {
            prop_assume!(k1 != k2);
            let plain: Vec<u8> = (0..sectors * SECTOR).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
            let first = first / 8;
            let mut ours = plain.clone();
            Xts::new(&k1, &k2).encrypt(&mut ours, first);
            let mut theirs = plain.clone();
            reference(&k1, &k2).encrypt_area(&mut theirs, SECTOR, first as u128, xts_mode::get_tweak_default);
            prop_assert_eq!(&ours, &theirs);
            Xts::new(&k1, &k2).decrypt(&mut ours, first);
            prop_assert_eq!(ours, plain);
        }
    }

    #[test]
    fn same_data_in_other_sectors_encrypts_differently() {
        let x = Xts::new(&[1; 32], &[2; 32]);
        let mut buf = vec![0u8; 2 * SECTOR];
        x.encrypt(&mut buf, 10);
        assert_ne!(buf[..SECTOR], buf[SECTOR..]);
    }
}
