//! A fast hasher for the isolate's maps on the request path.
//!
//! Their keys come from the policy (a backend's host, a token's key, an API key's secret name)
//! or from the gateway itself (a task's id), never from a caller, so they need no defence
//! against chosen collisions (the circuit breakers key theirs by caller and resource hashed
//! with [`FastHasher::seeded`], whose seed is random per isolate); the standard SipHash cost a
//! Service Bus send about a microsecond of wasm time (perf on workerd). This is the Fx hash
//! (Firefox, rustc): a rotate, a xor and a multiply per eight bytes (with rustc-hash 2's
//! constant and final rotation).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A [`HashMap`] with [`FastHasher`]; for keys a caller cannot choose.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

const SEED: u64 = 0xf1_35_7a_ea_2e_62_a9_c5;

impl FastHasher {
    /// A hasher that starts from `seed`: keys hashed with a seed the caller cannot know.
    pub fn seeded(seed: u64) -> FastHasher {
        let mut h = FastHasher(0);
        h.add(seed);
        h
    }

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves its best bits at the top; hashbrown indexes by the low ones.
        self.0.rotate_left(26)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = crate::encoding::word::split(bytes);
        for (word, _) in words {
            self.add(word);
        }
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(value: T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(value)
    }

    #[test]
    fn equal_keys_hash_equal_and_near_keys_apart() {
        assert_eq!(
            hash("https://sb.example/"),
            hash(String::from("https://sb.example/"))
        );
        // Keys that differ in one byte, in their length, or by where a field ends.
        let keys = [
            hash("abcdefgh"),
            hash("abcdefgi"),
            hash("abcdefghi"),
            hash("abcdefgh\0"),
            hash(("ab", "c")),
            hash(("a", "bc")),
        ];
        let distinct: HashSet<u64> = keys.iter().copied().collect();
        assert_eq!(distinct.len(), keys.len());
    }

    #[test]
    fn a_map_of_many_keys_finds_each() {
        let mut map: FastMap<String, usize> = FastMap::default();
        for i in 0..5000 {
            map.insert(format!("https://host-{i}.servicebus.windows.net"), i);
        }
        for i in 0..5000 {
            assert_eq!(
                map.get(&format!("https://host-{i}.servicebus.windows.net")),
                Some(&i)
            );
        }
        // Task ids, consecutive u32s: they spread over the table's low bits.
        let buckets: HashSet<u64> = (0u32..1024).map(|i| hash(i) & 1023).collect();
        assert!(
            buckets.len() > 600,
            "only {} of 1024 buckets",
            buckets.len()
        );
    }
}
