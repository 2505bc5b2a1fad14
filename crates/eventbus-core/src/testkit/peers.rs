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

/// A handler retrying while its member leaves the group does not drop the message (Dapr
/// #3849): two members; the event fails on whichever member gets it until that member is
/// closed mid-retry; the other member then gets it and handles it. Nothing is dead-lettered
/// by the member that left, and the aggregate's next event comes after it.
pub async fn retrying_message_survives_its_member_leaving<B: Backend>(b: &B) {
    let patient = kit_config().with_retry(RetryPolicy {
        max_attempts: 1_000,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        multiplier: 2.0,
    });
    let members = [connect(b, patient.clone()).await, connect(b, patient).await];
    let topic = unique("revoked");
    let group = unique("group");
    // The dead-letter reader on a bus of its own: either member may be the one that leaves.
    let observer = connect(b, kit_config()).await;
    let dlq = subscribe_dlq(&observer, &topic).await;
    let rec: Recorder<(u8, Envelope)> = Recorder::default();
    // The member of each failed attempt at the event, and whether the retrying member has
    // left (from then on the other member's attempt succeeds).
    let tries: Recorder<u8> = Recorder::default();
    let left = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (member, bus) in [(0u8, &members[0]), (1u8, &members[1])] {
        let (r, tries, left) = (rec.clone(), tries.clone(), left.clone());
        bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
            let (r, tries, left) = (r.clone(), tries.clone(), left.clone());
            async move {
                if e.event_type == "stuck" && !left.load(Ordering::SeqCst) {
                    tries.push(member);
                    return Err(HandlerError::retryable("not yet"));
                }
                r.push((member, e));
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    }
    // Both members at work first.
    let mut round = 0;
    hang_guard("both members to get work", async {
        loop {
            round += 1;
            for a in 0..16 {
                members[0]
                    .publish_envelope(&topic, &env(&format!("warm-{a}"), round))
                    .await
                    .expect("publish");
            }
            let got = rec.wait_for(16 * round as usize, "a warm-up round").await;
            if got.iter().map(|(m, _)| *m).collect::<HashSet<_>>().len() == 2 {
                break;
            }
        }
    })
    .await;
    let mut stuck = env("agg-r", 1);
    stuck.event_type = "stuck".into();
    let next = env("agg-r", 2);
    members[0]
        .publish_envelope(&topic, &stuck)
        .await
        .expect("publish");
    members[0]
        .publish_envelope(&topic, &next)
        .await
        .expect("publish");
    // Wait until one member is retrying it (two failed attempts), then close that member.
    let holder = tries.wait_for(2, "a member retrying the event").await[0];
    let [a, b_] = members;
    let (leaving, staying) = if holder == 0 { (a, b_) } else { (b_, a) };
    let leave = async {
        hang_guard("the retrying member to close", leaving.close())
            .await
            .expect("close");
        left.store(true, Ordering::SeqCst);
    };
    leave.await;
    let got = rec
        .wait_until("the event handled by the member that stayed", |items| {
            items.iter().any(|(_, e)| e.event_id == next.event_id)
        })
        .await;
    let after: Vec<&(u8, Envelope)> = got
        .iter()
        .filter(|(_, e)| e.aggregate_id == "agg-r")
        .collect();
    let other = 1 - holder;
    println!(
        "revoked while retrying: member {holder} retried {} times and left; then {:?}",
        tries.snapshot().len(),
        after
            .iter()
            .map(|(m, e)| (*m, e.event_version))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        after
            .iter()
            .map(|(_, e)| e.event_version)
            .collect::<Vec<_>>()[..2],
        [1, 2],
        "the retried event first, then the next, each once before the sentinel"
    );
    assert!(
        after.iter().take(2).all(|(m, _)| *m == other),
        "handled by the member that stayed"
    );
    // Nothing dead-lettered by the member that left: a sentinel behind any such letter.
    let sentinel = env("agg-r", 99);
    staying
        .publish_envelope(&format!("{topic}.dlq"), &sentinel)
        .await
        .expect("publish the sentinel");
    let dead = dlq
        .wait_until("the sentinel in the dead-letter topic", |items| {
            items
                .iter()
                .any(|m| m.event_id() == Some(sentinel.event_id.as_str()))
        })
        .await;
    assert_eq!(
        dead.len(),
        1,
        "only the sentinel: {:?}",
        dead.iter().map(|m| m.event_id()).collect::<Vec<_>>()
    );
    staying.close().await.expect("close");
    observer.close().await.expect("close");
}
