//! A fast hasher for the library's internal maps of short keys.

use std::collections::{HashMap, HashSet};

/// A hasher for the library's own maps (partition keys, topics, dedupe keys, topic names): FxHash, a
/// multiply-rotate over 8-byte words, seeded per process. Far cheaper than SipHash for short
/// keys; the maps it serves are bounded by the consumer's limits.
#[derive(Clone, Copy)]
pub(crate) struct FastHash(u64);

impl FastHash {
    pub(crate) fn new() -> FastHash {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        FastHash(*SEED.get_or_init(rand::random::<u64>))
    }
}

impl std::hash::BuildHasher for FastHash {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(self.0)
    }
}

pub(crate) struct FxHasher(u64);

/// The 1 to 7 bytes of `rest` as the little-endian word they make padded with zeros, read
/// with two overlapping loads instead of a copy into a padded buffer (which calls `memcpy`
/// for a length not known at compile time: ≈ 25 instructions per short key).
#[inline]
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    debug_assert!((1..8).contains(&n));
    if n >= 4 {
        // Both loads put each byte at its own position; where they overlap, the bytes agree.
        let lo = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let hi = u32::from_le_bytes([rest[n - 4], rest[n - 3], rest[n - 2], rest[n - 1]]);
        u64::from(lo) | (u64::from(hi) << (8 * (n - 4)))
    } else {
        let mid = n / 2;
        u64::from(rest[0])
            | (u64::from(rest[mid]) << (8 * mid))
            | (u64::from(rest[n - 1]) << (8 * (n - 1)))
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.add(tail_word(rest));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    /// The state turned so that its high bits, which every input bit reaches through the
    /// multiplications, land where the map's bucket index is taken (the low bits): the low
    /// bits of a product depend only on the low bits of what was multiplied, so keys that
    /// agree there — e.g. the addresses of allocations, all multiples of 16 or more — would
    /// otherwise crowd a few buckets.
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, FastHash>;
pub(crate) type FastSet<K> = HashSet<K, FastHash>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Keys that differ only above their low bits (addresses of 64-byte-aligned allocations)
    /// spread over the low bits of the hash, where the map takes its bucket index.
    #[test]
    fn aligned_addresses_spread_over_the_buckets() {
        let h = FastHash::new();
        let buckets: std::collections::HashSet<u64> = (0..1024u64)
            .map(|i| h.hash_one((7u64, 0x5555_0000_0000usize + 64 * i as usize)) & 2047)
            .collect();
        // 1,024 keys into 2,048 buckets at random fill about 806 distinct buckets; with the
        // low six bits of every key equal, the unturned state filled at most 2048 / 64 = 32.
        assert!(buckets.len() > 700, "{}", buckets.len());
    }

    /// The last 1 to 7 bytes of a key hash as the zero-padded little-endian word they make.
    #[test]
    fn a_short_tail_is_the_zero_padded_word() {
        let bytes = [0x81u8, 0x02, 0xf3, 0x04, 0x65, 0xa6, 0x07];
        for n in 1..8 {
            let mut padded = [0u8; 8];
            padded[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(
                tail_word(&bytes[..n]),
                u64::from_le_bytes(padded),
                "{n} bytes"
            );
        }
        // So a key hashes as its bytes zero-padded to whole words would.
        let h = FastHash::new();
        let mut a = h.build_hasher();
        std::hash::Hasher::write(&mut a, b"XNAS.S123");
        let mut b = h.build_hasher();
        std::hash::Hasher::write(&mut b, b"XNAS.S12");
        std::hash::Hasher::write(&mut b, b"3\0\0\0\0\0\0\0");
        assert_eq!(std::hash::Hasher::finish(&a), std::hash::Hasher::finish(&b));
    }
}
