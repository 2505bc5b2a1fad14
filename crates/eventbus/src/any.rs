//! Enum dispatch over the compiled-in backends: no boxing per message, one match per call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eventbus_core::memory::{
    MemoryBroker, MemoryConfig, MemoryDelivery, MemorySubscription, MemoryTransport,
};
use eventbus_core::{
    BusError, Capabilities, Delivery, Health, Lag, Message, OutgoingMessage, Receipt, Subscription,
    SubscriptionSpec, Transport, TransportError,
};

/// Runs `$body` on whichever backend `$value` holds. `$wrap` names, inside `$body`, the
/// matching variant constructor of the `$out` enum.
macro_rules! each {
    ($value:expr, $enum:ident => $out:ident, |$x:ident, $wrap:ident| $body:expr) => {
        match $value {
            $enum::Memory($x) => {
                let $wrap = $out::Memory;
                $body
            }
            #[cfg(feature = "nats")]
            $enum::Nats($x) => {
                let $wrap = $out::Nats;
                $body
            }
            #[cfg(feature = "kafka")]
            $enum::Kafka($x) => {
                let $wrap = $out::Kafka;
                $body
            }
        }
    };
    ($value:expr, $enum:ident, |$x:ident| $body:expr) => {
        match $value {
            $enum::Memory($x) => $body,
            #[cfg(feature = "nats")]
            $enum::Nats($x) => $body,
            #[cfg(feature = "kafka")]
            $enum::Kafka($x) => $body,
        }
    };
}

/// Which broker to use, and how to reach it.
#[derive(Debug, Clone)]
#[non_exhaustive]
// One per bus or subscription: the size of the largest backend costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum BackendConfig {
    /// A new embedded broker private to this bus.
    Memory(MemoryConfig),
    /// An existing embedded broker, shared with other buses of this process.
    SharedMemory(MemoryBroker),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsConfig),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaConfig),
}

impl BackendConfig {
    /// Parses a backend URL: `memory://`; with the `nats` feature `nats://host:port`
    /// (comma-separated for several servers); with `kafka`, `kafka://host:port[,host:port]`.
    /// Everything else takes its defaults; build the config value for more control.
    ///
    /// ```
    /// use eventbus::BackendConfig;
    /// assert!(BackendConfig::from_url("memory://").is_ok());
    /// assert!(BackendConfig::from_url("carrier-pigeon://x").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self, BusError> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "memory" => Ok(BackendConfig::Memory(MemoryConfig::default())),
            #[cfg(feature = "nats")]
            "nats" | "tls" => Ok(BackendConfig::Nats(eventbus_nats::NatsConfig::new(url))),
            #[cfg(not(feature = "nats"))]
            "nats" | "tls" => Err(BusError::Config(
                "this build has no NATS backend (enable the `nats` feature)".into(),
            )),
            #[cfg(feature = "kafka")]
            "kafka" => Ok(BackendConfig::Kafka(eventbus_kafka::KafkaConfig::new(
                url.trim_start_matches("kafka://"),
            ))),
            #[cfg(not(feature = "kafka"))]
            "kafka" => Err(BusError::Config(
                "this build has no Kafka backend (enable the `kafka` feature)".into(),
            )),
            _ => Err(BusError::Config(format!(
                "unknown backend URL scheme {scheme:?} (expected memory://, nats://host:port or kafka://host:port)"
            ))),
        }
    }
}

/// The transport of an [`crate::EventBus`].
// One per bus or subscription: the size of the largest backend costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyTransport {
    /// Embedded memory broker.
    Memory(MemoryTransport),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsTransport),
    /// Kafka backend.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaTransport),
}

impl AnyTransport {
    /// Connects to the configured backend.
    pub async fn connect(backend: BackendConfig) -> Result<Self, BusError> {
        match backend {
            BackendConfig::Memory(cfg) => Ok(AnyTransport::Memory(
                MemoryBroker::with_config(cfg).transport(),
            )),
            BackendConfig::SharedMemory(broker) => Ok(AnyTransport::Memory(broker.transport())),
            #[cfg(feature = "nats")]
            BackendConfig::Nats(cfg) => Ok(AnyTransport::Nats(
                eventbus_nats::NatsTransport::connect(cfg).await?,
            )),
            #[cfg(feature = "kafka")]
            BackendConfig::Kafka(cfg) => Ok(AnyTransport::Kafka(
                eventbus_kafka::KafkaTransport::connect(cfg).await?,
            )),
        }
    }
}

/// ACK future of an [`AnyTransport`].
pub enum AnyAck {
    /// Memory backend.
    Memory(<MemoryTransport as Transport>::Ack),
    /// NATS backend.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsAck),
    /// Kafka backend.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaAck),
}

impl Future for AnyAck {
    type Output = Result<Receipt, TransportError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        each!(self.get_mut(), AnyAck, |f| Pin::new(f).poll(cx))
    }
}

/// Subscription of an [`AnyTransport`].
// One per bus or subscription: the size of the largest backend costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnySubscription {
    /// Memory backend.
    Memory(MemorySubscription),
    /// NATS backend.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsSubscription),
    /// Kafka backend.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaSubscription),
}

/// Delivery of an [`AnyTransport`].
// Boxing the larger variant would add an allocation per message; the dispatcher queues are
// bounded, so the size difference is bounded too.
#[allow(clippy::large_enum_variant)]
pub enum AnyDelivery {
    /// Memory backend.
    Memory(MemoryDelivery),
    /// NATS backend.
    #[cfg(feature = "nats")]
    Nats(eventbus_nats::NatsDelivery),
    /// Kafka backend.
    #[cfg(feature = "kafka")]
    Kafka(eventbus_kafka::KafkaDelivery),
}

impl Transport for AnyTransport {
    type Ack = AnyAck;
    type Subscription = AnySubscription;

    fn backend(&self) -> &'static str {
        each!(self, AnyTransport, |t| t.backend())
    }

    fn capabilities(&self) -> Capabilities {
        each!(self, AnyTransport, |t| t.capabilities())
    }

    async fn send(&self, message: OutgoingMessage) -> Result<AnyAck, TransportError> {
        each!(self, AnyTransport => AnyAck, |t, wrap| t.send(message).await.map(wrap))
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<AnySubscription, TransportError> {
        each!(self, AnyTransport => AnySubscription, |t, wrap| t.subscribe(spec).await.map(wrap))
    }

    fn health(&self) -> Health {
        each!(self, AnyTransport, |t| t.health())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, TransportError> {
        each!(self, AnyTransport, |t| t.lag(topic, group).await)
    }

    async fn close(&self) -> Result<(), TransportError> {
        each!(self, AnyTransport, |t| t.close().await)
    }
}

impl Subscription for AnySubscription {
    type Delivery = AnyDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<AnyDelivery>, TransportError> {
        each!(self, AnySubscription => AnyDelivery, |s, wrap| s
            .fetch(max, max_wait)
            .await
            .map(|v| v.into_iter().map(wrap).collect()))
    }

    async fn release_prefetched(&mut self) {
        each!(self, AnySubscription, |s| s.release_prefetched().await)
    }

    fn assigned(&self) -> Option<Vec<u32>> {
        each!(self, AnySubscription, |s| s.assigned())
    }

    async fn close(self) -> Result<(), TransportError> {
        each!(self, AnySubscription, |s| s.close().await)
    }
}

impl Delivery for AnyDelivery {
    fn message(&self) -> &Message {
        each!(self, AnyDelivery, |d| d.message())
    }

    async fn ack(self) -> Result<(), TransportError> {
        each!(self, AnyDelivery, |d| d.ack().await)
    }

    async fn nak(self, delay: Duration) -> Result<(), TransportError> {
        each!(self, AnyDelivery, |d| d.nak(delay).await)
    }

    async fn term(self) -> Result<(), TransportError> {
        each!(self, AnyDelivery, |d| d.term().await)
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        each!(self, AnyDelivery, |d| d.in_progress().await)
    }
}
