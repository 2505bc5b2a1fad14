//! Cases on delivery itself: payloads and headers intact, stored messages, publish results, dedup, and the ack/nak contract.

use super::*;

/// Raw bytes and an envelope arrive intact; the returned event id is the message's.
pub async fn round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("round-trip");
    let group = unique("group");
    let rec = Recorder::default();
    bus.subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let id = bus
        .publish(&topic, &b"hello bytes"[..])
        .await
        .expect("publish");
    let e = env("agg-1", 1);
    let r = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish envelope");
    assert!(r.is_ok(), "publish failed: {r:?}");
    let got = rec.wait_for(2, "two messages").await;
    let raw = got
        .iter()
        .find(|m| m.event_id() == Some(id.as_str()))
        .expect("raw message by event id");
    assert_eq!(&raw.payload()[..], b"hello bytes");
    assert_eq!(raw.topic(), topic);
    let envm = got
        .iter()
        .find(|m| m.event_id() == Some(e.event_id.as_str()))
        .expect("envelope by event id");
    assert_eq!(envm.envelope().expect("valid envelope"), e);
    bus.close().await.expect("close");
}

/// Envelope headers and custom headers reach the consumer.
pub async fn headers_round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("headers");
    let group = unique("group");
    let rec = Recorder::default();
    bus.subscribe(&topic, &group, rec.handler())
        .await
        .expect("subscribe");
    let e = env("agg-h", 7)
        .with_trace_id("trace-1")
        .with_correlation_id("corr-1")
        .with_tenant_id("tenant-1");
    let p = Publication::envelope(&topic, &e)
        .expect("valid")
        .header("X-Custom", "custom value");
    bus.send_and_wait(p).await.expect("publish");
    let got = rec.wait_for(1, "one message").await;
    let h = got[0].headers();
    assert_eq!(h.get(headers::EVENT_ID), Some(e.event_id.as_str()));
    assert_eq!(h.get(headers::AGGREGATE_ID), Some("agg-h"));
    assert_eq!(h.get(headers::EVENT_TYPE), Some("kit.event"));
    assert_eq!(h.get(headers::EVENT_VERSION), Some("7"));
    assert_eq!(h.get(headers::TRACE_ID), Some("trace-1"));
    assert_eq!(h.get(headers::CORRELATION_ID), Some("corr-1"));
    assert_eq!(h.get(headers::TENANT_ID), Some("tenant-1"));
    assert!(h.get(headers::TIMESTAMP).is_some());
    assert_eq!(h.get("X-Custom"), Some("custom value"));
    assert_eq!(got[0].aggregate_id(), Some("agg-h"));
    bus.close().await.expect("close");
}

/// A new group receives messages stored before it subscribed.
pub async fn new_subscriber_receives_stored<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("stored");
    let mut ids = HashSet::new();
    for v in 1..=20 {
        let e = env("agg-s", v);
        ids.insert(e.event_id.clone());
        bus.publish_envelope(&topic, &e).await.expect("publish");
    }
    bus.flush().await.expect("flush");
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("late"), rec.envelope_handler())
        .await
        .expect("subscribe");
    let got = rec.wait_for(20, "stored envelopes").await;
    assert_eq!(versions_of(&got, "agg-s"), (1..=20).collect::<Vec<_>>());
    bus.close().await.expect("close");
}

/// Every accepted publish yields exactly one result, on the callback and on the stream.
pub async fn one_result_per_publish<B: Backend>(b: &B) {
    const N: usize = 300;
    let topic = unique("results");
    let by_callback: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let cb = by_callback.clone();
    let config = kit_config().with_result_callback(move |r: &PublishResult| {
        assert!(r.is_ok(), "{r:?}");
        *cb.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(r.event_id.clone())
            .or_default() += 1;
    });
    let bus = connect(b, config).await;
    let mut stream = bus.results().expect("results stream");
    assert!(matches!(bus.results(), Err(BusError::ResultsAlreadyTaken)));
    let mut ids = Vec::new();
    for i in 0..N {
        let id = if i % 2 == 0 {
            bus.publish(&topic, Bytes::from(format!("raw {i}"))).await
        } else {
            bus.publish_envelope(&topic, &env("agg-res", i as i64))
                .await
        };
        ids.push(id.expect("publish"));
    }
    let waited = bus
        .publish_and_wait(&topic, &b"awaited"[..])
        .await
        .expect("publish and wait");
    assert!(waited.is_ok(), "{waited:?}");
    ids.push(waited.event_id.clone());
    bus.flush().await.expect("flush");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..ids.len() {
        let r: PublishResult = tokio::time::timeout(kit_timeout(), stream.recv())
            .await
            .expect("a result in time")
            .expect("stream open");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.topic, topic);
        *seen.entry(r.event_id).or_default() += 1;
    }
    bus.close().await.expect("close");
    assert!(stream.recv().await.is_none(), "more results than publishes");
    assert_eq!(seen.len(), ids.len());
    assert!(seen.values().all(|n| *n == 1));
    let by_callback = by_callback
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "stream: no single result for {id}");
        assert_eq!(
            by_callback.get(id),
            Some(&1),
            "callback: no single result for {id}"
        );
    }
    assert_eq!(by_callback.len(), ids.len());
}

/// Publishing the same `event_id` twice: the handler sees it once; backends whose broker
/// deduplicates also report the second publish as a duplicate.
pub async fn dedup_by_event_id<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("dedup");
    let group = unique("group");
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, rec.envelope_handler())
        .await
        .expect("subscribe");
    let e = env("agg-dd", 1);
    let first = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    let second = bus
        .publish_envelope_and_wait(&topic, &e)
        .await
        .expect("publish");
    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
    assert_eq!(second.event_id, e.event_id);
    if bus.capabilities().publish_dedup {
        assert_eq!(second.outcome.as_ref().map(|r| r.duplicate), Ok(true));
    }
    bus.publish_envelope(&topic, &env("agg-dd", 2))
        .await
        .expect("publish");
    let got = rec
        .wait_until("the sentinel", |items| {
            items.iter().any(|x| x.event_version == 2)
        })
        .await;
    assert_eq!(
        got.iter().filter(|x| x.event_id == e.event_id).count(),
        1,
        "the duplicate reached the handler"
    );
    bus.close().await.expect("close");
}

/// Fetches from `sub` until `count` deliveries arrived; panics after the kit timeout.
async fn fetch_n<S: crate::Subscription>(
    sub: &mut S,
    count: usize,
    what: &str,
) -> Vec<S::Delivery> {
    let mut got = Vec::new();
    let fetched = async {
        while got.len() < count {
            got.extend(
                sub.fetch(count - got.len(), Duration::from_millis(100))
                    .await
                    .expect("fetch"),
            );
        }
    };
    if tokio::time::timeout(kit_timeout(), fetched).await.is_err() {
        panic!(
            "timed out after {:?} waiting for {what}: {} of {count} fetched",
            kit_timeout(),
            got.len()
        );
    }
    got
}

fn id_of<D: crate::Delivery>(d: &D) -> String {
    d.message().event_id().unwrap_or_default().to_string()
}

/// The settlement contract, at the transport level: a nak'ed message comes back (its delivery
/// count up), an acked one never does, neither to the same member nor to the next member of
/// the group after a restart. "Never" is checked by a marker published afterwards on the same
/// aggregate (one partition): everything before it has been delivered when it arrives.
pub async fn ack_settles_nak_redelivers<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("acknak");
    let spec = SubscriptionSpec {
        topic: topic.clone(),
        group: unique("group"),
    };
    let events: Vec<Envelope> = (1..=10).map(|v| env("agg-an", v)).collect();
    for e in &events {
        bus.publish_envelope(&topic, e).await.expect("publish");
    }
    bus.flush().await.expect("flush");
    let t = bus.transport();
    let mut sub = t.subscribe(spec.clone()).await.expect("subscribe");
    let first = fetch_n(&mut sub, 10, "the ten events").await;
    let nacked = events[4].event_id.clone();
    for d in first {
        if id_of(&d) == nacked {
            d.nak(Duration::ZERO).await.expect("nak");
        } else {
            d.ack().await.expect("ack");
        }
    }
    let again = fetch_n(&mut sub, 1, "the nak'ed event again").await;
    assert_eq!(id_of(&again[0]), nacked, "only the nak'ed event comes back");
    assert!(
        again[0].message().delivery_count() >= 2,
        "a redelivery counts: {}",
        again[0].message().delivery_count()
    );
    for d in again {
        d.ack().await.expect("ack");
    }
    let marker = env("agg-an", 11);
    bus.publish_envelope_and_wait(&topic, &marker)
        .await
        .expect("publish marker");
    let next = fetch_n(&mut sub, 1, "the marker").await;
    assert_eq!(id_of(&next[0]), marker.event_id, "an acked event came back");
    for d in next {
        d.ack().await.expect("ack");
    }
    sub.release_prefetched().await;
    sub.close().await.expect("close the consumer");

    // The next member of the group (a restart) gets nothing that was acked.
    let restart_marker = env("agg-an", 12);
    bus.publish_envelope_and_wait(&topic, &restart_marker)
        .await
        .expect("publish marker");
    let mut sub = t.subscribe(spec).await.expect("subscribe again");
    let after = fetch_n(&mut sub, 1, "the marker after the restart").await;
    assert_eq!(
        id_of(&after[0]),
        restart_marker.event_id,
        "an acked event was redelivered after a restart"
    );
    for d in after {
        d.ack().await.expect("ack");
    }
    sub.release_prefetched().await;
    sub.close().await.expect("close the consumer");
    bus.close().await.expect("close");
}
