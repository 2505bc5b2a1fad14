//! Partitioned consumer groups: which instance of a group consumes which partition of a topic.
//!
//! Every partition of a topic has, per group, a durable pull consumer filtering that
//! partition's subject. At most one live instance of the group pulls from it: the one holding
//! the partition's lease, a key in a JetStream key-value bucket beside the topic's stream
//! (create-if-absent to take it, compare-and-set on its revision to renew it, the bucket's age
//! limit to let an abandoned one lapse). Instances announce themselves in the same bucket;
//! each one computes the same round-robin assignment from the member list and takes the
//! partitions assigned to it as their leases become free. An instance giving a partition up
//! first stops pulling it, then waits until every delivery of it was settled, then deletes
//! the lease, so the new owner starts after the old one finished. The new owner restarts the
//! consumer at its ack floor when deliveries were left unsettled (a crashed owner), so they
//! come again before anything newer and the aggregate's order holds.
//!
//! One coordinator task per subscription does the bookkeeping; the subscription's fetcher pulls
//! from the partitions the coordinator hands it (see [`Membership`]).

mod assignment;
mod coordinator;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use eventbus_core::ownership::OwnershipToken;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

pub(crate) use coordinator::{join, GroupBucket, GroupSpec};

/// Deliveries handed to the dispatcher and not settled yet, per partition.
pub(crate) struct PartitionLoad {
    out: Box<[AtomicUsize]>,
    /// Partitions the coordinator waits to see settled (given up or to be restarted).
    draining: Box<[AtomicBool]>,
    /// Woken when a draining partition's last delivery is settled.
    drained: Notify,
}

impl PartitionLoad {
    fn new(partitions: u16) -> Self {
        Self {
            out: (0..partitions).map(|_| AtomicUsize::new(0)).collect(),
            draining: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            drained: Notify::new(),
        }
    }

    /// Wakes the coordinator once `partition` has no delivery out, while `on` holds.
    fn set_draining(&self, partition: u16, on: bool) {
        if let Some(d) = self.draining.get(usize::from(partition)) {
            d.store(on, Ordering::Release);
        }
    }

    fn get(&self, partition: u16) -> usize {
        self.out
            .get(usize::from(partition))
            .map_or(0, |n| n.load(Ordering::Acquire))
    }
}

/// Counts one delivery of a partition as out until it is dropped (settled or abandoned).
pub(crate) struct LoadGuard {
    load: Arc<PartitionLoad>,
    partition: u16,
}

impl LoadGuard {
    pub(crate) fn new(load: &Arc<PartitionLoad>, partition: u16) -> Self {
        if let Some(n) = load.out.get(usize::from(partition)) {
            n.fetch_add(1, Ordering::AcqRel);
        }
        Self {
            load: load.clone(),
            partition,
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let p = usize::from(self.partition);
        if let Some(n) = self.load.out.get(p) {
            let last = n.fetch_sub(1, Ordering::AcqRel) == 1;
            let watched = self.load.draining.get(p);
            if last && watched.is_some_and(|d| d.load(Ordering::Acquire)) {
                self.load.drained.notify_one();
            }
        }
    }
}

/// A partition this instance owns, with the consumer to pull it from. `epoch` changes each
/// time the partition is taken, so a fetcher never keeps pulling through an older consumer.
#[derive(Clone)]
pub(crate) struct Owned {
    pub(crate) partition: u16,
    pub(crate) epoch: u64,
    pub(crate) consumer: PullConsumer,
    /// Stamped on every delivery of this epoch: the dispatcher starts none of them once the
    /// lease is lost or past its deadline.
    pub(crate) token: OwnershipToken,
}

/// Restart requests from the fetcher to the coordinator: at most one per partition.
#[derive(Default)]
pub(crate) struct Restarts {
    asked: Mutex<BTreeMap<u16, u64>>,
    wake: Notify,
}

impl Restarts {
    fn request(&self, partition: u16, epoch: u64) {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition, epoch);
        self.wake.notify_one();
    }

    fn take(&self) -> BTreeMap<u16, u64> {
        std::mem::take(&mut *self.asked.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Set when the subscription stops fetching: the coordinator stops announcing and taking
/// partitions, and releases each one as soon as what was dispatched of it is settled.
#[derive(Default)]
pub(crate) struct Leaving {
    flag: AtomicBool,
    wake: Notify,
}

impl Leaving {
    fn begin(&self) {
        self.flag.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// The subscription's side of its group membership.
pub(crate) struct Membership {
    /// The partitions to pull now; changes wake the fetcher.
    pub(crate) assignment: watch::Receiver<Arc<Vec<Owned>>>,
    pub(crate) load: Arc<PartitionLoad>,
    /// What the fetcher pulls from now; a partition given up leaves the group only after the
    /// fetcher dropped it from here and its load fell to zero.
    pulling: Arc<Mutex<BTreeSet<u16>>>,
    /// Partitions (with their epoch) the fetcher stopped pulling because deliveries of theirs
    /// were lost on the way: the coordinator restarts their consumers at the ack floor.
    restarts: Arc<Restarts>,
    leaving: Arc<Leaving>,
    /// Sending on it, or dropping it with the membership, tells the coordinator to leave.
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Bound on waiting for the coordinator to leave.
    leave_within: Duration,
}

impl Membership {
    /// Records the partitions the fetcher pulls from.
    pub(crate) fn set_pulling(&self, partitions: impl Iterator<Item = u16>) {
        let mut p = self.pulling.lock().unwrap_or_else(|e| e.into_inner());
        p.clear();
        p.extend(partitions);
    }

    /// Asks for `partition`'s consumer to be restarted at its ack floor once its deliveries
    /// are settled; the fetcher no longer pulls it. The partition comes back in the
    /// assignment with a new epoch.
    pub(crate) fn restart(&self, partition: u16, epoch: u64) {
        self.restarts.request(partition, epoch);
    }

    /// Fetching has stopped for good: from now on the group is left partition by partition,
    /// each as soon as its deliveries are settled, so a hung handler holds back its own
    /// partition only, and no other member waits for [`Self::leave`].
    pub(crate) fn begin_leaving(&self) {
        self.leaving.begin();
    }

    /// Leaves the group: releases every lease and the membership entry, so other instances
    /// take the partitions at their next heartbeat rather than after the lease time.
    pub(crate) async fn leave(mut self) {
        self.set_pulling(std::iter::empty());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(self.leave_within, task).await.is_err() {
                tracing::warn!(
                    "leaving the consumer group took too long; its leases lapse instead"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn woken(load: &PartitionLoad) -> bool {
        load.drained.notified().now_or_never().is_some()
    }

    #[test]
    fn a_draining_partition_wakes_the_coordinator_when_its_last_delivery_settles() {
        let load = Arc::new(PartitionLoad::new(4));
        let (a, b) = (LoadGuard::new(&load, 2), LoadGuard::new(&load, 2));
        let other = LoadGuard::new(&load, 3);
        load.set_draining(2, true);
        drop(a);
        assert_eq!(load.get(2), 1);
        assert!(!woken(&load), "woken with a delivery still out");
        drop(other);
        assert!(!woken(&load), "woken by a partition nobody waits on");
        drop(b);
        assert_eq!(load.get(2), 0);
        assert!(woken(&load), "not woken when the last delivery settled");
    }

    #[test]
    fn a_partition_not_draining_wakes_nobody_and_unknown_partitions_are_ignored() {
        let load = Arc::new(PartitionLoad::new(2));
        load.set_draining(9, true);
        drop(LoadGuard::new(&load, 9));
        drop(LoadGuard::new(&load, 1));
        assert_eq!(load.get(9), 0);
        assert!(!woken(&load));
    }

    #[test]
    fn restart_requests_keep_one_epoch_per_partition_and_are_taken_once() {
        let restarts = Restarts::default();
        restarts.request(1, 4);
        restarts.request(1, 5);
        restarts.request(0, 2);
        assert!(restarts.wake.notified().now_or_never().is_some());
        assert_eq!(restarts.take(), BTreeMap::from([(0, 2), (1, 5)]));
        assert!(restarts.take().is_empty());
    }
}
