//! Kafka-specific behaviour: against the real Kafka-protocol broker, and against librdkafka's
//! in-process mock cluster where a broker must go down and come back.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{brokers, test_config};
use eventbus_core::testkit::{
    connection_lost_and_back, java_partition_mismatches, kit_config, ordering_violations,
    peak_tasks_during_flow, unique, Outage, Recorder,
};
use eventbus_core::{
    Bus, BusConfig, BusError, Envelope, HandlerError, Message, Publication, TransportError,
};
use eventbus_kafka::{KafkaConfig, KafkaTransport};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tokio::sync::Semaphore;

async fn bus_with(config: KafkaConfig, bus: BusConfig) -> Bus<KafkaTransport> {
    let t = KafkaTransport::connect(config).await.expect("connect");
    Bus::new(t, bus).expect("bus")
}

fn one_partition() -> KafkaConfig {
    let mut c = test_config(&brokers());
    c.topic.partitions = 1;
    c
}

/// The group's committed offset of partition 0, asked without joining the group.
fn committed(group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    match got.elements().first().map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

async fn wait_committed(group: &str, topic: &str, want: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (g, t) = (group.to_string(), topic.to_string());
        let got = tokio::task::spawn_blocking(move || committed(&g, &t))
            .await
            .expect("query");
        if got == Some(want) {
            return;
        }
        assert!(
            deadline > tokio::time::Instant::now(),
            "committed offset stayed {got:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A slow early message holds the committed offset back while later ones finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_early_message_holds_the_commit_back() {
    let bus = bus_with(one_partition(), kit_config()).await;
    let (topic, group) = (unique("kafka-commit"), unique("grp"));
    let gate = Arc::new(Semaphore::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (g, d) = (gate.clone(), done.clone());
    // No aggregate id: the global pool runs them concurrently, so later ones finish first.
    bus.subscribe(&topic, &group, move |m: Message| {
        let (g, d) = (g.clone(), d.clone());
        async move {
            if m.payload().as_ref() == b"0" {
                g.acquire()
                    .await
                    .map_err(|e| HandlerError::retryable(e.to_string()))?
                    .forget();
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for i in 0..10 {
        bus.publish(&topic, i.to_string()).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < 9 {
        assert!(
            deadline > tokio::time::Instant::now(),
            "messages 1..9 not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several commit intervals pass: offset 0 is still running, so nothing may be committed.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (g2, t2) = (group.clone(), topic.clone());
    let now = tokio::task::spawn_blocking(move || committed(&g2, &t2))
        .await
        .expect("query");
    assert!(
        now.is_none() || now == Some(0),
        "committed {now:?} past an unfinished message"
    );
    gate.add_permits(1);
    wait_committed(&group, &topic, 10).await;
    bus.close().await.expect("close");
}

/// A consumer restart redelivers exactly the uncommitted messages: from the first unfinished
/// offset on, nothing before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_redelivers_only_uncommitted_messages() {
    let (topic, group) = (unique("kafka-restart"), unique("grp"));
    let quick_close = kit_config().with_close_timeout(Duration::from_secs(2));
    let first = bus_with(one_partition(), quick_close).await;
    let handled: Recorder<Message> = Recorder::default();
    let h = handled.clone();
    first
        .subscribe(&topic, &group, move |m: Message| {
            let h = h.clone();
            async move {
                if m.payload().as_ref() == b"5" {
                    // Never finishes in this instance: the process "dies" with it in flight.
                    std::future::pending::<()>().await;
                }
                h.push(m);
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    for i in 0..10 {
        first.publish(&topic, i.to_string()).await.expect("publish");
    }
    handled.wait_for(9, "all but message 5").await;
    // close() gives up on message 5 at the deadline and commits only up to it.
    let _ = first.close().await;
    wait_committed(&group, &topic, 5).await;

    let second = bus_with(one_partition(), kit_config()).await;
    let again: Recorder<Message> = Recorder::default();
    second
        .subscribe(&topic, &group, again.handler())
        .await
        .expect("subscribe");
    let got = again.wait_for(5, "messages 5..9 again").await;
    let mut payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["5", "6", "7", "8", "9"]);
    second.close().await.expect("close");
}

/// Two members join and leave a group while events flow: nothing is lost and each
/// aggregate's events are handled in order across the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_keeps_order_and_loses_nothing() {
    const AGGS: usize = 24;
    const VERSIONS: i64 = 40;
    let (topic, group) = (unique("kafka-rebalance"), unique("grp"));
    let log: Recorder<Envelope> = Recorder::default();
    let member = |log: Recorder<Envelope>| {
        move |e: Envelope| {
            let log = log.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                log.push(e);
                Ok::<(), HandlerError>(())
            }
        }
    };
    let a = bus_with(test_config(&brokers()), kit_config()).await;
    a.subscribe_envelope(&topic, &group, member(log.clone()))
        .await
        .expect("subscribe a");
    let publisher = {
        let a = a.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for v in 1..=VERSIONS {
                for agg in 0..AGGS {
                    let e = Envelope::new(format!("agg-{agg}"), "t", v, json!({}));
                    ids.push(e.event_id.clone());
                    a.publish_envelope(&topic, &e).await.expect("publish");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ids
        })
    };
    log.wait_for(100, "traffic before the second member").await;
    let b = bus_with(test_config(&brokers()), kit_config()).await;
    let b_sub = b
        .subscribe_envelope(&topic, &group, member(log.clone()))
        .await
        .expect("subscribe b");
    log.wait_for(500, "traffic with two members").await;
    b_sub.unsubscribe().await;
    let ids = publisher.await.expect("publisher");
    let want: HashSet<String> = ids.into_iter().collect();
    let got = log
        .wait_until("every event", |items| {
            items.iter().filter(|e| want.contains(&e.event_id)).count() >= want.len()
        })
        .await;
    let unique_ids: HashSet<&String> = got.iter().map(|e| &e.event_id).collect();
    assert_eq!(unique_ids.len(), want.len(), "lost events");
    assert_eq!(
        ordering_violations(&got),
        0,
        "order broken by the rebalance"
    );
    println!(
        "rebalance: {} events, {} handlings ({} repeats)",
        want.len(),
        got.len(),
        got.len() - want.len()
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Broker down and up again (librdkafka's mock cluster): every publish gets an OK result
/// once the broker is back and every message is consumed.
/// librdkafka's mock cluster: its one broker goes down and comes back.
struct MockOutage<'a>(
    &'a rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
);

impl Outage for MockOutage<'_> {
    async fn cut(&mut self) {
        self.0.broker_down(1).expect("broker down");
    }
    async fn restore(&mut self) {
        self.0.broker_up(1).expect("broker up");
    }
    fn create_topic(&mut self, topic: &str) {
        self.0.create_topic(topic, 4, 1).expect("create topic");
    }
}

/// The kit's outage case on librdkafka's mock cluster (Tansu cannot be taken down and back
/// with its data: memory storage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_up_loses_nothing() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            let mut cfg = KafkaConfig::new(cluster.bootstrap_servers());
            cfg.topic.partitions = 4;
            cfg.consumer.session_timeout = Duration::from_secs(6);
            let bus = bus_with(cfg, kit_config()).await;
            connection_lost_and_back(&bus, &mut MockOutage(&cluster)).await;
            bus.close().await.expect("close");
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_topic_with_other_partitions_is_a_provisioning_error() {
    let topic = unique("kafka-parts");
    let four = bus_with(test_config(&brokers()), kit_config()).await;
    four.publish_and_wait(&topic, &b"x"[..])
        .await
        .expect("publish");
    let mut eight = test_config(&brokers());
    eight.topic.partitions = 8;
    let other = bus_with(eight, kit_config()).await;
    let err = other
        .publish(&topic, &b"y"[..])
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, BusError::Transport(TransportError::Provisioning(ref m)) if m.contains("4 partitions")),
        "{err:?}"
    );
    four.close().await.expect("close");
    other.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_a_clear_error() {
    let mut cfg = KafkaConfig::new("127.0.0.1:1");
    cfg.request_timeout = Duration::from_secs(2);
    let err = KafkaTransport::connect(cfg).await.err().expect("must fail");
    assert!(
        matches!(err, TransportError::Unavailable(ref m) if m.contains("127.0.0.1:1")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors() {
    let bus = bus_with(test_config(&brokers()), kit_config()).await;
    assert!(matches!(
        bus.publish("bad topic", &b"x"[..]).await,
        Err(BusError::Transport(TransportError::InvalidTopic { .. }))
    ));
    let topic = unique("kafka-bad");
    assert!(matches!(
        bus.publish(&topic, vec![0u8; 2 * 1024 * 1024]).await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    // Corrupt LZ4 and a malformed envelope go to the dead-letter topic.
    let dlq: Recorder<Message> = Recorder::default();
    bus.subscribe(&format!("{topic}.dlq"), &unique("ops"), dlq.handler())
        .await
        .expect("subscribe dlq");
    bus.subscribe_envelope(&topic, &unique("svc"), |_e: Envelope| async { Ok(()) })
        .await
        .expect("subscribe");
    bus.send(
        Publication::new(&topic, &b"\xff\xff\xff\x00nonsense"[..])
            .aggregate_id("a")
            .header(eventbus_core::headers::CONTENT_ENCODING, "lz4"),
    )
    .await
    .expect("publish");
    bus.send(Publication::new(&topic, &b"not an envelope"[..]).aggregate_id("a"))
        .await
        .expect("publish");
    let dead = dlq.wait_for(2, "two dead letters").await;
    let mut reasons: Vec<_> = dead
        .iter()
        .filter_map(|m| {
            m.headers()
                .get(eventbus_core::headers::DLQ_REASON)
                .map(str::to_owned)
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["codec", "malformed"]);
    bus.close().await.expect("close");
}

async fn peak_tasks(n: usize, aggs: usize) -> usize {
    let bus = bus_with(test_config(&brokers()), kit_config()).await;
    let peak = peak_tasks_during_flow(&bus, n, aggs).await;
    bus.close().await.expect("close");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_count_is_the_same_at_1000_and_100000_envelopes() {
    let small = peak_tasks(1_000, 100).await;
    let large = peak_tasks(100_000, 10_000).await;
    println!("Kafka bus, peak tokio tasks: 1,000 envelopes -> {small}; 100,000 envelopes over 10,000 aggregates -> {large}");
    assert_eq!(small, large);
}

/// Once the transport is closed, a subscription's `fetch` says so instead of returning empty
/// batches forever (a fetcher that missed the bus's own stop would otherwise spin on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_after_close_is_closed() {
    use eventbus_core::{Subscription as _, SubscriptionSpec, Transport as _};
    let t = KafkaTransport::connect(test_config(&brokers()))
        .await
        .expect("connect");
    let mut sub = t
        .subscribe(SubscriptionSpec {
            topic: unique("kafka-closed"),
            group: unique("grp"),
        })
        .await
        .expect("subscribe");
    t.close().await.expect("close");
    let got = sub.fetch(10, Duration::from_millis(100)).await;
    assert!(
        matches!(got, Err(TransportError::Closed)),
        "{:?}",
        got.map(|b| b.len())
    );
    sub.close().await.expect("close subscription");
}

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// 1,000 tasks publishing at once to 5 new topics provision each topic once: the OS thread
/// count stays flat instead of one blocking metadata lookup (and thread) per first publish.
/// Idle blocking-pool threads live 10 s, so the count right after the burst is its peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_publishes_to_new_topics_provision_each_topic_once() {
    let bus = Arc::new(bus_with(test_config(&brokers()), kit_config()).await);
    let topics: Vec<String> = (0..5).map(|i| unique(&format!("kafka-burst{i}"))).collect();
    let before = os_threads();
    let start = Arc::new(tokio::sync::Barrier::new(1_000));
    let tasks: Vec<_> = (0..1_000)
        .map(|i| {
            let (bus, start, topic) = (bus.clone(), start.clone(), topics[i % 5].clone());
            tokio::spawn(async move {
                start.wait().await;
                bus.publish(&topic, &b"x"[..]).await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("publish");
    }
    bus.flush().await.expect("flush");
    let after = os_threads();
    println!("Kafka bus, OS threads: {before} before 1,000 first publishes to 5 new topics, {after} after");
    assert!(
        after <= before + 8,
        "OS threads grew from {before} to {after}: a metadata lookup per first publish?"
    );
    Arc::try_unwrap(bus)
        .ok()
        .expect("last reference")
        .close()
        .await
        .expect("close");
}

/// An aggregate lands on the partition Kafka's Java client would pick (murmur2 of the key,
/// made positive, modulo the partition count), not on librdkafka's default CRC32 choice: Java
/// producers, the memory backend and the NATS partitions agree with the bus on Kafka.
#[tokio::test(flavor = "multi_thread")]
async fn aggregates_land_on_the_java_clients_partition() {
    let config = test_config(&brokers());
    let partitions = u32::try_from(config.topic.partitions).expect("positive");
    let bus = bus_with(config, kit_config()).await;
    let mismatches =
        java_partition_mismatches(&bus, &unique("kafka-partitioner"), partitions).await;
    assert!(
        mismatches.is_empty(),
        "(aggregate, stored, Java client's) differ: {mismatches:?}"
    );
    bus.close().await.expect("close");
}
