//! The conformance kit: the same cases for every backend (DESIGN.md §3 "Identical
//! behaviour"). A backend implements [`Backend`] and runs all cases with one line:
//!
//! ```text
//! async fn backend() -> MyBackend { MyBackend::from_env().await }
//! eventbus_core::conformance_tests!(backend);
//! ```
//!
//! Each case talks to the broker only through [`Bus`], uses fresh topic and group names, and
//! waits for what it expects with a deadline (`EVENTBUS_KIT_TIMEOUT_SECS`, default 60 s):
//! a missing message fails the case with what was seen; nothing is skipped. Where backends
//! legitimately differ the case asserts according to [`crate::Capabilities`] and prints it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;

use crate::{
    headers, Bus, BusConfig, BusError, Compression, Envelope, HandlerError, Message, Publication,
    PublishResult, RetryPolicy, Transport, TransportError,
};
use crate::{Delivery as _, Subscription as _, SubscriptionSpec};

/// The names of every case, in the order [`conformance_tests!`](crate::conformance_tests)
/// runs them.
pub const CASES: &[&str] = &[
    "round_trip",
    "headers_round_trip",
    "per_aggregate_order",
    "global_pool_delivery",
    "blocked_aggregate_stalls_no_other",
    "retrying_aggregate_keeps_order_others_flow",
    "retry_then_success",
    "panic_is_an_error",
    "dead_letter_after_attempts",
    "consumer_group_shares_work",
    "independent_groups",
    "new_subscriber_receives_stored",
    "resume_after_restart",
    "one_result_per_publish",
    "dedup_by_event_id",
    "close_while_publishing_loses_nothing",
    "close_bounded_with_unread_results",
    "subscribe_racing_close_leaves_nothing",
    "compression_round_trip",
    "mixed_compressed_and_plain",
    "malformed_input_dead_letter",
    "bad_input_is_rejected",
    "ack_settles_nak_redelivers",
    "current_thread_runtime",
];

/// A broker under test: each call gives a new client connection (a "process") to the same
/// broker.
pub trait Backend: Send + Sync + 'static {
    /// The backend's transport.
    type Transport: Transport;
    /// A new bus connected to the broker under test.
    fn connect(
        &self,
        config: BusConfig,
    ) -> impl Future<Output = Result<Bus<Self::Transport>, BusError>> + Send;

    /// Whether the backend works on Tokio's current-thread runtime. A backend that does not
    /// must refuse it at connect with [`TransportError::Unsupported`]
    /// (checked by [`current_thread_runtime`]).
    fn supports_current_thread(&self) -> bool {
        true
    }

    /// The messages of `topic` as the broker stores them, read without the bus (at least
    /// `count` of them, waiting for them to arrive). `None` when this harness has no raw
    /// reader; the backend crates' own kit runs have one.
    fn read_stored(
        &self,
        topic: &str,
        count: usize,
    ) -> impl Future<Output = Option<Vec<StoredMessage>>> + Send {
        let _ = (topic, count);
        async { None }
    }
}

/// One message as the broker holds it, read back without the bus.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The payload bytes as stored (compressed if the bus compressed them).
    pub payload: Bytes,
    /// The headers as stored.
    pub headers: Vec<(String, String)>,
    /// The codec the broker stores the message's batch with (`"lz4"`, …), where the
    /// protocol compresses batches (Kafka record batches); `None` when uncompressed or when
    /// the protocol has no batch compression.
    pub batch_compression: Option<String>,
}

impl StoredMessage {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The configuration every case starts from: short backoffs and waits so cases run fast.
pub fn kit_config() -> BusConfig {
    BusConfig::default()
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            multiplier: 2.0,
        })
        .with_max_wait(Duration::from_millis(50))
        .with_close_timeout(Duration::from_secs(20))
        .with_keyed_workers(8)
        .with_global_workers(4)
}

fn kit_timeout() -> Duration {
    let secs = std::env::var("EVENTBUS_KIT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A fresh topic name for one case.
pub fn unique(name: &str) -> String {
    let id = crate::new_event_id();
    format!("kit-{name}-{}", &id[id.len() - 12..])
}

async fn connect<B: Backend>(b: &B, config: BusConfig) -> Bus<B::Transport> {
    b.connect(config)
        .await
        .expect("connect to the broker under test")
}

/// Collects what handlers saw and wakes waiters.
pub struct Recorder<T> {
    items: Arc<(Mutex<Vec<T>>, Notify)>,
}

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self {
            items: self.items.clone(),
        }
    }
}

impl<T: Clone + Send + 'static> Default for Recorder<T> {
    fn default() -> Self {
        Self {
            items: Arc::new((Mutex::new(Vec::new()), Notify::new())),
        }
    }
}

impl<T: Clone + Send + 'static> Recorder<T> {
    /// Records one item.
    pub fn push(&self, item: T) {
        self.items
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.items.1.notify_waiters();
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Vec<T> {
        self.items
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `pred` holds for the recorded items; panics after the kit timeout.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[T]) -> bool) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + kit_timeout();
        loop {
            let notified = self.items.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let items = self.snapshot();
            if pred(&items) {
                return items;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let items = self.snapshot();
                if pred(&items) {
                    return items;
                }
                panic!(
                    "timed out after {:?} waiting for {what}: {} items recorded",
                    kit_timeout(),
                    items.len()
                );
            }
        }
    }

    /// Waits until at least `n` items are recorded.
    pub async fn wait_for(&self, n: usize, what: &str) -> Vec<T> {
        self.wait_until(what, |items| items.len() >= n).await
    }
}

impl Recorder<Message> {
    /// A handler that records every message.
    pub fn handler(
        &self,
    ) -> impl Fn(Message) -> futures_util::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
    {
        let r = self.clone();
        move |m: Message| {
            r.push(m);
            futures_util::future::ready(Ok(()))
        }
    }
}

impl Recorder<Envelope> {
    /// An envelope handler that records every envelope.
    pub fn envelope_handler(
        &self,
    ) -> impl Fn(Envelope) -> futures_util::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
    {
        let r = self.clone();
        move |e: Envelope| {
            r.push(e);
            futures_util::future::ready(Ok(()))
        }
    }
}

fn env(agg: &str, version: i64) -> Envelope {
    Envelope::new(
        agg,
        "kit.event",
        version,
        json!({"aggregate": agg, "version": version, "note": format!("event {version} of {agg}")}),
    )
}

fn versions_of(items: &[Envelope], agg: &str) -> Vec<i64> {
    items
        .iter()
        .filter(|e| e.aggregate_id == agg)
        .map(|e| e.event_version)
        .collect()
}

/// Counts per-aggregate ordering violations: a version that is not above the previous one
/// handled for the same aggregate.
pub fn ordering_violations(items: &[Envelope]) -> usize {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut violations = 0;
    for e in items {
        if let Some(prev) = last.insert(e.aggregate_id.as_str(), e.event_version) {
            if e.event_version <= prev {
                violations += 1;
            }
        }
    }
    violations
}

async fn subscribe_dlq<T: Transport>(bus: &Bus<T>, topic: &str) -> Recorder<Message> {
    let dlq = Recorder::default();
    bus.subscribe(
        &format!("{topic}.dlq"),
        &unique("dlq-reader"),
        dlq.handler(),
    )
    .await
    .expect("subscribe to the dead-letter topic");
    dlq
}

/// Raw bytes and an envelope arrive intact; the returned event id is the message's.
pub async fn round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("round-trip");
    let group = unique("group");
    let rec = Recorder::default();
    bus.subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let id = bus
        .publish(&topic, &b"hello bytes"[..])
        .await
        .expect("publish");
    let e = env("agg-1", 1);
    let r = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish envelope");
    assert!(r.is_ok(), "publish failed: {r:?}");
    let got = rec.wait_for(2, "two messages").await;
    let raw = got
        .iter()
        .find(|m| m.event_id() == Some(id.as_str()))
        .expect("raw message by event id");
    assert_eq!(&raw.payload()[..], b"hello bytes");
    assert_eq!(raw.topic(), topic);
    let envm = got
        .iter()
        .find(|m| m.event_id() == Some(e.event_id.as_str()))
        .expect("envelope by event id");
    assert_eq!(envm.envelope().expect("valid envelope"), e);
    bus.close().await.expect("close");
}

/// Envelope headers and custom headers reach the consumer.
pub async fn headers_round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("headers");
    let group = unique("group");
    let rec = Recorder::default();
    bus.subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let e = env("agg-h", 7)
        .with_trace_id("trace-1")
        .with_correlation_id("corr-1")
        .with_tenant_id("tenant-1");
    let p = Publication::envelope(&topic, &e)
        .expect("valid")
        .header("X-Custom", "custom value");
    bus.send_and_wait(p).await.expect("publish");
    let got = rec.wait_for(1, "one message").await;
    let h = got[0].headers();
    assert_eq!(h.get(headers::EVENT_ID), Some(e.event_id.as_str()));
    assert_eq!(h.get(headers::AGGREGATE_ID), Some("agg-h"));
    assert_eq!(h.get(headers::EVENT_TYPE), Some("kit.event"));
    assert_eq!(h.get(headers::EVENT_VERSION), Some("7"));
    assert_eq!(h.get(headers::TRACE_ID), Some("trace-1"));
    assert_eq!(h.get(headers::CORRELATION_ID), Some("corr-1"));
    assert_eq!(h.get(headers::TENANT_ID), Some("tenant-1"));
    assert!(h.get(headers::TIMESTAMP).is_some());
    assert_eq!(h.get("X-Custom"), Some("custom value"));
    assert_eq!(got[0].aggregate_id(), Some("agg-h"));
    bus.close().await.expect("close");
}

/// 50 aggregates × 40 versions published concurrently: each aggregate's versions are handled
/// in order, none lost.
pub async fn per_aggregate_order<B: Backend>(b: &B) {
    const AGGS: usize = 50;
    const VERSIONS: i64 = 40;
    let bus = connect(b, kit_config()).await;
    let topic = unique("order");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let r = rec.clone();
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let r = r.clone();
        async move {
            // Yield so handlers of different aggregates interleave.
            tokio::task::yield_now().await;
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let mut publishers = Vec::new();
    for chunk in 0..5 {
        let bus = bus.clone();
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for v in 1..=VERSIONS {
                for a in (chunk..AGGS).step_by(5) {
                    bus.publish_envelope(&topic, &env(&format!("agg-{a}"), v))
                        .await
                        .expect("publish");
                }
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher task");
    }
    let total = AGGS * VERSIONS as usize;
    let got = rec.wait_for(total, "every envelope").await;
    assert_eq!(ordering_violations(&got), 0, "per-aggregate order broken");
    for a in 0..AGGS {
        let agg = format!("agg-{a}");
        assert_eq!(
            versions_of(&got, &agg),
            (1..=VERSIONS).collect::<Vec<_>>(),
            "{agg}"
        );
    }
    bus.close().await.expect("close");
}

/// Aggregates in a blocked case: with the kit's 8 keyed workers a hash-to-worker dispatcher
/// puts about 25 of them behind the blocked one.
const HOL_AGGS: usize = 200;
const HOL_VERSIONS: i64 = 3;

async fn publish_hol_load<T: Transport>(bus: &Bus<T>, topic: &str) {
    for v in 1..=HOL_VERSIONS {
        for a in 0..HOL_AGGS {
            bus.publish_envelope(topic, &env(&format!("agg-{a}"), v))
                .await
                .expect("publish");
        }
    }
}

fn others_done(items: &[Envelope]) -> bool {
    let others = (HOL_AGGS - 1) * HOL_VERSIONS as usize;
    items.iter().filter(|e| e.aggregate_id != "agg-0").count() >= others
}

/// A handler blocked on one aggregate's first event holds that aggregate only: every other
/// aggregate's events are handled while it is blocked, and the blocked aggregate's later
/// events wait for it (key-ordered scheduling, not hash-to-worker queues).
pub async fn blocked_aggregate_stalls_no_other<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("blocked");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (r, g) = (rec.clone(), gate.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, g) = (r.clone(), g.clone());
        async move {
            if e.aggregate_id == "agg-0" && e.event_version == 1 {
                // Blocks until the case opens the gate.
                let _permit = g.acquire().await;
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    publish_hol_load(&bus, &topic).await;
    let got = rec
        .wait_until("every other aggregate while agg-0 is blocked", others_done)
        .await;
    assert!(
        versions_of(&got, "agg-0").is_empty(),
        "agg-0's later events overtook its blocked first event"
    );
    gate.add_permits(1);
    let got = rec
        .wait_until("agg-0 after the gate opened", |items| {
            versions_of(items, "agg-0").len() == HOL_VERSIONS as usize
        })
        .await;
    assert_eq!(versions_of(&got, "agg-0"), vec![1, 2, 3]);
    assert_eq!(ordering_violations(&got), 0);
    bus.close().await.expect("close");
}

/// An aggregate whose handler keeps failing is retried in place: its later events wait, and
/// every other aggregate flows meanwhile; once the handler succeeds the aggregate finishes in
/// order.
pub async fn retrying_aggregate_keeps_order_others_flow<B: Backend>(b: &B) {
    let cfg = kit_config().with_retry(RetryPolicy {
        max_attempts: 100_000,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        multiplier: 2.0,
    });
    let bus = connect(b, cfg).await;
    let topic = unique("retrying");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let (r, h, f) = (rec.clone(), healed.clone(), failures.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, h, f) = (r.clone(), h.clone(), f.clone());
        async move {
            if e.aggregate_id == "agg-0" && e.event_version == 1 && !h.load(Ordering::SeqCst) {
                f.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::retryable("downstream unavailable"));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    publish_hol_load(&bus, &topic).await;
    let got = rec
        .wait_until("every other aggregate while agg-0 retries", others_done)
        .await;
    assert!(
        versions_of(&got, "agg-0").is_empty(),
        "agg-0 overtook its retrying event"
    );
    assert!(failures.load(Ordering::SeqCst) >= 1);
    healed.store(true, Ordering::SeqCst);
    let got = rec
        .wait_until("agg-0 after it healed", |items| {
            versions_of(items, "agg-0").len() == HOL_VERSIONS as usize
        })
        .await;
    assert_eq!(versions_of(&got, "agg-0"), vec![1, 2, 3]);
    assert_eq!(ordering_violations(&got), 0);
    assert_eq!(bus.metrics().dead_lettered, 0);
    bus.close().await.expect("close");
}

/// Messages without an aggregate id are all delivered, by several workers at once.
pub async fn global_pool_delivery<B: Backend>(b: &B) {
    const N: usize = 32;
    let bus = connect(b, kit_config()).await;
    let topic = unique("global");
    let group = unique("group");
    let rec = Recorder::default();
    let r = rec.clone();
    // The first two handlers meet at a barrier: they pass only if the pool runs them at once.
    let together = Arc::new(tokio::sync::Barrier::new(2));
    let started = Arc::new(AtomicUsize::new(0));
    let (tg, st) = (together.clone(), started.clone());
    bus.subscribe(&topic, &group, move |m: Message| {
        let (r, tg, st) = (r.clone(), tg.clone(), st.clone());
        async move {
            if st.fetch_add(1, Ordering::SeqCst) < 2 {
                tg.wait().await;
            }
            r.push(m);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let mut ids = HashSet::new();
    for i in 0..N {
        ids.insert(
            bus.publish(&topic, Bytes::from(format!("no aggregate {i}")))
                .await
                .expect("publish"),
        );
    }
    let got = rec.wait_for(N, "every message").await;
    let seen: HashSet<String> = got
        .iter()
        .filter_map(|m| m.event_id().map(str::to_owned))
        .collect();
    assert_eq!(seen, ids);
    assert!(got.iter().all(|m| m.aggregate_id().is_none()));
    bus.close().await.expect("close");
}

/// A failing handler is retried in place: it succeeds on the third attempt and the
/// aggregate's later events wait for it.
pub async fn retry_then_success<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("retry");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let attempts = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
    let (r, at) = (rec.clone(), attempts.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, at) = (r.clone(), at.clone());
        async move {
            let n = {
                let mut m = at.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(e.event_version).or_insert(0);
                *n += 1;
                *n
            };
            if e.event_version == 2 && n < 3 {
                return Err(HandlerError::retryable(format!("transient failure {n}")));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=5 {
        bus.publish_envelope(&topic, &env("agg-r", v))
            .await
            .expect("publish");
    }
    let got = rec.wait_for(5, "five envelopes").await;
    assert_eq!(versions_of(&got, "agg-r"), vec![1, 2, 3, 4, 5]);
    assert_eq!(attempts.lock().unwrap_or_else(|e| e.into_inner())[&2], 3);
    let m = bus.metrics();
    assert!(m.retries >= 2, "{m:?}");
    assert_eq!(m.dead_lettered, 0);
    bus.close().await.expect("close");
}

/// A panicking handler is an error like any other: retried, the worker survives, later
/// messages are handled in order.
pub async fn panic_is_an_error<B: Backend>(b: &B) {
    const KEYED: usize = 8;
    let bus = connect(b, kit_config().with_keyed_workers(KEYED)).await;
    let topic = unique("panic");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let panicked = Arc::new(AtomicUsize::new(0));
    // After the panic, one event on each of KEYED aggregates: their handlers meet at a
    // barrier, which they pass only if all KEYED workers are still alive.
    let all_workers = Arc::new(tokio::sync::Barrier::new(KEYED));
    let (r, p, w) = (rec.clone(), panicked.clone(), all_workers.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, p, w) = (r.clone(), p.clone(), w.clone());
        async move {
            if e.aggregate_id == "agg-p"
                && e.event_version == 3
                && p.fetch_add(1, Ordering::SeqCst) == 0
            {
                panic!("kit: deliberate handler panic");
            }
            if e.aggregate_id.starts_with("agg-w") {
                w.wait().await;
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=5 {
        bus.publish_envelope(&topic, &env("agg-p", v))
            .await
            .expect("publish");
    }
    rec.wait_for(5, "five envelopes").await;
    bus.publish_envelope(&topic, &env("agg-p", 6))
        .await
        .expect("publish");
    rec.wait_for(6, "the envelope after the panic").await;
    for w in 0..KEYED {
        bus.publish_envelope(&topic, &env(&format!("agg-w{w}"), 1))
            .await
            .expect("publish");
    }
    let got = rec
        .wait_for(6 + KEYED, "one event per worker, handled at the same time")
        .await;
    assert_eq!(versions_of(&got, "agg-p"), vec![1, 2, 3, 4, 5, 6]);
    let m = bus.metrics();
    assert!(m.handler_panics >= 1, "{m:?}");
    bus.close().await.expect("close");
}

/// A message that keeps failing goes to `<topic>.dlq` after the configured attempts with the
/// error in headers; the subscription goes on.
pub async fn dead_letter_after_attempts<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("dlq");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let rec: Recorder<Envelope> = Recorder::default();
    let tries = Arc::new(AtomicUsize::new(0));
    let (r, t) = (rec.clone(), tries.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, t) = (r.clone(), t.clone());
        async move {
            if e.event_version == 2 {
                t.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::retryable("boom-v2"));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let bad = env("agg-d", 2);
    bus.publish_envelope(&topic, &env("agg-d", 1))
        .await
        .expect("publish");
    bus.publish_envelope(&topic, &bad).await.expect("publish");
    bus.publish_envelope(&topic, &env("agg-d", 3))
        .await
        .expect("publish");
    let got = rec.wait_for(2, "v1 and v3").await;
    assert_eq!(versions_of(&got, "agg-d"), vec![1, 3]);
    let dead = dlq.wait_for(1, "one dead letter").await;
    let h = dead[0].headers();
    assert_eq!(dead[0].event_id(), Some(bad.event_id.as_str()));
    assert!(h
        .get(headers::DLQ_ERROR)
        .unwrap_or_default()
        .contains("boom-v2"));
    assert_eq!(h.get(headers::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(h.get(headers::DLQ_TOPIC), Some(topic.as_str()));
    assert_eq!(h.get(headers::DLQ_GROUP), Some(group.as_str()));
    assert_eq!(h.get(headers::DLQ_REASON), Some("handler"));
    assert_eq!(dead[0].envelope().expect("dead letter keeps the body"), bad);
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    assert_eq!(bus.metrics().dead_lettered, 1);
    bus.close().await.expect("close");
}

/// Two bus instances in one group share the work and lose nothing. Where the backend
/// declares partitioned groups, per-aggregate order holds across the instances.
pub async fn consumer_group_shares_work<B: Backend>(b: &B) {
    const AGGS: usize = 20;
    let topic = unique("group");
    let a = connect(b, kit_config()).await;
    let c = connect(b, kit_config()).await;
    let caps = a.capabilities();
    eprintln!(
        "[conformance] backend {} partitioned_groups={} (order across instances {})",
        a.health().backend,
        caps.partitioned_groups,
        if caps.partitioned_groups {
            "asserted"
        } else {
            "not asserted"
        }
    );
    // One log for both instances, in handling order: (instance, envelope).
    let log: Recorder<(u8, Envelope)> = Recorder::default();
    let shared_group = unique("shared");
    for (i, bus) in [(0u8, &a), (1u8, &c)] {
        let l = log.clone();
        bus.subscribe_envelope(&topic, &shared_group, move |e: Envelope| {
            let l = l.clone();
            async move {
                l.push((i, e));
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    }
    // Publish rounds until both instances have work (group joins take a while on some
    // brokers), then a few more.
    let mut published = HashSet::new();
    let mut round = 0i64;
    let mut extra = 0;
    while extra < 3 {
        round += 1;
        for agg in 0..AGGS {
            let e = env(&format!("agg-{agg}"), round);
            published.insert(e.event_id.clone());
            a.publish_envelope(&topic, &e).await.expect("publish");
        }
        a.flush().await.expect("flush");
        let expected = published.len();
        let got = log
            .wait_until("this round", |items| {
                items
                    .iter()
                    .map(|(_, e)| e.event_id.as_str())
                    .collect::<HashSet<_>>()
                    .len()
                    >= expected
            })
            .await;
        let both = got.iter().any(|(i, _)| *i == 0) && got.iter().any(|(i, _)| *i == 1);
        if both {
            extra += 1;
        }
        assert!(round < 200, "the second instance never got any work");
    }
    let got = log.snapshot();
    let seen: HashSet<&str> = got.iter().map(|(_, e)| e.event_id.as_str()).collect();
    assert_eq!(seen.len(), published.len(), "messages lost");
    if caps.partitioned_groups {
        let envs: Vec<Envelope> = got.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(
            ordering_violations(&envs),
            0,
            "order broken across instances"
        );
    }
    a.close().await.expect("close");
    c.close().await.expect("close");
}

/// Every group gets every message.
pub async fn independent_groups<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("groups");
    let (r1, r2) = (Recorder::default(), Recorder::default());
    bus.subscribe(&topic, &unique("billing"), r1.handler())
        .await
        .expect("subscribe");
    bus.subscribe(&topic, &unique("shipping"), r2.handler())
        .await
        .expect("subscribe");
    for i in 0..20 {
        bus.send(
            Publication::new(&topic, Bytes::from(format!("m{i}")))
                .aggregate_id(format!("a{}", i % 4)),
        )
        .await
        .expect("publish");
    }
    assert_eq!(r1.wait_for(20, "group billing").await.len(), 20);
    assert_eq!(r2.wait_for(20, "group shipping").await.len(), 20);
    bus.close().await.expect("close");
}

/// A new group receives messages stored before it subscribed.
pub async fn new_subscriber_receives_stored<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("stored");
    let mut ids = HashSet::new();
    for v in 1..=20 {
        let e = env("agg-s", v);
        ids.insert(e.event_id.clone());
        bus.publish_envelope(&topic, &e).await.expect("publish");
    }
    bus.flush().await.expect("flush");
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("late"), rec.envelope_handler())
        .await
        .expect("subscribe");
    let got = rec.wait_for(20, "stored envelopes").await;
    assert_eq!(versions_of(&got, "agg-s"), (1..=20).collect::<Vec<_>>());
    bus.close().await.expect("close");
}

/// A group resumes where it left off after its only instance closed: nothing handled twice,
/// nothing lost.
pub async fn resume_after_restart<B: Backend>(b: &B) {
    let topic = unique("resume");
    let svc = unique("svc");
    let publisher = connect(b, kit_config()).await;
    let first = connect(b, kit_config()).await;
    let rec1: Recorder<Envelope> = Recorder::default();
    first
        .subscribe_envelope(&topic, &svc, rec1.envelope_handler())
        .await
        .expect("subscribe");
    for v in 1..=10 {
        publisher
            .publish_envelope(&topic, &env("agg-x", v))
            .await
            .expect("publish");
    }
    rec1.wait_for(10, "first half").await;
    first.close().await.expect("close first instance");
    for v in 11..=20 {
        publisher
            .publish_envelope(&topic, &env("agg-x", v))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    let second = connect(b, kit_config()).await;
    let rec2: Recorder<Envelope> = Recorder::default();
    second
        .subscribe_envelope(&topic, &svc, rec2.envelope_handler())
        .await
        .expect("subscribe");
    let got = rec2
        .wait_until("second half", |items| {
            items.iter().any(|e| e.event_version == 20)
        })
        .await;
    assert_eq!(
        versions_of(&got, "agg-x"),
        (11..=20).collect::<Vec<_>>(),
        "the restarted instance must resume after the last handled event"
    );
    second.close().await.expect("close");
    publisher.close().await.expect("close");
}

/// Every accepted publish yields exactly one result, on the callback and on the stream.
pub async fn one_result_per_publish<B: Backend>(b: &B) {
    const N: usize = 300;
    let topic = unique("results");
    let by_callback: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let cb = by_callback.clone();
    let config = kit_config().with_result_callback(move |r: &PublishResult| {
        assert!(r.is_ok(), "{r:?}");
        *cb.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(r.event_id.clone())
            .or_default() += 1;
    });
    let bus = connect(b, config).await;
    let mut stream = bus.results().expect("results stream");
    assert!(matches!(bus.results(), Err(BusError::ResultsAlreadyTaken)));
    let mut ids = Vec::new();
    for i in 0..N {
        let id = if i % 2 == 0 {
            bus.publish(&topic, Bytes::from(format!("raw {i}"))).await
        } else {
            bus.publish_envelope(&topic, &env("agg-res", i as i64))
                .await
        };
        ids.push(id.expect("publish"));
    }
    let waited = bus
        .publish_and_wait(&topic, &b"awaited"[..])
        .await
        .expect("publish and wait");
    assert!(waited.is_ok(), "{waited:?}");
    ids.push(waited.event_id.clone());
    bus.flush().await.expect("flush");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..ids.len() {
        let r: PublishResult = tokio::time::timeout(kit_timeout(), stream.recv())
            .await
            .expect("a result in time")
            .expect("stream open");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.topic, topic);
        *seen.entry(r.event_id).or_default() += 1;
    }
    bus.close().await.expect("close");
    assert!(stream.recv().await.is_none(), "more results than publishes");
    assert_eq!(seen.len(), ids.len());
    assert!(seen.values().all(|n| *n == 1));
    let by_callback = by_callback
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "stream: no single result for {id}");
        assert_eq!(
            by_callback.get(id),
            Some(&1),
            "callback: no single result for {id}"
        );
    }
    assert_eq!(by_callback.len(), ids.len());
}

/// Publishing the same `event_id` twice: the handler sees it once; backends whose broker
/// deduplicates also report the second publish as a duplicate.
pub async fn dedup_by_event_id<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("dedup");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, rec.envelope_handler())
        .await
        .expect("subscribe");
    let e = env("agg-dd", 1);
    let first = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    let second = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
    assert_eq!(second.event_id, e.event_id);
    if bus.capabilities().publish_dedup {
        assert_eq!(second.outcome.as_ref().map(|r| r.duplicate), Ok(true));
    }
    bus.publish_envelope(&topic, &env("agg-dd", 2))
        .await
        .expect("publish");
    let got = rec
        .wait_until("the sentinel", |items| {
            items.iter().any(|x| x.event_version == 2)
        })
        .await;
    assert_eq!(
        got.iter().filter(|x| x.event_id == e.event_id).count(),
        1,
        "the duplicate reached the handler"
    );
    bus.close().await.expect("close");
}

/// `close()` during a stream of publishes: every accepted publish gets one result, all are
/// stored, later publishes are refused with `Closed`.
pub async fn close_while_publishing_loses_nothing<B: Backend>(b: &B) {
    let topic = unique("close");
    let bus = connect(b, kit_config()).await;
    let mut stream = bus.results().expect("results");
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let (pb, acc, t) = (bus.clone(), accepted.clone(), topic.clone());
    let (mid_flow, started) = tokio::sync::oneshot::channel();
    let publisher = tokio::spawn(async move {
        let mut mid_flow = Some(mid_flow);
        for v in 1..=20_000i64 {
            match pb
                .publish_envelope(&t, &env(&format!("agg-{}", v % 16), v))
                .await
            {
                Ok(id) => {
                    acc.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                    if v == 500 {
                        if let Some(tx) = mid_flow.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Err(BusError::Closed) => return true,
                Err(e) => panic!("unexpected publish error {e}"),
            }
        }
        false
    });
    started.await.expect("500 publishes accepted");
    bus.close().await.expect("close");
    let refused = publisher.await.expect("publisher task");
    assert!(refused, "publishing went on after close");
    assert!(matches!(
        bus.publish(&topic, &b"late"[..]).await,
        Err(BusError::Closed)
    ));
    let accepted = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut results = HashMap::new();
    while let Some(r) = stream.recv().await {
        assert!(r.is_ok(), "{r:?}");
        *results.entry(r.event_id).or_insert(0) += 1;
    }
    assert_eq!(
        results.len(),
        accepted.len(),
        "one result per accepted publish"
    );
    assert!(results.values().all(|n| *n == 1));
    let reader = connect(b, kit_config()).await;
    let rec: Recorder<Envelope> = Recorder::default();
    reader
        .subscribe_envelope(&topic, &unique("after-close"), rec.envelope_handler())
        .await
        .expect("subscribe");
    let want: HashSet<String> = accepted.into_iter().collect();
    rec.wait_until("every accepted publish stored", |items| {
        items.iter().filter(|e| want.contains(&e.event_id)).count() >= want.len()
    })
    .await;
    reader.close().await.expect("close");
}

/// `close()` is bounded by the close timeout even when the application took the results
/// stream and never reads it: results that cannot be delivered in time are dropped from the
/// stream (counted in `results_dropped`), the callback still sees every one.
pub async fn close_bounded_with_unread_results<B: Backend>(b: &B) {
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
    let topic = unique("unread");
    let callback_seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let cs = callback_seen.clone();
    let mut cfg = kit_config()
        .with_close_timeout(CLOSE_TIMEOUT)
        .with_result_callback(move |r: &PublishResult| {
            *cs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(r.event_id.clone())
                .or_insert(0) += 1;
        });
    cfg.publish.results_capacity = 100;
    cfg.publish.in_flight_window = 100;
    let bus = connect(b, cfg).await;
    let stream = bus.results().expect("results");
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let (pb, acc, t) = (bus.clone(), accepted.clone(), topic.clone());
    let (going_tx, going) = tokio::sync::oneshot::channel::<()>();
    let publisher = tokio::spawn(async move {
        let mut going_tx = Some(going_tx);
        for v in 1..=1_000i64 {
            match pb.publish_envelope(&t, &env("agg-u", v)).await {
                Ok(id) => acc.lock().unwrap_or_else(|e| e.into_inner()).push(id),
                Err(BusError::Closed) => return,
                Err(e) => panic!("unexpected publish error {e}"),
            }
            if v == 150 {
                if let Some(tx) = going_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    // The stream (100) and the window (100) fill up; publishing then waits on the reader.
    going.await.expect("publishing got going (150 accepted)");
    // Four phases (subscriptions, dispatcher, flush, collector) each bounded by the timeout.
    let bound = CLOSE_TIMEOUT * 4 + Duration::from_secs(10);
    let closed = tokio::time::timeout(bound, bus.close()).await;
    assert!(closed.is_ok(), "close() did not return within {bound:?}");
    publisher.await.expect("publisher task");
    let accepted = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let seen = callback_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for id in &accepted {
        assert_eq!(seen.get(id), Some(&1), "callback missed or repeated {id}");
    }
    let mut stream = stream;
    let mut streamed = 0;
    while let Some(_r) = stream.recv().await {
        streamed += 1;
    }
    let m = bus.metrics();
    assert!(m.results_dropped > 0, "{m:?}");
    assert_eq!(streamed + m.results_dropped as usize, accepted.len());
}

/// `subscribe` racing `close`: either the subscription is refused with `Closed` or it is
/// stopped by the close; in both cases nothing the bus spawned is alive once `close` returns.
pub async fn subscribe_racing_close_leaves_nothing<B: Backend>(b: &B) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let topic = unique("race");
    for round in 0..50 {
        let baseline = metrics.num_alive_tasks();
        let bus = connect(b, kit_config()).await;
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        let handler = move |_m: Message| {
            h.fetch_add(1, Ordering::SeqCst);
            futures_util::future::ready(Ok::<(), HandlerError>(()))
        };
        // `subscribe` runs on a thread of its own (not a task, which would itself count as
        // alive for a moment after it completed), so the two truly race.
        let (b1, t, g) = (bus.clone(), topic.clone(), unique("g"));
        let handle = tokio::runtime::Handle::current();
        let (done, subscribed) = tokio::sync::oneshot::channel();
        let racer = std::thread::spawn(move || {
            let r = handle.block_on(async move { b1.subscribe(&t, &g, handler).await.map(drop) });
            let _ = done.send(r);
        });
        bus.close().await.expect("close");
        let sub = subscribed.await.expect("the subscribing thread reports");
        racer.join().expect("the subscribing thread ends");
        match sub {
            Ok(()) | Err(BusError::Closed) => {}
            Err(e) => panic!("round {round}: unexpected subscribe error {e}"),
        }
        assert!(matches!(
            bus.subscribe(&topic, "late", |_m: Message| async { Ok(()) })
                .await,
            Err(BusError::Closed)
        ));
        // The bus is still held: a closed bus must not keep tasks alive until it is dropped.
        // The bus's own tasks have ended when `close()` returns; a broker client's internal
        // tasks (async-nats spawns some without join handles) may need a few scheduler turns
        // to be released after they signalled their end: wait for that condition, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while metrics.num_alive_tasks() > baseline && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            metrics.num_alive_tasks(),
            baseline,
            "round {round}: tasks still alive after close() returned"
        );
        drop(bus);
    }
}

fn varied_json(n: usize) -> Bytes {
    let rows: Vec<serde_json::Value> = (0..n)
        .map(|i| json!({"sku": format!("SKU-{:05}", i * 7919 % 10007), "qty": i % 13, "price": (i * 37 % 1000) as f64 / 10.0, "tags": ["a", "b"]}))
        .collect();
    Bytes::from(serde_json::to_vec(&json!({ "rows": rows })).unwrap_or_default())
}

/// Compression happens exactly once, where the backend declares it: the bytes the broker
/// stores are compressed (read back raw, without the bus), never twice, and the handler gets
/// the original payload without the encoding header.
pub async fn compression_round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config().with_compression(Compression::Lz4)).await;
    let native = bus.capabilities().native_compression;
    let topic = unique("lz4");
    let group = unique("group");
    let rec = Recorder::default();
    bus.subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let payload = varied_json(200);
    bus.publish_and_wait(&topic, payload.clone())
        .await
        .expect("publish");
    let got = rec.wait_for(1, "compressed message").await;
    assert_eq!(got[0].payload(), &payload);
    assert!(got[0].headers().get(headers::CONTENT_ENCODING).is_none());
    match b.read_stored(&topic, 1).await {
        None => println!(
            "no raw reader in this harness; the backend crate's kit run checks the stored bytes"
        ),
        Some(stored) => {
            let m = &stored[0];
            if native {
                assert_eq!(
                    m.batch_compression.as_deref(),
                    Some(crate::codec::LZ4),
                    "the client compresses the batch on the wire"
                );
                assert_eq!(
                    m.header(headers::CONTENT_ENCODING),
                    None,
                    "no second compression"
                );
                assert_eq!(
                    m.payload, payload,
                    "the stored payload is plain inside the batch"
                );
            } else {
                assert_eq!(m.batch_compression, None);
                assert_eq!(m.header(headers::CONTENT_ENCODING), Some(crate::codec::LZ4));
                assert!(
                    m.payload.len() < payload.len() / 2,
                    "stored {} bytes for a {}-byte payload: not compressed",
                    m.payload.len(),
                    payload.len()
                );
            }
            println!(
                "stored: {} payload bytes for {} ({}), batch compression {:?}",
                m.payload.len(),
                payload.len(),
                if native {
                    "client batch compression"
                } else {
                    "bus LZ4"
                },
                m.batch_compression
            );
        }
    }
    bus.close().await.expect("close");
}

/// Compressed and plain messages share a topic; each is decoded correctly.
pub async fn mixed_compressed_and_plain<B: Backend>(b: &B) {
    let topic = unique("mixed");
    let group = unique("group");
    let lz = connect(b, kit_config().with_compression(Compression::Lz4)).await;
    let plain = connect(b, kit_config()).await;
    let rec = Recorder::default();
    plain
        .subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let big = varied_json(100);
    let id1 = lz.publish(&topic, big.clone()).await.expect("publish");
    let id2 = plain.publish(&topic, big.clone()).await.expect("publish");
    let id3 = lz
        .send(Publication::new(&topic, big.clone()).compression(Compression::None))
        .await
        .expect("publish");
    let got = rec.wait_for(3, "three messages").await;
    for id in [id1, id2, id3] {
        let m = got
            .iter()
            .find(|m| m.event_id() == Some(id.as_str()))
            .expect("message by id");
        assert_eq!(m.payload(), &big);
    }
    lz.close().await.expect("close");
    plain.close().await.expect("close");
}

/// Malformed envelopes and corrupt compressed frames go to the dead-letter topic with the
/// reason; the subscription goes on.
pub async fn malformed_input_dead_letter<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("malformed");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, rec.envelope_handler())
        .await
        .expect("subscribe");
    let bad_json = bus
        .send(Publication::new(&topic, &b"{not json"[..]).aggregate_id("agg-m"))
        .await
        .expect("publish");
    let bad_lz4 = bus
        .send(
            Publication::new(&topic, &b"\x10\x00\x00\x00garbage-not-lz4"[..])
                .aggregate_id("agg-m")
                .header(headers::CONTENT_ENCODING, "lz4"),
        )
        .await
        .expect("publish");
    let good = env("agg-m", 1);
    bus.publish_envelope(&topic, &good).await.expect("publish");
    let got = rec.wait_for(1, "the valid envelope").await;
    assert_eq!(got[0], good);
    let dead = dlq.wait_for(2, "two dead letters").await;
    let reason = |id: &str| {
        dead.iter()
            .find(|m| m.event_id() == Some(id))
            .and_then(|m| m.headers().get(headers::DLQ_REASON).map(str::to_owned))
    };
    assert_eq!(reason(&bad_json).as_deref(), Some("malformed"));
    assert_eq!(reason(&bad_lz4).as_deref(), Some("codec"));
    let corrupt = dead
        .iter()
        .find(|m| m.event_id() == Some(bad_lz4.as_str()))
        .expect("corrupt frame dead letter");
    assert_eq!(&corrupt.payload()[..], b"\x10\x00\x00\x00garbage-not-lz4");
    assert_eq!(
        corrupt.headers().get(headers::DLQ_CONTENT_ENCODING),
        Some("lz4")
    );
    assert!(bus.metrics().malformed >= 2);
    bus.close().await.expect("close");
}

/// Bad topic names, oversize messages and invalid envelopes are refused with typed errors
/// before anything reaches the broker.
pub async fn bad_input_is_rejected<B: Backend>(b: &B) {
    let bus = connect(b, kit_config().with_max_message_bytes(64 * 1024)).await;
    for bad in ["", "has space", "wild.*", "tail.>", "a..b"] {
        assert!(
            matches!(
                bus.publish(bad, &b"x"[..]).await,
                Err(BusError::Transport(TransportError::InvalidTopic { .. }))
            ),
            "{bad:?}"
        );
    }
    let topic = unique("bad");
    let big = Bytes::from(vec![b'x'; 64 * 1024 + 1]);
    assert!(matches!(
        bus.publish(&topic, big).await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    let mut e = env("agg-b", 1);
    e.event_type.clear();
    assert!(matches!(
        bus.publish_envelope(&topic, &e).await,
        Err(BusError::Envelope(crate::EnvelopeError::EmptyEventType))
    ));
    assert!(matches!(
        bus.subscribe(&topic, "bad group!", Recorder::default().handler())
            .await,
        Err(BusError::Config(_))
    ));
    assert_eq!(bus.metrics().published, 0);
    bus.close().await.expect("close");
}

/// Runs on Tokio's current-thread runtime (the default of `#[tokio::test]`): a backend that
/// supports it publishes, consumes, retries and closes there; one that does not refuses at
/// connect with a clear [`TransportError::Unsupported`] instead of stalling later.
pub async fn current_thread_runtime<B: Backend>(b: &B) {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread
    );
    let bus = match b.connect(kit_config()).await {
        Ok(bus) => bus,
        Err(e) => {
            assert!(
                !b.supports_current_thread(),
                "connect failed on a current-thread runtime: {e}"
            );
            assert!(
                matches!(e, BusError::Transport(TransportError::Unsupported(ref m)) if m.contains("multi-thread")),
                "refusal must say what to use instead: {e:?}"
            );
            println!("refused on a current-thread runtime, as declared: {e}");
            return;
        }
    };
    assert!(
        b.supports_current_thread(),
        "the backend declares no current-thread support but connected"
    );
    let topic = unique("current-thread");
    let rec: Recorder<Envelope> = Recorder::default();
    let r = rec.clone();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let f = failed_once.clone();
    bus.subscribe_envelope(&topic, &unique("group"), move |e: Envelope| {
        let (r, f) = (r.clone(), f.clone());
        async move {
            if e.event_version == 2 && f.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=20 {
        bus.publish_envelope(&topic, &env(&format!("agg-{}", v % 3), v))
            .await
            .expect("publish");
    }
    let got = rec
        .wait_for(20, "20 envelopes on a current-thread runtime")
        .await;
    assert_eq!(ordering_violations(&got), 0);
    assert_eq!(
        failed_once.load(Ordering::SeqCst),
        2,
        "one retry of version 2"
    );
    bus.close().await.expect("close");
}

/// Fetches from `sub` until `count` deliveries arrived; panics after the kit timeout.
async fn fetch_n<S: crate::Subscription>(
    sub: &mut S,
    count: usize,
    what: &str,
) -> Vec<S::Delivery> {
    let deadline = tokio::time::Instant::now() + kit_timeout();
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {:?} waiting for {what}: {} of {count} fetched",
            kit_timeout(),
            got.len()
        );
        got.extend(
            sub.fetch(count - got.len(), Duration::from_millis(100))
                .await
                .expect("fetch"),
        );
    }
    got
}

fn id_of<D: crate::Delivery>(d: &D) -> String {
    d.message().event_id().unwrap_or_default().to_string()
}

/// The settlement contract, at the transport level: a nak'ed message comes back (its delivery
/// count up), an acked one never does, neither to the same member nor to the next member of
/// the group after a restart. "Never" is checked by a marker published afterwards on the same
/// aggregate (one partition): everything before it has been delivered when it arrives.
pub async fn ack_settles_nak_redelivers<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("acknak");
    let spec = SubscriptionSpec {
        topic: topic.clone(),
        group: unique("group"),
    };
    let events: Vec<Envelope> = (1..=10).map(|v| env("agg-an", v)).collect();
    for e in &events {
        bus.publish_envelope(&topic, e).await.expect("publish");
    }
    bus.flush().await.expect("flush");
    let t = bus.transport();
    let mut sub = t.subscribe(spec.clone()).await.expect("subscribe");
    let first = fetch_n(&mut sub, 10, "the ten events").await;
    let nacked = events[4].event_id.clone();
    for d in first {
        if id_of(&d) == nacked {
            d.nak(Duration::ZERO).await.expect("nak");
        } else {
            d.ack().await.expect("ack");
        }
    }
    let again = fetch_n(&mut sub, 1, "the nak'ed event again").await;
    assert_eq!(id_of(&again[0]), nacked, "only the nak'ed event comes back");
    assert!(
        again[0].message().delivery_count() >= 2,
        "a redelivery counts: {}",
        again[0].message().delivery_count()
    );
    for d in again {
        d.ack().await.expect("ack");
    }
    let marker = env("agg-an", 11);
    bus.publish_envelope_and_wait(&topic, &marker)
        .await
        .expect("publish marker");
    let next = fetch_n(&mut sub, 1, "the marker").await;
    assert_eq!(id_of(&next[0]), marker.event_id, "an acked event came back");
    for d in next {
        d.ack().await.expect("ack");
    }
    sub.release_prefetched().await;
    sub.close().await.expect("close the consumer");

    // The next member of the group (a restart) gets nothing that was acked.
    let restart_marker = env("agg-an", 12);
    bus.publish_envelope_and_wait(&topic, &restart_marker)
        .await
        .expect("publish marker");
    let mut sub = t.subscribe(spec).await.expect("subscribe again");
    let after = fetch_n(&mut sub, 1, "the marker after the restart").await;
    assert_eq!(
        id_of(&after[0]),
        restart_marker.event_id,
        "an acked event was redelivered after a restart"
    );
    for d in after {
        d.ack().await.expect("ack");
    }
    sub.release_prefetched().await;
    sub.close().await.expect("close the consumer");
    bus.close().await.expect("close");
}

/// Runs every conformance case as its own `#[tokio::test]`. `$make` is an `async fn()`
/// returning the [`Backend`].
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@cases $make;
            round_trip, headers_round_trip, per_aggregate_order, global_pool_delivery,
            blocked_aggregate_stalls_no_other, retrying_aggregate_keeps_order_others_flow,
            retry_then_success, panic_is_an_error, dead_letter_after_attempts,
            consumer_group_shares_work, independent_groups, new_subscriber_receives_stored,
            resume_after_restart, one_result_per_publish, dedup_by_event_id,
            close_while_publishing_loses_nothing, close_bounded_with_unread_results,
            subscribe_racing_close_leaves_nothing, compression_round_trip,
            mixed_compressed_and_plain, malformed_input_dead_letter, bad_input_is_rejected,
            ack_settles_nak_redelivers);
        $crate::conformance_tests!(@current_thread $make; current_thread_runtime);
    };
    (@current_thread $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "current_thread")]
            async fn $case() {
                let backend = $make().await;
                $crate::testkit::$case(&backend).await;
            }
        )*
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $make().await;
                $crate::testkit::$case(&backend).await;
            }
        )*
    };
}

/// The memory backend under the kit: each `connect` is a new client of the same broker.
impl Backend for crate::memory::MemoryBroker {
    type Transport = crate::memory::MemoryTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<Self::Transport>, BusError> {
        Bus::new(self.transport(), config)
    }

    async fn read_stored(&self, topic: &str, count: usize) -> Option<Vec<StoredMessage>> {
        let stored = self.messages(topic);
        assert!(
            stored.len() >= count,
            "{} of {count} messages stored",
            stored.len()
        );
        Some(
            stored
                .into_iter()
                .map(|(h, payload)| StoredMessage {
                    payload,
                    headers: h
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    batch_compression: None,
                })
                .collect(),
        )
    }
}

/// Peak tokio tasks alive while `messages` envelopes over `aggregates` aggregates flow
/// through `bus` (one envelope subscription on a fresh topic). Backends compare it at two
/// volumes to show the task count is set by configuration only.
pub async fn peak_tasks_during_flow<T: Transport>(
    bus: &Bus<T>,
    messages: usize,
    aggregates: usize,
) -> usize {
    let topic = unique("tasks");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    bus.subscribe_envelope(&topic, &unique("group"), move |_e: Envelope| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::Relaxed);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let metrics = tokio::runtime::Handle::current().metrics();
    let publish = async {
        for v in 1..=(messages / aggregates) as i64 {
            for a in 0..aggregates {
                bus.publish_envelope(&topic, &env(&format!("agg-{a}"), v))
                    .await
                    .expect("publish");
            }
        }
    };
    let mut peak = 0;
    // The sampler runs inside this future, not as a task of its own, and samples at least once.
    let sample = async {
        let deadline = tokio::time::Instant::now() + kit_timeout() * 5;
        loop {
            peak = peak.max(metrics.num_alive_tasks());
            if seen.load(Ordering::Relaxed) >= messages {
                break;
            }
            assert!(
                deadline > tokio::time::Instant::now(),
                "not all {messages} envelopes delivered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(publish, sample);
    peak
}
