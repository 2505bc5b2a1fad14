//! A 3-broker Kafka cluster with replication factor 3 (librdkafka's in-process mock cluster:
//! Tansu runs as one broker). A broker leading partitions goes down mid-run and its
//! partitions' leadership moves to another broker (the mock cluster elects nobody by itself:
//! the test does what a controller would), then it comes back. Every publish is acknowledged,
//! every event handled, per-aggregate order of first handlings holds; the times are printed
//! (docs/reliability.md quotes them).
//!
//! The mock cluster keeps one log per partition whatever its leader, so this exercises the
//! client side of a failover (metadata refresh, produce and fetch against the new leader,
//! idempotent retries, the group over a broker loss), not a broker's replication.

use std::time::Duration;

use std::sync::Arc;

use eventbus_core::testkit::{
    captured_log, every_event_handled, kit_config, ordering_violations, unique, wait_for_state,
    working_ledger_handler, GroupLedger, Recorder,
};
use eventbus_core::{Bus, ConnectionState, Envelope};
use eventbus_kafka::{KafkaConfig, KafkaTransport};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use serde_json::json;
use tokio::time::Instant;

const BROKERS: i32 = 3;
const PARTITIONS: i32 = 6;
const AGGREGATES: usize = 200;
const ROUNDS: i64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_with_replication_factor_3_loses_nothing_and_keeps_order() {
    // The mock cluster is not Send: it lives on this task, in a LocalSet.
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster = MockCluster::new(BROKERS).expect("mock cluster");
            let topic = unique("kcluster");
            let group = unique("svc");
            cluster
                .create_topic(&topic, PARTITIONS, BROKERS)
                .expect("create topic, replication factor 3");
            // Leaders spread over the brokers; the group's coordinator on broker 3, which
            // stays up.
            let leader_of = |p: i32| p % BROKERS + 1;
            for p in 0..PARTITIONS {
                cluster
                    .partition_leader(&topic, p, Some(leader_of(p)))
                    .expect("leader");
            }
            cluster
                .coordinator(MockCoordinator::Group(group.clone()), 3)
                .expect("coordinator");
            let config = || {
                let mut c = KafkaConfig::new(cluster.bootstrap_servers());
                c.topic.partitions = PARTITIONS;
                c.topic.replication = Some(BROKERS);
                c.consumer.session_timeout = Duration::from_secs(6);
                c.consumer.commit_interval = Duration::from_millis(200);
                c
            };
            let publisher = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            let consumer = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            let handled: Recorder<Envelope> = Recorder::default();
            consumer
                .subscribe_envelope(&topic, &group, handled.envelope_handler())
                .await
                .expect("subscribe");

            let mut ids = Vec::new();
            let publish_round = async |round: i64, ids: &mut Vec<String>| {
                for a in 0..AGGREGATES {
                    let e =
                        Envelope::new(format!("agg-{a}"), "t", round, json!({"round": round}));
                    ids.push(e.event_id.clone());
                    publisher
                        .publish_envelope(&topic, &e)
                        .await
                        .expect("publish accepted");
                }
            };
            for round in 1..=ROUNDS / 3 {
                publish_round(round, &mut ids).await;
            }
            handled.wait_for(AGGREGATES, "traffic before the broker goes down").await;

            // Broker 1 goes down; a controller would elect new leaders for its partitions
            // from the in-sync replicas: broker 2 takes them.
            cluster.broker_down(1).expect("broker down");
            let down_at = Instant::now();
            for p in (0..PARTITIONS).filter(|p| leader_of(*p) == 1) {
                cluster
                    .partition_leader(&topic, p, Some(2))
                    .expect("new leader");
            }
            let handled_at_down = handled.snapshot().len();
            for round in ROUNDS / 3 + 1..=2 * ROUNDS / 3 {
                publish_round(round, &mut ids).await;
            }
            handled
                .wait_until("handling after the broker went down", |items| {
                    items.len() > handled_at_down + 4 * AGGREGATES
                })
                .await;
            let resumed_after = down_at.elapsed();
            // It comes back as a follower; the rest goes on.
            cluster.broker_up(1).expect("broker up");
            for round in 2 * ROUNDS / 3 + 1..=ROUNDS {
                publish_round(round, &mut ids).await;
            }
            publisher.flush().await.expect("flush");
            let all_acked_after = down_at.elapsed();
            let m = publisher.metrics();
            let (got, first) = every_event_handled(&handled, &ids, "every acknowledged event handled").await;
            eprintln!(
                "[cluster kafka mock] {BROKERS} brokers, RF {BROKERS}, {PARTITIONS} partitions, {} envelopes over {AGGREGATES} aggregates: broker 1 down with {handled_at_down} handled, \
                 handling went on {resumed_after:?} after, every publish acknowledged {all_acked_after:?} after; \
                 {} acked, {} failed, {} handled ({} duplicates), {} order violations",
                ids.len(),
                m.publish_acked,
                m.publish_failed,
                got.len(),
                got.len() - first.len(),
                ordering_violations(&first),
            );
            consumer.close().await.expect("close");
            publisher.close().await.expect("close");
            assert_eq!(m.publish_failed, 0, "publishes failed across the broker loss");
            assert_eq!(m.publish_acked, ids.len() as u64, "one ACK per publish");
            assert_eq!(first.len(), ids.len(), "acknowledged events lost");
            assert_eq!(ordering_violations(&first), 0, "per-aggregate order broken");
        })
        .await;
}

/// A one-broker mock cluster, a bus subscribed to a new topic of `partitions` (commits every
/// 50 ms), and a client of its own that reads the group's committed offsets from the broker.
struct CommitRig {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: String,
    bus: Bus<KafkaTransport>,
    handled: Recorder<Envelope>,
    reader: rdkafka::consumer::BaseConsumer,
    partitions: i32,
}

impl CommitRig {
    async fn start(prefix: &str, partitions: i32) -> Self {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let topic = unique(prefix);
        let group = unique("svc");
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("create topic");
        let mut c = mock_config(&cluster, partitions);
        c.consumer.commit_interval = Duration::from_millis(50);
        let bus = Bus::new(
            KafkaTransport::connect(c).await.expect("connect"),
            kit_config(),
        )
        .expect("bus");
        let handled: Recorder<Envelope> = Recorder::default();
        bus.subscribe_envelope(&topic, &group, handled.envelope_handler())
            .await
            .expect("subscribe");
        let reader = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", &group)
            .create()
            .expect("offset reader");
        Self {
            cluster,
            topic,
            bus,
            handled,
            reader,
            partitions,
        }
    }

    /// The group's committed offset of each partition, as the broker keeps it (0: none).
    fn committed(&self) -> Vec<i64> {
        use rdkafka::consumer::Consumer;
        use rdkafka::{Offset, TopicPartitionList};

        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition(&self.topic, p);
        }
        self.reader
            .committed_offsets(list, Duration::from_secs(5))
            .map(|l| {
                l.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Publishes envelopes `from..to` of `aggregates` aggregates and flushes.
    async fn publish(&self, from: usize, to: usize, aggregates: usize) {
        for i in from..to {
            let e = Envelope::new(format!("agg-{}", i % aggregates), "t", i as i64, json!({}));
            self.bus
                .publish_envelope(&self.topic, &e)
                .await
                .expect("publish");
        }
        self.bus.flush().await.expect("flush");
    }

    /// Every OffsetCommit from now on is answered `REBALANCE_IN_PROGRESS`, `n` times.
    fn refuse_commits(&self, n: usize) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        self.cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; n],
        );
    }

    fn accept_commits(&self) {
        self.cluster
            .clear_request_errors(rdkafka::types::RDKafkaApiKey::OffsetCommit);
    }
}

/// A commit that fails during a rebalance does not later commit stale offsets (Parallel
/// Consumer #352): with the group coordinator answering `REBALANCE_IN_PROGRESS` to 30 offset
/// commits while 2,000 envelopes are handled, the committed offsets read from the broker
/// never go backwards, and once commits succeed again they reach the end of every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_during_a_rebalance_never_commit_stale_offsets() {
    const TOTAL: usize = 2_000;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let rig = CommitRig::start("kcommit", 2).await;
            rig.refuse_commits(30);
            let mut seen: Vec<Vec<i64>> = Vec::new();
            let mut backwards = 0;
            let mut sample = |seen: &mut Vec<Vec<i64>>| {
                let now = rig.committed();
                if let Some(prev) = seen.last() {
                    if now.len() == prev.len() && now.iter().zip(prev).any(|(n, p)| n < p) {
                        backwards += 1;
                    }
                }
                seen.push(now);
            };
            for chunk in 0..TOTAL / 100 {
                rig.publish(chunk * 100, (chunk + 1) * 100, 50).await;
                sample(&mut seen);
            }
            rig.handled.wait_for(TOTAL, "every envelope handled").await;
            // Commits succeed again (the injected errors are used up or cleared): the
            // committed offsets reach the end without new traffic.
            rig.accept_commits();
            let reached = hang_guard_sum(|| {
                sample(&mut seen);
                seen.last().map(|v| v.iter().sum::<i64>()).unwrap_or(0)
            }, TOTAL as i64)
            .await;
            eprintln!(
                "[commits kafka mock] {TOTAL} envelopes, 30 commits refused: {} samples, {backwards} went backwards, committed {reached} of {TOTAL} at the end",
                seen.len()
            );
            rig.bus.close().await.expect("close");
            assert_eq!(backwards, 0, "a committed offset went backwards: {seen:?}");
            assert_eq!(reached, TOTAL as i64, "the commits never caught up");
        })
        .await;
}

/// A refused commit is sent again when nothing more arrives. Before, a commit was counted
/// done when it was sent: refused on an idle partition, the group's committed position stayed
/// behind until new traffic (or close), and a crash meanwhile redelivered what was handled.
/// The refusal is seen in the consumer's own warning (its log names the offsets), then the
/// broker takes commits again and the committed offset reaches the end, with no new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_is_sent_again_on_an_idle_partition() {
    const FIRST: usize = 100;
    const TOTAL: usize = 200;
    let log = captured_log();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let rig = CommitRig::start("krefused", 1).await;
            let committed = || rig.committed().first().copied().unwrap_or(0);
            rig.publish(0, FIRST, 1).await;
            rig.handled.wait_for(FIRST, "the first envelopes handled").await;
            assert_eq!(hang_guard_sum(committed, FIRST as i64).await, FIRST as i64, "first commit");
            // Every commit from here on is refused, until accepted again.
            rig.refuse_commits(10_000);
            rig.publish(FIRST, TOTAL, 1).await;
            rig.handled.wait_for(TOTAL, "every envelope handled").await;
            let refused = format!("(0, {TOTAL})");
            let warning: Vec<String> = log
                .wait_until("the commit of the last offset refused", |lines| {
                    lines
                        .iter()
                        .any(|l| l.contains("offset commit failed") && l.contains(&refused))
                })
                .await
                .into_iter()
                .filter(|l| l.contains("offset commit failed"))
                .collect();
            let behind = committed();
            rig.accept_commits();
            let reached = hang_guard_sum(committed, TOTAL as i64).await;
            eprintln!(
                "[commits kafka mock] a commit refused on an idle partition ({} warnings, the last: {:?}); committed {behind} while refused, {reached} of {TOTAL} once the broker took commits again",
                warning.len(),
                warning.last()
            );
            assert_eq!(behind, FIRST as i64, "nothing committed while refused");
            assert_eq!(reached, TOTAL as i64, "the refused commit was never sent again");
            rig.bus.close().await.expect("close");
        })
        .await;
}

/// Samples until the value reaches `want` or a kit timeout passes; returns the last value.
async fn hang_guard_sum(mut sample: impl FnMut() -> i64, want: i64) -> i64 {
    let deadline = Instant::now() + eventbus_core::testkit::kit_timeout();
    loop {
        let v = sample();
        if v >= want || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A member whose partitions are revoked while its dispatcher holds a backlog of them starts
/// none of it after the revoke: the next owner restarts at the committed offset and would
/// handle the same aggregates at the same time. Member 1 handles 2,000 envelopes over 8
/// aggregates (20 ms each, so most of them wait in its dispatcher); member 2 joins after 100,
/// and the group rebalances with a 1 s drain. Before the ownership check, the revoke waited
/// out its drain on the queued work, and member 1 then went on with it while member 2 handled
/// the same aggregates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_member_starts_none_of_its_backlog_after_the_revoke() {
    const TOTAL: usize = 4_000;
    const AGGREGATES: usize = 8;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
                MockCluster::new(1).expect("mock cluster");
            let topic = unique("krevoke");
            let group = unique("svc");
            cluster.create_topic(&topic, 2, 1).expect("create topic");
            let config = || {
                let mut c = mock_config(&cluster, 2);
                c.consumer.commit_interval = Duration::from_millis(100);
                c.consumer.drain_timeout = Duration::from_secs(1);
                // A join is seen within half a second.
                c.consumer
                    .extra
                    .push(("heartbeat.interval.ms".into(), "500".into()));
                c
            };
            let ledger = Arc::new(GroupLedger::default());
            // 20 ms of work per event, so a second handling of the aggregate meanwhile is seen.
            let handler = |instance: u8| working_ledger_handler(&ledger, instance, Duration::from_millis(20));
            let first = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            first
                .subscribe_envelope(&topic, &group, handler(1))
                .await
                .expect("subscribe");
            for i in 0..TOTAL {
                let v = (i / AGGREGATES) as i64 + 1;
                let e = Envelope::new(format!("agg-{}", i % AGGREGATES), "t", v, json!({}));
                first.publish_envelope(&topic, &e).await.expect("publish");
            }
            first.flush().await.expect("flush");
            ledger
                .wait_until("the first member under way", |c| c.handled >= 100)
                .await;
            let second = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            second
                .subscribe_envelope(&topic, &group, handler(2))
                .await
                .expect("subscribe");
            ledger
                .wait_until("every envelope", |c| c.handled >= TOTAL)
                .await;
            let counts = ledger.counts();
            let dropped = first.metrics().not_owned_dropped;
            eprintln!(
                "[revoke kafka mock] {TOTAL} envelopes over {AGGREGATES} aggregates, a member joining: {counts:?}; dropped unstarted by the revoked member: {dropped}"
            );
            first.close().await.expect("close");
            second.close().await.expect("close");
            assert_eq!(
                counts.overlaps, 0,
                "both members handled one aggregate at once: {counts:?}"
            );
            assert_eq!(counts.order_violations, 0, "{counts:?}");
            assert!(
                counts.per_instance.iter().any(|(i, n)| *i == 2 && *n > 0),
                "the second member never got a partition: {counts:?}"
            );
        })
        .await;
}

/// `close()` is bounded when the group coordinator stops answering: the subscription's
/// consumer cannot commit or leave the group (librdkafka waits up to its socket timeout,
/// 60 s), and the bus returns within its close deadline anyway, leaving no task behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_bounded_when_the_coordinator_stops_answering() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
                MockCluster::new(1).expect("mock cluster");
            let topic = unique("kclose");
            let group = unique("svc");
            cluster.create_topic(&topic, 2, 1).expect("create topic");
            let c = mock_config(&cluster, 2);
            let close_timeout = Duration::from_secs(3);
            let baseline = eventbus_core::testkit::tasks_and_rss().0;
            let bus = Bus::new(
                KafkaTransport::connect(c).await.expect("connect"),
                kit_config().with_close_timeout(close_timeout),
            )
            .expect("bus");
            let handled: Recorder<Envelope> = Recorder::default();
            bus.subscribe_envelope(&topic, &group, handled.envelope_handler())
                .await
                .expect("subscribe");
            let e = Envelope::new("agg", "t", 1, json!({}));
            bus.publish_envelope(&topic, &e).await.expect("publish");
            handled.wait_for(1, "the event").await;
            // Every request to the only broker (the coordinator) now takes two minutes.
            cluster
                .broker_round_trip_time(1, Duration::from_secs(120))
                .expect("rtt");
            let started = Instant::now();
            let closed = tokio::time::timeout(close_timeout * 4, bus.close()).await;
            let took = started.elapsed();
            eprintln!("[close kafka mock] coordinator unanswering: close took {took:?} (deadline {close_timeout:?})");
            assert!(closed.is_ok(), "close still running after {took:?}");
            // One task is rdkafka's own, tied to its consumer, which goes on leaving the group
            // in the background until librdkafka gives up on the coordinator; none of the
            // bus's may be left (before, the fetcher went on detached).
            let left = eventbus_core::testkit::tasks_released(baseline + 1).await;
            assert!(
                left <= baseline + 1,
                "{left} tasks alive after close, {baseline} before the bus"
            );
        })
        .await;
}

/// A bus that only consumes shows `Connected` again once its broker is back and messages flow.
/// Before, health was set back only by a delivery report, so a consume-only bus stayed
/// `Reconnecting` after one outage however much it handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_only_bus_is_connected_again_after_an_outage() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
                MockCluster::new(1).expect("mock cluster");
            let topic = unique("khealth");
            let group = unique("svc");
            cluster.create_topic(&topic, 1, 1).expect("create topic");
            let config = || mock_config(&cluster, 1);
            let consumer = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            let handled: Recorder<Envelope> = Recorder::default();
            consumer
                .subscribe_envelope(&topic, &group, handled.envelope_handler())
                .await
                .expect("subscribe");
            cluster.broker_down(1).expect("broker down");
            wait_for_state(&consumer, "the outage", |s| {
                s == ConnectionState::Reconnecting
            })
            .await;
            cluster.broker_up(1).expect("broker up");
            // Another bus publishes; this one only consumes.
            let publisher = Bus::new(
                KafkaTransport::connect(config()).await.expect("connect"),
                kit_config(),
            )
            .expect("bus");
            for v in 1..=3 {
                let e = Envelope::new("agg", "t", v, json!({}));
                publisher
                    .publish_envelope(&topic, &e)
                    .await
                    .expect("publish");
            }
            publisher.flush().await.expect("flush");
            handled.wait_for(3, "the events after the outage").await;
            let state = consumer.health().state;
            eprintln!(
                "[health kafka mock] consume-only bus after an outage, 3 events handled: {state:?}"
            );
            publisher.close().await.expect("close");
            consumer.close().await.expect("close");
            assert_eq!(state, ConnectionState::Connected);
        })
        .await;
}

/// A group coordinator that stops answering does not stop consumption: commits wait for it on
/// a thread of their own. Two brokers: the partition's leader answers, the coordinator takes
/// two minutes per request. Before, the fetcher committed synchronously every interval and
/// waited with the commit, so nothing more was fetched until the coordinator answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_coordinator_does_not_stop_consumption() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
                MockCluster::new(2).expect("mock cluster");
            let topic = unique("kslowcoord");
            let group = unique("svc");
            cluster.create_topic(&topic, 1, 1).expect("create topic");
            cluster
                .partition_leader(&topic, 0, Some(1))
                .expect("leader");
            cluster
                .coordinator(MockCoordinator::Group(group.clone()), 2)
                .expect("coordinator");
            let mut c = mock_config(&cluster, 1);
            c.consumer.commit_interval = Duration::from_millis(100);
            let bus = Bus::new(
                KafkaTransport::connect(c).await.expect("connect"),
                kit_config().with_close_timeout(Duration::from_secs(3)),
            )
            .expect("bus");
            let handled: Recorder<Envelope> = Recorder::default();
            bus.subscribe_envelope(&topic, &group, handled.envelope_handler())
                .await
                .expect("subscribe");
            let e = Envelope::new("agg", "t", 1, json!({}));
            bus.publish_envelope(&topic, &e).await.expect("publish");
            handled.wait_for(1, "the first event").await;
            // The coordinator now takes two minutes per request (longer than the kit's hang
            // guard): a commit waited for blocks everything behind it.
            cluster
                .broker_round_trip_time(2, Duration::from_secs(120))
                .expect("rtt");
            // One at a time, each handled before the next is published: the commits of the
            // first ones (every 100 ms) are due long before the last is fetched.
            for v in 2..=16 {
                let e = Envelope::new("agg", "t", v, json!({}));
                bus.publish_envelope(&topic, &e).await.expect("publish");
                handled
                    .wait_for(v as usize, "events handled while the coordinator is slow")
                    .await;
            }
            eprintln!(
                "[commits kafka mock] 15 events handled with the coordinator at a 120 s round trip"
            );
            let closed = tokio::time::timeout(Duration::from_secs(10), bus.close()).await;
            assert!(closed.is_ok(), "close not bounded");
        })
        .await;
}

/// A bus configuration for `cluster` with topics of `partitions` partitions and a 6 s session
/// timeout (a lost member is noticed within the kit's hang guard).
fn mock_config<C: rdkafka::ClientContext>(
    cluster: &MockCluster<'_, C>,
    partitions: i32,
) -> KafkaConfig {
    let mut c = KafkaConfig::new(cluster.bootstrap_servers());
    c.topic.partitions = partitions;
    c.consumer.session_timeout = Duration::from_secs(6);
    c
}
