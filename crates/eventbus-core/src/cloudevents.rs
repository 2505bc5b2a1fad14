//! CloudEvents 1.0: the [`Envelope`] to and from a [`CloudEvent`], in the JSON event format
//! (structured mode) and in binary mode, with the protocol bindings' header prefixes (`ce_`
//! on Kafka, `ce-` on NATS; both are read on every backend).
//!
//! | Envelope | CloudEvent |
//! |---|---|
//! | `event_id` | `id` |
//! | `event_type` | `type` |
//! | `aggregate_id` | `subject` (else the `partitionkey` extension) |
//! | `timestamp` | `time` (absent: the time it was read) |
//! | `event_version` | extension `eventversion` (absent: 0) |
//! | `trace_id`, `correlation_id`, `tenant_id` | extensions `traceid`, `correlationid`, `tenantid` |
//! | `payload` | `data` (JSON); `data_base64` / non-JSON binary data become a JSON string of base64 |
//! | – | `source`: given when converting, kept in a CloudEvent |
//!
//! ```
//! use eventbus_core::cloudevents::CloudEvent;
//! use eventbus_core::Envelope;
//! let env = Envelope::new("order-42", "order.created", 3, serde_json::json!({"total": 42}));
//! let ce = CloudEvent::from_envelope(&env, "/shop/orders");
//! let json = ce.to_json();
//! let back = CloudEvent::from_json(&json).unwrap().to_envelope().unwrap();
//! assert_eq!(back, env);
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use crate::envelope::Envelope;
use crate::headers::Headers;

/// The only specification version read and written.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of a structured-mode CloudEvent in JSON.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Binary-mode header prefix of the Kafka protocol binding.
pub const KAFKA_PREFIX: &str = "ce_";
/// Binary-mode header prefix of the NATS (and HTTP) protocol binding.
pub const NATS_PREFIX: &str = "ce-";
/// The content-type header both bindings use for `datacontenttype` in binary mode.
pub const CONTENT_TYPE: &str = "content-type";

/// Why bytes or headers are not a valid CloudEvent, or not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudEventError {
    /// A required attribute is missing or empty.
    #[error("CloudEvent attribute {0} is required")]
    Missing(&'static str),
    /// An attribute has the wrong type or form.
    #[error("CloudEvent attribute {attribute}: {reason}")]
    Invalid {
        /// The attribute.
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `specversion` is not 1.0.
    #[error("CloudEvents specversion {0:?} is not supported (only 1.0)")]
    UnsupportedVersion(String),
    /// The bytes are not a JSON object.
    #[error("malformed CloudEvent: {0}")]
    Malformed(String),
    /// The message carries no CloudEvent (no `ce-specversion`/`ce_specversion` header and
    /// no `application/cloudevents+json` content type).
    #[error("the message is not a CloudEvent")]
    NotACloudEvent,
}

fn invalid(attribute: &str, reason: impl Into<String>) -> CloudEventError {
    CloudEventError::Invalid {
        attribute: attribute.to_string(),
        reason: reason.into(),
    }
}

/// The event's data.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudEventData {
    /// JSON data (`data` in the JSON format).
    Json(Value),
    /// Binary data (`data_base64` in the JSON format).
    Binary(Bytes),
}

/// One CloudEvent 1.0.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    /// `id`: unique per `source`.
    pub id: String,
    /// `source`: a URI-reference naming the producer's context.
    pub source: String,
    /// `type`.
    pub ty: String,
    /// `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// `dataschema`.
    pub dataschema: Option<String>,
    /// `subject`.
    pub subject: Option<String>,
    /// `time`.
    pub time: Option<DateTime<Utc>>,
    /// Extension attributes (lower-case a–z 0–9 names); strings, numbers or booleans.
    pub extensions: BTreeMap<String, Value>,
    /// `data`.
    pub data: Option<CloudEventData>,
}

const CORE: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
];

impl CloudEvent {
    /// A CloudEvent carrying `env`, produced by `source`.
    pub fn from_envelope(env: &Envelope, source: &str) -> Self {
        let mut extensions = BTreeMap::new();
        extensions.insert("eventversion".into(), Value::from(env.event_version));
        for (name, value) in [
            ("traceid", &env.trace_id),
            ("correlationid", &env.correlation_id),
            ("tenantid", &env.tenant_id),
        ] {
            if let Some(v) = value {
                extensions.insert(name.into(), Value::from(v.as_str()));
            }
        }
        Self {
            id: env.event_id.clone(),
            source: source.to_string(),
            ty: env.event_type.clone(),
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            subject: Some(env.aggregate_id.clone()),
            time: Some(env.timestamp),
            extensions,
            data: Some(CloudEventData::Json(env.payload.clone())),
        }
    }

    /// The envelope this event carries (see the module's table). Needs a `subject` or a
    /// `partitionkey` extension for the aggregate id.
    pub fn to_envelope(&self) -> Result<Envelope, CloudEventError> {
        let text = |name: &str| -> Result<Option<String>, CloudEventError> {
            match self.extensions.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Ok(Some(other.to_string())),
            }
        };
        let aggregate_id = match (&self.subject, text("partitionkey")?) {
            (Some(s), _) if !s.is_empty() => s.clone(),
            (_, Some(k)) if !k.is_empty() => k,
            _ => return Err(CloudEventError::Missing("subject")),
        };
        let event_version = match self.extensions.get("eventversion") {
            None => 0,
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| invalid("eventversion", "not an integer"))?,
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| invalid("eventversion", format!("{s:?} is not an integer")))?,
            Some(_) => return Err(invalid("eventversion", "not an integer")),
        };
        let payload = match &self.data {
            None => Value::Null,
            Some(CloudEventData::Json(v)) => v.clone(),
            Some(CloudEventData::Binary(b)) => Value::String(base64_encode(b)),
        };
        let env = Envelope {
            event_id: self.id.clone(),
            aggregate_id,
            event_type: self.ty.clone(),
            event_version,
            timestamp: self.time.unwrap_or_else(Utc::now),
            trace_id: text("traceid")?,
            correlation_id: text("correlationid")?,
            tenant_id: text("tenantid")?,
            payload,
        };
        env.validate()
            .map_err(|e| invalid("envelope", e.to_string()))?;
        Ok(env)
    }

    /// Checks the required attributes and the extension names.
    pub fn validate(&self) -> Result<(), CloudEventError> {
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
        ] {
            if value.is_empty() {
                return Err(CloudEventError::Missing(name));
            }
        }
        for (name, value) in &self.extensions {
            let ok_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && !CORE.contains(&name.as_str())
                && name != "data"
                && name != "data_base64";
            if !ok_name {
                return Err(invalid(name, "extension names are a-z and 0-9"));
            }
            if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                return Err(invalid(
                    name,
                    "extension values are strings, numbers or booleans",
                ));
            }
        }
        Ok(())
    }

    /// The JSON event format (structured mode).
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("specversion".into(), SPEC_VERSION.into());
        m.insert("id".into(), self.id.as_str().into());
        m.insert("source".into(), self.source.as_str().into());
        m.insert("type".into(), self.ty.as_str().into());
        for (name, value) in [
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
            ("subject", &self.subject),
        ] {
            if let Some(v) = value {
                m.insert(name.into(), v.as_str().into());
            }
        }
        if let Some(t) = &self.time {
            m.insert(
                "time".into(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true).into(),
            );
        }
        for (name, value) in &self.extensions {
            m.insert(name.clone(), value.clone());
        }
        match &self.data {
            Some(CloudEventData::Json(v)) => {
                m.insert("data".into(), v.clone());
            }
            Some(CloudEventData::Binary(b)) => {
                m.insert("data_base64".into(), base64_encode(b).into());
            }
            None => {}
        }
        // A map of strings and JSON values always serialises.
        serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
    }

    /// Parses the JSON event format and validates it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CloudEventError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| CloudEventError::Malformed(e.to_string()))?;
        let Value::Object(mut m) = value else {
            return Err(CloudEventError::Malformed("not a JSON object".into()));
        };
        let mut take = |name: &'static str| -> Result<Option<String>, CloudEventError> {
            match m.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(invalid(name, "must be a string")),
            }
        };
        let version = take("specversion")?.ok_or(CloudEventError::Missing("specversion"))?;
        if version != SPEC_VERSION {
            return Err(CloudEventError::UnsupportedVersion(version));
        }
        let id = take("id")?.ok_or(CloudEventError::Missing("id"))?;
        let source = take("source")?.ok_or(CloudEventError::Missing("source"))?;
        let ty = take("type")?.ok_or(CloudEventError::Missing("type"))?;
        let datacontenttype = take("datacontenttype")?;
        let dataschema = take("dataschema")?;
        let subject = take("subject")?;
        let time = take("time")?.map(|t| parse_time(&t)).transpose()?;
        let data = match (m.remove("data"), m.remove("data_base64")) {
            (Some(_), Some(_)) => {
                return Err(invalid("data", "data and data_base64 are exclusive"))
            }
            (Some(Value::Null), None) | (None, None) => None,
            (Some(v), None) => Some(CloudEventData::Json(v)),
            (None, Some(Value::String(b))) => Some(CloudEventData::Binary(
                base64_decode(&b).ok_or_else(|| invalid("data_base64", "not base64"))?,
            )),
            (None, Some(_)) => return Err(invalid("data_base64", "must be a string")),
        };
        let ce = Self {
            id,
            source,
            ty,
            datacontenttype,
            dataschema,
            subject,
            time,
            extensions: m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
            data,
        };
        ce.validate()?;
        Ok(ce)
    }

    /// Binary mode: the attributes as headers named `prefix` + attribute ([`KAFKA_PREFIX`] or
    /// [`NATS_PREFIX`]), `datacontenttype` as `content-type`, the data as the payload (JSON
    /// data serialised).
    pub fn to_binary(&self, prefix: &str) -> (Headers, Bytes) {
        let mut h = Headers::with_capacity(6 + self.extensions.len());
        h.insert(format!("{prefix}specversion"), SPEC_VERSION);
        h.insert(format!("{prefix}id"), self.id.as_str());
        h.insert(format!("{prefix}source"), self.source.as_str());
        h.insert(format!("{prefix}type"), self.ty.as_str());
        if let Some(ct) = &self.datacontenttype {
            h.insert(CONTENT_TYPE, ct.as_str());
        }
        if let Some(s) = &self.dataschema {
            h.insert(format!("{prefix}dataschema"), s.as_str());
        }
        if let Some(s) = &self.subject {
            h.insert(format!("{prefix}subject"), s.as_str());
        }
        if let Some(t) = &self.time {
            h.insert(
                format!("{prefix}time"),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            );
        }
        for (name, value) in &self.extensions {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            h.insert(format!("{prefix}{name}"), text);
        }
        let payload = match &self.data {
            None => Bytes::new(),
            Some(CloudEventData::Binary(b)) => b.clone(),
            Some(CloudEventData::Json(v)) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        };
        (h, payload)
    }

    /// Reads a binary-mode event from `headers` (either prefix) and `payload`. JSON content
    /// types (`application/json`, `…+json`, or none) are parsed as JSON data; others are kept
    /// as bytes. Extension values arrive as strings (headers carry no types).
    pub fn from_binary(headers: &Headers, payload: &Bytes) -> Result<Self, CloudEventError> {
        let prefix = binary_prefix(headers).ok_or(CloudEventError::NotACloudEvent)?;
        let mut attrs: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers.iter() {
            if name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix) {
                attrs.insert(name[prefix.len()..].to_ascii_lowercase(), value.to_string());
            }
        }
        let version = attrs
            .remove("specversion")
            .ok_or(CloudEventError::Missing("specversion"))?;
        if version != SPEC_VERSION {
            return Err(CloudEventError::UnsupportedVersion(version));
        }
        let mut required = |name: &'static str| {
            attrs
                .remove(name)
                .filter(|v| !v.is_empty())
                .ok_or(CloudEventError::Missing(name))
        };
        let id = required("id")?;
        let source = required("source")?;
        let ty = required("type")?;
        let datacontenttype = headers.get(CONTENT_TYPE).map(str::to_owned);
        let time = attrs.remove("time").map(|t| parse_time(&t)).transpose()?;
        let json = datacontenttype.as_deref().map_or(true, is_json);
        let data = if payload.is_empty() {
            None
        } else if json {
            Some(CloudEventData::Json(
                serde_json::from_slice(payload)
                    .map_err(|e| invalid("data", format!("declared JSON, does not parse: {e}")))?,
            ))
        } else {
            Some(CloudEventData::Binary(payload.clone()))
        };
        let ce = Self {
            id,
            source,
            ty,
            datacontenttype,
            dataschema: attrs.remove("dataschema"),
            subject: attrs.remove("subject"),
            time,
            extensions: attrs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
            data,
        };
        ce.validate()?;
        Ok(ce)
    }

    /// The CloudEvent a message carries, in either mode; [`CloudEventError::NotACloudEvent`]
    /// when it carries none.
    pub fn from_message(headers: &Headers, payload: &Bytes) -> Result<Self, CloudEventError> {
        if binary_prefix(headers).is_some() {
            Self::from_binary(headers, payload)
        } else if is_structured(headers) {
            Self::from_json(payload)
        } else {
            Err(CloudEventError::NotACloudEvent)
        }
    }
}

/// True when `headers` mark a CloudEvent (structured content type or a binary-mode
/// `specversion` header).
pub fn is_cloud_event(headers: &Headers) -> bool {
    binary_prefix(headers).is_some() || is_structured(headers)
}

fn is_structured(headers: &Headers) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|ct| ct.trim_start().starts_with(STRUCTURED_CONTENT_TYPE))
}

fn binary_prefix(headers: &Headers) -> Option<&'static str> {
    if headers.get("ce_specversion").is_some() {
        Some(KAFKA_PREFIX)
    } else if headers.get("ce-specversion").is_some() {
        Some(NATS_PREFIX)
    } else {
        None
    }
}

/// The aggregate a binary-mode event names (`subject`, else `partitionkey`), for routing.
pub(crate) fn binary_subject(headers: &Headers) -> Option<&str> {
    [
        "ce_subject",
        "ce-subject",
        "ce_partitionkey",
        "ce-partitionkey",
    ]
    .into_iter()
    .find_map(|n| headers.get(n))
    .filter(|s| !s.is_empty())
}

fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

fn parse_time(t: &str) -> Result<DateTime<Utc>, CloudEventError> {
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| invalid("time", format!("{t:?} is not RFC 3339: {e}")))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Bytes> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits & 0xff) as u8);
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the CloudEvents JSON event format specification (section 3.1).
    const SPEC_JSON_EXAMPLE: &str = r#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "subject": null,
        "id" : "C234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "application/json",
        "data" : {
            "appinfoA" : "abc",
            "appinfoB" : 123,
            "appinfoC" : true
        }
    }"#;

    /// The binary-data example of the same section.
    const SPEC_BASE64_EXAMPLE: &str = r#"{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "id" : "B234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "application/vnd.apache.thrift.binary",
        "data_base64" : "YWFhYmJiY2Nj"
    }"#;

    #[test]
    fn the_specifications_examples_parse() {
        let ce = CloudEvent::from_json(SPEC_JSON_EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(ce.id, "C234-1234-1234");
        assert_eq!(ce.ty, "com.example.someevent");
        assert_eq!(ce.subject, None);
        assert_eq!(ce.extensions["comexampleothervalue"], Value::from(5));
        assert_eq!(
            ce.data,
            Some(CloudEventData::Json(serde_json::json!({
                "appinfoA": "abc", "appinfoB": 123, "appinfoC": true
            })))
        );
        // No subject: no aggregate to order by.
        assert_eq!(ce.to_envelope(), Err(CloudEventError::Missing("subject")));
        let bin = CloudEvent::from_json(SPEC_BASE64_EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(
            bin.data,
            Some(CloudEventData::Binary(Bytes::from_static(b"aaabbbccc")))
        );
        let again = CloudEvent::from_json(&bin.to_json()).expect("valid");
        assert_eq!(again, bin);
    }

    #[test]
    fn required_attributes_and_types_are_checked() {
        let base: Value = serde_json::from_str(SPEC_JSON_EXAMPLE).expect("json");
        for (attr, value, want) in [
            ("id", Value::Null, CloudEventError::Missing("id")),
            ("source", Value::Null, CloudEventError::Missing("source")),
            ("type", Value::Null, CloudEventError::Missing("type")),
            (
                "specversion",
                Value::Null,
                CloudEventError::Missing("specversion"),
            ),
            (
                "specversion",
                Value::from("0.3"),
                CloudEventError::UnsupportedVersion("0.3".into()),
            ),
        ] {
            let mut v = base.clone();
            v[attr] = value;
            let bytes = serde_json::to_vec(&v).expect("json");
            assert_eq!(CloudEvent::from_json(&bytes), Err(want), "{attr}");
        }
        for (attr, value) in [
            ("time", Value::from("yesterday")),
            ("id", Value::from(7)),
            ("Bad-Name", Value::from("x")),
            ("nested", serde_json::json!({"a": 1})),
        ] {
            let mut v = base.clone();
            v[attr] = value;
            let bytes = serde_json::to_vec(&v).expect("json");
            assert!(
                matches!(
                    CloudEvent::from_json(&bytes),
                    Err(CloudEventError::Invalid { .. })
                ),
                "{attr}"
            );
        }
        assert!(matches!(
            CloudEvent::from_json(b"[1]"),
            Err(CloudEventError::Malformed(_))
        ));
        assert!(matches!(
            CloudEvent::from_json(b"{not json"),
            Err(CloudEventError::Malformed(_))
        ));
    }

    #[test]
    fn envelopes_round_trip_in_both_modes() {
        let env = Envelope::new("acct-1", "posted", 9, serde_json::json!({"cents": 5}))
            .with_trace_id("t-1")
            .with_tenant_id("tenant-9");
        let ce = CloudEvent::from_envelope(&env, "/ledger");
        assert_eq!(
            CloudEvent::from_json(&ce.to_json())
                .expect("valid")
                .to_envelope(),
            Ok(env.clone())
        );
        for prefix in [KAFKA_PREFIX, NATS_PREFIX] {
            let (h, payload) = ce.to_binary(prefix);
            assert!(is_cloud_event(&h));
            assert_eq!(h.get(&format!("{prefix}subject")), Some("acct-1"));
            let back = CloudEvent::from_message(&h, &payload).expect("valid");
            assert_eq!(back.to_envelope(), Ok(env.clone()), "{prefix}");
        }
    }

    /// The Kafka binding's binary-mode example, as headers a Kafka client would send.
    #[test]
    fn a_binary_kafka_event_from_another_producer_becomes_an_envelope() {
        let h: Headers = [
            ("ce_specversion", "1.0"),
            ("ce_type", "com.example.someevent"),
            ("ce_source", "/mycontext/subcontext"),
            ("ce_id", "1234-1234-1234"),
            ("ce_time", "2018-04-05T03:56:24Z"),
            ("ce_subject", "order-7"),
            ("ce_eventversion", "4"),
            ("content-type", "application/json; charset=utf-8"),
        ]
        .into_iter()
        .collect();
        let ce =
            CloudEvent::from_message(&h, &Bytes::from_static(br#"{"total": 3}"#)).expect("valid");
        let env = ce.to_envelope().expect("an envelope");
        assert_eq!(env.event_id, "1234-1234-1234");
        assert_eq!(env.aggregate_id, "order-7");
        assert_eq!(env.event_version, 4);
        assert_eq!(env.payload, serde_json::json!({"total": 3}));
        // Declared JSON that is not: an error, not garbage data.
        let err = CloudEvent::from_message(&h, &Bytes::from_static(b"{oops")).unwrap_err();
        assert!(
            matches!(err, CloudEventError::Invalid { ref attribute, .. } if attribute == "data")
        );
        // Missing required attribute.
        let mut h2 = h.clone();
        h2.remove("ce_source");
        assert_eq!(
            CloudEvent::from_message(&h2, &Bytes::new()),
            Err(CloudEventError::Missing("source"))
        );
        assert_eq!(
            CloudEvent::from_message(&Headers::new(), &Bytes::new()),
            Err(CloudEventError::NotACloudEvent)
        );
    }

    #[test]
    fn base64_round_trips() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            &[0u8, 255, 7, 128][..],
        ] {
            let enc = base64_encode(data);
            assert_eq!(base64_decode(&enc).as_deref(), Some(data), "{enc}");
        }
        assert_eq!(base64_encode(b"aaabbbccc"), "YWFhYmJiY2Nj");
        assert!(base64_decode("not*base64").is_none());
    }
}
