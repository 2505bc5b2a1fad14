#![cfg(feature = "postgres")]
//! The outbox on PostgreSQL (a database per test, `EVENTBUS_POSTGRES_URL`) with the memory
//! backend.

mod common;

use common::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_publishes_exactly_once() {
    common::commit_publishes_exactly_once(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing() {
    common::rollback_publishes_nothing(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failure_is_retried_then_published() {
    common::broker_failure_is_retried_then_published(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_max_attempts() {
    common::dead_after_max_attempts(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_when_an_earlier_event_fails() {
    common::order_kept_when_an_earlier_event_fails(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_one_aggregate_takes_few_rounds() {
    common::backlog_of_one_aggregate_takes_few_rounds(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_when_an_event_inside_a_run_fails() {
    common::order_kept_when_an_event_inside_a_run_fails(Db::postgres().await).await;
}

/// Two relays on one table never publish one row at the same time, and between them publish
/// every row exactly once (`FOR UPDATE SKIP LOCKED`; each relay has its own bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_publish_one_row_concurrently() {
    use std::sync::atomic::Ordering;

    const AGGREGATES: usize = 100;
    const VERSIONS: i64 = 20;
    let h = common::Harness::new(Db::postgres().await);
    let first = h.relay(common::relay_config());
    // The second relay: its own bus over the same broker and the same publish recorder.
    let second_bus =
        eventbus_core::Bus::new(h.flaky.clone(), eventbus_core::BusConfig::default()).expect("bus");
    let second =
        eventbus_outbox::Relay::start(h.db.outbox(), second_bus.clone(), common::relay_config())
            .expect("relay");
    let topic = eventbus_core::testkit::unique("orders");
    for v in 1..=VERSIONS {
        let events: Vec<_> = (0..AGGREGATES)
            .map(|a| common::env(&format!("agg-{a}"), v))
            .collect();
        h.db.write(&topic, &events, true).await;
    }
    let total = AGGREGATES * VERSIONS as usize;
    let mut a = first.progress();
    let mut b = second.progress();
    let both = async {
        loop {
            let done = a.borrow().published + b.borrow().published;
            if done >= total as u64 {
                return;
            }
            tokio::select! {
                _ = a.changed() => {}
                _ = b.changed() => {}
            }
        }
    };
    tokio::time::timeout(eventbus_core::testkit::kit_timeout(), both)
        .await
        .expect("every row published");
    let (m1, m2) = (
        first.stop().await.expect("stop"),
        second.stop().await.expect("stop"),
    );
    eprintln!("[outbox] two relays: {m1:?} / {m2:?}");
    assert_eq!(h.flaky.overlapping.load(Ordering::Relaxed), 0);
    let sends = h.flaky.sends.lock().expect("lock").clone();
    assert_eq!(sends.len(), total);
    assert!(sends.values().all(|n| *n == 1), "a row was published twice");
    assert!(
        m1.published > 0 && m2.published > 0,
        "one relay did all the work"
    );
    let stored = common::stored(&h.broker, &topic);
    for a in 0..AGGREGATES {
        let agg = format!("agg-{a}");
        let versions: Vec<i64> = stored
            .iter()
            .filter(|e| e.aggregate_id == agg)
            .map(|e| e.event_version)
            .collect();
        assert_eq!(versions, (1..=VERSIONS).collect::<Vec<_>>(), "{agg}");
    }
    h.bus.close().await.expect("close");
    second_bus.close().await.expect("close");
}
