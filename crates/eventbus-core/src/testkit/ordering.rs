//! Cases on the dispatcher: per-aggregate order, no head-of-line blocking, the global pool.

use super::*;

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
