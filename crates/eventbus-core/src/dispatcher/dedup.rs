//! A bounded set of recently handled event ids, to skip redelivered duplicates.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// UUIDs (the default event ids) are kept as 128-bit numbers; other ids as strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DedupKey {
    Uuid(u128),
    Text(Arc<str>),
}

impl DedupKey {
    pub(crate) fn new(event_id: &str) -> Self {
        match uuid::Uuid::try_parse(event_id) {
            Ok(u) => DedupKey::Uuid(u.as_u128()),
            Err(_) => DedupKey::Text(Arc::from(event_id)),
        }
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
            DedupKey::new("0190a000-0000-7000-8000-000000000001"),
            DedupKey::new("plain-id"),
            DedupKey::new("another"),
        ];
        s.insert(ids[0].clone());
        s.insert(ids[1].clone());
        assert!(s.contains(&ids[0]) && s.contains(&ids[1]));
        s.insert(ids[2].clone());
        assert!(!s.contains(&ids[0]));
        assert!(s.contains(&ids[2]));
        assert!(matches!(ids[0], DedupKey::Uuid(_)));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut s = DedupSet::new(0);
        s.insert(DedupKey::new("a"));
        assert!(!s.contains(&DedupKey::new("a")));
    }
}
