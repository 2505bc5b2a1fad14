//! The outbox against the real brokers: what the relay marks published arrives at a consumer
//! once, in each aggregate's order. SQLite on NATS and on the Kafka-protocol broker, and
//! PostgreSQL on NATS when the `postgres` feature is on. Needs `EVENTBUS_NATS_URL` and
//! `EVENTBUS_KAFKA_BROKERS` (scripts/test.sh starts both).

mod common;

use std::time::Duration;

use common::{env, nats_bus, relay_config, wait_for, Db};
use eventbus_core::testkit::{kit_config, unique, Recorder};
use eventbus_core::{Bus, Envelope, Transport};
use eventbus_outbox::Relay;

const AGGREGATES: usize = 10;
const VERSIONS: i64 = 20;

/// Events committed in the outbox reach a subscriber of the bus exactly once each, in order.
async fn relayed_once_in_order<T: Transport>(db: Db, bus: Bus<T>) {
    let topic = unique("outbox");
    let got: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("readers"), got.envelope_handler())
        .await
        .expect("subscribe");
    let relay = Relay::start(db.outbox(), bus.clone(), relay_config()).expect("relay");
    for v in 1..=VERSIONS {
        let events: Vec<Envelope> = (0..AGGREGATES)
            .map(|a| env(&format!("agg-{a}"), v))
            .collect();
        db.write(&topic, &events, true).await;
        relay.wake();
    }
    let total = AGGREGATES * VERSIONS as usize;
    wait_for(&relay, "every row marked", |m| m.published >= total as u64).await;
    let seen = got.wait_for(total, "every event at the consumer").await;
    relay.stop().await.expect("stop");
    let ids: std::collections::HashSet<&str> = seen.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), total, "an event arrived twice or not at all");
    for a in 0..AGGREGATES {
        let agg = format!("agg-{a}");
        let versions: Vec<i64> = seen
            .iter()
            .filter(|e| e.aggregate_id == agg)
            .map(|e| e.event_version)
            .collect();
        assert_eq!(versions, (1..=VERSIONS).collect::<Vec<_>>(), "{agg}");
    }
    let stats = db.outbox().stats().await.expect("stats");
    assert_eq!((stats.pending, stats.published), (0, total as u64));
    bus.close().await.expect("close");
}

async fn kafka_bus() -> Bus<eventbus_kafka::KafkaTransport> {
    let brokers = std::env::var("EVENTBUS_KAFKA_BROKERS")
        .expect("EVENTBUS_KAFKA_BROKERS (scripts/test.sh starts the Kafka-protocol broker)");
    let mut c = eventbus_kafka::KafkaConfig::new(brokers);
    c.consumer.session_timeout = Duration::from_secs(6);
    c.topic.partitions = 4;
    let t = eventbus_kafka::KafkaTransport::connect(c)
        .await
        .expect("connect to the Kafka-protocol broker");
    Bus::new(t, kit_config()).expect("bus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_nats() {
    relayed_once_in_order(Db::sqlite().await, nats_bus().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_kafka() {
    relayed_once_in_order(Db::sqlite().await, kafka_bus().await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_on_nats() {
    relayed_once_in_order(Db::postgres().await, nats_bus().await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_on_kafka() {
    relayed_once_in_order(Db::postgres().await, kafka_bus().await).await;
}
