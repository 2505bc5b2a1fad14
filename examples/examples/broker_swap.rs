//! The same application code on any backend, chosen by configuration only — a file, the
//! environment, or both (`eventbus::Config::from_env`):
//!
//! ```text
//! cargo run -p eventbus-examples --example broker_swap                        # memory://
//! EVENTBUS_URL=nats://127.0.0.1:14222 cargo run -p eventbus-examples --example broker_swap
//! EVENTBUS_CONFIG=examples/eventbus.toml cargo run -p eventbus-examples --example broker_swap
//! EVENTBUS_CONFIG=examples/eventbus.toml EVENTBUS_URL=kafka://127.0.0.1:19092 \
//!     cargo run -p eventbus-examples --example broker_swap
//! ```
//!
//! It publishes 2,000 envelopes over 50 accounts, consumes them with per-account order
//! checking, and prints what it saw, the backend's health and the bus's task count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::{BusError, Envelope, EventBus, HandlerError};

const ACCOUNTS: usize = 50;
const VERSIONS: i64 = 40;

/// The application: knows nothing about the broker.
async fn run(bus: &EventBus, topic: &str) -> Result<(usize, usize), BusError> {
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let violations = Arc::new(Mutex::new(0usize));
    let (l, v) = (last.clone(), violations.clone());
    bus.subscribe_envelope(topic, "ledger", move |e: Envelope| {
        let (l, v) = (l.clone(), v.clone());
        async move {
            let mut last = l.lock().map_err(|_| HandlerError::retryable("poisoned"))?;
            let prev = last
                .insert(e.aggregate_id.clone(), e.event_version)
                .unwrap_or(0);
            if e.event_version != prev + 1 {
                *v.lock().map_err(|_| HandlerError::retryable("poisoned"))? += 1;
            }
            Ok(())
        }
    })
    .await?;
    for version in 1..=VERSIONS {
        for a in 0..ACCOUNTS {
            let e = Envelope::new(
                format!("acct-{a}"),
                "posted",
                version,
                serde_json::json!({"cents": version}),
            );
            bus.publish_envelope(topic, &e).await?;
        }
    }
    bus.flush().await?;
    let total = ACCOUNTS * VERSIONS as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (bus.metrics().handled as usize) < total && deadline > Instant::now() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handled = bus.metrics().handled as usize;
    let violations = *violations.lock().map_err(|_| BusError::Closed)?;
    Ok((handled, violations))
}

#[tokio::main]
async fn main() -> Result<(), BusError> {
    // EVENTBUS_CONFIG names a TOML file, EVENTBUS_URL and EVENTBUS_<TABLE>__<SETTING>
    // override it; without either, memory:// and every default.
    let bus = eventbus::Config::from_env()?.connect().await?;
    let topic = format!(
        "ledger-{}",
        &eventbus::Envelope::new("x", "x", 1, serde_json::Value::Null).event_id[24..]
    );
    let started = Instant::now();
    let (handled, violations) = run(&bus, &topic).await?;
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    println!(
        "backend {:<6} {:?}: {handled}/{} handled, {violations} ordering violations, {:.0} ms, {tasks} tasks",
        bus.health().backend,
        bus.health().state,
        ACCOUNTS * VERSIONS as usize,
        started.elapsed().as_secs_f64() * 1000.0
    );
    bus.close().await?;
    if handled != ACCOUNTS * VERSIONS as usize || violations != 0 {
        return Err(BusError::Config("lost or out-of-order events".into()));
    }
    Ok(())
}
