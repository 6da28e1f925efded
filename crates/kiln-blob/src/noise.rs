//! Deterministic incompressible bytes, for tests and benchmarks that need image-like
//! data without storing it.

/// `n_bytes` pseudo-random bytes (xorshift64), the same for the same `seed` and
/// different for different seeds. They do not compress, so they exercise transfer and
/// storage the way real image data at its worst does.
pub fn noise(n_bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(n_bytes + 8);
    while bytes.len() < n_bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(n_bytes);
    bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn noise_is_deterministic_per_seed_and_does_not_compress() {
        let a = super::noise(1 << 16, 1);
        assert_eq!(a, super::noise(1 << 16, 1));
        assert_ne!(a, super::noise(1 << 16, 2));
        assert_eq!(super::noise(5, 1).len(), 5);
        let compressed = zstd::bulk::compress(&a, 3).unwrap();
        assert!(compressed.len() > a.len() * 99 / 100);
    }
}
