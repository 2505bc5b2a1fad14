//! A consumer group member: pulls from the partitions its group hands it, through one fetcher.
//!
//! Deliveries lost on the way (a pull in flight when a cluster's consumer leader died, the
//! reply of a pull request whose inbox is gone) are seen as a jump in the consumer sequence,
//! which one puller sees contiguous, redeliveries included. The server would redeliver them
//! only after the ack wait, behind later events of their aggregates; so the fetcher stops
//! pulling that partition at once, dispatches nothing from it past the jump, and has the
//! coordinator restart its consumer at the ack floor once what was dispatched is settled.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use async_nats::Subject;
use eventbus_core::ownership::{Ownership, OwnershipToken};
use eventbus_core::{
    BrokerPosition, Delivery, ErrorDetail, Message, Subscription, SubscriptionSpec, TransportError,
};
use futures_util::{FutureExt, StreamExt};

use crate::group::{self, GroupSpec, LoadGuard, Membership};
use crate::provision::until_deadline;
use crate::transport::{headers_from, NatsTransport};

/// The pull stream of one owned partition.
struct Pulling {
    partition: u16,
    epoch: u64,
    /// Stamped on each delivery: its lease's epoch and deadline.
    token: OwnershipToken,
    messages: pull::Stream,
}

/// One member of a consumer group: pulls from the partitions whose leases its group's
/// coordinator holds (see [`crate::group`]), each through the group's durable consumer of
/// that partition, all read by the subscription's one fetcher.
pub struct NatsSubscription {
    /// Shared with every delivery, which acks through it.
    client: Arc<async_nats::Client>,
    topic: Arc<str>,
    pull_expires: Duration,
    membership: Option<Membership>,
    /// The partitions whose leases this instance holds, as the dispatcher checks them.
    ownership: Arc<Ownership>,
    pulling: Vec<Pulling>,
    /// Per owned partition: the epoch it is pulled under and the consumer sequence the next
    /// delivery must carry. At most one entry per partition of the topic.
    expected: BTreeMap<u16, (u64, u64)>,
    /// Partitions (with their epoch) held back for a restart: not pulled again until the
    /// coordinator hands them over under a new epoch.
    restarting: Vec<(u16, u64)>,
    /// Where the next look for a message starts, so no partition starves the others.
    turn: usize,
    /// A pull stream ended or could not start: look at the assignment again.
    dirty: bool,
}

impl NatsSubscription {
    pub(crate) async fn create(
        transport: &NatsTransport,
        spec: SubscriptionSpec,
        partitions: u16,
    ) -> Result<Self, TransportError> {
        let stream_name = transport.stream_name(&spec.topic);
        let js = transport.jetstream()?;
        let stream = until_deadline(
            &stream_name,
            transport.config.provision_timeout,
            |e: &GetStreamError| e.kind() == GetStreamErrorKind::Request,
            || js.get_stream(&stream_name),
        )
        .await
        .map_err(|e| TransportError::Provisioning(format!("stream {stream_name}: {e}").into()))?;
        let bucket = transport.group_bucket(&spec.topic).await?;
        let lease_ttl = bucket.lease_ttl;
        let config = &transport.config;
        let c = &config.consumer;
        let consumer = pull::Config {
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            // Retries and dead letters are the dispatcher's job: the server never gives up.
            max_deliver: -1,
            max_waiting: c.max_waiting,
            max_ack_pending: c.max_ack_pending,
            ..Default::default()
        };
        let instance = config
            .group
            .instance_id
            .clone()
            .unwrap_or_else(eventbus_core::new_event_id);
        let ownership = Ownership::new();
        let membership = group::join(
            GroupSpec {
                topic: spec.topic.clone(),
                group: spec.group,
                instance,
                partitions,
                heartbeat: config.group.heartbeat.min(lease_ttl / 3),
                lease_ttl,
                consumer,
            },
            bucket,
            stream,
            ownership.clone(),
        )
        .await;
        Ok(Self {
            client: Arc::new(transport.client.clone()),
            topic: Arc::from(spec.topic.as_str()),
            pull_expires: config.pull_expires,
            membership: Some(membership),
            ownership,
            pulling: Vec::new(),
            expected: BTreeMap::new(),
            restarting: Vec::new(),
            turn: 0,
            dirty: false,
        })
    }

    /// Pulls exactly the partitions the group hands this instance now: drops the streams of
    /// partitions given up (what they prefetched is redelivered to the next owner, which
    /// starts from the ack floor) and opens streams for partitions taken.
    async fn follow_assignment(&mut self, batch: usize) {
        let Some(membership) = self.membership.as_mut() else {
            return;
        };
        let owned = membership.assignment.borrow_and_update().clone();
        let current = |partition: u16, epoch: u64| {
            owned
                .iter()
                .any(|o| o.partition == partition && o.epoch == epoch)
        };
        self.pulling.retain(|p| current(p.partition, p.epoch));
        self.restarting.retain(|&(p, e)| current(p, e));
        self.expected.retain(|&p, &mut (e, _)| current(p, e));
        self.dirty = false;
        // Each stream keeps a share of the batch requested, so the prefetched total stays
        // about one batch however many partitions this instance owns.
        let per_stream = (batch / owned.len().max(1)).max(16);
        for o in owned.iter() {
            if self.pulling.iter().any(|p| p.partition == o.partition)
                || self.restarting.contains(&(o.partition, o.epoch))
            {
                continue;
            }
            // A partition taken (or restarted) under this epoch continues from what its
            // consumer had delivered when it was readied; one pulled before under the same
            // epoch, from where its last stream stopped.
            let delivered = o.consumer.cached_info().delivered.consumer_sequence;
            self.expected
                .entry(o.partition)
                .or_insert((o.epoch, delivered + 1));
            let started = o
                .consumer
                .stream()
                .max_messages_per_batch(per_stream)
                .expires(self.pull_expires)
                .messages()
                .await;
            match started {
                Ok(messages) => self.pulling.push(Pulling {
                    partition: o.partition,
                    epoch: o.epoch,
                    token: o.token.clone(),
                    messages,
                }),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, partition = o.partition, error = %e, "cannot pull from a partition; trying again");
                    self.dirty = true;
                }
            }
        }
        membership.set_pulling(self.pulling.iter().map(|p| p.partition));
    }

    /// `m`, just taken from `self.pulling[idx]`, as a delivery if it follows the last
    /// delivery of its partition. Its reply subject is parsed once, for both.
    fn accept(&mut self, idx: usize, m: jetstream::Message) -> Option<NatsDelivery> {
        let (partition, token) = (self.pulling[idx].partition, self.pulling[idx].token.clone());
        let info = m
            .info()
            .ok()
            .map(|i| (i.consumer_sequence, i.stream_sequence, i.delivered));
        if let Some((consumer_sequence, ..)) = info {
            if !self.admit(idx, consumer_sequence) {
                return None;
            }
        }
        Some(self.delivery(
            partition,
            token,
            m,
            info.map(|(_, stream, delivered)| (stream, delivered)),
        ))
    }

    /// Whether consumer sequence `seq` of `self.pulling[idx]` follows the last delivery of its
    /// partition. On a jump the message is dropped unacked, with the rest of the partition's
    /// pull stream, and the partition is held back for a restart at its ack floor.
    fn admit(&mut self, idx: usize, seq: u64) -> bool {
        let partition = self.pulling[idx].partition;
        let Some((_, next)) = self.expected.get_mut(&partition) else {
            return true;
        };
        if seq <= *next {
            // Contiguous, or behind: the server went back (a new consumer leader that had
            // not heard of the last deliveries) and sends again what followed, in order.
            *next = seq + 1;
            return true;
        }
        tracing::warn!(topic = %self.topic, partition, expected = *next, got = seq,
            "deliveries of the partition were lost on the way; restarting it at its ack floor");
        self.hold_for_restart(idx);
        false
    }

    /// Stops pulling `self.pulling[idx]` and has the coordinator ready its partition again
    /// (a new consumer at the ack floor, under a new epoch), once what was dispatched of it
    /// is settled — or drop it, if the lease turns out to be gone.
    fn hold_for_restart(&mut self, idx: usize) {
        let Pulling {
            partition, epoch, ..
        } = self.pulling.swap_remove(idx);
        self.restarting.push((partition, epoch));
        self.expected.remove(&partition);
        if let Some(m) = self.membership.as_ref() {
            m.set_pulling(self.pulling.iter().map(|p| p.partition));
            m.restart(partition, epoch);
        }
    }

    /// `m` as a delivery; `info` is its stream sequence and delivery count, if its reply
    /// subject had them.
    fn delivery(
        &self,
        partition: u16,
        token: OwnershipToken,
        mut m: jetstream::Message,
        info: Option<(u64, i64)>,
    ) -> NatsDelivery {
        let (position, delivered) = match info {
            Some((stream_sequence, delivered)) => (
                Some(BrokerPosition {
                    partition: Some(u32::from(partition)),
                    offset: stream_sequence,
                }),
                u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            ),
            None => (None, 1),
        };
        let message = Message::new(
            self.topic.clone(),
            m.message.payload.clone(),
            // Moved out, not copied: acking needs only the reply subject, and a queued
            // delivery then holds its headers once.
            Arc::new(headers_from(m.message.headers.take().as_ref())),
            None,
            position,
            delivered,
        );
        // The rest of the client's message (its context, subject and bookkeeping) is dropped
        // here: a queued delivery keeps the reply subject it acks to, and the message.
        NatsDelivery {
            reply: m.message.reply.take(),
            client: self.client.clone(),
            message,
            owner: token,
            _load: self
                .membership
                .as_ref()
                .map(|g| LoadGuard::new(&g.load, partition)),
        }
    }
}

/// What one look at the pull streams found.
// Lives on the stack for one move; boxing the message would allocate once per message.
#[allow(clippy::large_enum_variant)]
enum Next {
    Message(usize, jetstream::Message),
    Failed(usize, async_nats::jetstream::consumer::pull::MessagesError),
    Ended(usize),
}

/// The next message of any stream, looking at each in turn from `turn`.
fn poll_next(pulling: &mut [Pulling], turn: usize, cx: &mut std::task::Context<'_>) -> Poll<Next> {
    let n = pulling.len();
    for i in 0..n {
        let idx = (turn + i) % n;
        match pulling[idx].messages.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(m))) => return Poll::Ready(Next::Message(idx, m)),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Next::Failed(idx, e)),
            Poll::Ready(None) => return Poll::Ready(Next::Ended(idx)),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

impl Subscription for NatsSubscription {
    type Delivery = NatsDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<NatsDelivery>, TransportError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut batch = Vec::new();
        while batch.is_empty() {
            let changed = match self.membership.as_ref() {
                None => return Err(TransportError::Closed),
                Some(m) => m.assignment.has_changed().map_err(|_| {
                    TransportError::Unavailable("the consumer group's coordinator ended".into())
                })?,
            };
            if changed || self.dirty {
                self.follow_assignment(max).await;
            }
            let Some(membership) = self.membership.as_mut() else {
                return Err(TransportError::Closed);
            };
            let turn = self.turn;
            let pulling = &mut self.pulling;
            let next = tokio::select! {
                // A new assignment: follow it before taking more.
                r = membership.assignment.changed() => {
                    r.map_err(|_| TransportError::Unavailable(
                        "the consumer group's coordinator ended".into()))?;
                    // `changed` marked it seen: follow it on the next turn.
                    self.dirty = true;
                    continue;
                }
                next = poll_fn(|cx| poll_next(pulling, turn, cx)) => next,
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            };
            match next {
                Next::Message(idx, m) => {
                    self.turn = idx + 1;
                    batch.extend(self.accept(idx, m));
                }
                Next::Failed(idx, e) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind;
                    if matches!(
                        e.kind(),
                        MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders
                    ) {
                        // Another instance took the partition over and replaced its consumer
                        // with its own (this lease is gone then), or someone deleted it. Never
                        // pulled again under this epoch: the coordinator readies the partition
                        // anew if its lease is still ours, and drops it if not.
                        tracing::warn!(topic = %self.topic, partition = self.pulling[idx].partition,
                            error = %e, "the partition's consumer is gone; no longer pulling it");
                        self.hold_for_restart(idx);
                        continue;
                    }
                    // The stream reports and recovers (missed heartbeats across a
                    // reconnect); it is rebuilt only if it ends.
                    return Err(TransportError::Unavailable(ErrorDetail::with_source(
                        format!("pull: {e}"),
                        e,
                    )));
                }
                Next::Ended(idx) => {
                    self.pulling.swap_remove(idx);
                    self.dirty = true;
                }
            }
        }
        // Then whatever else is already here, from every partition, without waiting.
        let mut idle = 0;
        while batch.len() < max && idle < self.pulling.len() {
            let idx = self.turn % self.pulling.len();
            self.turn = idx + 1;
            match self.pulling[idx].messages.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    idle = 0;
                    batch.extend(self.accept(idx, m));
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(topic = %self.topic, error = %e, "pull stream error after a batch");
                    idle += 1;
                }
                Some(None) => {
                    self.pulling.swap_remove(idx);
                    self.dirty = true;
                    idle = 0;
                }
                None => idle += 1,
            }
        }
        Ok(batch)
    }

    async fn release_prefetched(&mut self) {
        // Stop pulling; what the streams prefetched stays unacked and goes to the next owner
        // of each partition, which restarts the partition's consumer at its ack floor.
        self.pulling.clear();
        if let Some(m) = self.membership.as_ref() {
            m.set_pulling(std::iter::empty());
            m.begin_leaving();
        }
    }

    fn ownership(&self) -> Option<Arc<Ownership>> {
        Some(self.ownership.clone())
    }

    fn assigned(&self) -> Option<Vec<u32>> {
        Some(
            self.pulling
                .iter()
                .map(|p| u32::from(p.partition))
                .collect(),
        )
    }

    async fn close(mut self) -> Result<(), TransportError> {
        self.pulling.clear();
        if let Some(m) = self.membership.take() {
            m.leave().await;
        }
        Ok(())
    }
}

/// One JetStream message. Unsettled, it is redelivered after the consumer's ack wait.
pub struct NatsDelivery {
    /// Where acks go (`$JS.ACK.…`); `None` for a message that did not come from JetStream.
    reply: Option<Subject>,
    client: Arc<async_nats::Client>,
    message: Message,
    /// The lease of its partition under which it was pulled.
    owner: OwnershipToken,
    /// Counts this delivery as out for its partition until it is settled or dropped.
    _load: Option<LoadGuard>,
}

fn ack_error(e: async_nats::Error) -> TransportError {
    TransportError::Unavailable(ErrorDetail::with_boxed_source(format!("ack: {e}"), e))
}

impl NatsDelivery {
    /// Sends `kind` to the message's reply subject, as the client's own `ack_with` does.
    async fn send(&self, kind: AckKind) -> Result<(), TransportError> {
        let Some(reply) = &self.reply else {
            return Err(TransportError::Unavailable(
                "ack: no reply subject, not a JetStream message".into(),
            ));
        };
        self.client
            .publish(reply.clone(), kind.into())
            .await
            .map_err(|e| ack_error(Box::new(e)))
    }
}

impl Delivery for NatsDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    async fn ack(self) -> Result<(), TransportError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(self, delay: Duration) -> Result<(), TransportError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.send(AckKind::Nak(delay)).await
    }

    async fn term(self) -> Result<(), TransportError> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        self.send(AckKind::Progress).await
    }

    fn owner(&self) -> Option<&OwnershipToken> {
        Some(&self.owner)
    }
}
