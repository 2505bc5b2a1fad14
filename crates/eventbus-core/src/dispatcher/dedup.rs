//! A bounded set of recently handled event ids, to skip redelivered duplicates.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

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
    fn zero_capacity_remembers_nothing() {
        let mut s = DedupSet::new(0);
        s.insert(DedupKey::new(1, "a"));
        assert!(!s.contains(&DedupKey::new(1, "a")));
    }
}
