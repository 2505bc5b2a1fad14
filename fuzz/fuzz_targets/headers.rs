//! Header parsing: arbitrary header sets (`name:value` lines, then an empty line and the
//! payload) through validation, the W3C trace context, CloudEvents binary mode, the codec and
//! `Message::envelope`. Never a panic; a trace context that parses prints back the same.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use eventbus_core::cloudevents::{self, CloudEvent};
use eventbus_core::trace::TraceContext;
use eventbus_core::{codec, headers, Headers, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, payload) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(head);
    let mut h = Headers::new();
    for line in text.split('\n') {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        h.insert(name, value);
    }
    let _ = headers::validate(&h);
    if let Some(tc) = TraceContext::from_headers(&h) {
        let printed = tc.traceparent();
        let again = TraceContext::parse(&printed).expect("a printed traceparent parses");
        assert_eq!(again.traceparent(), printed);
        let _ = tc.child();
    }
    let payload = Bytes::copy_from_slice(payload);
    let _ = cloudevents::is_cloud_event(&h);
    let _ = CloudEvent::from_binary(&h, &payload);
    let _ = codec::decode(&payload, &h, 1 << 20);
    let msg = Message::new(Arc::from("fuzz"), payload, Arc::new(h), None, None, 1);
    let _ = msg.envelope();
    let _ = msg.cloud_event();
    let _ = msg.event_id();
    let _ = msg.aggregate_id();
});
