//! Kafka transport for eventbus, on rdkafka with its bundled librdkafka.
//!
//! - **One idempotent producer per bus** (`enable.idempotence`, `acks=all`, native LZ4 batch
//!   compression, `linger.ms` 5); key = aggregate id, so an aggregate stays on one partition;
//!   the envelope headers (with `X-Event-ID`) travel as Kafka headers. Delivery reports are
//!   `DeliveryFuture`s awaited by the core's single ACK collector: exactly one result each.
//! - Topics are created through the admin API (partitions, replication, retention) and an
//!   existing topic is validated; broker auto-create is never relied on.
//! - One consumer per subscription (group = consumer group id). Offsets are committed only up
//!   to the highest contiguous settled offset per partition ([`OffsetTracker`]), every second,
//!   on close, and on revoke — after the revoked partitions' in-flight messages are settled.
//!
//! ```no_run
//! # async fn run() -> Result<(), eventbus_core::BusError> {
//! use eventbus_core::{Bus, BusConfig};
//! use eventbus_kafka::{KafkaConfig, KafkaTransport};
//! let transport = KafkaTransport::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
//! let bus = Bus::new(transport, BusConfig::default())?;
//! bus.publish("orders", &b"{}"[..]).await?;
//! bus.close().await
//! # }
//! ```

mod commit;
mod config;
mod consumer;
mod lag;
mod offsets;
mod transport;

pub use config::{
    default_replication, ConsumerSettings, KafkaConfig, ProducerSettings, Security, TopicSettings,
    DEFAULT_FETCH_WAIT, DEFAULT_MAX_REPLICATION, DEFAULT_PREFETCH_KBYTES,
};
pub use consumer::{GroupContext, KafkaDelivery, KafkaSubscription};
pub use offsets::OffsetTracker;
pub use transport::{KafkaAck, KafkaTransport, LinkState, ProducerEvents};
