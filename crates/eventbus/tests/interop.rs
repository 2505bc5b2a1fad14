//! Interop with independent clients (scripts/interop/peer.py: nats-py and confluent-kafka,
//! installed by scripts/interop.sh): what the bus publishes they read with the right key,
//! headers and JSON; envelopes they publish the bus consumes in order; garbage they publish
//! is dead-lettered with a reason.

#![cfg(all(feature = "nats", feature = "kafka"))]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use eventbus::trace::TraceContext;
use eventbus::{headers, BackendConfig, BusConfig, Envelope, EventBus, HandlerError, Message};
use serde_json::Value;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/interop/peer.py");

fn python() -> String {
    std::env::var("EVENTBUS_PYTHON").unwrap_or_else(|_| {
        panic!("EVENTBUS_PYTHON is not set: run scripts/test.sh (scripts/interop.sh installs the peers)")
    })
}

fn unique(name: &str) -> String {
    let id = eventbus::new_event_id();
    format!("interop-{name}-{}", &id[id.len() - 12..])
}

/// Runs the peer; its stdout lines as JSON.
async fn peer(args: Vec<String>) -> Vec<Value> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(PEER)
            .args(&args)
            .output()
            .expect("run the peer")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "peer failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("peer output is JSON"))
        .collect()
}

async fn connect(url: &str) -> EventBus {
    eventbus::connect(
        BackendConfig::from_url(url).expect("url"),
        BusConfig::default().with_max_attempts(1),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Publishes 6 envelopes of 2 aggregates with a custom header; returns them.
async fn publish_some(bus: &EventBus, topic: &str) -> Vec<Envelope> {
    let mut sent = Vec::new();
    for v in 1..=3 {
        for agg in ["acct-a", "acct-b"] {
            let e = Envelope::new(agg, "posted", v, serde_json::json!({"cents": v}))
                .with_tenant_id("t-1");
            let p = eventbus::Publication::envelope(topic, &e)
                .expect("valid")
                .header("X-Custom", "from the bus");
            let r = bus.send_and_wait(p).await.expect("publish");
            assert!(r.is_ok(), "{r:?}");
            sent.push(e);
        }
    }
    sent
}

/// What the peer read matches what the bus sent: ids, aggregate, headers, JSON body, one
/// place (key or subject) per aggregate, and the bus's order within an aggregate.
fn check_read(read: &[Value], sent: &[Envelope], place: &str) {
    assert_eq!(read.len(), sent.len());
    let mut places: HashMap<String, String> = HashMap::new();
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for m in read {
        let h = &m["headers"];
        let id = h[headers::EVENT_ID].as_str().expect("X-Event-ID");
        let e = sent
            .iter()
            .find(|e| e.event_id == id)
            .expect("a sent event");
        assert_eq!(h[headers::AGGREGATE_ID], e.aggregate_id.as_str());
        assert_eq!(h[headers::EVENT_TYPE], "posted");
        assert_eq!(h[headers::TENANT_ID], "t-1");
        assert_eq!(h["X-Custom"], "from the bus");
        let tp = h[headers::TRACEPARENT].as_str().expect("traceparent");
        assert!(TraceContext::parse(tp).is_some(), "{tp}");
        let body: Envelope =
            serde_json::from_str(m["body"].as_str().expect("body")).expect("JSON envelope");
        assert_eq!(&body, e);
        let at = m[place].to_string();
        let first = places.entry(e.aggregate_id.clone()).or_insert(at.clone());
        assert_eq!(*first, at, "one {place} per aggregate");
        versions
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.event_version);
    }
    for (agg, v) in versions {
        assert_eq!(v, [1, 2, 3], "{agg} in order");
    }
}

/// Lines for the peer to publish: 5 envelopes of one aggregate, then garbage.
fn peer_lines(key: bool) -> (String, Vec<Envelope>) {
    let mut lines = String::new();
    let mut envs = Vec::new();
    for v in 1..=5 {
        let e = Envelope::new("peer-agg", "peer.event", v, serde_json::json!({"n": v}));
        let mut line = serde_json::json!({
            "headers": {
                headers::EVENT_ID: e.event_id,
                headers::AGGREGATE_ID: e.aggregate_id,
                "Nats-Msg-Id": e.event_id,
            },
            "body": String::from_utf8(e.to_json().expect("json")).expect("utf-8"),
        });
        if key {
            line["key"] = Value::from("peer-agg");
        }
        lines.push_str(&format!("{line}\n"));
        envs.push(e);
    }
    let garbage = serde_json::json!({
        "headers": {headers::EVENT_ID: "garbage-1", "Nats-Msg-Id": "garbage-1"},
        "body": "this is {not an envelope",
        "key": "peer-garbage",
    });
    lines.push_str(&format!("{garbage}\n"));
    (lines, envs)
}

/// The bus consumes what the peer publishes: envelopes in order, garbage dead-lettered.
async fn consume_from_peer(bus: &EventBus, topic: &str, write: impl FnOnce(String) -> Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Envelope>(16);
    bus.subscribe_envelope(topic, "interop", move |e: Envelope| {
        let tx = tx.clone();
        async move {
            tx.send(e)
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    })
    .await
    .expect("subscribe");
    let (dtx, mut drx) = tokio::sync::mpsc::channel::<Message>(4);
    bus.subscribe(&format!("{topic}.dlq"), "interop-dlq", move |m: Message| {
        let tx = dtx.clone();
        async move {
            tx.send(m)
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    })
    .await
    .expect("subscribe to the dead letters");
    let (lines, envs) = peer_lines(true);
    let file = std::env::temp_dir().join(format!("{topic}.jsonl"));
    std::fs::write(&file, lines).expect("write the peer's input");
    let out = peer(write(file.display().to_string())).await;
    assert!(!out.is_empty());
    let mut got = Vec::new();
    for _ in 0..envs.len() {
        let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the peer's envelope arrives")
            .expect("handler alive");
        got.push(e);
    }
    assert_eq!(got, envs, "the peer's envelopes, in order");
    let dead = tokio::time::timeout(Duration::from_secs(60), drx.recv())
        .await
        .expect("the garbage is dead-lettered")
        .expect("handler alive");
    assert_eq!(dead.headers().get(headers::DLQ_REASON), Some("malformed"));
    assert_eq!(dead.event_id(), Some("garbage-1"));
    assert_eq!(&dead.payload()[..], b"this is {not an envelope");
    let _ = std::fs::remove_file(file);
}

fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL").expect("EVENTBUS_NATS_URL is not set: run scripts/test.sh")
}

fn kafka_brokers() -> String {
    std::env::var("EVENTBUS_KAFKA_BROKERS")
        .expect("EVENTBUS_KAFKA_BROKERS is not set: run scripts/test.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_reads_what_the_bus_publishes() {
    let url = nats_url();
    let bus = connect(&url).await;
    let topic = unique("to-py");
    let sent = publish_some(&bus, &topic).await;
    let stream = format!("EB_{}:{topic}.*", topic.replace('.', "_"));
    let read = peer(vec![
        "nats-read".into(),
        url,
        stream,
        sent.len().to_string(),
    ])
    .await;
    check_read(&read, &sent, "subject");
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_consumes_what_nats_py_publishes() {
    let url = nats_url();
    let bus = connect(&url).await;
    let topic = unique("from-py");
    let subject = format!("{topic}.3");
    consume_from_peer(&bus, &topic, |file| {
        vec!["nats-write".into(), url.clone(), subject, file]
    })
    .await;
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_reads_what_the_bus_publishes() {
    let brokers = kafka_brokers();
    let bus = connect(&format!("kafka://{brokers}")).await;
    let topic = unique("to-ck");
    let sent = publish_some(&bus, &topic).await;
    let read = peer(vec![
        "kafka-read".into(),
        brokers,
        topic.clone(),
        sent.len().to_string(),
    ])
    .await;
    check_read(&read, &sent, "partition");
    for m in &read {
        assert_eq!(
            m["key"],
            m["headers"][headers::AGGREGATE_ID],
            "key = aggregate id"
        );
    }
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_consumes_what_confluent_kafka_produces() {
    let brokers = kafka_brokers();
    let bus = connect(&format!("kafka://{brokers}")).await;
    let topic = unique("from-ck");
    let t = topic.clone();
    consume_from_peer(&bus, &topic, |file| {
        vec!["kafka-write".into(), brokers.clone(), t, file]
    })
    .await;
    bus.close().await.expect("close");
}
