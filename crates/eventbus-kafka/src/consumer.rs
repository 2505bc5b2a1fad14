//! One consumer per subscription (group = consumer group id), with contiguous commits and
//! drain-before-release on rebalance.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventbus_core::ownership::{Ownership, OwnershipToken};
use eventbus_core::{
    BrokerPosition, Delivery, ErrorDetail, Headers, Message, Subscription, SubscriptionSpec,
    TransportError,
};
use futures_util::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};

use crate::commit::Committer;
use crate::config::KafkaConfig;
use crate::offsets::OffsetTracker;
use crate::transport::{blocking, kafka_error, LinkState};

/// How often a revocation checks whether the revoked partitions' messages are settled.
const DRAIN_POLL: Duration = Duration::from_millis(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message waiting for a local redelivery (nak'ed, or dropped unsettled).
struct Parked {
    due: Instant,
    message: Message,
    partition: i32,
    offset: i64,
}

/// State shared by the consumer, its rebalance callbacks and its deliveries.
struct Shared {
    tracker: Mutex<OffsetTracker>,
    parked: Mutex<Vec<Parked>>,
    drain_timeout: Duration,
    /// The partitions assigned now, by epoch: the dispatcher starts no job of one revoked
    /// or lost, and a revoke waits only for the jobs running.
    ownership: Arc<Ownership>,
    /// Held by each commit, from the committer thread or a revoke: a commit checks the
    /// ownership of its points under it, so an older commit never lands after a revoke's.
    commit_gate: Mutex<()>,
}

/// One commit's points, each with the assignment it was taken under.
type Points = Vec<(i32, i64, OwnershipToken)>;

impl Shared {
    /// Parks a message for a local redelivery, unless its partition is being given up: then
    /// the message only stops counting as busy, and the next owner delivers it (its offset
    /// stays uncommitted).
    fn park(&self, message: Message, partition: i32, offset: i64, delay: Duration) {
        let mut tracker = lock(&self.tracker);
        tracker.park(partition, offset);
        if !tracker.redelivers(partition) {
            return;
        }
        // Lock order: tracker, then parked (as in `take_due`).
        lock(&self.parked).push(Parked {
            due: Instant::now() + delay,
            message,
            partition,
            offset,
        });
    }

    /// Parked messages whose redelivery time has come, at most `max`.
    fn take_due(&self, now: Instant, max: usize) -> Vec<Parked> {
        let mut tracker = lock(&self.tracker);
        let mut parked = lock(&self.parked);
        let mut out = Vec::new();
        let mut i = 0;
        while i < parked.len() && out.len() < max {
            if !tracker.redelivers(parked[i].partition) {
                parked.swap_remove(i);
            } else if parked[i].due <= now {
                let p = parked.swap_remove(i);
                tracker.unpark(p.partition, p.offset);
                out.push(p);
            } else {
                i += 1;
            }
        }
        out
    }

    /// Gives `partitions` up: no job of theirs starts from now on (those queued are dropped
    /// and the next owner delivers them); unless the assignment was `lost`, waits (through
    /// `drain`, given a count of jobs still running) for the running ones to be settled and
    /// returns the commit points. A lost assignment is already another member's: nothing is
    /// waited for or committed (the broker would refuse the commit of a fenced generation).
    fn revoke(
        &self,
        partitions: &[i32],
        lost: bool,
        drain: impl FnOnce(&dyn Fn() -> usize),
    ) -> Vec<(i32, i64)> {
        // From here on, messages of these partitions are no longer parked here: parked and
        // later nak'ed ones go to the next owner (they stay uncommitted, so the next owner
        // starts at or before them).
        {
            let mut tracker = lock(&self.tracker);
            for p in partitions {
                tracker.begin_revoke(*p);
            }
            lock(&self.parked).retain(|p| !partitions.contains(&p.partition));
        }
        // Outside the tracker's lock: the dispatcher drops the queued jobs here, and each
        // dropped delivery settles through the tracker.
        for p in partitions {
            if let Ok(p) = u32::try_from(*p) {
                self.ownership.lose(p);
            }
        }
        if !lost {
            drain(&|| {
                partitions
                    .iter()
                    .filter_map(|p| u32::try_from(*p).ok())
                    .map(|p| self.ownership.running(p))
                    .sum()
            });
        }
        let mut t = lock(&self.tracker);
        let mut points = Vec::new();
        for p in partitions {
            if !lost {
                if let Some(point) = t.commit_point(*p) {
                    points.push((*p, point));
                }
            }
            t.revoke(*p);
        }
        points
    }

    /// The broker refused a commit (or it never got there): the points of `list` count as
    /// uncommitted again, so the next commit interval sends them even on an idle partition.
    fn commit_failed(&self, topic: &str, list: &TopicPartitionList, error: &KafkaError) {
        let points: Vec<(i32, i64)> = list
            .elements_for_topic(topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        {
            let mut t = lock(&self.tracker);
            for (p, o) in &points {
                t.commit_failed(*p, *o);
            }
        }
        tracing::warn!(%topic, %error, offsets = ?points, "offset commit failed; sent again at the next commit interval");
    }
}

/// Rebalance hooks: before partitions are released, wait for what was fetched from them to
/// be settled, then commit their completed offsets.
pub struct GroupContext {
    shared: Arc<Shared>,
    topic: Arc<str>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = list
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        // Lost (session timed out, fenced, poll interval exceeded): the broker already gave
        // the partitions to another member, which restarts at the last commit.
        let lost = consumer.assignment_lost();
        if lost {
            tracing::warn!(topic = %self.topic, ?partitions,
                "assignment lost (the group moved on without this member): its queued work is dropped, nothing is committed");
        }
        let deadline = Instant::now() + self.shared.drain_timeout;
        let topic = &self.topic;
        let points = self.shared.revoke(&partitions, lost, |running| {
            blocking(|| loop {
                let n = running();
                if n == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(topic = %topic, running = n, "handlers of revoked partitions still running at the drain deadline; their messages will be redelivered to the next owner");
                    break;
                }
                std::thread::sleep(DRAIN_POLL);
            })
        });
        let mut commits = TopicPartitionList::new();
        for (p, point) in points {
            let _ = commits.add_partition_offset(&self.topic, p, Offset::Offset(point));
        }
        if commits.count() > 0 {
            // After the committer's commit in progress, if any; one waiting there finds
            // these partitions no longer owned and leaves them out.
            let _gate = lock(&self.shared.commit_gate);
            if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                tracing::warn!(topic = %self.topic, error = %e, "commit on revoke failed");
            }
        }
        tracing::debug!(topic = %self.topic, ?partitions, "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut t = lock(&self.shared.tracker);
            for e in list.elements_for_topic(&self.topic) {
                t.assign(e.partition());
                if let Ok(p) = u32::try_from(e.partition()) {
                    self.shared.ownership.claim(p, None);
                }
            }
            tracing::debug!(topic = %self.topic, partitions = list.count(), "partitions assigned");
        }
    }
}

/// A member of a Kafka consumer group, read by one fetcher.
pub struct KafkaSubscription {
    /// Shared with the committer thread.
    consumer: Arc<StreamConsumer<GroupContext>>,
    /// Commits off the fetcher, so a slow group coordinator never stops fetching.
    committer: Committer<Points>,
    shared: Arc<Shared>,
    topic: Arc<str>,
    commit_interval: Duration,
    last_commit: Instant,
    /// The transport's closed flag: once set, `fetch` returns `Closed`.
    transport_closed: Arc<AtomicBool>,
    /// The transport's reachability: a record received shows the brokers answer again.
    link: LinkState,
}

impl KafkaSubscription {
    pub(crate) fn create(
        config: &KafkaConfig,
        spec: SubscriptionSpec,
        transport_closed: Arc<AtomicBool>,
        link: LinkState,
    ) -> Result<Self, TransportError> {
        let c = &config.consumer;
        let mut cc = config.base();
        cc.set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                c.session_timeout.as_millis().to_string(),
            )
            .set(
                "fetch.wait.max.ms",
                c.fetch_wait.as_millis().max(1).to_string(),
            )
            .set(
                "queued.max.messages.kbytes",
                c.prefetch_kbytes.max(1).to_string(),
            );
        for (k, v) in &c.extra {
            cc.set(k, v);
        }
        let shared = Arc::new(Shared {
            tracker: Mutex::new(OffsetTracker::new()),
            parked: Mutex::new(Vec::new()),
            drain_timeout: c.drain_timeout,
            ownership: Ownership::new(),
            commit_gate: Mutex::new(()),
        });
        let topic: Arc<str> = Arc::from(spec.topic.as_str());
        let consumer: StreamConsumer<GroupContext> = cc
            .create_with_context(GroupContext {
                shared: shared.clone(),
                topic: topic.clone(),
            })
            .map_err(|e| TransportError::Other(format!("consumer configuration: {e}").into()))?;
        consumer
            .subscribe(&[&spec.topic])
            .map_err(|e| kafka_error(&format!("subscribe to {}", spec.topic), &e))?;
        let consumer = Arc::new(consumer);
        let committer = {
            let (consumer, shared, t) = (consumer.clone(), shared.clone(), topic.clone());
            Committer::start(&spec.topic, move |points: Points| {
                let _gate = lock(&shared.commit_gate);
                // Points of partitions given up since: the revoke committed them already.
                let mut list = TopicPartitionList::new();
                for (p, offset, owner) in &points {
                    if owner.is_current() {
                        let _ = list.add_partition_offset(&t, *p, Offset::Offset(*offset));
                    }
                }
                if list.count() > 0 {
                    if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                        shared.commit_failed(&t, &list, &e);
                    }
                }
            })
            .map_err(|e| {
                TransportError::Other(ErrorDetail::with_source(
                    "cannot start the consumer's commit thread".to_string(),
                    e,
                ))
            })?
        };
        Ok(Self {
            consumer,
            committer,
            shared,
            topic,
            commit_interval: c.commit_interval,
            last_commit: Instant::now(),
            transport_closed,
            link,
        })
    }

    /// `m` as a delivery, or `None` when its partition is no longer assigned (fetched before
    /// a revoke was served): the partition's next owner delivers it.
    fn delivery(&self, m: &BorrowedMessage<'_>) -> Option<KafkaDelivery> {
        let (partition, offset) = (m.partition(), m.offset());
        let owner = self.shared.ownership.token(u32::try_from(partition).ok()?);
        if !owner.is_current() {
            return None;
        }
        let mut headers = Headers::new();
        if let Some(h) = m.headers() {
            // Every value in one buffer; a valid UTF-8 value is not copied on the way.
            let bytes = h.iter().map(|x| x.value.map_or(0, <[u8]>::len)).sum();
            headers = Headers::with_capacity_for(h.count(), bytes);
            for header in h.iter() {
                let value = header
                    .value
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                headers.insert(header.key, value);
            }
        }
        lock(&self.shared.tracker).fetched(partition, offset);
        Some(KafkaDelivery {
            message: Message::new(
                self.topic.clone(),
                Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                Arc::new(headers),
                m.key().map(Bytes::copy_from_slice),
                Some(BrokerPosition {
                    partition: u32::try_from(partition).ok(),
                    offset: u64::try_from(offset).unwrap_or(0),
                }),
                1,
            ),
            partition,
            offset,
            shared: self.shared.clone(),
            settled: false,
            owner,
        })
    }

    /// Parked messages whose redelivery time has come.
    fn due_redeliveries(&self, max: usize) -> Vec<KafkaDelivery> {
        self.shared
            .take_due(Instant::now(), max)
            .into_iter()
            .map(|p| {
                let m = &p.message;
                KafkaDelivery {
                    message: Message::new(
                        self.topic.clone(),
                        m.payload().clone(),
                        Arc::new(m.headers().clone()),
                        m.key().map(Bytes::copy_from_slice),
                        m.position(),
                        m.delivery_count().saturating_add(1),
                    ),
                    partition: p.partition,
                    offset: p.offset,
                    shared: self.shared.clone(),
                    settled: false,
                    owner: self
                        .shared
                        .ownership
                        .token(u32::try_from(p.partition).unwrap_or(u32::MAX)),
                }
            })
            .collect()
    }

    /// Commits the points that moved; a refused one is sent again next time. While
    /// fetching, the commit goes to the committer thread (synchronous there, so a refusal
    /// is seen; the fetcher does not wait for the coordinator); if a commit is already
    /// waiting there, the points stay pending for the next interval. On close, here and
    /// synchronously (after the committer stopped, so no older commit lands after it).
    fn commit(&mut self, closing: bool) {
        let commits = lock(&self.shared.tracker).take_commits();
        self.last_commit = Instant::now();
        if commits.is_empty() {
            return;
        }
        if closing {
            let mut list = TopicPartitionList::new();
            for (p, offset) in commits {
                let _ = list.add_partition_offset(&self.topic, p, Offset::Offset(offset));
            }
            if let Err(e) = blocking(|| self.consumer.commit(&list, CommitMode::Sync)) {
                self.shared.commit_failed(&self.topic, &list, &e);
            }
            return;
        }
        let points: Points = commits
            .into_iter()
            .map(|(p, offset)| {
                let owner = self
                    .shared
                    .ownership
                    .token(u32::try_from(p).unwrap_or(u32::MAX));
                (p, offset, owner)
            })
            .collect();
        if let Err(points) = self.committer.send(points) {
            let mut t = lock(&self.shared.tracker);
            for (p, offset, _) in points {
                t.commit_failed(p, offset);
            }
        }
    }
}

impl Subscription for KafkaSubscription {
    type Delivery = KafkaDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<KafkaDelivery>, TransportError> {
        if self.transport_closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if self.last_commit.elapsed() >= self.commit_interval {
            self.commit(false);
        }
        let mut batch = self.due_redeliveries(max);
        if !batch.is_empty() {
            return Ok(batch);
        }
        let first = match tokio::time::timeout(max_wait, self.consumer.recv()).await {
            Err(_) => return Ok(batch),
            Ok(Err(e)) => return Err(kafka_error("consume", &e)),
            Ok(Ok(m)) => self.delivery(&m),
        };
        // A consume-only bus learns here that its brokers are back (no delivery reports).
        self.link.answered();
        batch.extend(first);
        while batch.len() < max {
            let next = match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => self.delivery(&m),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "consume error after a batch");
                    break;
                }
                None => break,
            };
            batch.extend(next);
        }
        Ok(batch)
    }

    fn ownership(&self) -> Option<Arc<Ownership>> {
        Some(self.shared.ownership.clone())
    }

    fn assigned(&self) -> Option<Vec<u32>> {
        // librdkafka's local view of the assignment: no broker round trip.
        self.consumer.assignment().ok().map(|list| {
            list.elements_for_topic(&self.topic)
                .iter()
                .filter_map(|e| u32::try_from(e.partition()).ok())
                .collect()
        })
    }

    async fn close(mut self) -> Result<(), TransportError> {
        // The last commit, leaving the group (which runs the revoke hook) and closing the
        // client all wait for the group coordinator, with no deadline of librdkafka's own
        // short of `socket.timeout.ms` per request. They run on a thread of their own; the
        // fetcher waits for it at most `drain_timeout`, so close and unsubscribe stay bounded
        // when the coordinator does not answer (the consumer then goes on leaving in the
        // background, and the group moves its partitions after the session timeout).
        let wait = self.shared.drain_timeout;
        let topic = self.topic.clone();
        let (left, leaving) = tokio::sync::oneshot::channel();
        let closing = std::thread::Builder::new()
            .name("eventbus-kafka-close".into())
            .spawn(move || {
                // The committer's last commit first, so no older one lands after ours.
                self.committer.stop();
                self.commit(true);
                self.consumer.unsubscribe();
                drop(self);
                let _ = left.send(());
            });
        if let Err(e) = closing {
            return Err(TransportError::Other(ErrorDetail::with_source(
                "cannot start a thread to close the consumer".to_string(),
                e,
            )));
        }
        match tokio::time::timeout(wait, leaving).await {
            Ok(_) => Ok(()),
            Err(_) => {
                tracing::warn!(%topic, ?wait, "the consumer did not leave its group in time (coordinator unreachable?); it goes on leaving in the background");
                Err(TransportError::Timeout(
                    format!("the consumer of {topic} did not leave its group within {wait:?}")
                        .into(),
                ))
            }
        }
    }
}

/// One Kafka record. Acking marks its offset complete; a nak (or dropping it unsettled)
/// parks it for a local redelivery, its offset still uncommitted.
pub struct KafkaDelivery {
    message: Message,
    partition: i32,
    offset: i64,
    shared: Arc<Shared>,
    settled: bool,
    /// The assignment of its partition it was fetched under.
    owner: OwnershipToken,
}

impl KafkaDelivery {
    fn complete(&mut self) {
        self.settled = true;
        lock(&self.shared.tracker).settled(self.partition, self.offset);
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        // Of an assignment that ended: the partition's next owner (or this member's next
        // assignment, from the committed offset) delivers it; parking it here would deliver
        // it twice.
        if !self.settled && self.owner.is_current() {
            self.shared.park(
                self.message.clone(),
                self.partition,
                self.offset,
                Duration::ZERO,
            );
        }
    }
}

impl Delivery for KafkaDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.complete();
        Ok(())
    }

    async fn nak(mut self, delay: Duration) -> Result<(), TransportError> {
        self.settled = true;
        if self.owner.is_current() {
            self.shared
                .park(self.message.clone(), self.partition, self.offset, delay);
        }
        Ok(())
    }

    async fn term(mut self) -> Result<(), TransportError> {
        self.complete();
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        // Kafka has no per-message deadline; liveness is the consumer's poll loop.
        Ok(())
    }

    fn owner(&self) -> Option<&OwnershipToken> {
        Some(&self.owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            tracker: Mutex::new(OffsetTracker::new()),
            parked: Mutex::new(Vec::new()),
            drain_timeout: Duration::from_secs(1),
            ownership: Ownership::new(),
            commit_gate: Mutex::new(()),
        }
    }

    fn message(offset: i64) -> Message {
        Message::new(
            Arc::from("t"),
            Bytes::from_static(b"x"),
            Arc::new(Headers::new()),
            None,
            Some(BrokerPosition {
                partition: Some(0),
                offset: offset as u64,
            }),
            1,
        )
    }

    fn assign(s: &Shared, partitions: &[i32]) {
        let mut t = lock(&s.tracker);
        for p in partitions {
            t.assign(*p);
            s.ownership.claim(*p as u32, None);
        }
    }

    /// A revoke waits for the running handler only: the queued message of the partition never
    /// starts (its token is stale) and is left to the next owner, and a nak during the drain
    /// does not park it for a local redelivery.
    #[test]
    fn a_revoke_waits_for_running_jobs_only_and_leaves_the_rest_to_the_next_owner() {
        let s = shared();
        assign(&s, &[0, 1]);
        {
            let mut t = lock(&s.tracker);
            t.fetched(0, 5);
            t.fetched(0, 6);
            t.fetched(1, 9);
        }
        let running = s.ownership.token(0).begin().expect("owned");
        let queued = s.ownership.token(0);
        let points = s.revoke(&[0], false, |running_now| {
            assert_eq!(running_now(), 1, "offset 5 is being handled, 6 only queued");
            assert!(queued.begin().is_none(), "the queued one must not start");
            s.park(message(5), 0, 5, Duration::ZERO); // nak during the drain
            drop(running);
            assert_eq!(running_now(), 0);
        });
        assert_eq!(points, vec![(0, 5)], "the next owner starts at offset 5");
        assert!(
            s.take_due(Instant::now() + Duration::from_secs(60), 10)
                .is_empty(),
            "no redelivery of a partition this member no longer owns"
        );
        // Partition 1 is still owned: its nak'ed message is redelivered here.
        s.park(message(9), 1, 9, Duration::ZERO);
        let due = s.take_due(Instant::now(), 10);
        assert_eq!(due.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![9]);
    }

    /// A lost assignment is another member's already: nothing is waited for or committed.
    #[test]
    fn a_lost_assignment_waits_for_nothing_and_commits_nothing() {
        let s = shared();
        assign(&s, &[3]);
        lock(&s.tracker).fetched(3, 7);
        let token = s.ownership.token(3);
        let _running = token.begin().expect("owned");
        let points = s.revoke(&[3], true, |_| {
            panic!("a lost assignment waits for nothing")
        });
        assert!(points.is_empty(), "{points:?}");
        assert!(!token.is_current());
    }

    /// A message parked before a revoke and due after it is not handed out either.
    #[test]
    fn parked_messages_of_revoked_partitions_are_purged() {
        let s = shared();
        assign(&s, &[2]);
        lock(&s.tracker).fetched(2, 1);
        s.park(message(1), 2, 1, Duration::from_secs(30));
        let points = s.revoke(&[2], false, |running| assert_eq!(running(), 0));
        assert_eq!(points, vec![(2, 1)]);
        assert!(s
            .take_due(Instant::now() + Duration::from_secs(60), 10)
            .is_empty());
    }
}
