//! The bus's metrics for Prometheus: installs the `metrics-exporter-prometheus` recorder,
//! serves `GET /metrics`, and runs some traffic on the configured backend.
//!
//! ```text
//! cargo run -p eventbus-examples --example prometheus                      # memory://
//! EVENTBUS_URL=nats://127.0.0.1:14222 cargo run -p eventbus-examples --example prometheus
//! EVENTBUS_METRICS_ADDR=127.0.0.1:9464 EVENTBUS_METRICS_SERVE=1 cargo run -p eventbus-examples --example prometheus
//! curl -s http://127.0.0.1:9464/metrics | grep eventbus_
//! ```
//!
//! `EVENTBUS_METRICS_SERVE=1` keeps serving after the traffic until Ctrl-C; otherwise the
//! example scrapes its own endpoint once, prints the `eventbus_` series and exits.

use std::time::Duration;

use eventbus::{Envelope, HandlerError};
use eventbus_examples::metrics_http;
use metrics_exporter_prometheus::PrometheusBuilder;

const EVENTS: i64 = 200;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before the bus: its series are registered when it is built and when it subscribes.
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ])?
        .install_recorder()?;
    let addr = std::env::var("EVENTBUS_METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    let server = tokio::spawn(metrics_http::serve(listener, handle));
    println!("metrics on http://{local}/metrics");

    let bus = eventbus::Config::from_env()?.connect().await?;
    let topic = format!("metrics-demo-{}", &eventbus::new_event_id()[24..]);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(EVENTS as usize);
    bus.subscribe_envelope(&topic, "demo", move |_e: Envelope| {
        let tx = tx.clone();
        async move {
            tx.send(())
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    })
    .await?;
    for v in 1..=EVENTS {
        let e = Envelope::new(
            format!("acct-{}", v % 10),
            "posted",
            v,
            serde_json::json!({"v": v}),
        );
        bus.publish_envelope(&topic, &e).await?;
    }
    bus.flush().await?;
    for _ in 0..EVENTS {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await?
            .ok_or("handler gone")?;
    }
    if std::env::var_os("EVENTBUS_METRICS_SERVE").is_some() {
        println!("serving; Ctrl-C stops");
        tokio::signal::ctrl_c().await?;
    } else {
        let body = metrics_http::scrape(local).await?;
        for line in body.lines().filter(|l| l.starts_with("eventbus_")) {
            println!("{line}");
        }
    }
    bus.close().await?;
    server.abort();
    Ok(())
}
