//! Kafka's default partitioner for keyed records, shared by every backend: murmur2 of the key,
//! made positive, modulo the partition count — what the Java client does
//! (`Utils.toPositive(Utils.murmur2(key)) % numPartitions`) and librdkafka with
//! `partitioner=murmur2_random`. One aggregate therefore has one partition number on every
//! backend and for Java producers alike. (Not FNV-1a modulo a power of two: its low bits
//! depend only on the low bits of each byte, so ids that differ only in letter case collide.)
//!
//! ```
//! use eventbus_core::partitioner::{murmur2, partition_for};
//! assert_eq!(murmur2(b"21"), -973_932_308); // Kafka's own test vector
//! assert!(partition_for(b"order-42", 16) < 16);
//! ```

/// Kafka's murmur2 (MurmurHash2, seed `0x9747b28c`), as the Java client's `Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java hashes the length as an int: keys longer than 2³¹ bytes do not exist there.
    let mut h = SEED ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (0 when there are none).
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    if partitions == 0 {
        return 0;
    }
    // Java's `Utils.toPositive`: clear the sign bit (not `abs`, which overflows on MIN).
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafkas_own_test_vectors() {
        // Apache Kafka's UtilsTest.testMurmur2 and librdkafka's rdmurmur2 unit test.
        for (key, want) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("kafka", 0xd067_cf64_u32 as i32),
        ] {
            assert_eq!(murmur2(key.as_bytes()), want, "{key}");
        }
    }

    #[test]
    fn every_tail_length_is_hashed() {
        // 0–3 trailing bytes after the 4-byte blocks all change the hash.
        let hashes: std::collections::HashSet<i32> =
            (0..8).map(|n| murmur2(&b"abcdefgh"[..n])).collect();
        assert_eq!(hashes.len(), 8);
    }

    #[test]
    fn partitions_are_in_range_and_case_sensitive_ids_spread() {
        assert_eq!(partition_for(b"x", 0), 0);
        for n in [1, 3, 16, 1000] {
            assert!(partition_for(b"order-1", n) < n);
        }
        // Ids that differ only in letter case: FNV-1a mod 16 put all of these on one partition.
        let spread: std::collections::HashSet<u32> = ["order-a", "order-A", "ORDER-a", "Order-A"]
            .iter()
            .map(|k| partition_for(k.as_bytes(), 16))
            .collect();
        assert!(spread.len() > 1, "{spread:?}");
    }
}
