//! Reed-Solomon erasure coding of one encrypted segment into k data + m parity shards (`reed-solomon-simd`).
//!
//! The encrypted segment is laid out in a buffer of `k * shard_len` bytes (zero padded); data shard `i` is the
//! slice `[i * shard_len, (i + 1) * shard_len)`, so encoding reads the data shards in place without copying.

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::error::{Error, Result};

/// Shard length for a segment of `stored_len` bytes (ciphertext + tag) split into `k` data shards. It is even
/// (the codec works on 16-bit words) and at least 2.
pub fn shard_len(stored_len: u64, k: usize) -> usize {
    let per = stored_len.div_ceil(k as u64).max(1) as usize;
    per + (per & 1)
}

/// Checks that (k, m) is usable.
pub fn validate(k: usize, m: usize) -> Result<()> {
    if k == 0 || m == 0 || k + m > 255 || !ReedSolomonEncoder::supports(k, m) {
        return Err(Error::Config(format!(
            "unsupported shard counts k={k}, m={m} (need k >= 1, m >= 1, k + m <= 255)"
        )));
    }
    Ok(())
}

/// Bytes of each shard coded at a time. Reed-Solomon works column by column (each 64-byte block of a shard only
/// meets the blocks at the same position in the other shards), so coding 1 MiB columns gives the same bytes as
/// coding whole shards while the coder's working memory stays a few MiB instead of several times the segment.
pub const DEFAULT_COLUMN: usize = 1 << 20;
const _: () = assert!(DEFAULT_COLUMN.is_multiple_of(64));

/// A reusable encoder/decoder for fixed k and m; keeps its working memory between segments.
pub struct Codec {
    k: usize,
    m: usize,
    column: usize,
    encoder: Option<ReedSolomonEncoder>,
    decoder: Option<ReedSolomonDecoder>,
    parity: Vec<u8>,
}

fn rs_err(e: reed_solomon_simd::Error) -> Error {
    Error::internal(format!("erasure coder: {e}"))
}

impl Codec {
    /// A codec for `k` data and `m` parity shards.
    pub fn new(k: usize, m: usize) -> Result<Self> {
        Self::with_column(k, m, DEFAULT_COLUMN)
    }

    /// A codec working on columns of `column` bytes (a positive multiple of 64).
    pub fn with_column(k: usize, m: usize, column: usize) -> Result<Self> {
        validate(k, m)?;
        if column == 0 || !column.is_multiple_of(64) {
            return Err(Error::internal("erasure column must be a positive multiple of 64 bytes"));
        }
        Ok(Codec { k, m, column, encoder: None, decoder: None, parity: Vec::new() })
    }

    /// Column ranges `[start, end)` of a shard of `shard_len` bytes.
    fn columns(&self, shard_len: usize) -> impl Iterator<Item = (usize, usize)> {
        let column = self.column;
        (0..shard_len).step_by(column).map(move |c| (c, (c + column).min(shard_len)))
    }

    /// Data shard count.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Parity shard count.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Computes the m parity shards of `data` (`k * shard_len` bytes) and hands them to `use_parity` (slices of
    /// the codec's own parity buffer, reused between calls).
    pub fn encode_with<R>(
        &mut self,
        data: &[u8],
        shard_len: usize,
        use_parity: impl FnOnce(&[&[u8]]) -> R,
    ) -> Result<R> {
        if data.len() != self.k * shard_len || !shard_len.is_multiple_of(2) {
            return Err(Error::internal("segment buffer does not match k * shard_len"));
        }
        let (k, m) = (self.k, self.m);
        let mut parity = std::mem::take(&mut self.parity);
        parity.resize(m * shard_len, 0);
        let columns: Vec<(usize, usize)> = self.columns(shard_len).collect();
        for (c0, c1) in columns {
            let w = c1 - c0;
            let enc = match &mut self.encoder {
                Some(e) => {
                    e.reset(k, m, w).map_err(rs_err)?;
                    e
                }
                None => self.encoder.insert(ReedSolomonEncoder::new(k, m, w).map_err(rs_err)?),
            };
            for i in 0..k {
                enc.add_original_shard(&data[i * shard_len + c0..i * shard_len + c1]).map_err(rs_err)?;
            }
            let result = enc.encode().map_err(rs_err)?;
            for (j, p) in result.recovery_iter().enumerate() {
                parity[j * shard_len + c0..j * shard_len + c1].copy_from_slice(p);
            }
        }
        let slices: Vec<&[u8]> = parity.chunks_exact(shard_len).collect();
        let r = use_parity(&slices);
        self.parity = parity;
        Ok(r)
    }

    /// Computes the m parity shards of `data` into `parity` (resized to `m * shard_len`).
    pub fn encode(&mut self, data: &[u8], shard_len: usize, parity: &mut Vec<u8>) -> Result<()> {
        self.encode_with(data, shard_len, |p| {
            parity.clear();
            for shard in p {
                parity.extend_from_slice(shard);
            }
        })
    }

    /// Rebuilds missing data shards in place. `data` is `k * shard_len` bytes where `have_data[i]` says whether
    /// data shard `i` is present; `parity` yields `(parity_index, bytes)` of good parity shards. Fails when
    /// fewer than k shards are present in total.
    pub fn reconstruct<'a>(
        &mut self,
        data: &mut [u8],
        shard_len: usize,
        have_data: &[bool],
        parity: impl IntoIterator<Item = (usize, &'a [u8])>,
    ) -> Result<()> {
        if have_data.iter().all(|h| *h) {
            return Ok(());
        }
        let (k, m) = (self.k, self.m);
        let parity: Vec<(usize, &[u8])> = parity.into_iter().collect();
        let columns: Vec<(usize, usize)> = self.columns(shard_len).collect();
        for (c0, c1) in columns {
            let dec = match &mut self.decoder {
                Some(d) => {
                    d.reset(k, m, c1 - c0).map_err(rs_err)?;
                    d
                }
                None => self.decoder.insert(ReedSolomonDecoder::new(k, m, c1 - c0).map_err(rs_err)?),
            };
            for (i, shard) in data.chunks_exact(shard_len).enumerate() {
                if have_data[i] {
                    dec.add_original_shard(i, &shard[c0..c1]).map_err(rs_err)?;
                }
            }
            for (j, p) in &parity {
                dec.add_recovery_shard(*j, &p[c0..c1]).map_err(rs_err)?;
            }
            let result = dec.decode().map_err(rs_err)?;
            for (i, restored) in result.restored_original_iter() {
                data[i * shard_len + c0..i * shard_len + c1].copy_from_slice(restored);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip_losing(k: usize, m: usize, lost: &[usize], data: &[u8]) {
        let sl = shard_len(data.len() as u64, k);
        let mut buf = data.to_vec();
        buf.resize(k * sl, 0);
        let mut codec = Codec::new(k, m).unwrap();
        let mut parity = Vec::new();
        codec.encode(&buf, sl, &mut parity).unwrap();
        let mut damaged = buf.clone();
        let mut have = vec![true; k];
        for &l in lost.iter().filter(|&&l| l < k) {
            have[l] = false;
            damaged[l * sl..(l + 1) * sl].fill(0xEE);
        }
        let good_parity: Vec<(usize, &[u8])> =
            (0..m).filter(|j| !lost.contains(&(k + j))).map(|j| (j, &parity[j * sl..(j + 1) * sl])).collect();
        codec.reconstruct(&mut damaged, sl, &have, good_parity).unwrap();
        assert_eq!(damaged, buf, "k={k} m={m} lost={lost:?}");
    }

    /// Every combination of at most m lost shards, for small k+m.
    #[test]
    fn any_m_losses_recover_exhaustively() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        for (k, m) in [(1, 1), (2, 1), (3, 2), (4, 2), (4, 3), (5, 3)] {
            let n = k + m;
            for mask in 0u32..(1 << n) {
                if mask.count_ones() as usize > m {
                    continue;
                }
                let lost: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                round_trip_losing(k, m, &lost, &data);
            }
        }
    }

    /// Column-wise coding must produce exactly the bytes of whole-shard coding (the on-disk format depends on it).
    #[test]
    fn columns_match_whole_shard_coding() {
        for (k, m) in [(4, 2), (3, 3), (2, 1)] {
            for sl in [2, 62, 64, 66, 190, 256, 1000, 4096 + 130] {
                let data: Vec<u8> = (0..k * sl).map(|i| (i * 7 % 251) as u8).collect();
                let whole = reed_solomon_simd::encode(k, m, data.chunks_exact(sl)).unwrap();
                for column in [64, 128, 4096] {
                    let mut codec = Codec::with_column(k, m, column).unwrap();
                    let mut parity = Vec::new();
                    codec.encode(&data, sl, &mut parity).unwrap();
                    assert_eq!(parity, whole.concat(), "k={k} m={m} sl={sl} column={column}");
                    // And decoding column-wise restores what was lost.
                    let mut damaged = data.clone();
                    damaged[..sl].fill(0);
                    let mut have = vec![true; k];
                    have[0] = false;
                    codec.reconstruct(&mut damaged, sl, &have, [(0usize, &parity[..sl])]).unwrap();
                    assert_eq!(damaged, data);
                }
            }
        }
    }

    #[test]
    fn more_than_m_losses_fail_cleanly() {
        let (k, m) = (4, 2);
        let sl = shard_len(100, k);
        let buf = vec![7u8; k * sl];
        let mut codec = Codec::new(k, m).unwrap();
        let mut parity = Vec::new();
        codec.encode(&buf, sl, &mut parity).unwrap();
        let mut d = buf.clone();
        let have = [false, false, true, true];
        let one_parity = [(0usize, &parity[..sl])];
        assert!(codec.reconstruct(&mut d, sl, &have, one_parity).is_err());
    }

    #[test]
    fn shard_len_is_even_and_covers() {
        for len in 0..200u64 {
            for k in 1..7 {
                let s = shard_len(len, k);
                assert!(s.is_multiple_of(2) && s >= 2 && (s * k) as u64 >= len);
            }
        }
    }

    proptest! {
        #[test]
        fn random_losses_recover(data in proptest::collection::vec(any::<u8>(), 1..5000),
                                 k in 1usize..8, m in 1usize..4, seed in any::<u64>()) {
            let n = k + m;
            let mut lost: Vec<usize> = (0..n).collect();
            // Deterministic shuffle from the seed, keep at most m.
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                lost.swap(i, (s >> 33) as usize % (i + 1));
            }
            lost.truncate((seed % (m as u64 + 1)) as usize);
            round_trip_losing(k, m, &lost, &data);
        }
    }
}
