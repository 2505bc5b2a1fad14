//! NATS-specific behaviour against a real nats-server.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{nats_url, Nats, OwnServer};
use eventbus_core::testkit::{
    captured_log, connection_lost_and_back, every_event_handled, hang_guard, join_group,
    kit_config, kit_timeout, ordering_violations, peak_tasks_during_flow, unique,
    working_ledger_handler, Backend, GroupLedger, Outage, Recorder,
};
use eventbus_core::{
    headers, Bus, BusConfig, BusError, ConnectionState, Envelope, Publication, TransportError,
};
use eventbus_nats::{Auth, GroupSettings, NatsConfig, NatsTransport, Secret};
use serde_json::json;

async fn bus() -> Bus<NatsTransport> {
    Nats::new().connect(kit_config()).await.expect("connect")
}

#[tokio::test]
async fn unreachable_server_is_a_clear_error() {
    let err = NatsTransport::connect(NatsConfig::new("nats://user:pw@127.0.0.1:1"))
        .await
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(matches!(err, TransportError::Unavailable(_)), "{err:?}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("pw"), "credentials leaked: {text}");
}

#[test]
fn secrets_are_not_printed() {
    let cfg = NatsConfig::new("nats://h:4222").with_auth(Auth::UserPassword {
        user: "bob".into(),
        password: Secret::new("hunter2"),
    });
    assert!(!format!("{cfg:?}").contains("hunter2"));
}

#[tokio::test]
async fn republished_event_id_is_a_duplicate_and_stored_once() {
    let bus = bus().await;
    let topic = unique("nats-dedup");
    let e = Envelope::new("a", "t", 1, json!({}));
    let first = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    let second = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    let r1 = first.outcome.expect("acked");
    let r2 = second.outcome.expect("acked");
    assert!(!r1.duplicate);
    assert!(
        r2.duplicate,
        "JetStream must report the Nats-Msg-Id duplicate"
    );
    assert_eq!(
        r1.position, r2.position,
        "the duplicate points at the stored copy"
    );
    let mut stream = bus
        .transport()
        .jetstream()
        .expect("open transport")
        .get_stream(bus.transport().stream_name(&topic))
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    bus.close().await.expect("close");
}

#[tokio::test]
async fn provisioning_defaults_are_visible_in_stream_and_consumer_info() {
    let bus = bus().await;
    let topic = unique("nats-prov");
    bus.subscribe(&topic, "billing", Recorder::default().handler())
        .await
        .expect("subscribe");
    let js = bus.transport().jetstream().expect("open transport");
    let mut stream = js
        .get_stream(bus.transport().stream_name(&topic))
        .await
        .expect("stream");
    let cfg = stream.info().await.expect("info").config.clone();
    assert_eq!(cfg.subjects, vec![format!("{topic}.*")]);
    assert_eq!(
        cfg.metadata.get("eventbus.partitions").map(String::as_str),
        Some("16")
    );
    assert_eq!(
        cfg.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(cfg.max_bytes, 1 << 30);
    assert_eq!(cfg.max_messages, 1_000_000);
    assert_eq!(cfg.duplicate_window, Duration::from_secs(120));
    // One consumer per partition and ownership epoch: `billing-p3-e<lease revision>`.
    let names: Vec<String> = futures_util::StreamExt::collect::<Vec<_>>(stream.consumer_names())
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("consumer names");
    let p3: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.strip_prefix("billing-p3-e")
                .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    let [name] = p3.as_slice() else {
        panic!("one consumer of partition 3, got {names:?}");
    };
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(name).await.expect("consumer");
    let c = consumer.info().await.expect("consumer info").config.clone();
    assert_eq!(c.durable_name.as_deref(), Some(name.as_str()));
    assert_eq!(
        c.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    assert_eq!(c.ack_wait, Duration::from_secs(30));
    assert_eq!(c.max_ack_pending, 10_000);
    assert_eq!(c.max_waiting, 1_000);
    assert_eq!(c.filter_subject, format!("{topic}.3"));
    bus.close().await.expect("close");
}

#[tokio::test]
async fn conflicting_stream_is_a_provisioning_error() {
    let bus = bus().await;
    let topic = unique("nats-conflict");
    // Someone else's stream already captures the topic's partitions under another name.
    bus.transport()
        .jetstream()
        .expect("open transport")
        .create_stream(async_nats::jetstream::stream::Config {
            name: format!("OTHER_{}", topic.replace('-', "_")),
            subjects: vec![format!("{topic}.>")],
            ..Default::default()
        })
        .await
        .expect("create the foreign stream");
    let err = bus.publish(&topic, &b"x"[..]).await.expect_err("must fail");
    assert!(
        matches!(err, BusError::Transport(TransportError::Provisioning(_))),
        "{err:?}"
    );
    bus.close().await.expect("close");
}

/// A stream made by eventbus before topics had partitions (it captures the topic's own
/// subject) is reported with what to do, not reused with the wrong layout.
#[tokio::test]
async fn a_stream_without_partitions_is_a_clear_provisioning_error() {
    let bus = bus().await;
    let topic = unique("nats-legacy");
    bus.transport()
        .jetstream()
        .expect("open transport")
        .create_stream(async_nats::jetstream::stream::Config {
            name: bus.transport().stream_name(&topic),
            subjects: vec![topic.clone()],
            ..Default::default()
        })
        .await
        .expect("create the old layout's stream");
    let err = bus.publish(&topic, &b"x"[..]).await.expect_err("must fail");
    assert!(
        matches!(&err, BusError::Transport(TransportError::Provisioning(d)) if d.to_string().contains("docs/nats.md")),
        "{err:?}"
    );
    bus.close().await.expect("close");
}

#[tokio::test]
async fn bad_subject_oversize_and_malformed_input() {
    let bus = bus().await;
    // Bad subject: wildcard and whitespace never reach the server.
    for bad in ["orders.*", "orders.>", "a b", "a..b"] {
        assert!(matches!(
            bus.publish(bad, &b"x"[..]).await,
            Err(BusError::Transport(TransportError::InvalidTopic { .. }))
        ));
    }
    // Oversize: above the bus limit (1 MiB, the server's max_payload too).
    let topic = unique("nats-bad");
    let big = vec![b'x'; 1024 * 1024 + 1];
    assert!(matches!(
        bus.publish(&topic, big).await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    // Just under the bus limit but over the server's max_payload with headers: the broker's
    // refusal is a typed error too, and nothing is counted as published.
    let near = vec![b'y'; 1024 * 1024 - 200];
    match bus.publish(&topic, near).await {
        Ok(_) => {}
        Err(BusError::Transport(TransportError::Rejected(_))) => {}
        Err(other) => panic!("unexpected {other:?}"),
    }
    // Malformed envelope: dead-lettered, the subscription goes on.
    let dlq: Recorder<eventbus_core::Message> = Recorder::default();
    bus.subscribe(&format!("{topic}.dlq"), "ops", dlq.handler())
        .await
        .expect("subscribe dlq");
    let ok: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, "svc", ok.envelope_handler())
        .await
        .expect("subscribe");
    bus.send(Publication::new(&topic, &b"{\"event_id\": 5"[..]).aggregate_id("a"))
        .await
        .expect("publish");
    let good = Envelope::new("a", "t", 1, json!({}));
    bus.publish_envelope(&topic, &good).await.expect("publish");
    assert_eq!(ok.wait_for(1, "the valid envelope").await[0], good);
    let dead = dlq.wait_for(1, "the dead letter").await;
    assert_eq!(
        dead[0].headers().get(headers::DLQ_REASON),
        Some("malformed")
    );
    bus.close().await.expect("close");
}

async fn peak_tasks(n: usize, aggs: usize) -> usize {
    let bus = bus().await;
    let peak = peak_tasks_during_flow(&bus, n, aggs).await;
    bus.close().await.expect("close");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_count_is_the_same_at_1000_and_100000_envelopes() {
    let small = peak_tasks(1_000, 100).await;
    let large = peak_tasks(100_000, 10_000).await;
    println!("NATS bus, peak tokio tasks: 1,000 envelopes -> {small}; 100,000 envelopes over 10,000 aggregates -> {large}");
    assert_eq!(small, large);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_connected_then_closed() {
    let bus = bus().await;
    assert_eq!(bus.health().state, ConnectionState::Connected);
    assert_eq!(bus.health().backend, "nats");
    bus.close().await.expect("close");
    assert_eq!(bus.health().state, ConnectionState::Closed);
}

/// Kill -9 and restart the server (same store) while publishing and consuming: every
/// published event id is delivered at least once, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run_loses_nothing() {
    const AGGS: usize = 50;
    const VERSIONS: i64 = 60;
    let store = std::env::temp_dir().join(format!("eventbus-nats-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let mut server = OwnServer::start(&store);
    let mut cfg = NatsConfig::new(server.url()).with_ack_wait(Duration::from_secs(3));
    cfg.publish_ack_timeout = Duration::from_secs(2);
    cfg.publish_retries = 30;
    let transport = NatsTransport::connect(cfg).await.expect("connect");
    let bus = Bus::new(transport, kit_config()).expect("bus");
    let mut results = bus.results().expect("results");
    let topic = unique("nats-restart");
    let handled: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, "svc", handled.envelope_handler())
        .await
        .expect("subscribe");

    let publisher = {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for v in 1..=VERSIONS {
                for a in 0..AGGS {
                    let e = Envelope::new(format!("agg-{a}"), "t", v, json!({"v": v}));
                    ids.push(e.event_id.clone());
                    bus.publish_envelope(&topic, &e)
                        .await
                        .expect("publish accepted");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    // Let some traffic flow, then kill the server and bring it back on the same store.
    handled.wait_for(300, "traffic before the restart").await;
    server.kill();
    // The outage is visible through the bus's health call.
    let down_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.health().state == ConnectionState::Connected {
        assert!(
            down_deadline > tokio::time::Instant::now(),
            "health never showed the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bus.health().state, ConnectionState::Reconnecting);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let ids = publisher.await.expect("publisher");
    bus.flush().await.expect("flush");
    let mut outcomes = HashMap::new();
    for _ in 0..ids.len() {
        let r = tokio::time::timeout(Duration::from_secs(60), results.recv())
            .await
            .expect("a result")
            .expect("stream open");
        outcomes.insert(r.event_id.clone(), r.outcome.is_ok());
    }
    let failed: Vec<_> = outcomes.iter().filter(|(_, ok)| !**ok).collect();
    assert!(failed.is_empty(), "publishes reported failed: {failed:?}");
    let want: std::collections::HashSet<&String> = ids.iter().collect();
    let got = handled
        .wait_until("every event delivered after the restart", |items| {
            let seen: std::collections::HashSet<&String> =
                items.iter().map(|e| &e.event_id).collect();
            want.iter().all(|id| seen.contains(*id))
        })
        .await;
    // At least once: redeliveries after the restart may repeat an event; order per aggregate
    // must hold for first deliveries.
    let mut first = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in &got {
        if seen.insert(e.event_id.clone()) {
            first.push(e.clone());
        }
    }
    assert_eq!(
        ordering_violations(&first),
        0,
        "order broken across the restart"
    );
    println!(
        "restart: {} published, {} handled ({} repeats), health {:?}",
        ids.len(),
        got.len(),
        got.len() - first.len(),
        bus.health().state
    );
    bus.close().await.expect("close");
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}

#[tokio::test]
async fn token_auth_is_passed_through() {
    // The shared test server has no auth: a token is accepted and ignored by it, proving the
    // option reaches the connection without breaking it.
    let cfg = NatsConfig::new(nats_url()).with_auth(Auth::Token(Secret::new("unused-token")));
    let t = NatsTransport::connect(cfg)
        .await
        .expect("connect with a token");
    let bus = Bus::new(t, BusConfig::default()).expect("bus");
    let r = bus
        .publish_and_wait(&unique("nats-auth"), &b"x"[..])
        .await
        .expect("publish");
    assert!(r.is_ok());
    bus.close().await.expect("close");
}

/// `close()` hands what this instance fetched but did not start back to the server at once:
/// the next instance of the group gets it long before the consumer's AckWait (120 s here)
/// would have redelivered it. Only the handlers still running at the close deadline (blocked
/// here on purpose) wait for AckWait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_hands_prefetched_messages_back_before_ack_wait() {
    const EVENTS: usize = 400;
    const WORKERS: usize = 4;
    let mut nats = Nats::new();
    nats.config.consumer.ack_wait = Duration::from_secs(120);
    let topic = unique("handback");
    let group = unique("group");
    let cfg = kit_config()
        .with_keyed_workers(WORKERS)
        .with_close_timeout(Duration::from_secs(2));
    let first = nats.connect(cfg.clone()).await.expect("connect");
    let started: Recorder<String> = Recorder::default();
    let s = started.clone();
    first
        .subscribe_envelope(&topic, &group, move |e: Envelope| {
            let s = s.clone();
            async move {
                s.push(e.event_id);
                // Never returns: these stay unsettled and come back after AckWait only.
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    for i in 0..EVENTS {
        let e = Envelope::new(format!("agg-{i}"), "t", 1, json!({ "i": i }));
        first.publish_envelope(&topic, &e).await.expect("publish");
    }
    first.flush().await.expect("flush");
    started.wait_for(WORKERS, "every worker blocked").await;
    first.close().await.expect("close");
    let blocked: std::collections::HashSet<String> = started.snapshot().into_iter().collect();

    let second = nats.connect(cfg).await.expect("connect");
    let got: Recorder<Envelope> = Recorder::default();
    second
        .subscribe_envelope(&topic, &group, got.envelope_handler())
        .await
        .expect("subscribe");
    // The kit timeout (60 s) is half the AckWait: only a prompt hand-back passes.
    let items = got
        .wait_until("every message not started by the first instance", |items| {
            items
                .iter()
                .filter(|e| !blocked.contains(&e.event_id))
                .count()
                >= EVENTS - blocked.len()
        })
        .await;
    assert!(items.len() >= EVENTS - blocked.len());
    second.close().await.expect("close");
}

/// A nats-server of the test's own, killed (SIGKILL) and restarted on the same store.
struct ServerOutage<'a>(&'a mut OwnServer);

impl Outage for ServerOutage<'_> {
    async fn cut(&mut self) {
        self.0.kill();
    }
    async fn restore(&mut self) {
        self.0.restart();
    }
}

/// The kit's outage case: the server is killed and comes back on its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_and_back_loses_nothing() {
    let store = std::env::temp_dir().join(format!("eventbus-nats-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let mut server = OwnServer::start(&store);
    let mut cfg = NatsConfig::new(server.url()).with_ack_wait(Duration::from_secs(3));
    cfg.publish_ack_timeout = Duration::from_secs(2);
    cfg.publish_retries = 30;
    let bus = Bus::new(
        NatsTransport::connect(cfg).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    connection_lost_and_back(&bus, &mut ServerOutage(&mut server)).await;
    bus.close().await.expect("close");
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}

/// A topic whose next publish nobody answers: a bus with `cfg`, the topic provisioned by a
/// first publish, then its stream deleted and a plain subscriber (which never replies) on its
/// subject instead.
struct Unanswered {
    bus: Bus<NatsTransport>,
    topic: String,
    raw: async_nats::Client,
    js: async_nats::jetstream::Context,
    /// The deleted stream's configuration, to bring it back.
    stream: async_nats::jetstream::stream::Config,
    sniffer: async_nats::Subscriber,
}

impl Unanswered {
    async fn new(cfg: NatsConfig, prefix: &str) -> Self {
        let bus = Bus::new(
            NatsTransport::connect(cfg).await.expect("connect"),
            kit_config(),
        )
        .expect("bus");
        let topic = unique(prefix);
        bus.publish_envelope_and_wait(&topic, &Envelope::new("a", "t", 1, json!({})))
            .await
            .expect("publish")
            .outcome
            .expect("acked");
        let raw = async_nats::connect(nats_url()).await.expect("raw client");
        let js = async_nats::jetstream::new(raw.clone());
        let name = bus.transport().stream_name(&topic);
        let stream = js
            .get_stream(&name)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .config
            .clone();
        js.delete_stream(&name).await.expect("delete stream");
        let sniffer = raw
            .subscribe(format!("{topic}.*"))
            .await
            .expect("subscribe");
        // `flush` only writes the SUB out; a round trip on the same connection proves the
        // server registered it (it reads a connection in order). Without it the bus's publish
        // can arrive first and be answered "no responders" instead of going unanswered.
        js.query_account().await.expect("a round trip after SUB");
        Self {
            bus,
            topic,
            raw,
            js,
            stream,
            sniffer,
        }
    }

    /// The next message the plain subscriber takes, under the kit's hang guard.
    async fn next_attempt(&mut self) -> Option<async_nats::Message> {
        use futures_util::StreamExt;
        tokio::time::timeout(kit_timeout(), self.sniffer.next())
            .await
            .ok()
            .flatten()
    }
}

/// A JetStream ACK that never comes is recovered by republishing with the same `Nats-Msg-Id`:
/// the publish reports success and the stream holds the event once. The first attempt is made
/// to go unanswered for certain (see [`Unanswered`]); the stream comes back only after that
/// attempt arrived.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_ack_is_recovered_by_republishing() {
    let mut cfg = Nats::new().config;
    cfg.publish_ack_timeout = Duration::from_millis(500);
    cfg.publish_retries = 5;
    let mut t = Unanswered::new(cfg, "nats-lost-ack").await;

    let e = Envelope::new("a", "t", 2, json!({}));
    let waiting = {
        let (bus, topic, e) = (t.bus.clone(), t.topic.clone(), e.clone());
        tokio::spawn(async move { bus.publish_envelope_and_wait(&topic, &e).await })
    };
    let first = t.next_attempt().await.expect("the first attempt arrives");
    let msg_id = first
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string());
    assert_eq!(msg_id.as_deref(), Some(e.event_id.as_str()));
    t.sniffer.unsubscribe().await.expect("unsubscribe");
    t.raw.flush().await.expect("flush");
    let name = t.stream.name.clone();
    t.js.create_stream(t.stream.clone())
        .await
        .expect("stream back");

    let r = tokio::time::timeout(kit_timeout(), waiting)
        .await
        .expect("a result")
        .expect("task")
        .expect("accepted");
    assert!(r.outcome.is_ok(), "the lost ACK was not recovered: {r:?}");
    let mut stream = t.js.get_stream(&name).await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    t.bus.close().await.expect("close");
}

/// `publish_ack_timeout` bounds the wait for an ACK that never comes. The bound asserted is ten
/// times the configured 200 ms, so only a timeout that is not applied at all (the client's own
/// 5 s default) fails it, not a slow machine.
#[tokio::test(flavor = "multi_thread")]
async fn publish_ack_timeout_bounds_a_missing_ack() {
    let mut cfg = Nats::new().config;
    cfg.publish_ack_timeout = Duration::from_millis(200);
    cfg.publish_retries = 0;
    let mut t = Unanswered::new(cfg.clone(), "nats-ack-timeout").await;
    let started = std::time::Instant::now();
    let r = t
        .bus
        .publish_envelope_and_wait(&t.topic, &Envelope::new("a", "t", 2, json!({})))
        .await
        .expect("accepted");
    let waited = started.elapsed();
    assert!(
        t.next_attempt().await.is_some(),
        "the publish never went out"
    );
    assert!(
        matches!(r.outcome, Err(TransportError::Timeout(_))),
        "{r:?}"
    );
    assert!(
        waited < cfg.publish_ack_timeout * 10,
        "waited {waited:?} for an ACK with publish_ack_timeout {:?}",
        cfg.publish_ack_timeout
    );
    t.bus.close().await.expect("close");
}

/// An instance that closes hands its partitions over at once: the instance left gets them at
/// its next heartbeat. The lease time here (10 min) is far beyond the kit's hang guard, so the
/// events can only arrive if the closing instance released its leases and left the member
/// list (a member still listed keeps the partitions the round robin gives it).
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_instance_hands_its_partitions_over_at_once() {
    let mut nats = Nats::new();
    nats.config.group = GroupSettings {
        lease_ttl: Duration::from_secs(600),
        heartbeat: Duration::from_millis(200),
        instance_id: None,
    };
    let topic = unique("nats-handover");
    let group = unique("svc");
    let ledger = Arc::new(GroupLedger::default());
    let leaving = nats.connect(kit_config()).await.expect("connect");
    let staying = nats.connect(kit_config()).await.expect("connect");
    join_group(&leaving, &topic, &group, 0, &ledger).await;
    join_group(&staying, &topic, &group, 1, &ledger).await;
    // Rounds until both instances have work, so both hold partitions.
    let mut published = 0;
    let mut round = 0;
    hang_guard("the second instance to get work", async {
        while ledger.counts().instances < 2 {
            round += 1;
            for a in 0..64 {
                let e = Envelope::new(format!("agg-{a}"), "t", round, json!({}));
                staying.publish_envelope(&topic, &e).await.expect("publish");
            }
            published += 64;
            ledger
                .wait_until("a round", |c| c.handled >= published)
                .await;
        }
    })
    .await;
    leaving.close().await.expect("close");
    let before = ledger.counts().per_instance;
    round += 1;
    for a in 0..64 {
        let e = Envelope::new(format!("agg-{a}"), "t", round, json!({}));
        staying.publish_envelope(&topic, &e).await.expect("publish");
    }
    published += 64;
    ledger
        .wait_until("every event, by the instance that stayed", |c| {
            c.handled >= published
        })
        .await;
    let after = ledger.counts();
    assert_eq!(after.order_violations, 0, "{after:?}");
    assert_eq!(after.overlaps, 0, "{after:?}");
    assert_eq!(
        after.per_instance.iter().find(|(i, _)| *i == 0),
        before.iter().find(|(i, _)| *i == 0),
        "the closed instance handled events after close"
    );
    staying.close().await.expect("close");
}

/// Deliveries that never reach the fetcher (a pull in flight when a cluster's leader dies,
/// or a stale pull request of a dropped inbox) must not let later events of their aggregate
/// overtake them. A second client pulls from the partition's consumer and never acks, so
/// some messages go to it; without the gap check the bus handled the rest at once and the
/// stolen ones only after ack_wait, behind them. The thief's pull must be the only one
/// waiting at the server: the member's handler holds version 1 (a one-job buffer, so its
/// fetcher waits too and issues no pull) until the member's pull requests have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_lost_in_transit_do_not_let_later_events_overtake_them() {
    const EVENTS: i64 = 10;
    let log = captured_log();
    let mut nats = Nats::new();
    nats.config.stream.partitions = 1;
    nats.config.consumer.ack_wait = Duration::from_secs(2);
    nats.config.pull_expires = Duration::from_secs(1);
    nats.config.group = GroupSettings {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(200),
        instance_id: None,
    };
    let topic = unique("nats-gap");
    let group = unique("svc");
    let mut config = kit_config();
    config.dispatch.keyed_buffer = 1;
    config.dispatch.keyed_workers = 1;
    let member = nats.connect(config).await.expect("connect");
    let handled: Recorder<Envelope> = Recorder::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, g) = (handled.clone(), gate.clone());
    member
        .subscribe_envelope(&topic, &group, move |e: Envelope| {
            let (h, g) = (h.clone(), g.clone());
            async move {
                if e.event_version == 1 {
                    let _open = g.acquire().await;
                }
                h.push(e);
                Ok::<(), eventbus_core::HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    let stream_name = member.transport().stream_name(&topic);
    let mut ids = Vec::new();
    let mut publish = async |v: i64| {
        let e = Envelope::new("agg", "t", v, json!({}));
        ids.push(e.event_id.clone());
        member.publish_envelope(&topic, &e).await.expect("publish");
        member.flush().await.expect("flush");
    };
    // Version 1 holds the only worker, version 2 the buffer's one place: the fetcher waits.
    publish(1).await;
    publish(2).await;

    let raw = async_nats::connect(nats_url()).await.expect("raw client");
    let js = async_nats::jetstream::new(raw.clone());
    let stream = js.get_stream(&stream_name).await.expect("stream");
    let consumers: Vec<String> =
        futures_util::StreamExt::collect::<Vec<_>>(stream.consumer_names())
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("consumer names");
    let [consumer] = consumers.as_slice() else {
        panic!("one partition, one group: one consumer, got {consumers:?}");
    };
    // The member's pull requests expire (pull_expires) and are not renewed meanwhile.
    hang_guard("the member's pull requests expiring", async {
        loop {
            let info = stream.consumer_info(consumer).await.expect("consumer info");
            if info.num_waiting == 0 && info.delivered.stream_sequence >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let inbox = raw.new_inbox();
    let mut stolen = raw.subscribe(inbox.clone()).await.expect("thief inbox");
    raw.publish_with_reply(
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream_name}.{consumer}"),
        inbox,
        r#"{"batch":3,"expires":60000000000}"#.into(),
    )
    .await
    .expect("thief pull");
    raw.flush().await.expect("flush");
    for v in 3..=EVENTS {
        publish(v).await;
    }
    let taken = hang_guard(
        "the thief's first message",
        futures_util::StreamExt::next(&mut stolen),
    )
    .await
    .expect("thief inbox open");
    let taken = Envelope::from_json(&taken.payload).expect("an envelope");
    gate.add_permits(1);
    let (got, first_handlings) =
        every_event_handled(&handled, &ids, "every event, the stolen ones too").await;
    let order: Vec<i64> = got.iter().map(|e| e.event_version).collect();
    assert_eq!(
        ordering_violations(&first_handlings),
        0,
        "the thief took version {}; handled in the order {order:?}",
        taken.event_version
    );
    let gaps = log
        .snapshot()
        .iter()
        .filter(|l| l.starts_with("WARN") && l.contains("lost on the way"))
        .count();
    assert_eq!(gaps, 1, "the stolen deliveries were seen as one gap");
    member.close().await.expect("close");
}

/// An instance cut off from the server past its lease starts nothing more of the partitions
/// it held: another instance takes them over from their ack floor, and the two must never
/// handle one aggregate at the same time. Instance 1 reaches nats-server through a proxy;
/// with a backlog queued in its dispatcher the proxy is cut (longer than the lease), and
/// instance 2 joins. On main before the ownership check, instance 1 went on handling its
/// queued events after its leases lapsed while instance 2 handled the same aggregates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_past_its_lease_starts_nothing_the_new_owner_handles() {
    const AGGREGATES: usize = 5;
    const VERSIONS: i64 = 400;
    let group_settings = GroupSettings {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
        instance_id: None,
    };
    let proxy = common::proxy().await;
    let mut cut_off = NatsConfig::new(format!("nats://{}", proxy.addr()));
    cut_off.group = group_settings.clone();
    let mut direct = NatsConfig::new(nats_url());
    direct.group = group_settings;
    let topic = unique("nats-lease-cut");
    let group = unique("svc");
    let ledger = Arc::new(GroupLedger::default());
    // 20 ms of work per event, so a second handling of the aggregate meanwhile is seen.
    let handler =
        |instance: u8| working_ledger_handler(&ledger, instance, Duration::from_millis(20));
    let first = Bus::new(
        NatsTransport::connect(cut_off).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    first
        .subscribe_envelope(&topic, &group, handler(1))
        .await
        .expect("subscribe");
    let publisher = Bus::new(
        NatsTransport::connect(direct.clone())
            .await
            .expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let mut ids = Vec::new();
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let e = Envelope::new(format!("agg-{a}"), "t", v, json!({}));
            ids.push(e.event_id.clone());
            publisher
                .publish_envelope(&topic, &e)
                .await
                .expect("publish");
        }
    }
    publisher.flush().await.expect("flush");
    ledger
        .wait_until("the first instance under way", |c| c.handled >= 100)
        .await;
    proxy.cut();
    let second = Bus::new(
        NatsTransport::connect(direct).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    second
        .subscribe_envelope(&topic, &group, handler(2))
        .await
        .expect("subscribe");
    ledger
        .wait_until("the second instance taking over", |c| {
            c.per_instance.iter().any(|(i, n)| *i == 2 && *n > 0)
        })
        .await;
    proxy.restore();
    ledger
        .wait_until("every event", |c| c.handled >= ids.len())
        .await;
    let counts = ledger.counts();
    println!("lease lost mid-backlog: {counts:?}");
    assert_eq!(
        counts.overlaps, 0,
        "both instances handled one aggregate at once: {counts:?}"
    );
    assert_eq!(counts.order_violations, 0, "{counts:?}");
    let dropped = first.metrics().not_owned_dropped;
    println!("dropped unstarted by the cut-off instance: {dropped}");
    for bus in [first, second, publisher] {
        bus.close().await.expect("close");
    }
}

/// Provisioning rides out a server too slow to answer one request in time (a busy cluster
/// replicating a create): the bus retries the idempotent create-or-get until its provisioning
/// deadline, instead of failing the subscribe at the first request timeout. The client's
/// connection goes through a proxy that holds all traffic until a request (1 s timeout) has
/// timed out and been sent again. On main before the retries, the subscribe failed with "jetstream request timed
/// out" after the first second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_rides_out_a_server_slower_than_one_request_timeout() {
    let log = captured_log();
    let proxy = common::proxy().await;
    let mut cfg = NatsConfig::new(format!("nats://{}", proxy.addr()));
    cfg.publish_ack_timeout = Duration::from_secs(1);
    let bus = Bus::new(
        NatsTransport::connect(cfg).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let topic = unique("nats-slow-provision");
    let handled: Recorder<Envelope> = Recorder::default();
    let group = unique("svc");
    proxy.stall();
    let subscribing = bus.subscribe_envelope(&topic, &group, handled.envelope_handler());
    let stall = async {
        // The server answers nothing until a request has timed out and is sent again.
        log.wait_until("a provisioning request timed out and sent again", |lines| {
            lines
                .iter()
                .any(|l| l.contains("provisioning request failed; sending it again"))
        })
        .await;
        proxy.restore();
    };
    let (subscribed, ()) = tokio::join!(subscribing, stall);
    subscribed.expect("subscribe despite a stalled server");
    let e = Envelope::new("agg", "t", 1, json!({}));
    bus.publish_envelope(&topic, &e).await.expect("publish");
    handled.wait_for(1, "the event").await;
    bus.close().await.expect("close");
}

/// A lease renewal the server applied but whose reply was lost (a stalled link) does not
/// cost the partition: the next renewal, refused for its old revision, reads the lease back,
/// finds it still this subscription's and goes on with it. The instance reaches nats-server
/// through a proxy that holds all traffic for longer than a renewal's timeout (a heartbeat)
/// but well within the lease. On main before the read-back, the refused renewal dropped the
/// lease ("partition lease lost"), and the partition waited for its own lease to lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_reply_was_lost_keeps_the_lease() {
    let log = captured_log();
    let proxy = common::proxy().await;
    let settings = GroupSettings {
        lease_ttl: Duration::from_secs(6),
        heartbeat: Duration::from_millis(500),
        instance_id: None,
    };
    let mut through = NatsConfig::new(format!("nats://{}", proxy.addr()));
    through.stream.partitions = 1;
    through.group = settings.clone();
    let mut direct = NatsConfig::new(nats_url());
    direct.stream.partitions = 1;
    direct.group = settings;
    let topic = unique("nats-lost-renewal");
    let group = unique("svc");
    let bus = Bus::new(
        NatsTransport::connect(through).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let publisher = Bus::new(
        NatsTransport::connect(direct).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let handled: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, handled.envelope_handler())
        .await
        .expect("subscribe");
    let e = Envelope::new("agg", "t", 1, json!({}));
    publisher
        .publish_envelope(&topic, &e)
        .await
        .expect("publish");
    handled.wait_for(1, "the first event").await;
    // A renewal goes out while the link is stalled: it reaches the server only after its
    // timeout, when the link is back, and its reply comes too late to be taken.
    proxy.stall();
    log.wait_until("a renewal timing out on the stalled link", |lines| {
        lines
            .iter()
            .any(|l| l.contains(&group) && l.contains("renewing a partition lease timed out"))
    })
    .await;
    proxy.restore();
    // The next renewal carries the revision before the one applied late: refused. What the
    // coordinator made of it is logged either way.
    log.wait_until("the refused renewal's outcome", |lines| {
        lines.iter().any(|l| {
            l.contains(&group)
                && (l.contains("partition lease lost") || l.contains("keeping the lease"))
        })
    })
    .await;
    for v in 2..=3 {
        let e = Envelope::new("agg", "t", v, json!({}));
        publisher
            .publish_envelope(&topic, &e)
            .await
            .expect("publish");
    }
    handled.wait_for(3, "the events after the stall").await;
    let lost: Vec<String> = log
        .snapshot()
        .into_iter()
        .filter(|l| l.contains(&group) && l.contains("partition lease lost"))
        .collect();
    assert!(lost.is_empty(), "a lease still ours was dropped: {lost:?}");
    bus.close().await.expect("close");
    publisher.close().await.expect("close");
}

/// A handler that hangs when an instance leaves holds back its own partition only: every
/// other partition goes to the other members at once, while the leaving instance still waits
/// (up to its drain deadline) for the hung handler. Before, the leaving instance kept every
/// partition, announced itself and even took partitions until the drain deadline passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_keeps_no_other_partition_from_the_group_when_an_instance_leaves() {
    use eventbus_core::partitioner::partition_for;
    let mut nats = Nats::new();
    nats.config.group = GroupSettings {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(200),
        instance_id: None,
    };
    let partitions = u32::from(nats.config.stream.partitions);
    let topic = unique("nats-hung-leave");
    let group = unique("svc");
    let hung = "agg-hung";
    // Aggregates on other partitions than the hung one.
    let others: Vec<String> = (0..200)
        .map(|i| format!("agg-{i}"))
        .filter(|a| {
            partition_for(a.as_bytes(), partitions) != partition_for(hung.as_bytes(), partitions)
        })
        .take(7)
        .collect();
    let leaving_bus = nats
        .connect(kit_config().with_close_timeout(Duration::from_secs(20)))
        .await
        .expect("connect");
    let staying = nats.connect(kit_config()).await.expect("connect");
    let first: Recorder<Envelope> = Recorder::default();
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(4);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (f, g) = (first.clone(), gate.clone());
    let handle = leaving_bus
        .subscribe_envelope(&topic, &group, move |e: Envelope| {
            let (f, g, started_tx) = (f.clone(), g.clone(), started_tx.clone());
            async move {
                if e.aggregate_id == "agg-hung" {
                    let _ = started_tx.send(()).await;
                    let _open = g.acquire().await;
                }
                f.push(e);
                Ok::<(), eventbus_core::HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    let publish = |aggregate: &str, v: i64| Envelope::new(aggregate, "t", v, json!({}));
    staying
        .publish_envelope(&topic, &publish(hung, 1))
        .await
        .expect("publish");
    for a in &others {
        staying
            .publish_envelope(&topic, &publish(a, 1))
            .await
            .expect("publish");
    }
    started.recv().await.expect("the hung handler started");
    first
        .wait_for(others.len(), "the other aggregates' first events")
        .await;
    let leaving = tokio::spawn(handle.unsubscribe());
    let second: Recorder<Envelope> = Recorder::default();
    staying
        .subscribe_envelope(&topic, &group, second.envelope_handler())
        .await
        .expect("subscribe");
    for a in &others {
        staying
            .publish_envelope(&topic, &publish(a, 2))
            .await
            .expect("publish");
    }
    second
        .wait_until(
            "the other aggregates' second events, on the staying instance",
            |items| items.iter().filter(|e| e.event_version == 2).count() >= others.len(),
        )
        .await;
    let still_leaving = !leaving.is_finished();
    gate.add_permits(1);
    leaving.await.expect("unsubscribe");
    assert!(
        still_leaving,
        "the other partitions moved only after the leaving instance's drain deadline"
    );
    leaving_bus.close().await.expect("close");
    staying.close().await.expect("close");
}
