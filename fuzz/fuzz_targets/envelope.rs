//! Envelope decoding: any bytes are a typed error or an envelope that survives a round trip;
//! the same bytes read as a structured CloudEvent, and through `Message::envelope`, never panic.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use eventbus_core::cloudevents::CloudEvent;
use eventbus_core::{Envelope, Headers, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::from_json(data) {
        if env.validate().is_ok() {
            let json = env.to_json().expect("a valid envelope serializes");
            let again = Envelope::from_json(&json).expect("what we wrote reads back");
            assert_eq!(env, again, "round trip changed the envelope");
        }
    }
    if let Ok(ce) = CloudEvent::from_json(data) {
        let _ = ce.validate();
        let _ = ce.to_envelope();
    }
    let msg = Message::new(
        Arc::from("fuzz"),
        Bytes::copy_from_slice(data),
        Arc::new(Headers::new()),
        None,
        None,
        1,
    );
    let _ = msg.envelope();
});
