//! Writing events into the outbox, inside the application's own transaction.

use eventbus_core::{validate_topic, Envelope};

use crate::error::{OutboxError, OutboxErrorKind};
use crate::store::{NewRow, OutboxExecutor};

/// Stores `envelope` for `topic` through `tx`, the application's own transaction: the event
/// commits or rolls back with the business change. The relay publishes it after the commit,
/// with its `event_id` as the idempotency key.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use eventbus_core::Envelope;
/// use eventbus_outbox::{enqueue, OutboxDb};
///
/// let pool = sqlx::sqlite::SqlitePoolOptions::new()
///     .max_connections(1)
///     .connect("sqlite::memory:")
///     .await?;
/// let db = OutboxDb::from(pool.clone());
/// db.migrate().await?;
///
/// let mut tx = pool.begin().await?;
/// // … the business change, through `tx` …
/// let e = Envelope::new("order-1", "order.placed", 1, serde_json::json!({"total": 42}));
/// enqueue(&mut tx, "orders", &e).await?;
/// tx.commit().await?;
/// assert_eq!(db.stats().await?.pending, 1);
/// # Ok(())
/// # }
/// ```
pub async fn enqueue<X: OutboxExecutor>(
    tx: &mut X,
    topic: &str,
    envelope: &Envelope,
) -> Result<(), OutboxError> {
    validate_topic(topic)
        .map_err(|e| OutboxError::new(OutboxErrorKind::InvalidTopic, e.to_string()))?;
    envelope
        .validate()
        .map_err(|e| OutboxError::new(OutboxErrorKind::InvalidEnvelope, e.to_string()))?;
    let json = envelope
        .to_json()
        .map_err(|e| OutboxError::new(OutboxErrorKind::InvalidEnvelope, e.to_string()))?;
    let json = String::from_utf8(json)
        .map_err(|e| OutboxError::new(OutboxErrorKind::InvalidEnvelope, e.to_string()))?;
    tx.insert_row(&NewRow {
        event_id: &envelope.event_id,
        topic,
        aggregate_id: &envelope.aggregate_id,
        envelope: &json,
        created_at: crate::now_ms(),
    })
    .await
    .map_err(|e| OutboxError::database("storing the event in the outbox", e))
}
