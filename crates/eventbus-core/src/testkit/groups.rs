//! Cases on consumer groups: shared work, independent groups, resume after a restart.

use super::*;

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
    hang_guard("the second instance to get work", async {
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
        }
    })
    .await;
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
