//! Enum dispatch over the compiled-in backends: no boxing per message, one match per call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eventbus_core::memory::{
    MemoryBroker, MemoryConfig, MemoryDelivery, MemorySubscription, MemoryTransport,
};
use eventbus_core::{
    BusError, Capabilities, Delivery, Health, Message, OutgoingMessage, Receipt, Subscription,
    SubscriptionSpec, Transport, TransportError,
};

/// Which broker to use, and how to reach it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BackendConfig {
    /// A new embedded broker private to this bus.
    Memory(MemoryConfig),
    /// An existing embedded broker, shared with other buses of this process.
    SharedMemory(MemoryBroker),
}

impl BackendConfig {
    /// Parses a backend URL: `memory://`; with the features, `nats://host:port` and
    /// `kafka://host:port[,host:port]`.
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
            "nats" | "tls" => Err(BusError::Config(format!(
                "{url}: this build has no NATS backend (enable the `nats` feature)"
            ))),
            "kafka" => Err(BusError::Config(format!(
                "{url}: this build has no Kafka backend (enable the `kafka` feature)"
            ))),
            _ => Err(BusError::Config(format!(
                "unknown backend URL {url:?} (expected memory://, nats://host:port or kafka://host:port)"
            ))),
        }
    }
}

/// The transport of an [`crate::EventBus`].
pub enum AnyTransport {
    /// Embedded memory broker.
    Memory(MemoryTransport),
}

impl AnyTransport {
    /// Connects to the configured backend.
    pub async fn connect(backend: BackendConfig) -> Result<Self, BusError> {
        match backend {
            BackendConfig::Memory(cfg) => Ok(AnyTransport::Memory(
                MemoryBroker::with_config(cfg).transport(),
            )),
            BackendConfig::SharedMemory(broker) => Ok(AnyTransport::Memory(broker.transport())),
        }
    }
}

/// ACK future of an [`AnyTransport`].
pub enum AnyAck {
    /// Memory backend.
    Memory(<MemoryTransport as Transport>::Ack),
}

impl Future for AnyAck {
    type Output = Result<Receipt, TransportError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            AnyAck::Memory(f) => Pin::new(f).poll(cx),
        }
    }
}

/// Subscription of an [`AnyTransport`].
pub enum AnySubscription {
    /// Memory backend.
    Memory(MemorySubscription),
}

/// Delivery of an [`AnyTransport`].
pub enum AnyDelivery {
    /// Memory backend.
    Memory(MemoryDelivery),
}

impl Transport for AnyTransport {
    type Ack = AnyAck;
    type Subscription = AnySubscription;

    fn backend(&self) -> &'static str {
        match self {
            AnyTransport::Memory(t) => t.backend(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self {
            AnyTransport::Memory(t) => t.capabilities(),
        }
    }

    async fn send(&self, message: OutgoingMessage) -> Result<AnyAck, TransportError> {
        match self {
            AnyTransport::Memory(t) => t.send(message).await.map(AnyAck::Memory),
        }
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<AnySubscription, TransportError> {
        match self {
            AnyTransport::Memory(t) => t.subscribe(spec).await.map(AnySubscription::Memory),
        }
    }

    fn health(&self) -> Health {
        match self {
            AnyTransport::Memory(t) => t.health(),
        }
    }

    async fn close(&self) -> Result<(), TransportError> {
        match self {
            AnyTransport::Memory(t) => t.close().await,
        }
    }
}

impl Subscription for AnySubscription {
    type Delivery = AnyDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<AnyDelivery>, TransportError> {
        match self {
            AnySubscription::Memory(s) => s
                .fetch(max, max_wait)
                .await
                .map(|v| v.into_iter().map(AnyDelivery::Memory).collect()),
        }
    }

    async fn close(self) -> Result<(), TransportError> {
        match self {
            AnySubscription::Memory(s) => s.close().await,
        }
    }
}

impl Delivery for AnyDelivery {
    fn message(&self) -> &Message {
        match self {
            AnyDelivery::Memory(d) => d.message(),
        }
    }

    async fn ack(self) -> Result<(), TransportError> {
        match self {
            AnyDelivery::Memory(d) => d.ack().await,
        }
    }

    async fn nak(self, delay: Duration) -> Result<(), TransportError> {
        match self {
            AnyDelivery::Memory(d) => d.nak(delay).await,
        }
    }

    async fn term(self) -> Result<(), TransportError> {
        match self {
            AnyDelivery::Memory(d) => d.term().await,
        }
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        match self {
            AnyDelivery::Memory(d) => d.in_progress().await,
        }
    }
}
