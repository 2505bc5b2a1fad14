//! Publish envelopes and handle them, in order per aggregate, on the embedded backend.
//! Run: `cargo run -p eventbus-examples --example quickstart`

use eventbus::{BackendConfig, BusConfig, Envelope, HandlerError};

#[tokio::main]
async fn main() -> Result<(), eventbus::BusError> {
    let url = std::env::var("EVENTBUS_URL").unwrap_or_else(|_| "memory://".into());
    let bus = eventbus::connect(BackendConfig::from_url(&url)?, BusConfig::default()).await?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(16);
    bus.subscribe_envelope("orders", "billing", move |e: Envelope| {
        let done = done_tx.clone();
        async move {
            println!("{} v{}: {}", e.aggregate_id, e.event_version, e.payload);
            done.send(())
                .await
                .map_err(|_| HandlerError::retryable("main has gone"))
        }
    })
    .await?;
    for v in 1..=3 {
        let e = Envelope::new(
            "order-42",
            "order.updated",
            v,
            serde_json::json!({ "step": v }),
        );
        bus.publish_envelope("orders", &e).await?;
    }
    for _ in 0..3 {
        done_rx.recv().await;
    }
    bus.close().await
}
