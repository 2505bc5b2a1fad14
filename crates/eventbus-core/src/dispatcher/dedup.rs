//! A bounded set of recently handled event ids, to skip redelivered duplicates.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

/// An event id as seen by one subscription: workers are shared by every subscription of a
/// bus, and each group must get its own copy of an event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DedupKey {
    route: u64,
    id: EventIdKey,
}

/// UUIDs (the default event ids) are kept as 128-bit numbers; other ids as strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EventIdKey {
    Uuid(u128),
    Text(Arc<str>),
}

impl DedupKey {
    pub(crate) fn new(route: u64, event_id: &str) -> Self {
        let id = match uuid::Uuid::try_parse(event_id) {
            Ok(u) => EventIdKey::Uuid(u.as_u128()),
            Err(_) => EventIdKey::Text(Arc::from(event_id)),
        };
        Self { route, id }
    }
}

/// Remembers the last `capacity` ids (first in, first out).
#[derive(Debug)]
pub(crate) struct DedupSet {
    capacity: usize,
    seen: HashSet<DedupKey>,
    order: VecDeque<DedupKey>,
}

impl DedupSet {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: HashSet::with_capacity(capacity.min(4096)),
            order: VecDeque::with_capacity(capacity.min(4096)),
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
    hasher: std::collections::hash_map::RandomState,
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
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &DedupKey) -> &Mutex<DedupSet> {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        let i = (std::hash::Hasher::finish(&h) % self.shards.len() as u64) as usize;
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
    fn remembers_the_last_capacity_ids() {
        let mut s = DedupSet::new(2);
        let ids = [
            DedupKey::new(1, "0190a000-0000-7000-8000-000000000001"),
            DedupKey::new(1, "plain-id"),
            DedupKey::new(1, "another"),
        ];
        s.insert(ids[0].clone());
        s.insert(ids[1].clone());
        assert!(s.contains(&ids[0]) && s.contains(&ids[1]));
        s.insert(ids[2].clone());
        assert!(!s.contains(&ids[0]));
        assert!(s.contains(&ids[2]));
        assert!(matches!(ids[0].id, EventIdKey::Uuid(_)));
        assert!(
            !s.contains(&DedupKey::new(2, "another")),
            "keys are per subscription"
        );
    }

    #[test]
    fn shared_set_is_seen_by_everyone() {
        let s = SharedDedup::new(64, 8);
        let k = DedupKey::new(1, "id-1");
        assert!(!s.contains(&k));
        s.insert(k.clone());
        assert!(s.contains(&k));
        assert!(!s.contains(&DedupKey::new(2, "id-1")));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut s = DedupSet::new(0);
        s.insert(DedupKey::new(1, "a"));
        assert!(!s.contains(&DedupKey::new(1, "a")));
    }
}
