//! The small contract a backend implements: send with an ACK future, and a fetch loop
//! yielding deliveries that can be acked, nak'ed with a delay, terminated or kept alive.
//!
//! Everything else (windows, results, dispatching, retries, dead letters, dedup) lives in the
//! core and is the same for every backend. The traits are written against both brokers:
//! - NATS JetStream: a delivery is one JetStream message; `ack`/`nak(delay)`/`term`/
//!   `in_progress` map to the ack kinds of the same names.
//! - Kafka: a delivery is one record; `ack` marks its offset complete in a contiguous offset
//!   tracker (commits happen inside the transport, up to the highest contiguous offset),
//!   `nak` makes the transport redeliver from that offset, `in_progress` is a no-op, and a
//!   rebalance is handled inside the subscription, which waits for outstanding deliveries of
//!   revoked partitions before they are released.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use crate::error::TransportError;
use crate::message::{BrokerPosition, Message, OutgoingMessage};
use crate::ownership::{Ownership, OwnershipToken};

/// What the broker said about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Where it was stored, when the broker says.
    pub position: Option<BrokerPosition>,
    /// True when the broker recognised the event id and did not store it again.
    pub duplicate: bool,
}

/// What a backend can do; the conformance kit asserts according to these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Consumer groups keep per-aggregate order across instances (partitioned groups).
    pub partitioned_groups: bool,
    /// The broker itself drops a republished `event_id` and reports it as a duplicate.
    pub publish_dedup: bool,
    /// The client compresses batches on the wire itself (Kafka's `compression.type`): the bus
    /// then never compresses payloads, so nothing is compressed twice and other clients read
    /// plain payloads. Without it the bus's [`crate::Compression`] applies per message.
    pub native_compression: bool,
}

/// State of the connection to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected and usable.
    Connected,
    /// Lost; the client is reconnecting.
    Reconnecting,
    /// Not connected.
    Disconnected,
    /// Closed by `close()`.
    Closed,
}

/// Health of a bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Backend name (`memory`, `nats`, `kafka`).
    pub backend: &'static str,
    /// Connection state.
    pub state: ConnectionState,
    /// Subscriptions whose consumer stopped receiving while messages wait in the partitions
    /// it holds (filled by the bus; transports leave it empty). Each is being recovered by a
    /// new consumer; it leaves the list when messages flow again.
    pub stalled: Vec<StalledSubscription>,
}

impl Health {
    /// Connected or not, and nothing stalled.
    pub fn new(backend: &'static str, state: ConnectionState) -> Self {
        Self {
            backend,
            state,
            stalled: Vec::new(),
        }
    }
}

/// A subscription found stalled (see [`crate::SubscribeOptions::stall_timeout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalledSubscription {
    /// Its topic.
    pub topic: String,
    /// Its group.
    pub group: String,
}

/// What a subscription asks the transport for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// Topic to consume.
    pub topic: String,
    /// Consumer group: members of one group share the work; every group gets every message.
    pub group: String,
}

/// A consumer group's backlog on one topic, per partition, as the broker reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lag {
    /// One entry per partition of the topic.
    pub partitions: Vec<PartitionLag>,
}

impl Lag {
    /// Messages not yet acknowledged by the group, over every partition (pending plus
    /// unacknowledged where the broker counts those apart).
    pub fn total(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.pending + p.unacked.unwrap_or(0))
            .sum()
    }
}

/// One partition's backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// Messages the group has not acknowledged and that are not out for delivery (Kafka:
    /// end offset minus committed offset, which includes what is in flight).
    pub pending: u64,
    /// Delivered but not yet acknowledged, where the broker counts them apart (NATS, memory).
    pub unacked: Option<u64>,
}

/// A broker client. One per bus (one connection per bus).
pub trait Transport: Send + Sync + 'static {
    /// Resolves with the broker's ACK of one message. `Unpin` so the ACK collector can keep
    /// many of them without boxing each.
    type Ack: Future<Output = Result<Receipt, TransportError>> + Send + Unpin + 'static;
    /// A consumer for one subscription.
    type Subscription: Subscription;

    /// Backend name.
    fn backend(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Hands one message to the broker client. Returns once handed over; the returned future
    /// resolves with the broker's ACK.
    fn send(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<Self::Ack, TransportError>> + Send;

    /// Creates (or joins) the consumer for `spec`.
    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> impl Future<Output = Result<Self::Subscription, TransportError>> + Send;

    /// Connection state.
    fn health(&self) -> Health;

    /// How far consumer `group` is behind on `topic`, as the broker reports it; `None` when
    /// the backend cannot tell. A group that never consumed has everything stored pending.
    fn lag(
        &self,
        topic: &str,
        group: &str,
    ) -> impl Future<Output = Result<Option<Lag>, TransportError>> + Send {
        let _ = (topic, group);
        async { Ok(None) }
    }

    /// Disconnects. Called once, after every subscription and publish has finished.
    fn close(&self) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// One consumer, driven by exactly one fetcher task.
pub trait Subscription: Send + 'static {
    /// One received message.
    type Delivery: Delivery;

    /// Waits up to `max_wait` for up to `max` messages; an empty batch means nothing came.
    /// `Err(TransportError::Closed)` ends the subscription.
    fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Delivery>, TransportError>> + Send;

    /// Fetching has stopped for good: hand back to the broker, at once, whatever the client
    /// holds prefetched and has not returned from `fetch` yet, so another member gets it now
    /// rather than after an ack timeout. Called before the dispatched messages are drained
    /// and [`Subscription::close`] runs. Default: nothing is prefetched.
    fn release_prefetched(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The partitions this consumer holds now, for the stall check (a consumer that receives
    /// nothing while a partition it holds has messages waiting). `None`: it cannot tell; the
    /// check then looks at every partition of the topic.
    fn assigned(&self) -> Option<Vec<u32>> {
        None
    }

    /// The partitions this consumer owns, by epoch, for a backend whose groups hand
    /// partitions to one member at a time: the bus drops a lost partition's queued jobs when
    /// the transport calls [`Ownership::lose`], and checks [`Delivery::owner`] before it
    /// starts each job and each retry. `None` (the default): every delivery stays owned.
    fn ownership(&self) -> Option<Arc<Ownership>> {
        None
    }

    /// Leaves the group (commits what is complete). Called after every delivery it fetched
    /// was acked, nak'ed or terminated, or the drain deadline passed.
    fn close(self) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// One received message and the means to settle it. Settling consumes it, so a delivery
/// cannot be settled twice. A delivery dropped unsettled must be redelivered by the transport.
pub trait Delivery: Send + Sync + 'static {
    /// The message as received (payload possibly still compressed).
    fn message(&self) -> &Message;

    /// The handler succeeded: do not deliver again.
    fn ack(self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Deliver again after `delay`.
    fn nak(self, delay: Duration) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Never deliver again (it was dead-lettered).
    fn term(self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Still working on it: extend the broker's ack deadline.
    fn in_progress(&self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The ownership of the delivery's partition under the epoch it was fetched in (see
    /// [`crate::ownership`]). The dispatcher starts no job and no retry of a delivery whose
    /// token is stale: it drops it unsettled, and the partition's next owner delivers it.
    /// `None` (the default): always owned.
    fn owner(&self) -> Option<&OwnershipToken> {
        None
    }
}

/// Longest topic name: Kafka's limit, also safe for NATS subjects.
pub const MAX_TOPIC_LEN: usize = 249;

/// Checks a topic name against the rules every backend accepts: 1–249 characters of
/// `[A-Za-z0-9._-]`, not starting or ending with `.`, no empty `..` segment. One rule for all
/// backends, so an application that works on one works on the others.
///
/// ```
/// use eventbus_core::validate_topic;
/// assert!(validate_topic("orders.created-v1").is_ok());
/// assert!(validate_topic("orders.>").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), TransportError> {
    let bad = |reason: &str| {
        Err(TransportError::InvalidTopic {
            topic: topic.to_string(),
            reason: reason.to_string(),
        })
    };
    if topic.is_empty() {
        return bad("empty");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return bad("longer than 249 characters");
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 . _ -)"
        ));
    }
    if topic.starts_with('.') || topic.ends_with('.') || topic.contains("..") {
        return bad("empty segment between dots");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        for ok in [
            "a",
            "orders",
            "orders.created",
            "a_b-c.D9",
            &"x".repeat(249),
        ] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a.*",
            "a.>",
            ".a",
            "a.",
            "a..b",
            "ü",
            "a/b",
            &"x".repeat(250),
        ] {
            assert!(
                matches!(
                    validate_topic(bad),
                    Err(TransportError::InvalidTopic { .. })
                ),
                "{bad}"
            );
        }
    }
}
