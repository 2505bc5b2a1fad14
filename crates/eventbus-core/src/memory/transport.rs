//! The memory transport, its subscriptions and deliveries.

use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::TransportError;
use crate::message::{Message, OutgoingMessage};
use crate::transport::{
    validate_topic, Capabilities, ConnectionState, Delivery, Health, Lag, Receipt, Subscription,
    SubscriptionSpec, Transport,
};

use super::log::Topic;
use super::{lock, MemoryBroker};

/// A client of a [`MemoryBroker`]. [`MemoryTransport::new`] makes one with a private broker.
pub struct MemoryTransport {
    pub(super) broker: MemoryBroker,
    pub(super) closed: Arc<AtomicBool>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A transport over its own new broker.
    pub fn new() -> Self {
        MemoryBroker::new().transport()
    }

    /// The broker this transport talks to.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

impl Transport for MemoryTransport {
    type Ack = Ready<Result<Receipt, TransportError>>;
    type Subscription = MemorySubscription;

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            partitioned_groups: true,
            native_compression: false,
            publish_dedup: true,
        }
    }

    async fn send(&self, message: OutgoingMessage) -> Result<Self::Ack, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let topic = self.broker.topic(&message.topic);
        let receipt = lock(&topic.state).append(message);
        if !receipt.duplicate {
            topic.notify.notify_waiters();
        }
        Ok(ready(Ok(receipt)))
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<Self::Subscription, TransportError> {
        // A broker's subscribe is a round trip: yield like one, so callers meet the same
        // interleavings (a close racing the subscribe) on every backend.
        tokio::task::yield_now().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let topic = self.broker.topic(&spec.topic);
        let member = self
            .broker
            .state
            .next_member
            .fetch_add(1, Ordering::Relaxed);
        let group = lock(&topic.state).join(&spec.group, member);
        topic.notify.notify_waiters();
        Ok(MemorySubscription {
            topic,
            group,
            member,
            left: false,
            transport_closed: self.closed.clone(),
        })
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, TransportError> {
        validate_topic(topic)?;
        let lag = lock(&self.broker.topic(topic).state).lag(group);
        Ok(Some(lag))
    }

    fn health(&self) -> Health {
        Health::new(
            "memory",
            if self.closed.load(Ordering::Acquire) {
                ConnectionState::Closed
            } else {
                ConnectionState::Connected
            },
        )
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// One member of a consumer group.
pub struct MemorySubscription {
    topic: Arc<Topic>,
    group: usize,
    member: u64,
    left: bool,
    transport_closed: Arc<AtomicBool>,
}

impl MemorySubscription {
    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            lock(&self.topic.state).leave(self.group, self.member);
            self.topic.notify.notify_waiters();
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Subscription for MemorySubscription {
    type Delivery = MemoryDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<MemoryDelivery>, TransportError> {
        let deadline = Instant::now() + max_wait;
        loop {
            if self.left || self.transport_closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            let notified = self.topic.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next_due) =
                lock(&self.topic.state).take(&self.topic, self.group, self.member, max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(batch);
            }
            let wake = next_due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
        }
    }

    fn assigned(&self) -> Option<Vec<u32>> {
        Some(lock(&self.topic.state).owned(self.group, self.member))
    }

    async fn close(mut self) -> Result<(), TransportError> {
        self.leave();
        Ok(())
    }
}

/// One delivered message. Dropped unsettled, it is redelivered.
pub struct MemoryDelivery {
    pub(super) message: Message,
    pub(super) topic: Arc<Topic>,
    pub(super) group: usize,
    pub(super) member: u64,
    pub(super) partition: usize,
    pub(super) offset: u64,
    pub(super) settled: bool,
}

impl MemoryDelivery {
    fn settle(&mut self, redeliver_at: Option<Instant>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let wake = lock(&self.topic.state).settle(
            self.group,
            self.member,
            self.partition,
            self.offset,
            redeliver_at,
        );
        if wake {
            self.topic.notify.notify_waiters();
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        self.settle(Some(Instant::now()));
    }
}

impl Delivery for MemoryDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.settle(None);
        Ok(())
    }

    async fn nak(mut self, delay: Duration) -> Result<(), TransportError> {
        self.settle(Some(Instant::now() + delay));
        Ok(())
    }

    async fn term(mut self) -> Result<(), TransportError> {
        self.settle(None);
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{java_partition_mismatches, kit_config};
    use crate::Bus;

    /// Keys are placed as Kafka's Java client places them, so an aggregate has one partition
    /// number on every backend.
    #[tokio::test]
    async fn keys_land_on_the_java_clients_partition() {
        let partitions = crate::memory::MemoryConfig::default().partitions;
        let bus = Bus::new(MemoryTransport::new(), kit_config()).expect("bus");
        let mismatches = java_partition_mismatches(&bus, "placement", partitions).await;
        assert!(
            mismatches.is_empty(),
            "(aggregate, stored, Java client's) differ: {mismatches:?}"
        );
    }
}
