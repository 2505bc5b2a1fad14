//! The codec: corrupt and truncated LZ4 frames, forged size prefixes and unknown encodings
//! are typed errors within the size limit; whatever is compressed decodes to itself.
#![no_main]

use bytes::Bytes;
use eventbus_core::codec::{self, CodecError, Compression};
use eventbus_core::{headers, Headers};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    let mut h = Headers::new();
    match selector % 4 {
        0 => h.insert(headers::CONTENT_ENCODING, codec::LZ4),
        1 => h.insert(headers::CONTENT_ENCODING, "LZ4"),
        2 => h.insert(headers::CONTENT_ENCODING, "gzip"),
        _ => {}
    }
    match codec::decode(&payload, &h, LIMIT) {
        Ok(out) => assert!(out.len() <= LIMIT.max(payload.len())),
        Err(CodecError::TooLarge { declared, limit }) => assert!(declared > limit),
        Err(_) => {}
    }
    let mut enc_headers = Headers::new();
    let encoded = codec::encode(payload.clone(), Compression::Lz4, 0, &mut enc_headers);
    let decoded = codec::decode(&encoded, &enc_headers, LIMIT.max(payload.len()))
        .expect("what we compressed decodes");
    assert_eq!(decoded, payload);
});
