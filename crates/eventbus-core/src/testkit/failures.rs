//! Cases on failure: retries, panics, dead letters, malformed and bad input.

use super::*;

/// A failing handler is retried in place: it succeeds on the third attempt and the
/// aggregate's later events wait for it.
pub async fn retry_then_success<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("retry");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let attempts = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
    let (r, at) = (rec.clone(), attempts.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, at) = (r.clone(), at.clone());
        async move {
            let n = {
                let mut m = at.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(e.event_version).or_insert(0);
                *n += 1;
                *n
            };
            if e.event_version == 2 && n < 3 {
                return Err(HandlerError::retryable(format!("transient failure {n}")));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=5 {
        bus.publish_envelope(&topic, &env("agg-r", v))
            .await
            .expect("publish");
    }
    let got = rec.wait_for(5, "five envelopes").await;
    assert_eq!(versions_of(&got, "agg-r"), vec![1, 2, 3, 4, 5]);
    assert_eq!(attempts.lock().unwrap_or_else(|e| e.into_inner())[&2], 3);
    let m = bus.metrics();
    assert!(m.retries >= 2, "{m:?}");
    assert_eq!(m.dead_lettered, 0);
    bus.close().await.expect("close");
}

/// A panicking handler is an error like any other: retried, the worker survives, later
/// messages are handled in order.
pub async fn panic_is_an_error<B: Backend>(b: &B) {
    const KEYED: usize = 8;
    let bus = connect(b, kit_config().with_keyed_workers(KEYED)).await;
    let topic = unique("panic");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    let panicked = Arc::new(AtomicUsize::new(0));
    // After the panic, one event on each of KEYED aggregates: their handlers meet at a
    // barrier, which they pass only if all KEYED workers are still alive.
    let all_workers = Arc::new(tokio::sync::Barrier::new(KEYED));
    let (r, p, w) = (rec.clone(), panicked.clone(), all_workers.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, p, w) = (r.clone(), p.clone(), w.clone());
        async move {
            if e.aggregate_id == "agg-p"
                && e.event_version == 3
                && p.fetch_add(1, Ordering::SeqCst) == 0
            {
                panic!("kit: deliberate handler panic");
            }
            if e.aggregate_id.starts_with("agg-w") {
                w.wait().await;
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=5 {
        bus.publish_envelope(&topic, &env("agg-p", v))
            .await
            .expect("publish");
    }
    rec.wait_for(5, "five envelopes").await;
    bus.publish_envelope(&topic, &env("agg-p", 6))
        .await
        .expect("publish");
    rec.wait_for(6, "the envelope after the panic").await;
    for w in 0..KEYED {
        bus.publish_envelope(&topic, &env(&format!("agg-w{w}"), 1))
            .await
            .expect("publish");
    }
    let got = rec
        .wait_for(6 + KEYED, "one event per worker, handled at the same time")
        .await;
    assert_eq!(versions_of(&got, "agg-p"), vec![1, 2, 3, 4, 5, 6]);
    let m = bus.metrics();
    assert!(m.handler_panics >= 1, "{m:?}");
    bus.close().await.expect("close");
}

/// A message that keeps failing goes to `<topic>.dlq` after the configured attempts with the
/// error in headers; the subscription goes on.
pub async fn dead_letter_after_attempts<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("dlq");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let rec: Recorder<Envelope> = Recorder::default();
    let tries = Arc::new(AtomicUsize::new(0));
    let (r, t) = (rec.clone(), tries.clone());
    bus.subscribe_envelope(&topic, &group, move |e: Envelope| {
        let (r, t) = (r.clone(), t.clone());
        async move {
            if e.event_version == 2 {
                t.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::retryable("boom-v2"));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let bad = env("agg-d", 2);
    bus.publish_envelope(&topic, &env("agg-d", 1))
        .await
        .expect("publish");
    bus.publish_envelope(&topic, &bad).await.expect("publish");
    bus.publish_envelope(&topic, &env("agg-d", 3))
        .await
        .expect("publish");
    let got = rec.wait_for(2, "v1 and v3").await;
    assert_eq!(versions_of(&got, "agg-d"), vec![1, 3]);
    let dead = dlq.wait_for(1, "one dead letter").await;
    let h = dead[0].headers();
    assert_eq!(dead[0].event_id(), Some(bad.event_id.as_str()));
    assert!(h
        .get(headers::DLQ_ERROR)
        .unwrap_or_default()
        .contains("boom-v2"));
    assert_eq!(h.get(headers::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(h.get(headers::DLQ_TOPIC), Some(topic.as_str()));
    assert_eq!(h.get(headers::DLQ_GROUP), Some(group.as_str()));
    assert_eq!(h.get(headers::DLQ_REASON), Some("handler"));
    assert_eq!(dead[0].envelope().expect("dead letter keeps the body"), bad);
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    assert_eq!(bus.metrics().dead_lettered, 1);
    bus.close().await.expect("close");
}

/// Malformed envelopes and corrupt compressed frames go to the dead-letter topic with the
/// reason; the subscription goes on.
pub async fn malformed_input_dead_letter<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("malformed");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, rec.envelope_handler())
        .await
        .expect("subscribe");
    let bad_json = bus
        .send(Publication::new(&topic, &b"{not json"[..]).aggregate_id("agg-m"))
        .await
        .expect("publish");
    let bad_lz4 = bus
        .send(
            Publication::new(&topic, &b"\x10\x00\x00\x00garbage-not-lz4"[..])
                .aggregate_id("agg-m")
                .header(headers::CONTENT_ENCODING, "lz4"),
        )
        .await
        .expect("publish");
    let good = env("agg-m", 1);
    bus.publish_envelope(&topic, &good).await.expect("publish");
    let got = rec.wait_for(1, "the valid envelope").await;
    assert_eq!(got[0], good);
    let dead = dlq.wait_for(2, "two dead letters").await;
    let reason = |id: &str| {
        dead.iter()
            .find(|m| m.event_id() == Some(id))
            .and_then(|m| m.headers().get(headers::DLQ_REASON).map(str::to_owned))
    };
    assert_eq!(reason(&bad_json).as_deref(), Some("malformed"));
    assert_eq!(reason(&bad_lz4).as_deref(), Some("codec"));
    let corrupt = dead
        .iter()
        .find(|m| m.event_id() == Some(bad_lz4.as_str()))
        .expect("corrupt frame dead letter");
    assert_eq!(&corrupt.payload()[..], b"\x10\x00\x00\x00garbage-not-lz4");
    assert_eq!(
        corrupt.headers().get(headers::DLQ_CONTENT_ENCODING),
        Some("lz4")
    );
    assert!(bus.metrics().malformed >= 2);
    bus.close().await.expect("close");
}

/// Bad topic names, oversize messages and invalid envelopes are refused with typed errors
/// before anything reaches the broker.
pub async fn bad_input_is_rejected<B: Backend>(b: &B) {
    let bus = connect(b, kit_config().with_max_message_bytes(64 * 1024)).await;
    for bad in ["", "has space", "wild.*", "tail.>", "a..b"] {
        assert!(
            matches!(
                bus.publish(bad, &b"x"[..]).await,
                Err(BusError::Transport(TransportError::InvalidTopic { .. }))
            ),
            "{bad:?}"
        );
    }
    let topic = unique("bad");
    let big = Bytes::from(vec![b'x'; 64 * 1024 + 1]);
    assert!(matches!(
        bus.publish(&topic, big).await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    let mut e = env("agg-b", 1);
    e.event_type.clear();
    assert!(matches!(
        bus.publish_envelope(&topic, &e).await,
        Err(BusError::Envelope(crate::EnvelopeError::EmptyEventType))
    ));
    assert!(matches!(
        bus.subscribe(&topic, "bad group!", Recorder::default().handler())
            .await,
        Err(BusError::Config(_))
    ));
    assert_eq!(bus.metrics().published, 0);
    bus.close().await.expect("close");
}
