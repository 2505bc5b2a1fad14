//! NATS JetStream transport for eventbus.
//!
//! - **One connection per bus**; the JetStream context bounds publishes awaiting an ACK
//!   (`max_ack_inflight`, with backpressure instead of errors).
//! - Publishing hands the message to the client and returns; the core's single ACK collector
//!   awaits the `PublishAck`. `event_id` is sent as `Nats-Msg-Id`, so a republish inside the
//!   stream's duplicate window is reported as a duplicate, not stored twice. An ACK lost to a
//!   disconnect is retried with the same id, then reported failed: never dropped silently.
//! - One stream per topic (file storage, 1 GiB, 1,000,000 messages, 2 min duplicate window),
//!   created or validated on first use; one durable pull consumer per topic and group
//!   (explicit ack, AckWait 30 s, MaxAckPending 10,000, MaxWaiting 1,000).
//! - One fetcher per subscription over a continuous pull (batches of 500), feeding the shared
//!   dispatcher; ack after success, `-NAK` with delay, `+TERM` after dead-lettering, `+WPI`
//!   while long handlers run.
//!
//! ```no_run
//! # async fn run() -> Result<(), eventbus_core::BusError> {
//! use eventbus_core::{Bus, BusConfig};
//! use eventbus_nats::{NatsConfig, NatsTransport};
//! let transport = NatsTransport::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let bus = Bus::new(transport, BusConfig::default())?;
//! bus.publish("orders", &b"{}"[..]).await?;
//! bus.close().await
//! # }
//! ```

mod ack;
mod config;
mod group;
mod lag;
mod line;
mod naming;
mod provision;
mod subscription;
mod transport;
mod url;

pub use ack::NatsAck;
pub use config::{
    Auth, ConsumerSettings, GroupSettings, NatsConfig, Secret, Storage, StreamSettings, Tls,
};
pub use subscription::{NatsDelivery, NatsSubscription};
pub use transport::NatsTransport;
