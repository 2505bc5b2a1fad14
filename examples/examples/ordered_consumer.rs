//! Many aggregates, one consumer: events of each aggregate are handled strictly in order while
//! different aggregates are handled in parallel; a failing event is retried in place and the
//! aggregate's later events wait for it. Prints the publish results as they arrive.
//! Run: `cargo run -p eventbus-examples --example ordered_consumer`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventbus::{BackendConfig, BusConfig, Envelope, HandlerError, RetryPolicy};

#[tokio::main]
async fn main() -> Result<(), eventbus::BusError> {
    let config = BusConfig::default().with_retry(RetryPolicy {
        max_attempts: 5,
        ..RetryPolicy::default()
    });
    let bus = eventbus::connect(BackendConfig::from_url("memory://")?, config).await?;
    let mut results = bus.results()?;
    let acked = tokio::spawn(async move {
        let mut n = 0;
        while let Some(r) = results.recv().await {
            if let Err(e) = &r.outcome {
                eprintln!("publish of {} failed: {e}", r.event_id);
            }
            n += 1;
        }
        n
    });

    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let failed_once = Arc::new(Mutex::new(false));
    let (l, f) = (last.clone(), failed_once.clone());
    bus.subscribe_envelope("accounts", "ledger", move |e: Envelope| {
        let (l, f) = (l.clone(), f.clone());
        async move {
            if e.aggregate_id == "acct-3" && e.event_version == 5 {
                let mut failed = f.lock().map_err(|_| HandlerError::retryable("poisoned"))?;
                if !*failed {
                    *failed = true;
                    return Err(HandlerError::retryable("ledger busy, try again"));
                }
            }
            let mut last = l.lock().map_err(|_| HandlerError::retryable("poisoned"))?;
            let prev = last
                .insert(e.aggregate_id.clone(), e.event_version)
                .unwrap_or(0);
            assert_eq!(prev + 1, e.event_version, "order broken");
            Ok(())
        }
    })
    .await?;

    for v in 1..=10 {
        for a in 0..20 {
            let e = Envelope::new(
                format!("acct-{a}"),
                "posted",
                v,
                serde_json::json!({"cents": v * 100}),
            );
            bus.publish_envelope("accounts", &e).await?;
        }
    }
    while bus.metrics().handled < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let m = bus.metrics();
    bus.close().await?;
    println!(
        "handled {} events over 20 accounts in order; {} retry; {} publish results",
        m.handled,
        m.retries,
        acked.await.unwrap_or(0)
    );
    Ok(())
}
