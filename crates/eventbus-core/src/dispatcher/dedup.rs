//! A bounded set of recently handled event ids, to skip redelivered duplicates.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};

use super::prehashed::PassThrough;

/// An event id as seen by one subscription: workers are shared by every subscription of a
/// bus, and each group must get its own copy of an event.
///
/// The key carries its hash, computed once ([`SharedDedup::key`], keyed by a per-bus random
/// seed so ids chosen by a sender cannot force collisions): it picks the shard and is the
/// set's hash, so a message costs one hash of its id, not one per lookup.
#[derive(Debug, Clone)]
pub(crate) struct DedupKey {
    hash: u64,
    route: u64,
    id: EventIdKey,
}

impl PartialEq for DedupKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.route == other.route && self.id == other.id
    }
}

impl Eq for DedupKey {}

impl Hash for DedupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// UUIDs (the default event ids) are kept as 128-bit numbers; other ids as strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EventIdKey {
    Uuid(u128),
    Text(Arc<str>),
}

impl DedupKey {
    fn new(seed: &RandomState, route: u64, event_id: &str) -> Self {
        let id = match uuid::Uuid::try_parse(event_id) {
            Ok(u) => EventIdKey::Uuid(u.as_u128()),
            Err(_) => EventIdKey::Text(Arc::from(event_id)),
        };
        let mut h = seed.build_hasher();
        route.hash(&mut h);
        id.hash(&mut h);
        Self {
            hash: h.finish(),
            route,
            id,
        }
    }
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
        self.order.push_back(key.clone());
        self.seen.insert(key);
    }
}

/// Shards of a shared dedup window: any worker may handle any aggregate, so every worker
/// sees the same set; sharding by event id keeps the lock per message short and rarely
/// contended.
pub(crate) struct SharedDedup {
    shards: Box<[Mutex<DedupSet>]>,
    seed: RandomState,
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
            seed: RandomState::new(),
        }
    }

    /// The key `event_id` of subscription `route` is remembered by.
    pub(crate) fn key(&self, route: u64, event_id: &str) -> DedupKey {
        DedupKey::new(&self.seed, route, event_id)
    }

    fn shard(&self, key: &DedupKey) -> &Mutex<DedupSet> {
        // The high bits: the set's buckets use the low ones.
        let i = ((key.hash >> 32) % self.shards.len() as u64) as usize;
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

    #[test]
    fn keys_that_share_a_hash_stay_distinct() {
        // Forced collision: equal hashes, different ids, both remembered apart.
        let seed = RandomState::new();
        let a = DedupKey::new(&seed, 1, "a");
        let mut b = DedupKey::new(&seed, 1, "b");
        b.hash = a.hash;
        let mut s = DedupSet::new(8);
        s.insert(a.clone());
        assert!(s.contains(&a));
        assert!(!s.contains(&b));
        s.insert(b.clone());
        assert!(s.contains(&a) && s.contains(&b));
    }

    #[test]
    fn remembers_the_last_capacity_ids() {
        let seed = RandomState::new();
        let mut s = DedupSet::new(2);
        let ids = [
            DedupKey::new(&seed, 1, "0190a000-0000-7000-8000-000000000001"),
            DedupKey::new(&seed, 1, "plain-id"),
            DedupKey::new(&seed, 1, "another"),
        ];
        s.insert(ids[0].clone());
        s.insert(ids[1].clone());
        assert!(s.contains(&ids[0]) && s.contains(&ids[1]));
        s.insert(ids[2].clone());
        assert!(!s.contains(&ids[0]));
        assert!(s.contains(&ids[2]));
        assert!(matches!(ids[0].id, EventIdKey::Uuid(_)));
        assert!(
            !s.contains(&DedupKey::new(&seed, 2, "another")),
            "keys are per subscription"
        );
    }

    #[test]
    fn shared_set_is_seen_by_everyone() {
        let s = SharedDedup::new(64, 8);
        let k = s.key(1, "id-1");
        assert!(!s.contains(&k));
        s.insert(k.clone());
        assert!(s.contains(&k));
        assert!(
            s.contains(&s.key(1, "id-1")),
            "an equal key built again is found"
        );
        assert!(!s.contains(&s.key(2, "id-1")));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let seed = RandomState::new();
        let mut s = DedupSet::new(0);
        s.insert(DedupKey::new(&seed, 1, "a"));
        assert!(!s.contains(&DedupKey::new(&seed, 1, "a")));
    }
}
