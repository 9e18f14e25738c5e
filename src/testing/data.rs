//! Test data.

/// Deterministic pseudo-random bytes (xorshift64) for test and benchmark inputs: incompressible, and never the
/// all-zero pages the kernel may share copy-on-write.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
