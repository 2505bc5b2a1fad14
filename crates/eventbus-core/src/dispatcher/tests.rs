//! Dispatcher behaviour through a whole bus on the memory transport.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use crate::memory::{MemoryBroker, MemoryTransport};
use crate::{headers, Bus, BusConfig, Envelope, HandlerError, Message, RetryPolicy};

/// Generous deadline for things that should happen in milliseconds; never a speed assertion.
const DEADLINE: Duration = Duration::from_secs(120);

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        multiplier: 2.0,
    }
}

fn bus(config: BusConfig) -> Bus<MemoryTransport> {
    Bus::new(MemoryTransport::new(), config).expect("bus")
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            deadline > tokio::time::Instant::now(),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Per-aggregate last version seen and the violations found.
#[derive(Default)]
struct OrderCheck {
    last: Mutex<HashMap<String, i64>>,
    violations: AtomicUsize,
    seen: AtomicUsize,
}

impl OrderCheck {
    fn record(&self, e: &Envelope) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.insert(e.aggregate_id.clone(), e.event_version);
        if prev.is_some_and(|p| e.event_version != p + 1)
            || (prev.is_none() && e.event_version != 1)
        {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        self.seen.fetch_add(1, Ordering::Relaxed);
    }
}

async fn publish_versions(bus: &Bus<MemoryTransport>, topic: &str, aggs: usize, versions: i64) {
    for v in 1..=versions {
        for a in 0..aggs {
            let e = Envelope::new(format!("agg-{a}"), "t", v, json!({ "v": v }));
            bus.publish_envelope(topic, &e).await.expect("publish");
        }
    }
}

async fn order_per_aggregate(aggregates: usize, versions: i64) {
    let total = aggregates * versions as usize;
    let bus = bus(BusConfig::default());
    let check = Arc::new(OrderCheck::default());
    let c = check.clone();
    bus.subscribe_envelope("orders", "g", move |e: Envelope| {
        let c = c.clone();
        async move {
            if e.event_version % 7 == 0 {
                tokio::task::yield_now().await;
            }
            c.record(&e);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    publish_versions(&bus, "orders", aggregates, versions).await;
    wait_until("every envelope", || {
        check.seen.load(Ordering::Relaxed) == total
    })
    .await;
    assert_eq!(check.violations.load(Ordering::Relaxed), 0);
    let m = bus.metrics();
    assert_eq!(m.handled, total as u64);
    assert_eq!(m.deduplicated, 0);
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_aggregate_1000_aggregates_x_100_events() {
    order_per_aggregate(1_000, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_aggregate_10000_aggregates_x_10_events() {
    order_per_aggregate(10_000, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_order() {
    let bus = bus(BusConfig::default().with_retry(fast_retry(5)));
    let check = Arc::new(OrderCheck::default());
    let failures = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let (c, f) = (check.clone(), failures.clone());
    bus.subscribe_envelope("orders", "g", move |e: Envelope| {
        let (c, f) = (c.clone(), f.clone());
        async move {
            if e.event_version % 10 == 3 {
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                let n = f.entry(e.event_id.clone()).or_insert(0);
                if *n < 2 {
                    *n += 1;
                    return Err(HandlerError::retryable("try again"));
                }
            }
            c.record(&e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    publish_versions(&bus, "orders", 50, 30).await;
    wait_until("1,500 envelopes", || {
        check.seen.load(Ordering::Relaxed) == 1500
    })
    .await;
    assert_eq!(check.violations.load(Ordering::Relaxed), 0);
    // Versions 3, 13, 23 of 50 aggregates failed twice each.
    assert_eq!(bus.metrics().retries, 50 * 3 * 2);
    assert_eq!(bus.metrics().dead_lettered, 0);
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_leaves_workers_alive() {
    let bus = bus(BusConfig::default()
        .with_retry(fast_retry(2))
        .with_keyed_workers(2)
        .with_global_workers(1));
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    bus.subscribe("jobs", "g", move |m: Message| {
        let h = h.clone();
        async move {
            // Messages with an even first byte panic on every attempt.
            if m.payload().first().is_some_and(|b| b % 2 == 0) {
                panic!("deliberate");
            }
            h.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    // Half of them panic every time: they end in the dead-letter topic after 2 tries.
    for i in 0..200u8 {
        let p = crate::Publication::new("jobs", vec![i]).aggregate_id(format!("a{}", i % 10));
        bus.send(p).await.expect("publish");
    }
    for i in 0..20u8 {
        bus.publish("jobs", vec![i]).await.expect("publish");
    }
    wait_until("every message settled", || {
        let m = bus.metrics();
        m.handled + m.dead_lettered == 220
    })
    .await;
    let m = bus.metrics();
    assert_eq!(m.handled, 110);
    assert_eq!(m.dead_lettered, 110);
    assert_eq!(m.handler_panics, 220);
    assert_eq!(m.workers, 3, "all workers still alive");
    assert_eq!(handled.load(Ordering::Relaxed), 110);
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_after_n_attempts() {
    let broker = MemoryBroker::new();
    let bus = Bus::new(
        broker.transport(),
        BusConfig::default().with_retry(fast_retry(4)),
    )
    .expect("bus");
    let tries = Arc::new(AtomicU32::new(0));
    let t = tries.clone();
    bus.subscribe_envelope("pay", "g", move |e: Envelope| {
        let t = t.clone();
        async move {
            if e.event_version == 1 {
                t.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::retryable("card declined"));
            }
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let dead = Arc::new(Mutex::new(Vec::<Message>::new()));
    let d = dead.clone();
    bus.subscribe("pay.dlq", "ops", move |m: Message| {
        let d = d.clone();
        async move {
            d.lock().unwrap_or_else(|e| e.into_inner()).push(m);
            Ok(())
        }
    })
    .await
    .expect("subscribe dlq");
    let e = Envelope::new("acct-1", "charged", 1, json!({}));
    bus.publish_envelope("pay", &e).await.expect("publish");
    bus.publish_envelope("pay", &Envelope::new("acct-1", "charged", 2, json!({})))
        .await
        .expect("publish");
    wait_until("one dead letter", || {
        !dead.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    })
    .await;
    wait_until("v2 handled", || bus.metrics().handled == 2).await;
    assert_eq!(tries.load(Ordering::SeqCst), 4);
    let dead = dead.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers().get(headers::DLQ_ATTEMPTS), Some("4"));
    assert_eq!(
        dead[0].headers().get(headers::DLQ_ERROR),
        Some("card declined")
    );
    assert_eq!(dead[0].event_id(), Some(e.event_id.as_str()));
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_queue_depth() {
    let mut cfg = BusConfig::default()
        .with_keyed_workers(4)
        .with_global_workers(2)
        .with_batch_size(50);
    cfg.dispatch.keyed_buffer = 8;
    cfg.dispatch.global_queue = 4;
    let bound = (4 * 8 + 4) + (4 + 2) + 50;
    let bus = bus(cfg);
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    bus.subscribe_envelope("load", "g", move |_e: Envelope| {
        let g = g.clone();
        async move {
            g.acquire()
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))?
                .forget();
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    publish_versions(&bus, "load", 100, 50).await;
    // Wait until the fetcher has stalled on full queues.
    let mut last = u64::MAX;
    let mut stable = 0;
    while stable < 5 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let f = bus.metrics().fetched;
        if f == last {
            stable += 1;
        } else {
            stable = 0;
            last = f;
        }
    }
    let m = bus.metrics();
    assert!(m.fetched > 0);
    assert!(
        m.fetched as usize <= bound,
        "fetched {} with handlers blocked; the queues should have stopped the fetcher at {bound}",
        m.fetched
    );
    assert!(m.queued_messages as usize <= 4 * 8 + 4);
    gate.add_permits(5000);
    wait_until("all 5,000 handled", || bus.metrics().handled == 5000).await;
    bus.close().await.expect("close");
}

/// Peak tokio tasks alive while `messages` envelopes over `aggregates` aggregates flow
/// through a bus with a fixed configuration.
async fn peak_tasks(messages: usize, aggregates: usize) -> usize {
    // A task whose join handle was awaited may still count as alive for a few scheduler
    // turns (tokio releases it after waking the joiner): let the previous bus's tasks go.
    let metrics = tokio::runtime::Handle::current().metrics();
    assert_eq!(
        crate::testkit::tasks_released(0).await,
        0,
        "tasks left from before"
    );
    let bus = bus(BusConfig::default()
        .with_keyed_workers(16)
        .with_global_workers(4));
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    bus.subscribe_envelope("flow", "g", move |_e: Envelope| {
        let s = s.clone();
        async move {
            tokio::task::yield_now().await;
            s.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let versions = (messages / aggregates) as i64;
    let publisher = {
        let bus = bus.clone();
        async move { publish_versions(&bus, "flow", aggregates, versions).await }
    };
    let mut peak = 0;
    // Samples at least once: the publisher may finish without yielding, and the workers may
    // handle everything before the sampler is first polled.
    let sample = async {
        loop {
            peak = peak.max(metrics.num_alive_tasks());
            if seen.load(Ordering::Relaxed) >= messages {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    // Publisher and sampler run inside this test's own future: neither is a spawned task.
    tokio::join!(publisher, sample);
    assert!(bus.metrics().in_flight_publishes <= 10_000);
    bus.close().await.expect("close");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_count_is_set_by_configuration_only() {
    let small = peak_tasks(1_000, 100).await;
    let large = peak_tasks(100_000, 10_000).await;
    println!("peak tokio tasks: 1,000 messages -> {small}, 100,000 messages over 10,000 aggregates -> {large}");
    // 16 keyed + 4 global workers + 1 fetcher + 1 ACK collector.
    assert_eq!(small, 22);
    assert_eq!(large, small);
}

/// The memory transport, except that every publish to a dead-letter topic fails.
struct FailingDeadLetters(MemoryTransport);

impl crate::Transport for FailingDeadLetters {
    type Ack = <MemoryTransport as crate::Transport>::Ack;
    type Subscription = <MemoryTransport as crate::Transport>::Subscription;

    fn backend(&self) -> &'static str {
        "memory-failing-dlq"
    }

    fn capabilities(&self) -> crate::Capabilities {
        self.0.capabilities()
    }

    async fn send(&self, m: crate::OutgoingMessage) -> Result<Self::Ack, crate::TransportError> {
        if m.topic.ends_with(".dlq") {
            return Err(crate::TransportError::Unavailable(
                "dead-letter topic down".into(),
            ));
        }
        self.0.send(m).await
    }

    async fn subscribe(
        &self,
        spec: crate::SubscriptionSpec,
    ) -> Result<Self::Subscription, crate::TransportError> {
        self.0.subscribe(spec).await
    }

    fn health(&self) -> crate::Health {
        self.0.health()
    }

    async fn close(&self) -> Result<(), crate::TransportError> {
        self.0.close().await
    }
}

/// A dead letter that cannot be stored must not let the aggregate's later events overtake
/// the message: the subscription stops with an error instead of moving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dead_letter_keeps_the_aggregate_blocked_and_stops_the_subscription() {
    let bus = Bus::new(
        FailingDeadLetters(MemoryTransport::new()),
        BusConfig::default().with_retry(fast_retry(2)),
    )
    .expect("bus");
    let handled = Arc::new(Mutex::new(Vec::<i64>::new()));
    let attempts_on_2 = Arc::new(AtomicUsize::new(0));
    let (h, a2) = (handled.clone(), attempts_on_2.clone());
    let sub = bus
        .subscribe_envelope("orders", "g", move |e: Envelope| {
            let (h, a2) = (h.clone(), a2.clone());
            async move {
                if e.event_version == 2 {
                    a2.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::permanent("cannot handle v2"));
                }
                h.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.event_version);
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    for v in 1..=5 {
        let e = Envelope::new("agg-1", "t", v, json!({ "v": v }));
        bus.publish_envelope("orders", &e).await.expect("publish");
    }
    wait_until("the subscription to stop on the failed dead letter", || {
        sub.failure().is_some()
    })
    .await;
    assert!(!sub.is_running());
    let reason = sub.failure().unwrap_or_default();
    assert!(reason.contains("orders.dlq"), "{reason}");
    // Settled state: the fetcher is gone once the bus closes.
    bus.close().await.expect("close");
    assert_eq!(
        *handled.lock().unwrap_or_else(|e| e.into_inner()),
        vec![1],
        "events after the undeliverable one were handled before it"
    );
    let m = bus.metrics();
    assert_eq!(m.dead_lettered, 0);
    assert!(m.dead_letter_failures >= 1, "{m:?}");
}

/// The bus's own dead-letter publishes are not the application's publishes: they never reach
/// its result callback or stream, and do not count as `published`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_stay_out_of_the_applications_results() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let bus = Bus::builder(MemoryTransport::new())
        .config(BusConfig::default().with_retry(fast_retry(1)))
        .on_publish_result(move |r| {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.topic.clone())
        })
        .build()
        .expect("bus");
    let mut results = bus.results().expect("results");
    bus.subscribe("orders", "g", |_m: Message| async {
        Err::<(), _>(HandlerError::permanent("no"))
    })
    .await
    .expect("subscribe");
    let dlq = Arc::new(AtomicUsize::new(0));
    let d = dlq.clone();
    bus.subscribe("orders.dlq", "reader", move |_m: Message| {
        d.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    })
    .await
    .expect("subscribe dlq");
    bus.publish_and_wait("orders", &b"x"[..])
        .await
        .expect("publish");
    wait_until("the dead letter", || dlq.load(Ordering::SeqCst) == 1).await;
    bus.close().await.expect("close");
    let mut streamed = Vec::new();
    while let Some(r) = results.recv().await {
        streamed.push(r.topic);
    }
    assert_eq!(streamed, vec!["orders".to_string()]);
    assert_eq!(
        *seen.lock().unwrap_or_else(|e| e.into_inner()),
        vec!["orders".to_string()]
    );
    assert_eq!(bus.metrics().published, 1);
    assert_eq!(bus.metrics().dead_lettered, 1);
}

/// `unsubscribe` stays bounded when every worker is stuck in a hung handler and the buffer
/// is full: the fetcher, waiting for room that never comes, hands its message back and
/// stops. Before, it waited for room forever and so did `unsubscribe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_is_bounded_when_every_worker_hangs_and_the_buffer_is_full() {
    let close = Duration::from_secs(2);
    let mut config = BusConfig::default().with_close_timeout(close);
    config.dispatch.keyed_workers = 1;
    config.dispatch.keyed_buffer = 2;
    let bus = bus(config);
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(16);
    let handle = bus
        .subscribe("hung", "g", move |_m: Message| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(()).await;
                // Hangs for good (until the bus aborts it at close).
                std::future::pending::<()>().await;
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    for i in 0..10 {
        bus.send(crate::Publication::new("hung", format!("m{i}")).aggregate_id("one-aggregate"))
            .await
            .expect("publish");
    }
    started.recv().await.expect("a handler started");
    let done = tokio::time::timeout(close + Duration::from_secs(5), handle.unsubscribe()).await;
    assert!(
        done.is_ok(),
        "unsubscribe waited for buffer room behind a hung handler"
    );
    let closed = tokio::time::timeout(close * 3, bus.close()).await;
    assert!(closed.is_ok(), "close not bounded");
}
