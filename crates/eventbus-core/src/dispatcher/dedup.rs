//! A bounded set of recently handled event ids, to skip redelivered duplicates.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

use super::prehashed::PassThrough;

/// An event id as seen by one subscription: workers are shared by every subscription of a
/// bus, and each group must get its own copy of an event.
///
/// Kept as a 128-bit fingerprint of (subscription, id): two SipHash values under per-bus random
/// seeds, so ids chosen by a sender cannot be made to collide. An entry is 16 bytes with no
/// allocation, whatever the id's length (the id itself is not kept). Two distinct ids share a
/// fingerprint with probability about n/2¹²⁸ per lookup in a window of n ids (below 10⁻³³ for
/// the default windows): a genuine event is not mistaken for a duplicate in practice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupKey(u128);

impl Hash for DedupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: the set uses its low half as it is.
        state.write_u64(self.0 as u64);
    }
}

fn fingerprint(seeds: &[RandomState; 2], route: u64, event_id: &str) -> DedupKey {
    let half = |seed: &RandomState| {
        let mut h = seed.build_hasher();
        route.hash(&mut h);
        event_id.hash(&mut h);
        h.finish()
    };
    DedupKey((u128::from(half(&seeds[0])) << 64) | u128::from(half(&seeds[1])))
}

/// Remembers the last `capacity` ids (first in, first out).
#[derive(Debug)]
pub(crate) struct DedupSet {
    capacity: usize,
    seen: HashSet<DedupKey, BuildHasherDefault<PassThrough>>,
    order: VecDeque<DedupKey>,
}

impl DedupSet {
    pub(crate) fn new(capacity: usize) -> Self {
        let initial = capacity.min(4096);
        Self {
            capacity,
            seen: HashSet::with_capacity_and_hasher(initial, Default::default()),
            order: VecDeque::with_capacity(initial),
        }
    }

    pub(crate) fn contains(&self, key: &DedupKey) -> bool {
        self.seen.contains(key)
    }

    pub(crate) fn insert(&mut self, key: DedupKey) {
        if self.capacity == 0 || self.seen.contains(&key) {
            return;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.order.push_back(key);
        self.seen.insert(key);
    }
}

/// Shards of a shared dedup window: any worker may handle any aggregate, so every worker
/// sees the same set; sharding by event id keeps the lock per message short and rarely
/// contended.
pub(crate) struct SharedDedup {
    shards: Box<[Mutex<DedupSet>]>,
    seeds: [RandomState; 2],
}

impl SharedDedup {
    /// Remembers about `capacity` ids in all, over `shards` shards.
    pub(crate) fn new(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let per_shard = capacity.div_ceil(shards);
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(DedupSet::new(per_shard)))
                .collect(),
            seeds: [RandomState::new(), RandomState::new()],
        }
    }

    /// The key `event_id` of subscription `route` is remembered by.
    pub(crate) fn key(&self, route: u64, event_id: &str) -> DedupKey {
        fingerprint(&self.seeds, route, event_id)
    }

    fn shard(&self, key: &DedupKey) -> &Mutex<DedupSet> {
        // The high half: the set's buckets use the low one.
        let i = ((key.0 >> 64) as u64 % self.shards.len() as u64) as usize;
        &self.shards[i]
    }

    pub(crate) fn contains(&self, key: &DedupKey) -> bool {
        self.shard(key)
            .lock()
            .map(|s| s.contains(key))
            .unwrap_or(false)
    }

    pub(crate) fn insert(&self, key: DedupKey) {
        if let Ok(mut s) = self.shard(&key).lock() {
            s.insert(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> [RandomState; 2] {
        [RandomState::new(), RandomState::new()]
    }

    #[test]
    fn remembers_the_last_capacity_ids() {
        let seeds = seeds();
        let mut s = DedupSet::new(2);
        let ids = [
            fingerprint(&seeds, 1, "0190a000-0000-7000-8000-000000000001"),
            fingerprint(&seeds, 1, "plain-id"),
            fingerprint(&seeds, 1, "another"),
        ];
        s.insert(ids[0]);
        s.insert(ids[1]);
        assert!(s.contains(&ids[0]) && s.contains(&ids[1]));
        s.insert(ids[2]);
        assert!(!s.contains(&ids[0]));
        assert!(s.contains(&ids[2]));
        assert!(
            !s.contains(&fingerprint(&seeds, 2, "another")),
            "keys are per subscription"
        );
    }

    #[test]
    fn keys_that_share_a_bucket_stay_distinct() {
        // Same low half (same bucket), different high half: both remembered apart.
        let a = DedupKey(1);
        let b = DedupKey(1 | (1 << 64));
        let mut s = DedupSet::new(8);
        s.insert(a);
        assert!(s.contains(&a));
        assert!(!s.contains(&b));
        s.insert(b);
        assert!(s.contains(&a) && s.contains(&b));
    }

    #[test]
    fn shared_set_is_seen_by_everyone() {
        let s = SharedDedup::new(64, 8);
        let k = s.key(1, "id-1");
        assert!(!s.contains(&k));
        s.insert(k);
        assert!(s.contains(&k));
        assert!(
            s.contains(&s.key(1, "id-1")),
            "an equal key built again is found"
        );
        assert!(!s.contains(&s.key(2, "id-1")));
        assert!(!s.contains(&s.key(1, "id-2")));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let seeds = seeds();
        let mut s = DedupSet::new(0);
        s.insert(fingerprint(&seeds, 1, "a"));
        assert!(!s.contains(&fingerprint(&seeds, 1, "a")));
    }
}
