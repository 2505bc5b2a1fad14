//! A transactional outbox for eventbus.
//!
//! The application writes its business change and the event in **one database
//! transaction** ([`enqueue`]); they commit or roll back together. A [`Relay`] reads the
//! committed rows in order, publishes each through a [`eventbus_core::Bus`] with the row's
//! `event_id` as the idempotency key, and marks a row published **only from the broker's
//! answer** to that exact message ([`eventbus_core::PublishResult`]). A failed publish is retried
//! with backoff; after the configured attempts the row is marked dead and reported. Per
//! aggregate, a later event is published only after the broker acknowledged every earlier
//! one (never while an earlier one is unacknowledged or failing), so the broker's order is the
//! outbox's order; a round publishes a run of each aggregate's consecutive events, one ACK
//! apart, rather than one event per aggregate.
//!
//! Databases: SQLite (feature `sqlite`, the default; one relay per database) and PostgreSQL
//! (feature `postgres`; several relays share the table with `FOR UPDATE SKIP LOCKED` and
//! are woken by `LISTEN`/`NOTIFY`). The schema ships with the crate ([`OutboxDb::migrate`]);
//! no database is needed to build. See docs/outbox.md for the schema, the guarantees and the
//! failure modes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use eventbus_core::{memory::MemoryBroker, Bus, BusConfig, Envelope};
//! use eventbus_outbox::{enqueue, OutboxDb, Relay, RelayConfig};
//!
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .max_connections(1)
//!     .connect("sqlite::memory:")
//!     .await?;
//! let db = OutboxDb::from(pool.clone());
//! db.migrate().await?;
//! let broker = MemoryBroker::new();
//! let bus = Bus::new(broker.transport(), BusConfig::default())?;
//! let relay = Relay::start(db.clone(), bus.clone(), RelayConfig::default())?;
//!
//! let mut tx = pool.begin().await?;
//! enqueue(&mut tx, "orders", &Envelope::new("order-1", "order.placed", 1, serde_json::json!({})))
//!     .await?;
//! tx.commit().await?;
//! relay.wake();
//!
//! // Marked published only after the broker's ACK.
//! relay.progress().wait_for(|m| m.published >= 1).await?;
//! assert_eq!(broker.stored("orders"), 1);
//! relay.stop().await?;
//! bus.close().await?;
//! # Ok(())
//! # }
//! ```

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("eventbus-outbox needs the `sqlite` or the `postgres` feature");

mod enqueue;
mod error;
mod relay;
mod store;

pub use enqueue::enqueue;
pub use error::{OutboxError, OutboxErrorKind};
pub use relay::{DeadCallback, DeadEvent, Relay, RelayConfig, RelayMetrics, RelayWaker};
pub use store::{OutboxDb, OutboxExecutor, OutboxStats};

/// Milliseconds since the Unix epoch (the table's timestamps).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
