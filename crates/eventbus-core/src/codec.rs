//! Payload codecs. A compressed payload is marked by the `X-Content-Encoding` header, so
//! compressed and plain messages can share a topic and a consumer decodes each correctly.

use bytes::Bytes;

use crate::headers::{self, Headers};

/// Header value marking an LZ4 block (size-prepended) payload.
pub const LZ4: &str = "lz4";

/// How payloads are compressed on publish (`"none"` or `"lz4"` in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Payloads are sent as they are.
    #[default]
    None,
    /// LZ4 block compression (lz4_flex), marked with `X-Content-Encoding: lz4`.
    Lz4,
}

/// A payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The LZ4 frame is corrupt or truncated.
    #[error("corrupt lz4 payload: {0}")]
    Corrupt(String),
    /// The payload declares an encoding this build does not know.
    #[error("unknown content encoding {0:?}")]
    UnknownEncoding(String),
    /// The decoded payload would exceed the configured limit (a decompression bomb).
    #[error("decoded payload of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size declared by the frame.
        declared: usize,
        /// Configured limit.
        limit: usize,
    },
}

/// Compresses `payload` if `compression` asks for it and the payload is at least `min_bytes`
/// long, setting the encoding header. Returns the bytes to send.
pub fn encode(
    payload: Bytes,
    compression: Compression,
    min_bytes: usize,
    headers: &mut Headers,
) -> Bytes {
    match compression {
        Compression::Lz4 if payload.len() >= min_bytes => {
            headers.insert(headers::CONTENT_ENCODING, LZ4);
            Bytes::from(lz4_flex::block::compress_prepend_size(&payload))
        }
        _ => payload,
    }
}

/// Decodes `payload` according to its encoding header. `max_bytes` bounds the decoded size so a
/// forged size prefix cannot make us allocate without limit.
pub fn decode(payload: &Bytes, headers: &Headers, max_bytes: usize) -> Result<Bytes, CodecError> {
    match headers.get(headers::CONTENT_ENCODING) {
        None => Ok(payload.clone()),
        Some(enc) if enc.eq_ignore_ascii_case(LZ4) => {
            let declared = payload
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| CodecError::Corrupt("missing size prefix".into()))?;
            if declared > max_bytes {
                return Err(CodecError::TooLarge {
                    declared,
                    limit: max_bytes,
                });
            }
            let decoded = lz4_flex::block::decompress_size_prepended(payload)
                .map_err(|e| CodecError::Corrupt(e.to_string()))?;
            // lz4_flex can return a short buffer for a truncated frame instead of an error.
            if decoded.len() != declared {
                return Err(CodecError::Corrupt(format!(
                    "decoded {} bytes, the frame declares {declared}",
                    decoded.len()
                )));
            }
            Ok(Bytes::from(decoded))
        }
        Some(other) => Err(CodecError::UnknownEncoding(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_payload() -> Bytes {
        let items: Vec<String> = (0..50)
            .map(|i| format!("{{\"sku\":\"item-{i}\",\"qty\":{i},\"note\":\"fragile\"}}"))
            .collect();
        Bytes::from(format!("{{\"items\":[{}]}}", items.join(",")))
    }

    #[test]
    fn lz4_round_trip_sets_header() {
        let mut h = Headers::new();
        let plain = json_payload();
        let enc = encode(plain.clone(), Compression::Lz4, 0, &mut h);
        assert_eq!(h.get(headers::CONTENT_ENCODING), Some(LZ4));
        assert!(enc.len() < plain.len());
        assert_eq!(decode(&enc, &h, 1 << 20).unwrap(), plain);
    }

    #[test]
    fn small_payloads_and_none_stay_plain() {
        let mut h = Headers::new();
        let p = Bytes::from_static(b"tiny");
        assert_eq!(encode(p.clone(), Compression::Lz4, 512, &mut h), p);
        assert_eq!(encode(p.clone(), Compression::None, 0, &mut h), p);
        assert!(h.is_empty());
        assert_eq!(decode(&p, &h, 10).unwrap(), p);
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        let mut h = Headers::new();
        h.insert(headers::CONTENT_ENCODING, LZ4);
        let good = encode(json_payload(), Compression::Lz4, 0, &mut h.clone());
        let cases: Vec<Bytes> = vec![
            Bytes::new(),
            Bytes::from_static(&[1, 2]),
            Bytes::from_static(&[10, 0, 0, 0, 0xff, 0xff, 0xff]),
            good.slice(..good.len() / 2),
            {
                let mut v = good.to_vec();
                for b in v.iter_mut().skip(4).step_by(3) {
                    *b ^= 0x5a;
                }
                Bytes::from(v)
            },
        ];
        for c in cases {
            match decode(&c, &h, 1 << 20) {
                Err(CodecError::Corrupt(_)) | Err(CodecError::TooLarge { .. }) => {}
                other => panic!("expected an error for {c:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn forged_size_prefix_is_bounded() {
        let mut h = Headers::new();
        h.insert(headers::CONTENT_ENCODING, LZ4);
        let forged = Bytes::from_static(&[0xff, 0xff, 0xff, 0x7f, 0, 0]);
        assert!(matches!(
            decode(&forged, &h, 1 << 20),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_encoding_is_rejected() {
        let mut h = Headers::new();
        h.insert(headers::CONTENT_ENCODING, "zstd");
        assert_eq!(
            decode(&Bytes::from_static(b"x"), &h, 10),
            Err(CodecError::UnknownEncoding("zstd".into()))
        );
    }
}
