//! A service that changes a row and enqueues its event in one transaction; a relay publishes
//! the event to whichever backend the configuration names, and marks it published only after
//! the broker acknowledged it.
//!
//! ```text
//! cargo run -p eventbus-examples --example outbox                          # memory://
//! EVENTBUS_URL=nats://127.0.0.1:14222 cargo run -p eventbus-examples --example outbox
//! ```
//!
//! Orders live in an SQLite database (in memory here); placing an order inserts it and
//! enqueues `order.placed` in the same transaction, and a failed order rolls both back.

use std::time::Duration;

use eventbus::{BackendConfig, BusConfig, Envelope, HandlerError};
use eventbus_outbox::{enqueue, OutboxDb, Relay, RelayConfig, RelayWaker};

/// The business change and its event, committed together.
async fn place_order(
    pool: &sqlx::SqlitePool,
    relay: &RelayWaker,
    id: &str,
    cents: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, cents) VALUES (?, ?)")
        .bind(id)
        .bind(cents)
        .execute(&mut *tx)
        .await?;
    let event = Envelope::new(id, "order.placed", 1, serde_json::json!({ "cents": cents }));
    enqueue(&mut tx, "orders", &event).await?;
    if cents <= 0 {
        // Invalid: nothing of it, neither the row nor the event, survives.
        tx.rollback().await?;
        return Err(format!("order {id}: amount must be positive").into());
    }
    tx.commit().await?;
    relay.wake();
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("EVENTBUS_URL").unwrap_or_else(|_| "memory://".into());
    let bus = eventbus::connect(BackendConfig::from_url(&url)?, BusConfig::default()).await?;

    // One connection: an in-memory SQLite database lives as long as its connection.
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await?;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, cents INTEGER NOT NULL)")
        .execute(&pool)
        .await?;
    let outbox = OutboxDb::from(pool.clone());
    outbox.migrate().await?;
    let relay = Relay::start(outbox.clone(), bus.clone(), RelayConfig::default())?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Envelope>(16);
    bus.subscribe_envelope("orders", "shipping", move |e: Envelope| {
        let tx = tx.clone();
        async move {
            tx.send(e)
                .await
                .map_err(|_| HandlerError::permanent("the example stopped listening"))
        }
    })
    .await?;

    let waker = relay.waker();
    place_order(&pool, &waker, "order-1", 4_200).await?;
    place_order(&pool, &waker, "order-2", 990).await?;
    if let Err(e) = place_order(&pool, &waker, "order-3", 0).await {
        println!("rejected: {e}");
    }
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or("the subscription ended")?;
        println!("shipping got {} ({})", e.aggregate_id, e.payload);
    }
    let mut progress = relay.progress();
    tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|m| m.published >= 2),
    )
    .await??;
    let stats = outbox.stats().await?;
    println!(
        "outbox on {url}: {} published, {} pending, {} dead",
        stats.published, stats.pending, stats.dead
    );
    assert_eq!((stats.published, stats.pending), (2, 0));
    relay.stop().await?;
    bus.close().await?;
    Ok(())
}
