//! The bad-input sweep: every kind of bad input a producer, a peer or a user can hand the bus,
//! each answered by a typed error before the broker or by a dead letter with its reason, and
//! the bus still working afterwards.

use super::*;

/// What a consumer is handed that it cannot read, by kind: dead-lettered with its reason
/// (`malformed` for envelopes, `codec` for payload encodings), the raw bytes kept, the
/// subscription going on in order; and what a publisher or subscriber asks that cannot work:
/// typed errors (bad names, oversize payloads and headers, bad header names and values,
/// publish and subscribe after close, a second subscription of one group on one bus).
pub async fn bad_input_sweep<B: Backend>(b: &B) {
    let bus = connect(b, kit_config().with_max_message_bytes(256 * 1024)).await;
    let topic = unique("sweep");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let rec: Recorder<Envelope> = Recorder::default();
    let sub = bus
        .subscribe_envelope(&topic, &group, rec.envelope_handler())
        .await
        .expect("subscribe");

    // A second subscription of the same group on the same bus would fetch the same
    // partitions next to the first (and on some brokers break per-aggregate order): refused.
    let twice = bus
        .subscribe_envelope(&topic, &group, Recorder::default().envelope_handler())
        .await;
    assert!(
        matches!(&twice, Err(BusError::Config(m)) if m.contains("already")),
        "a second subscription of one group: {twice:?}"
    );

    let valid = serde_json::to_value(env("agg-s", 1)).expect("json");
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = valid.clone();
        if let Some(o) = v.as_object_mut() {
            f(o);
        }
        serde_json::to_vec(&v).expect("json")
    };
    let mut nested = vec![b'['; 100_000];
    nested.extend(vec![b']'; 100_000]);
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{not json".to_vec()),
        (
            "truncated JSON",
            valid.to_string().as_bytes()[..20].to_vec(),
        ),
        ("empty payload", Vec::new()),
        ("not UTF-8", b"\xff\xfe\xfd".to_vec()),
        ("a JSON array", b"[1,2,3]".to_vec()),
        ("an empty object", b"{}".to_vec()),
        ("nested 100,000 deep", nested),
        (
            "trailing garbage",
            [valid.to_string().as_bytes(), b"}}"].concat(),
        ),
        (
            "event_id a number",
            with(&|o| {
                o.insert("event_id".into(), json!(5));
            }),
        ),
        (
            "event_version a string",
            with(&|o| {
                o.insert("event_version".into(), json!("one"));
            }),
        ),
        (
            "timestamp not a time",
            with(&|o| {
                o.insert("timestamp".into(), json!("yesterday"));
            }),
        ),
        (
            "event_id missing",
            with(&|o| {
                o.remove("event_id");
            }),
        ),
        (
            "aggregate_id missing",
            with(&|o| {
                o.remove("aggregate_id");
            }),
        ),
        (
            "event_id empty",
            with(&|o| {
                o.insert("event_id".into(), json!(""));
            }),
        ),
        (
            "event_type blank",
            with(&|o| {
                o.insert("event_type".into(), json!("  "));
            }),
        ),
    ];
    let mut expected: Vec<(String, &str, Vec<u8>)> = Vec::new();
    for (what, bytes) in &malformed {
        let id = bus
            .send(Publication::new(&topic, bytes.clone()).aggregate_id("agg-s"))
            .await
            .unwrap_or_else(|e| panic!("publishing {what}: {e}"));
        expected.push((id, "malformed", bytes.clone()));
    }
    // Payload encodings: a corrupt frame, a truncated one, a forged size (a decompression
    // bomb: 4 GiB declared), an encoding nobody knows.
    let mut h = Headers::new();
    let frame = codec_frame(&mut h);
    let codec_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "corrupt lz4",
            b"\x10\x00\x00\x00garbage-not-lz4".to_vec(),
            "lz4",
        ),
        ("truncated lz4", frame[..frame.len() / 2].to_vec(), "lz4"),
        ("size prefix only", frame[..4].to_vec(), "lz4"),
        (
            "forged size",
            [&[0xff, 0xff, 0xff, 0xff][..], &frame[4..]].concat(),
            "lz4",
        ),
        ("unknown encoding", b"plain".to_vec(), "zstd-9000"),
    ];
    for (what, bytes, encoding) in &codec_cases {
        let id = bus
            .send(
                Publication::new(&topic, bytes.clone())
                    .aggregate_id("agg-s")
                    .header(headers::CONTENT_ENCODING, *encoding),
            )
            .await
            .unwrap_or_else(|e| panic!("publishing {what}: {e}"));
        expected.push((id, "codec", bytes.clone()));
    }
    // Unknown header values on a valid envelope are carried, not judged.
    let good = env("agg-s", 2);
    bus.send(
        Publication::envelope(&topic, &good)
            .expect("envelope")
            .header("X-Unknown", "\u{1F980} any value")
            .header(headers::EVENT_VERSION, "not-a-number"),
    )
    .await
    .expect("publish with odd headers");

    let got = rec
        .wait_for(1, "the valid envelope after the bad ones")
        .await;
    assert_eq!(
        got,
        vec![good],
        "only the valid envelope reaches the handler"
    );
    let dead = dlq
        .wait_for(expected.len(), "one dead letter per bad input")
        .await;
    for (id, reason, bytes) in &expected {
        let m = dead
            .iter()
            .find(|m| m.event_id() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(m.headers().get(headers::DLQ_REASON), Some(*reason), "{id}");
        assert!(
            m.headers()
                .get(headers::DLQ_ERROR)
                .is_some_and(|e| !e.is_empty()),
            "a dead letter says why: {:?}",
            m.headers()
        );
        assert_eq!(&m.payload()[..], &bytes[..], "the raw bytes are kept");
    }
    assert_eq!(
        dead.len(),
        expected.len(),
        "each bad input dead-lettered once"
    );

    // What the publisher asks that cannot work: typed errors, nothing sent.
    let published = bus.metrics().published;
    let big = Bytes::from(vec![b'x'; 256 * 1024 + 1]);
    assert!(matches!(
        bus.publish(&topic, big).await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    let big_header = "v".repeat(256 * 1024);
    assert!(matches!(
        bus.send(Publication::new(&topic, &b"x"[..]).header("X-Big", big_header))
            .await,
        Err(BusError::Transport(TransportError::PayloadTooLarge { .. }))
    ));
    for (name, value) in [
        ("", "v"),
        ("has space", "v"),
        ("colon:name", "v"),
        ("X-Line", "a\r\nInjected: yes"),
        ("X-\u{e9}", "v"),
    ] {
        let r = bus
            .send(Publication::new(&topic, &b"x"[..]).header(name, value))
            .await;
        assert!(
            matches!(
                r,
                Err(BusError::Transport(TransportError::InvalidHeader { .. }))
            ),
            "header {name:?}: {value:?}: {r:?}"
        );
    }
    for bad in [
        "",
        "has space",
        "wild.*",
        "tail.>",
        "a..b",
        ".lead",
        "trail.",
    ] {
        let r = bus.publish(bad, &b"x"[..]).await;
        assert!(
            matches!(
                r,
                Err(BusError::Transport(TransportError::InvalidTopic { .. }))
            ),
            "topic {bad:?}: {r:?}"
        );
    }
    assert_eq!(bus.metrics().published, published, "nothing bad was sent");

    // Still working, and a group can subscribe again once its subscription stopped.
    sub.unsubscribe().await;
    let again: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, again.envelope_handler())
        .await
        .expect("the group subscribes again after unsubscribe");
    let after = env("agg-s", 3);
    bus.publish_envelope(&topic, &after).await.expect("publish");
    assert_eq!(
        again.wait_for(1, "the envelope after the sweep").await,
        vec![after]
    );

    bus.close().await.expect("close");
    assert!(matches!(
        bus.publish(&topic, &b"x"[..]).await,
        Err(BusError::Closed)
    ));
    assert!(matches!(
        bus.subscribe(&topic, &unique("late"), Recorder::default().handler())
            .await,
        Err(BusError::Closed)
    ));
}

/// A valid LZ4 frame of a 4 KiB envelope-like payload.
fn codec_frame(h: &mut Headers) -> Vec<u8> {
    let payload = Bytes::from(
        serde_json::to_vec(&json!({"items": vec!["fragile item"; 300]})).expect("json"),
    );
    crate::codec::encode(payload, Compression::Lz4, 0, h).to_vec()
}
