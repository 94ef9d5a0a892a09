//! A fast hash for the maps every routed frame looks up: the relay's connections and routes,
//! the bridge's open requests.
//!
//! std's `HashMap` hashes with SipHash-1-3, which keeps a map fast even when an attacker
//! chooses its keys. It took 7% of the relay's user time per small request and 4% of the
//! bridge's at c16 (docs/PERFORMANCE.md, stop 18). The maps that use [`FastMap`] and
//! [`FastSet`] do not need that defence: their keys are numbers and ids that the relay or the
//! registry hands out, or request ids an app chooses among its own open requests, of which
//! there are at most 32 per app (256 per bridge): ids made to collide cost a lookup at most a
//! scan of that many entries.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A `HashSet` with [`FastHasher`].
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// The multiply-rotate hash of rustc's `FxHasher`, eight bytes per step, with MurmurHash3's
/// finaliser.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

/// An odd constant with well-mixed bits (as in rustc's `FxHasher`).
const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.add(u64::from_le_bytes(w));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // hashbrown takes a bucket from the low bits and a tag from the top seven, and a
        // multiply only carries a bit upwards: ids that differ in their last bytes would share
        // buckets. MurmurHash3's finaliser spreads every bit over all of them.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash<T: std::hash::Hash>(t: &T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(t)
    }

    #[test]
    fn keys_that_differ_anywhere_hash_apart() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("hcl_{i:020}")).collect();
        let hashes: HashSet<u64> = ids.iter().map(hash).collect();
        assert_eq!(hashes.len(), ids.len());
        // Buckets of a 1,024-slot table (low bits) and tags (top 7 bits) both spread: 10,000
        // random keys leave no bucket empty but by chance.
        let buckets: HashSet<u64> = ids.iter().map(|id| hash(id) & 1023).collect();
        assert!(buckets.len() > 1000, "{} buckets", buckets.len());
        let tags: HashSet<u64> = ids.iter().map(|id| hash(id) >> 57).collect();
        assert_eq!(tags.len(), 128);
        // Consecutive numbers too (the relay's connection ids): 1,024 random keys fill about
        // 63% of 1,024 buckets.
        let buckets: HashSet<u64> = (0..1024usize).map(|n| hash(&n) & 1023).collect();
        assert!(buckets.len() > 600, "{} buckets", buckets.len());
        // A trailing byte counts, and the tuple keys of the bridge's open map keep apart.
        assert_ne!(hash(&"abcdefgh"), hash(&"abcdefgh\0"));
        assert_ne!(hash(&(Some("a".to_owned()), "b".to_owned())), hash(&(None::<String>, "b")));
    }

    #[test]
    fn maps_work_as_maps() {
        let mut m: FastMap<String, usize> = FastMap::default();
        for i in 0..1000 {
            m.insert(format!("r{i}"), i);
        }
        assert!((0..1000).all(|i| m.get(&format!("r{i}")) == Some(&i)));
        assert!(m.remove("r5").is_some() && !m.contains_key("r5"));
    }
}
