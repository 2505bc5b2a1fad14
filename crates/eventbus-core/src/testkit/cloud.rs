//! CloudEvents through the bus: published in both modes, consumed as envelopes in order,
//! invalid ones dead-lettered with their reason.

use super::*;
use crate::cloudevents::{CloudEvent, KAFKA_PREFIX, NATS_PREFIX};

/// CloudEvents published in structured mode and in binary mode (both bindings' prefixes, on
/// every backend) reach an envelope subscription as envelopes, in the subject's order; a raw
/// subscriber reads them back as CloudEvents equal to what was sent; one produced by another
/// system without `source` is dead-lettered with the reason.
pub async fn cloud_events_round_trip<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("cloudevents");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let envs: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("group"), envs.envelope_handler())
        .await
        .expect("subscribe envelopes");
    let raw: Recorder<Message> = Recorder::default();
    bus.subscribe(&topic, &unique("raw"), raw.handler())
        .await
        .expect("subscribe raw");
    let mut sent = Vec::new();
    for v in 1..=6 {
        let e = env("agg-ce", v);
        let ce = CloudEvent::from_envelope(&e, "/kit/cloudevents");
        let p = match v % 3 {
            0 => Publication::cloud_event(topic.as_str(), &ce),
            1 => Publication::cloud_event_binary(topic.as_str(), &ce, KAFKA_PREFIX),
            _ => Publication::cloud_event_binary(topic.as_str(), &ce, NATS_PREFIX),
        }
        .expect("a valid CloudEvent");
        let r = bus.send_and_wait(p).await.expect("publish");
        assert!(r.is_ok(), "{r:?}");
        sent.push((e, ce));
    }
    let got = envs.wait_for(6, "six CloudEvents as envelopes").await;
    assert_eq!(versions_of(&got, "agg-ce"), [1, 2, 3, 4, 5, 6], "in order");
    for (e, _) in &sent {
        assert!(got.contains(e), "envelope {e:?} arrived unchanged");
    }
    let msgs = raw.wait_for(6, "six raw CloudEvents").await;
    for (_, ce) in &sent {
        let m = msgs
            .iter()
            .find(|m| m.event_id() == Some(ce.id.as_str()))
            .expect("by id");
        let back = m.cloud_event().expect("reads back as a CloudEvent");
        assert_eq!(back.id, ce.id);
        assert_eq!(back.source, ce.source);
        assert_eq!(back.subject, ce.subject);
        assert_eq!(back.data, ce.data);
    }

    // Another system's binary-mode event without `source`: dead-lettered, with the reason.
    let p = Publication::new(topic.as_str(), Bytes::from_static(br#"{"x": 1}"#))
        .header("ce_specversion", "1.0")
        .header("ce_id", "foreign-1")
        .header("ce_type", "com.example.thing")
        .header("ce_subject", "agg-foreign")
        .header("content-type", "application/json");
    bus.send_and_wait(p).await.expect("publish");
    let dead = dlq
        .wait_for(1, "the invalid CloudEvent dead-lettered")
        .await;
    let reason = dead[0]
        .headers()
        .get(headers::DLQ_ERROR)
        .unwrap_or_default();
    assert!(reason.contains("source"), "{reason}");
    assert_eq!(
        dead[0].headers().get(headers::DLQ_REASON),
        Some("malformed")
    );
    bus.close().await.expect("close");
}
