//! The Kafka transport: one idempotent producer per bus, topic provisioning, ACK futures.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use eventbus_core::{
    BrokerPosition, Capabilities, ConnectionState, ErrorDetail, Health, Lag, OutgoingMessage,
    Receipt, SubscriptionSpec, Transport, TransportError,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::ProducerContext;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use tokio::sync::OnceCell;

use crate::config::{default_replication, KafkaConfig};
use crate::consumer::KafkaSubscription;

/// Pause before offering a message again when librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(2);
/// Poll interval while a new topic propagates to the metadata.
const TOPIC_METADATA_POLL: Duration = Duration::from_millis(50);

const CONNECTED: u8 = 0;
const BROKERS_DOWN: u8 = 1;

/// Tracks reachability from librdkafka's error events: "all brokers down" marks the bus
/// reconnecting; the next successful delivery, or the next record a consumer receives, marks
/// it connected again.
#[derive(Clone, Default)]
pub struct LinkState(Arc<AtomicU8>);

impl LinkState {
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// A broker answered (a delivery report, a record received): reachable again.
    pub(crate) fn answered(&self) {
        self.set(CONNECTED);
    }
    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The producer's librdkafka context.
#[derive(Clone, Default)]
pub struct ProducerEvents {
    link: LinkState,
}

impl ClientContext for ProducerEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.link.set(BROKERS_DOWN);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for ProducerEvents {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// A connection to a Kafka cluster: one producer (and one admin client) per bus.
pub struct KafkaTransport {
    producer: FutureProducer<ProducerEvents>,
    link: LinkState,
    admin: AdminClient<DefaultClientContext>,
    pub(crate) config: KafkaConfig,
    /// One provisioning per topic: concurrent first publishes wait for the one lookup.
    topics: RwLock<HashMap<String, Arc<OnceCell<()>>>>,
    closed: Arc<AtomicBool>,
}

pub(crate) fn kafka_error(context: &str, e: &KafkaError) -> TransportError {
    // The librdkafka error stays reachable as the error's source.
    let detail = ErrorDetail::with_source(format!("{context}: {e}"), e.clone());
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => TransportError::Rejected(detail),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition)
        | Some(RDKafkaErrorCode::TopicAuthorizationFailed) => TransportError::Rejected(detail),
        Some(RDKafkaErrorCode::MessageTimedOut) | Some(RDKafkaErrorCode::OperationTimedOut) => {
            TransportError::Timeout(detail)
        }
        Some(RDKafkaErrorCode::AllBrokersDown) | Some(RDKafkaErrorCode::BrokerTransportFailure) => {
            TransportError::Unavailable(detail)
        }
        _ => TransportError::Other(detail),
    }
}

/// Runs a blocking librdkafka call from inside a spawned task (the fetcher) without stalling
/// the runtime's other tasks. Calls made from user code use [`off_runtime`] instead.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    if can_block() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Whether [`blocking`] keeps the runtime's other tasks going (a multi-thread runtime); on a
/// current-thread runtime it would stall them all.
pub(crate) fn can_block() -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
}

/// Runs a blocking librdkafka call on the blocking pool (one-off calls: connect, metadata,
/// flush), so it is safe from any async context, `LocalSet`s included.
async fn off_runtime<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, TransportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransportError::Other(format!("blocking librdkafka call failed: {e}").into()))
}

impl KafkaTransport {
    /// Creates the producer and admin client and checks that the cluster answers.
    ///
    /// Needs Tokio's multi-thread runtime: a consumer-group rebalance runs inside
    /// librdkafka's poll and waits there for the revoked partitions' handlers to finish,
    /// which a current-thread runtime cannot do while it is blocked. On a current-thread
    /// runtime (the default of `#[tokio::test]`) this returns [`TransportError::Unsupported`].
    pub async fn connect(config: KafkaConfig) -> Result<Self, TransportError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if Handle::try_current().map(|h| h.runtime_flavor()).ok()
            != Some(RuntimeFlavor::MultiThread)
        {
            return Err(TransportError::Unsupported(
                "the Kafka backend needs Tokio's multi-thread runtime (a consumer-group rebalance \
                 waits for running handlers inside librdkafka's poll); use \
                 #[tokio::main] or #[tokio::test(flavor = \"multi_thread\")]"
                    .into(),
            ));
        }
        let mut pc = config.base();
        let p = &config.producer;
        pc.set("enable.idempotence", "true")
            .set("acks", "all")
            // The Java client's partitioner (murmur2 of the key), not librdkafka's CRC32
            // default: an aggregate gets the same partition number from Java producers, the
            // memory backend and NATS partitions (eventbus_core::partitioner).
            .set("partitioner", "murmur2_random")
            .set("compression.type", &p.compression)
            .set("linger.ms", p.linger_ms.to_string())
            .set("batch.num.messages", p.batch_num_messages.to_string())
            .set(
                "message.timeout.ms",
                p.message_timeout.as_millis().to_string(),
            );
        for (k, v) in &p.extra {
            pc.set(k, v);
        }
        let events = ProducerEvents::default();
        let link = events.link.clone();
        let producer: FutureProducer<ProducerEvents> = pc
            .create_with_context(events)
            .map_err(|e| TransportError::Other(format!("producer configuration: {e}").into()))?;
        let admin: AdminClient<DefaultClientContext> = config
            .base()
            .create()
            .map_err(|e| TransportError::Other(format!("admin configuration: {e}").into()))?;
        let timeout = config.request_timeout;
        let probe = producer.clone();
        off_runtime(move || probe.client().fetch_metadata(None, timeout).map(|_| ()))
            .await?
            .map_err(|e| {
                TransportError::Unavailable(
                    format!("cannot reach Kafka at {}: {e}", config.brokers).into(),
                )
            })?;
        Ok(Self {
            producer,
            link,
            admin,
            config,
            topics: RwLock::new(HashMap::new()),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Creates `topic` with the configured partitions and replication, or checks that the
    /// existing topic has the configured partition count.
    /// Concurrent calls for one topic share a single lookup (and creation); a failed one is
    /// tried again by the next call.
    pub async fn provision_topic(&self, topic: &str) -> Result<(), TransportError> {
        let cell = {
            let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
            match topics.get(topic) {
                Some(c) if c.initialized() => return Ok(()),
                Some(c) => Some(c.clone()),
                None => None,
            }
        };
        let cell = match cell {
            Some(c) => c,
            None => self
                .topics
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(topic.to_string())
                .or_default()
                .clone(),
        };
        cell.get_or_try_init(|| self.provision_once(topic))
            .await
            .map(|_| ())
    }

    async fn provision_once(&self, topic: &str) -> Result<(), TransportError> {
        let t = &self.config.topic;
        let partitions = match self.partition_count(topic).await? {
            Some(n) => n,
            None => {
                self.create_topic(topic).await?;
                self.wait_for_topic(topic).await?
            }
        };
        if partitions != t.partitions as usize {
            return Err(TransportError::Provisioning(
                format!(
                    "topic {topic} exists with {partitions} partitions, configured {}",
                    t.partitions
                )
                .into(),
            ));
        }
        Ok(())
    }

    async fn create_topic(&self, topic: &str) -> Result<(), TransportError> {
        let t = &self.config.topic;
        let retention = t.retention_ms.map(|r| r.to_string());
        let replication = match t.replication {
            Some(r) => r,
            None => default_replication(self.broker_count().await?),
        };
        let mut new = NewTopic::new(topic, t.partitions, TopicReplication::Fixed(replication));
        if let Some(r) = retention.as_deref() {
            new = new.set("retention.ms", r);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.config.request_timeout));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| kafka_error(&format!("create topic {topic}"), &e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(TransportError::Provisioning(
                        format!("create topic {name}: {code}").into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// A created topic shows up in metadata a little later.
    async fn wait_for_topic(&self, topic: &str) -> Result<usize, TransportError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        loop {
            if let Some(n) = self.partition_count(topic).await? {
                return Ok(n);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TransportError::Provisioning(
                    format!(
                        "topic {topic} was created but does not appear in the cluster metadata"
                    )
                    .into(),
                ));
            }
            tokio::time::sleep(TOPIC_METADATA_POLL).await;
        }
    }

    /// Brokers in the cluster's metadata.
    async fn broker_count(&self) -> Result<usize, TransportError> {
        let timeout = self.config.request_timeout;
        let producer = self.producer.clone();
        off_runtime(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|md| md.brokers().len())
        })
        .await?
        .map_err(|e| kafka_error("metadata (brokers)", &e))
    }

    /// Partitions of `topic` according to the cluster's metadata, `None` if it does not
    /// exist. Reads the metadata of all topics: asking for one topic by name could make a
    /// broker with auto-create on create it with its own defaults.
    pub async fn partition_count(&self, topic: &str) -> Result<Option<usize>, TransportError> {
        let timeout = self.config.request_timeout;
        let producer = self.producer.clone();
        let name = topic.to_string();
        off_runtime(move || {
            producer.client().fetch_metadata(None, timeout).map(|md| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map(|t| t.partitions().len())
            })
        })
        .await?
        .map_err(|e| kafka_error(&format!("metadata of {topic}"), &e))
    }
}

/// Resolves with the delivery report of one message: partition and offset, or the error.
pub struct KafkaAck(DeliveryFuture, LinkState);

impl Future for KafkaAck {
    type Output = Result<Receipt, TransportError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match std::task::ready!(Pin::new(&mut self.0).poll(cx)) {
            Ok(Ok(d)) => {
                self.1.set(CONNECTED);
                Ok(Receipt {
                    position: Some(BrokerPosition {
                        partition: u32::try_from(d.partition).ok(),
                        offset: u64::try_from(d.offset).unwrap_or(0),
                    }),
                    // Kafka does not say; the idempotent producer only drops its own retries.
                    duplicate: false,
                })
            }
            Ok(Err((e, _))) => Err(kafka_error("delivery", &e)),
            Err(_) => Err(TransportError::Closed),
        })
    }
}

impl Transport for KafkaTransport {
    type Ack = KafkaAck;
    type Subscription = KafkaSubscription;

    fn backend(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            partitioned_groups: true,
            native_compression: true,
            publish_dedup: false,
        }
    }

    async fn send(&self, message: OutgoingMessage) -> Result<KafkaAck, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        self.provision_topic(&message.topic).await?;
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (key, value) in message.headers.iter() {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload[..])
            .headers(headers);
        if let Some(k) = &message.key {
            record = record.key(k.as_bytes());
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(KafkaAck(f, self.link.clone())),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) => return Err(kafka_error("produce", &e)),
            }
        }
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<KafkaSubscription, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        self.provision_topic(&spec.topic).await?;
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        KafkaSubscription::create(&self.config, spec, self.closed.clone(), self.link.clone())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let (config, topic, group) = (self.config.clone(), topic.to_string(), group.to_string());
        let timeout = self.config.request_timeout;
        tokio::task::spawn_blocking(move || crate::lag::group_lag(&config, &topic, &group, timeout))
            .await
            .map_err(|e| TransportError::Unavailable(format!("lag: {e}").into()))?
            .map(Some)
    }

    fn health(&self) -> Health {
        Health::new(
            "kafka",
            if self.closed.load(Ordering::Acquire) {
                ConnectionState::Closed
            } else if self.link.get() == BROKERS_DOWN {
                ConnectionState::Reconnecting
            } else {
                ConnectionState::Connected
            },
        )
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.closed.store(true, Ordering::Release);
        let timeout = self.config.request_timeout;
        let producer = self.producer.clone();
        off_runtime(move || producer.flush(timeout))
            .await?
            .map_err(|e| kafka_error("flush on close", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn librdkafka_errors_are_kept_as_the_source() {
        let e = kafka_error(
            "delivery",
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        assert!(matches!(e, TransportError::Timeout(_)), "{e:?}");
        let source = e.source().expect("source kept");
        assert!(matches!(
            source.downcast_ref::<KafkaError>(),
            Some(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            ))
        ));
    }
}
