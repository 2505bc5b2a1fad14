//! [`OffsetTracker`]: which offsets may be committed. A partition's commit point is the lowest
//! offset fetched but not yet settled (or one past the highest fetched when none is pending),
//! so no offset is ever committed for a message whose handler has not finished.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct PartitionOffsets {
    /// Fetched, not yet settled (parked redeliveries included).
    pending: BTreeSet<i64>,
    /// Pending offsets parked for a local redelivery (nak'ed or dropped).
    parked: BTreeSet<i64>,
    /// Highest offset fetched.
    high: Option<i64>,
    /// Last commit point sent to the broker.
    committed: Option<i64>,
    /// The partition is being given up: settle what runs, redeliver nothing locally.
    revoking: bool,
}

impl PartitionOffsets {
    fn commit_point(&self) -> Option<i64> {
        self.pending
            .first()
            .copied()
            .or_else(|| self.high.map(|h| h + 1))
    }
}

/// Contiguous-completion offset tracking for the partitions a consumer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    /// A tracker with no partitions.
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition was assigned: track it from scratch.
    pub fn assign(&mut self, partition: i32) {
        self.partitions
            .insert(partition, PartitionOffsets::default());
    }

    /// The partition was revoked: stop tracking it (late settlements are ignored).
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Whether the partition is currently owned.
    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// The partition is about to be revoked: it is still tracked until [`Self::revoke`], but
    /// its messages are no longer redelivered locally.
    pub fn begin_revoke(&mut self, partition: i32) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.revoking = true;
        }
    }

    /// Whether a nak'ed message of `partition` may be redelivered by this member: it owns the
    /// partition and is not giving it up.
    pub fn redelivers(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_some_and(|p| !p.revoking)
    }

    /// A message was fetched (and handed to the dispatcher).
    pub fn fetched(&mut self, partition: i32, offset: i64) {
        let p = self.partitions.entry(partition).or_default();
        // The group's committed position is at most the first offset it hands us: committing
        // that again would say nothing.
        p.committed.get_or_insert(offset);
        p.pending.insert(offset);
        p.high = Some(p.high.map_or(offset, |h| h.max(offset)));
    }

    /// The message was handled (acked) or dead-lettered (terminated).
    pub fn settled(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.pending.remove(&offset);
            p.parked.remove(&offset);
        }
    }

    /// The message waits for a local redelivery: still pending, but nobody is working on it.
    pub fn park(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.pending.contains(&offset) {
                p.parked.insert(offset);
            }
        }
    }

    /// A parked message was handed out again.
    pub fn unpark(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.parked.remove(&offset);
        }
    }

    /// Messages of `partition` a worker is still busy with (pending and not parked).
    pub fn busy(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.pending.len() - p.parked.len())
    }

    /// Commit points that moved since the last call: `(partition, next offset to consume)`.
    pub fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (partition, p) in &mut self.partitions {
            if let Some(point) = p.commit_point() {
                if p.committed.is_some_and(|c| point > c) {
                    p.committed = Some(point);
                    out.push((*partition, point));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// The broker refused the commit of `point` for `partition` (or it never got there): the
    /// point counts as not committed, so the next [`Self::take_commits`] sends it again even
    /// when nothing more arrives. A refusal of an older point, already overtaken by a later
    /// commit, changes nothing; a partition no longer owned is not committed again.
    pub fn commit_failed(&mut self, partition: i32, point: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.committed == Some(point) {
                p.committed = Some(point - 1);
            }
        }
    }

    /// The commit point of one partition, whether or not it moved.
    pub fn commit_point(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(PartitionOffsets::commit_point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_commit_is_taken_again_without_new_messages() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        for o in 0..5 {
            t.fetched(0, o);
            t.settled(0, o);
        }
        assert_eq!(t.take_commits(), vec![(0, 5)]);
        assert_eq!(t.take_commits(), vec![], "sent once while it stands");
        t.commit_failed(0, 5);
        assert_eq!(t.take_commits(), vec![(0, 5)], "refused: sent again");
        // A late refusal of a point a later commit overtook changes nothing.
        t.fetched(0, 5);
        t.settled(0, 5);
        assert_eq!(t.take_commits(), vec![(0, 6)]);
        t.commit_failed(0, 5);
        assert_eq!(t.take_commits(), vec![]);
        // Nor one of a partition given up.
        t.revoke(0);
        t.commit_failed(0, 6);
        assert_eq!(t.take_commits(), vec![]);
    }

    #[test]
    fn a_slow_early_message_holds_the_commit_point_back() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        for o in 10..15 {
            t.fetched(0, o);
        }
        // 11..14 finish, 10 is still running.
        for o in 11..15 {
            t.settled(0, o);
        }
        assert_eq!(
            t.take_commits(),
            vec![],
            "offset 10 is not done: nothing to commit"
        );
        t.settled(0, 10);
        assert_eq!(t.take_commits(), vec![(0, 15)]);
        assert_eq!(t.take_commits(), vec![], "nothing moved");
    }

    #[test]
    fn parked_messages_stay_pending_but_are_not_busy() {
        let mut t = OffsetTracker::new();
        t.assign(3);
        t.fetched(3, 0);
        t.fetched(3, 1);
        t.park(3, 0);
        assert_eq!(t.busy(3), 1);
        t.settled(3, 1);
        assert_eq!(
            t.commit_point(3),
            Some(0),
            "a parked message is never skipped"
        );
        assert_eq!(t.busy(3), 0);
        t.unpark(3, 0);
        assert_eq!(t.busy(3), 1);
        t.settled(3, 0);
        assert_eq!(t.commit_point(3), Some(2));
    }

    #[test]
    fn revoked_partitions_ignore_late_settlements() {
        let mut t = OffsetTracker::new();
        t.assign(1);
        t.fetched(1, 5);
        t.revoke(1);
        t.settled(1, 5);
        assert!(!t.owns(1));
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.commit_point(1), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        t.assign(1);
        t.fetched(0, 0);
        t.fetched(1, 7);
        t.settled(1, 7);
        assert_eq!(t.take_commits(), vec![(1, 8)]);
    }
}
