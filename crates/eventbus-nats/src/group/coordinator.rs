//! The coordinator task of one subscription: membership, leases, consumers, rebalancing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::assignment::owned_partitions;
use super::{Leaving, Membership, Owned, PartitionLoad, Restarts};
use crate::naming::{
    consumer_epoch, consumer_name, lease_key, member_key, member_prefix, partition_subject,
};
use eventbus_core::ownership::Ownership;
use eventbus_core::TransportError;

/// What a subscription's coordinator works with.
pub(crate) struct GroupSpec {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) instance: String,
    pub(crate) partitions: u16,
    pub(crate) heartbeat: Duration,
    pub(crate) lease_ttl: Duration,
    /// Every partition consumer's settings; name, filter and start are set per partition.
    pub(crate) consumer: pull::Config,
}

/// The key-value bucket of a topic's groups.
pub(crate) struct GroupBucket {
    pub(crate) name: String,
    pub(crate) store: kv::Store,
    /// The stream under the bucket.
    pub(crate) stream: Stream,
    /// Its age limit: the lease time in force.
    pub(crate) lease_ttl: Duration,
}

/// A lease this instance holds.
struct Lease {
    revision: u64,
    /// Past this instant the lease may have lapsed on the server: stop pulling before it.
    valid_until: Instant,
    /// Being given up: no longer pulled, released once its deliveries are settled.
    revoking: bool,
    /// Deliveries were lost on the way to the fetcher: no longer pulled, its consumer is
    /// restarted at the ack floor once its deliveries are settled.
    restarting: bool,
    owned: Owned,
}

struct Coordinator {
    spec: GroupSpec,
    kv: kv::Store,
    /// The bucket's name and its stream, for listing and purging member subjects.
    bucket: String,
    bucket_stream: Stream,
    /// The topic's stream, for the partition consumers.
    stream: Stream,
    load: Arc<PartitionLoad>,
    pulling: Arc<Mutex<BTreeSet<u16>>>,
    restarts: Arc<Restarts>,
    leaving: Arc<Leaving>,
    /// This instance is off the member list (it began leaving).
    unlisted: bool,
    assignment: watch::Sender<Arc<Vec<Owned>>>,
    held: BTreeMap<u16, Lease>,
    members: Vec<String>,
    epoch: u64,
    /// The value of this subscription's leases: its instance name and a nonce of this join,
    /// so a lease read back is known to be this subscription's, not another's of the same
    /// instance name.
    lease_value: Bytes,
    /// What the dispatcher checks before it starts a job: claimed with each lease's
    /// deadline, extended on renewal, lost with the lease.
    ownership: Arc<Ownership>,
}

/// Joins `spec.group` on `stream` with the bucket `kv`: announces this instance and takes the
/// partitions that are free and its own, then leaves the rest to the coordinator task.
pub(crate) async fn join(
    spec: GroupSpec,
    bucket: GroupBucket,
    stream: Stream,
    ownership: Arc<Ownership>,
) -> Membership {
    let load = Arc::new(PartitionLoad::new(spec.partitions));
    let pulling = Arc::new(Mutex::new(BTreeSet::new()));
    let restarts = Arc::new(Restarts::default());
    let leaving = Arc::new(Leaving::default());
    let (assignment, receiver) = watch::channel(Arc::new(Vec::new()));
    let (stop, stopped) = oneshot::channel();
    let leave_within = spec.lease_ttl;
    let lease_value = Bytes::from(format!(
        "{} {}",
        spec.instance,
        eventbus_core::new_event_id()
    ));
    let mut coordinator = Coordinator {
        spec,
        kv: bucket.store,
        bucket: bucket.name,
        bucket_stream: bucket.stream,
        stream,
        load: load.clone(),
        pulling: pulling.clone(),
        restarts: restarts.clone(),
        leaving: leaving.clone(),
        unlisted: false,
        assignment,
        held: BTreeMap::new(),
        lease_value,
        members: Vec::new(),
        epoch: 0,
        ownership,
    };
    coordinator.tick().await;
    let task = tokio::spawn(coordinator.run(stopped));
    Membership {
        assignment: receiver,
        load,
        pulling,
        restarts,
        leaving,
        stop: Some(stop),
        task: Some(task),
        leave_within,
    }
}

fn provisioning(text: String) -> TransportError {
    TransportError::Provisioning(text.into())
}

impl Coordinator {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        // The first tick ran in `join`.
        let start = Instant::now() + self.spec.heartbeat;
        let mut ticks = tokio::time::interval_at(start, self.spec.heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Besides the heartbeat: a restart asked for, or a partition waited on settled.
        let (restarts, load, leaving) = (
            self.restarts.clone(),
            self.load.clone(),
            self.leaving.clone(),
        );
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = ticks.tick() => self.tick().await,
                _ = restarts.wake.notified() => self.tick().await,
                _ = load.drained.notified() => self.tick().await,
                _ = leaving.wake.notified() => self.tick().await,
            }
        }
        self.leave().await;
    }

    async fn tick(&mut self) {
        if self.leaving.is_set() {
            return self.tick_leaving().await;
        }
        self.announce().await;
        self.renew().await;
        self.take_restarts();
        let mine = owned_partitions(&self.members, &self.spec.instance, self.spec.partitions);
        for (p, lease) in self.held.iter_mut() {
            if !mine.contains(p) && !lease.revoking {
                tracing::info!(group = %self.spec.group, partition = p, "giving the partition up");
                lease.revoking = true;
                self.load.set_draining(*p, true);
            }
        }
        self.publish();
        self.release_finished().await;
        if self.restart_finished().await {
            self.publish();
        }
        // Taking partitions stops when the heartbeat is spent, so the next renewal is on time.
        let budget = Instant::now() + self.spec.heartbeat;
        for p in mine {
            if Instant::now() >= budget {
                break;
            }
            if !self.held.contains_key(&p) {
                self.acquire(p).await;
                self.publish();
            }
        }
    }

    /// A tick once the subscription stopped fetching: off the member list (so the others
    /// take the partitions as theirs), nothing taken, every partition given up and released
    /// as soon as what was dispatched of it is settled; the leases not yet released are
    /// still renewed meanwhile.
    async fn tick_leaving(&mut self) {
        if !self.unlisted {
            self.unlisted = self.leave_member_list().await;
        }
        self.renew().await;
        for (p, lease) in self.held.iter_mut() {
            if !lease.revoking {
                lease.revoking = true;
                self.load.set_draining(*p, true);
            }
        }
        self.publish();
        self.release_finished().await;
    }

    /// Renews this instance's membership entry and reads the group's members.
    async fn announce(&mut self) {
        let me = &self.spec.instance;
        let put = self
            .kv
            .put(member_key(&self.spec.group, me), Bytes::from(me.clone()));
        match tokio::time::timeout(self.spec.heartbeat, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(group = %self.spec.group, error = %e, "cannot renew group membership");
                return;
            }
            Err(_) => {
                tracing::warn!(group = %self.spec.group, "renewing group membership timed out");
                return;
            }
        }
        // The member subjects present, read from the bucket's stream info: one request, no
        // consumer. A member that left purged its subject; one that died lapses with it.
        let prefix = format!("$KV.{}.{}", self.bucket, member_prefix(&self.spec.group));
        let list = async {
            let mut members = Vec::new();
            let mut subjects = self
                .bucket_stream
                .info_with_subjects(format!("{prefix}>"))
                .await
                .map_err(|e| e.to_string())?;
            while let Some(subject) = subjects.next().await {
                let (subject, _) = subject.map_err(|e| e.to_string())?;
                if let Some(id) = subject.strip_prefix(&prefix) {
                    members.push(id.to_string());
                }
            }
            Ok::<_, String>(members)
        };
        match tokio::time::timeout(self.spec.heartbeat, list).await {
            Ok(Ok(members)) => self.members = members,
            // The assignment is computed from the last list read: it may move partitions.
            Ok(Err(e)) => tracing::warn!(group = %self.spec.group, error = %e,
                "cannot list the group's members; keeping the last list"),
            Err(_) => tracing::warn!(group = %self.spec.group,
                "listing the group's members timed out; keeping the last list"),
        }
    }

    /// Renews every lease held, all at once and each within a heartbeat; a lease taken over,
    /// or one not renewed in time, is dropped at once.
    async fn renew(&mut self) {
        let sent = Instant::now();
        let value = self.lease_value.clone();
        let (kv, group, heartbeat) = (&self.kv, &self.spec.group, self.spec.heartbeat);
        let renewals = self.held.iter().map(|(p, lease)| {
            let key = lease_key(group, *p);
            let (value, revision, p) = (value.clone(), lease.revision, *p);
            async move {
                let update = kv.update(&key, value, revision);
                (p, tokio::time::timeout(heartbeat, update).await)
            }
        });
        let results = futures_util::future::join_all(renewals).await;
        let now = Instant::now();
        let mut refused = Vec::new();
        for (p, result) in results {
            let Some(lease) = self.held.get_mut(&p) else {
                continue;
            };
            let lost = match result {
                Ok(Ok(revision)) => {
                    lease.revision = revision;
                    lease.valid_until = sent + self.spec.lease_ttl - self.spec.heartbeat;
                    self.ownership
                        .extend(&lease.owned.token, lease.valid_until.into_std());
                    false
                }
                Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    refused.push(p);
                    false
                }
                Ok(Err(e)) => {
                    tracing::warn!(group = %self.spec.group, partition = p, error = %e, "cannot renew a partition lease");
                    now >= lease.valid_until
                }
                Err(_) => {
                    tracing::warn!(group = %self.spec.group, partition = p, "renewing a partition lease timed out");
                    now >= lease.valid_until
                }
            };
            if lost {
                self.lost(p);
            }
        }
        for p in refused {
            if !self.reclaim(p).await {
                self.lost(p);
            }
        }
    }

    /// Renews the lease of `p` alone, for a restart: its new revision and deadline, or
    /// `None` when it could not be renewed now (then it is lost if provably another's, or
    /// tried again at the next heartbeat).
    async fn renew_one(&mut self, p: u16) -> Option<(u64, Instant)> {
        let revision = self.held.get(&p)?.revision;
        let key = lease_key(&self.spec.group, p);
        let sent = Instant::now();
        let update = self.kv.update(&key, self.lease_value.clone(), revision);
        let renewed = match tokio::time::timeout(self.spec.heartbeat, update).await {
            Ok(Ok(revision)) => revision,
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                if !self.reclaim(p).await {
                    self.lost(p);
                }
                return None;
            }
            _ => return None,
        };
        let lease = self.held.get_mut(&p)?;
        lease.revision = renewed;
        lease.valid_until = sent + self.spec.lease_ttl - self.spec.heartbeat;
        self.ownership
            .extend(&lease.owned.token, lease.valid_until.into_std());
        Some((renewed, lease.valid_until))
    }

    /// The lease of `p` is gone: stop everything of the partition at once.
    fn lost(&mut self, p: u16) {
        tracing::warn!(group = %self.spec.group, partition = p,
            "partition lease lost (lapsed or taken over): no longer pulling it");
        self.held.remove(&p);
        self.load.set_draining(p, false);
        // Its queued jobs never start here: the new owner may be on them already.
        self.ownership.lose(u32::from(p));
    }

    /// A renewal of `p` was refused for its revision: an earlier renewal may have been
    /// applied with its reply lost (a timeout). Reads the lease back; if it still holds this
    /// subscription's value, renews it at the revision found and keeps it. False: lost.
    async fn reclaim(&mut self, p: u16) -> bool {
        let key = lease_key(&self.spec.group, p);
        let heartbeat = self.spec.heartbeat;
        let entry = match tokio::time::timeout(heartbeat, self.kv.entry(&key)).await {
            Ok(Ok(Some(entry))) if entry.value == self.lease_value => entry,
            // Another's, deleted, lapsed, or unreadable now: not provably ours.
            _ => return false,
        };
        let sent = Instant::now();
        let update = self
            .kv
            .update(&key, self.lease_value.clone(), entry.revision);
        let Ok(Ok(revision)) = tokio::time::timeout(heartbeat, update).await else {
            return false;
        };
        let Some(lease) = self.held.get_mut(&p) else {
            return false;
        };
        lease.revision = revision;
        lease.valid_until = sent + self.spec.lease_ttl - heartbeat;
        self.ownership
            .extend(&lease.owned.token, lease.valid_until.into_std());
        tracing::info!(group = %self.spec.group, partition = p,
            "a lease renewal was applied though its reply was lost; keeping the lease");
        true
    }

    /// Marks the partitions the fetcher asked to restart, if they are still held under the
    /// epoch it pulled them with.
    fn take_restarts(&mut self) {
        for (p, epoch) in self.restarts.take() {
            let Some(lease) = self.held.get_mut(&p) else {
                continue;
            };
            if lease.owned.epoch == epoch && !lease.revoking && !lease.restarting {
                lease.restarting = true;
                self.load.set_draining(p, true);
            }
        }
    }

    /// Restarts, at their ack floor, the consumers of the partitions marked for it whose
    /// deliveries were all settled. True if any was restarted.
    async fn restart_finished(&mut self) -> bool {
        let due = self.settled(|l| l.restarting);
        let mut any = false;
        for p in due {
            // A renewal first: the lease write's revision proves the partition is still ours
            // as its new consumer is made and the old one deleted (a stale owner asking for a
            // restart finds out here that its lease is gone, and deletes nothing).
            let Some((revision, valid_until)) = self.renew_one(p).await else {
                continue;
            };
            match self.ready_owned(p, revision, valid_until).await {
                Ok(owned) => {
                    if let Some(lease) = self.held.get_mut(&p) {
                        lease.restarting = false;
                        lease.owned = owned;
                        self.load.set_draining(p, false);
                        any = true;
                    }
                }
                Err(e) => tracing::warn!(group = %self.spec.group, partition = p, error = %e,
                    "cannot restart the partition's consumer; trying again"),
            }
        }
        any
    }

    /// Tells the fetcher what to pull: held leases not being given up or restarted.
    fn publish(&self) {
        let owned: Vec<Owned> = self
            .held
            .values()
            .filter(|l| !l.revoking && !l.restarting)
            .map(|l| l.owned.clone())
            .collect();
        self.assignment.send_if_modified(|current| {
            let same = current.len() == owned.len()
                && current
                    .iter()
                    .zip(&owned)
                    .all(|(a, b)| a.partition == b.partition && a.epoch == b.epoch);
            if !same {
                *current = Arc::new(owned);
            }
            !same
        });
    }

    /// The held partitions `marked` whose fetcher no longer pulls them and whose deliveries
    /// were all settled.
    fn settled(&self, marked: impl Fn(&Lease) -> bool) -> Vec<u16> {
        let pulling = self
            .pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.held
            .iter()
            .filter(|(p, l)| marked(l) && !pulling.contains(p) && self.load.get(**p) == 0)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Releases the leases being given up whose partitions are no longer pulled and whose
    /// deliveries were all settled.
    async fn release_finished(&mut self) {
        let done = self.settled(|l| l.revoking);
        for p in done {
            if let Some(lease) = self.held.remove(&p) {
                self.load.set_draining(p, false);
                self.ownership.lose(u32::from(p));
                self.release(p, lease.revision).await;
            }
        }
    }

    async fn release(&self, partition: u16, revision: u64) {
        let key = lease_key(&self.spec.group, partition);
        let delete = self.kv.delete_expect_revision(&key, Some(revision));
        match tokio::time::timeout(self.spec.heartbeat, delete).await {
            Ok(Ok(())) => {
                tracing::info!(group = %self.spec.group, partition, "partition released")
            }
            Ok(Err(e)) => tracing::warn!(group = %self.spec.group, partition, error = %e,
                "releasing a lease failed; it lapses instead"),
            Err(_) => tracing::warn!(group = %self.spec.group, partition,
                "releasing a lease timed out; it lapses instead"),
        }
    }

    /// Takes `partition` if its lease is free, and readies its consumer.
    async fn acquire(&mut self, partition: u16) {
        let key = lease_key(&self.spec.group, partition);
        let sent = Instant::now();
        let create = self.kv.create(&key, self.lease_value.clone());
        let revision = match tokio::time::timeout(self.spec.heartbeat, create).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => return,
            Ok(Err(e)) => {
                tracing::warn!(group = %self.spec.group, partition, error = %e,
                    "cannot take the partition's lease; trying again at the next heartbeat");
                return;
            }
            // Taken or not, unknown: if it was, it lapses unrenewed.
            Err(_) => return,
        };
        let valid_until = sent + self.spec.lease_ttl - self.spec.heartbeat;
        match self.ready_owned(partition, revision, valid_until).await {
            Ok(owned) => {
                self.load.set_draining(partition, false);
                tracing::info!(group = %self.spec.group, partition, "partition taken");
                self.held.insert(
                    partition,
                    Lease {
                        revision,
                        valid_until,
                        revoking: false,
                        restarting: false,
                        owned,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(group = %self.spec.group, partition, error = %e, "cannot ready the partition's consumer");
                self.release(partition, revision).await;
            }
        }
    }

    /// The partition's consumer readied (within a heartbeat) under a new epoch, proved by
    /// the lease write of revision `revision`, owned until `valid_until` unless the lease is
    /// renewed. The consumers of earlier epochs are deleted once the new one exists.
    async fn ready_owned(
        &mut self,
        partition: u16,
        revision: u64,
        valid_until: Instant,
    ) -> Result<Owned, TransportError> {
        let ready = tokio::time::timeout(
            self.spec.heartbeat,
            self.ready_consumer(partition, revision),
        );
        let (consumer, earlier) = ready
            .await
            .unwrap_or_else(|_| Err(TransportError::Timeout("readying the consumer".into())))?;
        self.delete_consumers(partition, earlier).await;
        self.epoch += 1;
        let token = self
            .ownership
            .claim(u32::from(partition), Some(valid_until.into_std()));
        Ok(Owned {
            partition,
            epoch: self.epoch,
            consumer,
            token,
        })
    }

    /// A consumer of its own for the partition's new owner, named for the epoch `epoch`,
    /// and the names of the partition's earlier consumers. It starts after the highest ack
    /// floor among the earlier ones (none: the group is new there, so from the start), so
    /// what a previous owner left unsettled (it crashed or lost its lease) comes again first,
    /// in order, instead of after the ack wait behind later events of its aggregates. It is
    /// created *before* the earlier ones are deleted: a failure or a crash in between loses no
    /// position (the next attempt finds them all and starts after the highest floor again).
    async fn ready_consumer(
        &self,
        partition: u16,
        epoch: u64,
    ) -> Result<(PullConsumer, Vec<String>), TransportError> {
        let group = &self.spec.group;
        let name = consumer_name(group, partition, epoch);
        let filter = partition_subject(&self.spec.topic, partition);
        let mut earlier = Vec::new();
        let mut names = self.stream.consumer_names();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| provisioning(format!("listing consumers: {e}")))?;
            if n != name && consumer_epoch(&n, group, partition).is_some() {
                earlier.push(n);
            }
        }
        let mut floor: Option<u64> = None;
        let mut unsettled = 0;
        for old in &earlier {
            let info = match self.stream.consumer_info(old).await {
                Ok(info) => info,
                // Deleted meanwhile (by another instance's cleanup): nothing to start from.
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => continue,
                Err(e) => return Err(provisioning(format!("consumer {old}: {e}"))),
            };
            let have = &info.config;
            if have.ack_policy != AckPolicy::Explicit {
                return Err(provisioning(format!(
                    "consumer {old} exists with ack policy {:?}; eventbus needs explicit acks",
                    have.ack_policy
                )));
            }
            if have.filter_subject != filter {
                return Err(provisioning(format!(
                    "consumer {old} filters {:?}, not {filter:?}",
                    have.filter_subject
                )));
            }
            unsettled += info.num_ack_pending;
            let f = info.ack_floor.stream_sequence;
            floor = Some(floor.map_or(f, |x| x.max(f)));
        }
        let start = match floor {
            None => DeliverPolicy::All,
            Some(f) => {
                if unsettled > 0 {
                    tracing::info!(group = %group, partition, unsettled, from = f + 1,
                        "the previous owner left deliveries unsettled: starting at its ack floor");
                }
                DeliverPolicy::ByStartSequence {
                    start_sequence: f + 1,
                }
            }
        };
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: filter,
            deliver_policy: start,
            ..self.spec.consumer.clone()
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| provisioning(format!("consumer {name}: {e}")))?;
        Ok((consumer, earlier))
    }

    /// Deletes a partition's consumers of earlier epochs (each within a heartbeat); one left
    /// over is deleted at the partition's next takeover.
    async fn delete_consumers(&self, partition: u16, names: Vec<String>) {
        for name in names {
            let delete = self.stream.delete_consumer(&name);
            match tokio::time::timeout(self.spec.heartbeat, delete).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(group = %self.spec.group, partition, consumer = %name, error = %e,
                    "cannot delete an earlier consumer of the partition; left for its next takeover")
                }
                Err(_) => tracing::warn!(group = %self.spec.group, partition, consumer = %name,
                    "deleting an earlier consumer of the partition timed out; left for its next takeover"),
            }
        }
    }

    /// Gives every partition up and leaves the membership list.
    async fn leave(&mut self) {
        self.assignment.send_replace(Arc::new(Vec::new()));
        let held = std::mem::take(&mut self.held);
        for p in held.keys() {
            self.ownership.lose(u32::from(*p));
        }
        futures_util::future::join_all(held.iter().map(|(p, l)| self.release(*p, l.revision)))
            .await;
        if !self.unlisted {
            self.leave_member_list().await;
        }
    }

    /// Takes this instance off the member list; false if that failed (the entry then lapses).
    async fn leave_member_list(&self) -> bool {
        // Purged, not deleted: a delete marker would keep this instance on the member list
        // (read from the subjects present) until it lapsed.
        let subject = format!(
            "$KV.{}.{}",
            self.bucket,
            member_key(&self.spec.group, &self.spec.instance)
        );
        let purge = async { self.bucket_stream.purge().filter(subject).await };
        let done = matches!(
            tokio::time::timeout(self.spec.heartbeat, purge).await,
            Ok(Ok(_))
        );
        if !done {
            tracing::warn!(group = %self.spec.group, "leaving the member list failed; the entry lapses instead");
        }
        done
    }
}
