//! eventbus: one API for event-driven services over Kafka, NATS JetStream and an embedded
//! in-memory backend. Applications pick the broker by cargo feature and configuration; the
//! code that publishes and subscribes stays the same.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use eventbus::{BackendConfig, BusConfig, Envelope, HandlerError};
//!
//! // "memory://" here; "nats://127.0.0.1:4222" or "kafka://127.0.0.1:9092" with those features.
//! let backend = BackendConfig::from_url("memory://")?;
//! let bus = eventbus::connect(backend, BusConfig::default()).await?;
//! bus.subscribe_envelope("orders", "billing", |e: Envelope| async move {
//!     println!("{} v{}", e.aggregate_id, e.event_version);
//!     Ok::<(), HandlerError>(())
//! }).await?;
//! let e = Envelope::new("order-1", "order.created", 1, serde_json::json!({"total": 42}));
//! bus.publish_envelope("orders", &e).await?;
//! bus.close().await?;
//! # Ok::<(), eventbus::BusError>(()) }).unwrap();
//! ```
//!
//! Or from a file and the environment ([`Config`]): `EVENTBUS_CONFIG=eventbus.toml`,
//! `EVENTBUS_URL=nats://127.0.0.1:4222`, then `eventbus::Config::from_env()?.connect().await?`.
//!
//! Cargo features: `nats` (JetStream through async-nats) and `kafka` (rdkafka) add backends;
//! the memory backend is always there.

mod any;
pub mod config;

pub use any::{AnyAck, AnyDelivery, AnySubscription, AnyTransport, BackendConfig};
pub use config::{Config, ConfigError, ConfigErrorKind};
pub use eventbus_core::memory::{MemoryBroker, MemoryConfig};
pub use eventbus_core::{
    cloudevents, codec, duration, headers, metric_names, middleware, new_event_id, trace,
    BrokerPosition, Bus, BusBuilder, BusConfig, BusError, Capabilities, Compression,
    ConnectionState, DispatchConfig, Envelope, EnvelopeError, EnvelopeHandler, Handler,
    HandlerError, Headers, Health, Lag, Message, MetricsSnapshot, PartitionLag, Publication,
    PublishConfig, PublishResult, PublishResults, Receipt, RetryPolicy, StalledSubscription,
    SubscribeOptions, SubscriptionHandle, TransportError,
};
/// The Kafka backend's configuration types.
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;
/// The NATS backend's configuration types.
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;

/// The bus over whichever backend the configuration names.
pub type EventBus = Bus<AnyTransport>;

/// Connects to `backend` and starts a bus with `config`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = eventbus::connect(eventbus::BackendConfig::from_url("memory://")?, Default::default()).await?;
/// assert_eq!(bus.health().backend, "memory");
/// # Ok::<(), eventbus::BusError>(()) }).unwrap();
/// ```
pub async fn connect(backend: BackendConfig, config: BusConfig) -> Result<EventBus, BusError> {
    let transport = AnyTransport::connect(backend).await?;
    Bus::new(transport, config)
}
