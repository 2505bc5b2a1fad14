//! The broker connection lost and back. Not in the per-backend list run by
//! [`conformance_tests!`](crate::conformance_tests): an outage needs a broker of the test's own
//! (a nats-server it can kill and restart, librdkafka's mock cluster), so each backend's
//! tests call [`connection_lost_and_back`] with its [`Outage`]. The memory backend has no
//! connection to lose.

use std::future::Future;

use super::*;
use crate::ConnectionState;

/// Takes the broker away and brings it back.
pub trait Outage {
    /// The broker becomes unreachable (killed, or its listener down).
    fn cut(&mut self) -> impl Future<Output = ()>;
    /// The broker is back, with what it had stored.
    fn restore(&mut self) -> impl Future<Output = ()>;
    /// Creates `topic` on the broker where its admin API cannot (librdkafka's mock cluster).
    /// Default: nothing; the bus provisions the topic itself.
    fn create_topic(&mut self, topic: &str) {
        let _ = topic;
    }
}

/// Waits until the bus's health satisfies `ok`. Health changes raise no event, so this looks
/// again every 20 ms; the kit timeout only guards against a hang.
pub async fn wait_for_state<T: Transport>(
    bus: &Bus<T>,
    what: &str,
    ok: impl Fn(ConnectionState) -> bool,
) {
    let reached = async {
        while !ok(bus.health().state) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(kit_timeout(), reached).await.is_err() {
        panic!("health never showed {what}: {:?}", bus.health().state);
    }
}

/// 50 aggregates × 4 events flow and are handled; the broker goes away (health shows it), 200
/// more events are published while it is gone, it comes back: every publish gets an OK
/// result, every event is handled (at least once), per-aggregate order holds for first
/// deliveries, and health is `Connected` again. `bus` must be connected to the broker
/// `outage` controls.
pub async fn connection_lost_and_back<T: Transport>(bus: &Bus<T>, outage: &mut impl Outage) {
    const AGGS: usize = 50;
    let mut results = bus.results().expect("results");
    let topic = unique("outage");
    outage.create_topic(&topic);
    let handled: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("svc"), handled.envelope_handler())
        .await
        .expect("subscribe");
    let mut ids = Vec::new();
    let publish = |v: i64, ids: &mut Vec<String>| {
        (0..AGGS)
            .map(|a| env(&format!("agg-{a}"), v))
            .inspect(|e| ids.push(e.event_id.clone()))
            .collect::<Vec<_>>()
    };
    for v in 1..=4 {
        for e in publish(v, &mut ids) {
            bus.publish_envelope(&topic, &e).await.expect("publish");
        }
    }
    handled
        .wait_for(ids.len(), "every event before the outage")
        .await;
    outage.cut().await;
    wait_for_state(bus, "the outage", |s| s == ConnectionState::Reconnecting).await;
    for v in 5..=8 {
        for e in publish(v, &mut ids) {
            bus.publish_envelope(&topic, &e)
                .await
                .expect("publish accepted while the broker is away");
        }
    }
    outage.restore().await;
    let mut failed = Vec::new();
    for _ in 0..ids.len() {
        let r = tokio::time::timeout(kit_timeout(), results.recv())
            .await
            .expect("a publish result")
            .expect("results stream open");
        if r.outcome.is_err() {
            failed.push(r);
        }
    }
    assert!(
        failed.is_empty(),
        "publishes failed across the outage: {failed:?}"
    );
    let (got, first) = every_event_handled(&handled, &ids, "every event after the outage").await;
    assert_eq!(
        ordering_violations(&first),
        0,
        "order broken across the outage"
    );
    wait_for_state(bus, "the connection back", |s| {
        s == ConnectionState::Connected
    })
    .await;
    println!(
        "outage: {} published, {} handled ({} repeats)",
        ids.len(),
        got.len(),
        got.len() - first.len()
    );
}
