//! Failure modes users of peer libraries keep running into, each a case on every backend.

use super::*;

/// A poison message does not bounce between the members of a group forever (Dapr #4580): with
/// two members sharing the work, an event whose handler always fails is retried in place,
/// dead-lettered exactly once, and its aggregate's later events are handled after it, in
/// order; the group goes on.
pub async fn poison_message_is_dead_lettered_once_across_members<B: Backend>(b: &B) {
    let first = connect(b, kit_config()).await;
    let second = connect(b, kit_config()).await;
    let topic = unique("poison");
    let group = unique("group");
    let dlq = subscribe_dlq(&first, &topic).await;
    let rec: Recorder<(u8, Envelope)> = Recorder::default();
    let tries = Arc::new(AtomicUsize::new(0));
    for (member, bus) in [(0u8, &first), (1u8, &second)] {
        let (r, t) = (rec.clone(), tries.clone());
        bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
            let (r, t) = (r.clone(), t.clone());
            async move {
                if e.event_type == "poison" {
                    t.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::retryable("poison: always fails"));
                }
                r.push((member, e));
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    }
    // Both members at work first (joining a group takes a while on some brokers).
    let mut round = 0;
    hang_guard("both members to get work", async {
        loop {
            round += 1;
            for a in 0..16 {
                first
                    .publish_envelope(&topic, &env(&format!("warm-{a}"), round))
                    .await
                    .expect("publish");
            }
            let n = 16 * round as usize;
            let got = rec.wait_for(n, "a warm-up round").await;
            let members: HashSet<u8> = got.iter().map(|(m, _)| *m).collect();
            if members.len() == 2 {
                break;
            }
        }
    })
    .await;
    let before = rec.snapshot().len();
    let mut poison = env("agg-poison", 2);
    poison.event_type = "poison".into();
    first
        .publish_envelope(&topic, &env("agg-poison", 1))
        .await
        .expect("publish");
    first
        .publish_envelope(&topic, &poison)
        .await
        .expect("publish");
    for v in 3..=5 {
        first
            .publish_envelope(&topic, &env("agg-poison", v))
            .await
            .expect("publish");
    }
    let got = rec.wait_for(before + 4, "the poison's neighbours").await;
    let versions: Vec<i64> = got[before..]
        .iter()
        .filter(|(_, e)| e.aggregate_id == "agg-poison")
        .map(|(_, e)| e.event_version)
        .collect();
    assert_eq!(
        versions,
        vec![1, 3, 4, 5],
        "the aggregate goes on after its poison, in order"
    );
    dlq.wait_for(1, "the poison's dead letter").await;
    // A sentinel behind it in the dead-letter topic (same aggregate, so same partition and
    // order): once it is read, a second dead letter of the poison would have been too.
    let sentinel = env("agg-poison", 99);
    first
        .publish_envelope(&format!("{topic}.dlq"), &sentinel)
        .await
        .expect("publish the sentinel");
    let dead = dlq
        .wait_until("the sentinel behind the dead letter", |items| {
            items
                .iter()
                .any(|m| m.event_id() == Some(sentinel.event_id.as_str()))
        })
        .await;
    let copies = dead
        .iter()
        .filter(|m| m.event_id() == Some(poison.event_id.as_str()))
        .count();
    let attempts = tries.load(Ordering::SeqCst);
    println!("poison: {copies} dead letter(s) after {attempts} attempts over 2 members");
    assert_eq!(copies, 1, "the poison is dead-lettered exactly once");
    assert!(
        (3..=6).contains(&attempts),
        "3 attempts, 3 more at most if its partition moved mid-retry: {attempts}"
    );
    assert_eq!(
        first.metrics().dead_lettered + second.metrics().dead_lettered,
        1,
        "one dead letter across the group"
    );
    first.close().await.expect("close");
    second.close().await.expect("close");
}
