//! Core of eventbus: the [`Envelope`], the [`Bus`] API, the [`Transport`] contract every
//! backend implements, the shared dispatcher (keyed and global worker pools), publish results,
//! the LZ4 codec, the in-memory backend and (feature `testkit`) the conformance kit.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use eventbus_core::{memory::MemoryTransport, Bus, HandlerError, Message};
//! let bus = Bus::builder(MemoryTransport::new()).build()?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1);
//! bus.subscribe("greetings", "printer", move |msg: Message| {
//!     let tx = tx.clone();
//!     async move {
//!         tx.send(msg.payload().clone()).await.map_err(|e| HandlerError::retryable(e.to_string()))
//!     }
//! }).await?;
//! bus.publish("greetings", &b"hello"[..]).await?;
//! assert_eq!(&rx.recv().await.unwrap()[..], b"hello");
//! bus.close().await?;
//! # Ok::<(), eventbus_core::BusError>(()) }).unwrap();
//! ```

mod bus;
pub mod cloudevents;
pub mod codec;
mod config;
mod consume;
mod dispatcher;
pub mod duration;
mod envelope;
mod error;
mod handler;
pub mod headers;
pub mod memory;
mod message;
mod metrics;
pub mod middleware;
pub mod ownership;
pub mod partitioner;
mod publish;
mod secret;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod trace;
mod transport;

pub use crate::metrics::facade::names as metric_names;
pub use crate::metrics::MetricsSnapshot;
pub use bus::{Bus, BusBuilder, Publication};
pub use codec::{CodecError, Compression};
pub use config::{
    BusConfig, DispatchConfig, PublishConfig, RetryPolicy, SubscribeOptions, DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT_WINDOW, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WAIT,
};
pub use consume::SubscriptionHandle;
pub use envelope::{new_event_id, Envelope, EnvelopeError};
pub use error::{
    BusError, BusErrorKind, ErrorDetail, HandlerError, TransportError, TransportErrorKind,
};
pub use handler::{EnvelopeHandler, Handler};
pub use headers::Headers;
pub use message::{BrokerPosition, Message, OutgoingMessage};
pub use publish::{PublishResult, PublishResults, ResultCallback};
pub use secret::{redact_url, Secret};
pub use transport::{
    validate_topic, Capabilities, ConnectionState, Delivery, Health, Lag, PartitionLag, Receipt,
    StalledSubscription, Subscription, SubscriptionSpec, Transport, MAX_TOPIC_LEN,
};
