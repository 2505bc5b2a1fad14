//! The bus's metrics reach Prometheus: a recorder from `metrics-exporter-prometheus`, the
//! examples' `/metrics` endpoint, traffic on each backend, one scrape over HTTP, and the
//! series found with their labels and values. NATS and Kafka run when their variables are set
//! (scripts/test.sh sets them); a set but unreachable broker fails the test.

use std::net::SocketAddr;
use std::sync::OnceLock;

use eventbus::{metric_names as names, BackendConfig, BusConfig, Envelope, HandlerError};
use eventbus_examples::metrics_http;
use metrics_exporter_prometheus::PrometheusBuilder;

const EVENTS: i64 = 60;

/// One recorder and endpoint for the whole test binary (the recorder is process-global).
async fn endpoint() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    static SERVER: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .expect("install the Prometheus recorder");
            // Its own runtime thread, so the endpoint outlives each test's runtime.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind");
                    tx.send(listener.local_addr().expect("addr"))
                        .expect("send addr");
                    metrics_http::serve(listener, handle).await;
                });
            });
            let addr = rx.recv().expect("endpoint address");
            ADDR.set(addr).expect("set once");
        })
        .await;
    *ADDR.get().expect("set")
}

/// The value of the series `name` whose labels include every one of `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().find_map(|line| {
        let (series, v) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let all = labels
            .iter()
            .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")));
        (n == name && all).then(|| v.parse().ok()).flatten()
    })
}

async fn traffic_then_scrape(url: &str) {
    let addr = endpoint().await;
    let bus = eventbus::connect(
        BackendConfig::from_url(url).expect("backend URL"),
        BusConfig::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let topic = format!("prom-{}", &eventbus::new_event_id()[24..]);
    let group = "scraped";
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(EVENTS as usize);
    let failed_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    bus.subscribe_envelope(&topic, group, move |e: Envelope| {
        let (tx, failed) = (tx.clone(), failed_once.clone());
        async move {
            // One retry, so the error and retry series have a value.
            if e.event_version == 1 && !failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            tx.send(())
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=EVENTS {
        let e = Envelope::new(
            format!("acct-{}", v % 6),
            "posted",
            v,
            serde_json::json!({"v": v}),
        );
        bus.publish_envelope(&topic, &e).await.expect("publish");
    }
    bus.flush().await.expect("flush");
    for _ in 0..EVENTS {
        tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv())
            .await
            .expect("every event handled")
            .expect("handler alive");
    }
    // The handled counter is bumped after the handler returns: close() waits for that.
    bus.close().await.expect("close");
    let body = metrics_http::scrape(addr)
        .await
        .expect("scrape /metrics over HTTP");
    let labels = [("topic", topic.as_str()), ("group", group)];
    assert_eq!(
        value(&body, names::HANDLED, &labels),
        Some(EVENTS as f64),
        "{body}"
    );
    assert_eq!(
        value(&body, names::FETCHED, &labels),
        Some(EVENTS as f64),
        "{body}"
    );
    assert_eq!(value(&body, names::RETRIES, &labels), Some(1.0), "{body}");
    assert_eq!(
        value(&body, names::HANDLER_ERRORS, &labels),
        Some(1.0),
        "{body}"
    );
    let attempts = value(&body, &format!("{}_count", names::HANDLER_SECONDS), &labels);
    assert_eq!(attempts, Some(EVENTS as f64 + 1.0), "{body}");
    let e2e = value(
        &body,
        &format!("{}_count", names::END_TO_END_SECONDS),
        &labels,
    );
    assert_eq!(e2e, Some(EVENTS as f64), "{body}");
    // Bus-wide series, shared by the buses of this process: present and at least this run.
    assert!(
        value(&body, names::PUBLISH_ACKED, &[]).unwrap_or(0.0) >= EVENTS as f64,
        "{body}"
    );
    let acks = value(&body, &format!("{}_count", names::PUBLISH_ACK_SECONDS), &[]);
    assert!(acks.unwrap_or(0.0) >= EVENTS as f64, "{body}");
    assert!(
        value(&body, names::PUBLISH_IN_FLIGHT, &[]).is_some(),
        "{body}"
    );
    assert!(
        value(&body, names::DISPATCH_QUEUED, &[]).is_some(),
        "{body}"
    );
    assert!(
        body.contains(&format!("# HELP {} ", names::HANDLED)),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_metrics_are_scraped() {
    traffic_then_scrape("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_metrics_are_scraped() {
    match std::env::var("EVENTBUS_NATS_URL") {
        Ok(url) => traffic_then_scrape(&url).await,
        Err(_) => eprintln!("EVENTBUS_NATS_URL not set: NATS not tried"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_metrics_are_scraped() {
    match std::env::var("EVENTBUS_KAFKA_BROKERS") {
        Ok(brokers) => traffic_then_scrape(&format!("kafka://{brokers}")).await,
        Err(_) => eprintln!("EVENTBUS_KAFKA_BROKERS not set: Kafka not tried"),
    }
}
