//! The event [`Envelope`]: its JSON wire form, its headers and its validation.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::headers::{self, Headers};

/// Why an envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// `event_id` is empty.
    #[error("envelope event_id is empty")]
    EmptyEventId,
    /// `aggregate_id` is empty.
    #[error("envelope aggregate_id is empty")]
    EmptyAggregateId,
    /// `event_type` is empty.
    #[error("envelope event_type is empty")]
    EmptyEventType,
    /// The encoded envelope is larger than the configured limit.
    #[error("envelope of {actual} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size in bytes.
        actual: usize,
        /// Configured limit in bytes.
        limit: usize,
    },
    /// The bytes are not a JSON envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// A domain event with its routing metadata.
///
/// The JSON form uses exactly these snake_case field names; optional fields are omitted when
/// absent.
///
/// ```
/// use eventbus_core::Envelope;
/// let env = Envelope::new("order-42", "order.created", 1, serde_json::json!({"total": 10}));
/// assert!(env.validate().is_ok());
/// let json = env.to_json().unwrap();
/// assert_eq!(Envelope::from_json(&json).unwrap(), env);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id; the idempotency key (UUIDv7 by default).
    pub event_id: String,
    /// The aggregate (entity) this event belongs to; events of one aggregate are ordered.
    pub aggregate_id: String,
    /// Event type, e.g. `order.created`.
    pub event_type: String,
    /// Version of the aggregate after this event; increasing per aggregate.
    pub event_version: i64,
    /// When the event happened.
    pub timestamp: DateTime<Utc>,
    /// Optional trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Optional correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Optional tenant id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The event body: arbitrary JSON.
    pub payload: serde_json::Value,
}

impl Envelope {
    /// A new envelope with a fresh UUIDv7 `event_id` and the current time.
    pub fn new(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            event_id: new_event_id(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            timestamp: Utc::now(),
            trace_id: None,
            correlation_id: None,
            tenant_id: None,
            payload,
        }
    }

    /// Sets the event id (for example to republish an event idempotently).
    pub fn with_event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = id.into();
        self
    }

    /// Sets the trace id.
    pub fn with_trace_id(mut self, id: impl Into<String>) -> Self {
        self.trace_id = Some(id.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the tenant id.
    pub fn with_tenant_id(mut self, id: impl Into<String>) -> Self {
        self.tenant_id = Some(id.into());
        self
    }

    /// Checks the required fields.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.event_id.trim().is_empty() {
            return Err(EnvelopeError::EmptyEventId);
        }
        if self.aggregate_id.trim().is_empty() {
            return Err(EnvelopeError::EmptyAggregateId);
        }
        if self.event_type.trim().is_empty() {
            return Err(EnvelopeError::EmptyEventType);
        }
        Ok(())
    }

    /// The JSON wire form.
    pub fn to_json(&self) -> Result<Vec<u8>, EnvelopeError> {
        serde_json::to_vec(self).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    /// Parses and validates the JSON wire form: a JSON object (serde would also take the
    /// fields as an array, which no producer of envelopes writes).
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::Malformed(
                "an envelope is a JSON object".into(),
            ));
        }
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        env.validate()?;
        Ok(env)
    }

    /// The routing headers of this envelope (`X-Event-ID`, `X-Aggregate-ID`, ...).
    pub fn headers(&self) -> Headers {
        /// Longest `i64` in decimal, and an RFC 3339 UTC timestamp with nanoseconds.
        const VERSION_BYTES: usize = 20;
        const TIMESTAMP_BYTES: usize = 30;
        let optional = [&self.trace_id, &self.correlation_id, &self.tenant_id];
        // Exactly as many entries as there are headers, and their values in one buffer: the
        // map lives until the broker's ACK.
        let entries = 5 + optional.iter().filter(|v| v.is_some()).count();
        let bytes = self.event_id.len()
            + self.aggregate_id.len()
            + self.event_type.len()
            + VERSION_BYTES
            + TIMESTAMP_BYTES
            + optional
                .iter()
                .filter_map(|v| v.as_ref())
                .map(String::len)
                .sum::<usize>();
        let mut h = Headers::with_capacity_for(entries, bytes);
        h.push_known(headers::EVENT_ID, &self.event_id);
        h.push_known(headers::AGGREGATE_ID, &self.aggregate_id);
        h.push_known(headers::EVENT_TYPE, &self.event_type);
        h.push_known_display(headers::EVENT_VERSION, self.event_version);
        h.push_known(
            headers::TIMESTAMP,
            &self.timestamp.to_rfc3339_opts(SecondsFormat::Nanos, true),
        );
        for (name, value) in [
            (headers::TRACE_ID, &self.trace_id),
            (headers::CORRELATION_ID, &self.correlation_id),
            (headers::TENANT_ID, &self.tenant_id),
        ] {
            if let Some(v) = value {
                h.push_known(name, v);
            }
        }
        h
    }
}

/// A new UUIDv7 event id (time-ordered, so ids sort by creation time).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Reads only `aggregate_id` from a JSON envelope, for routing foreign messages that carry no
/// `X-Aggregate-ID` header.
pub(crate) fn peek_aggregate_id(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        aggregate_id: Option<String>,
    }
    serde_json::from_slice::<Peek>(bytes)
        .ok()?
        .aggregate_id
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the envelope fuzz target (fuzz/regressions/envelope/array-form-huge-number):
    /// the fields as a JSON array were taken for an envelope, and a long number in the payload
    /// changed in a round trip (serde_json's default float parsing is not correctly rounded;
    /// the workspace enables its `float_roundtrip`).
    #[test]
    fn fuzz_regression_array_form_huge_number() {
        let input = include_bytes!("../../../fuzz/regressions/envelope/array-form-huge-number");
        assert!(matches!(
            Envelope::from_json(input),
            Err(EnvelopeError::Malformed(m)) if m.contains("object")
        ));
        let number = "-88888888888800000000000000000000000000000000011184939874553925169";
        let mut v = serde_json::to_value(sample()).unwrap();
        v["payload"] = serde_json::from_str(number).unwrap();
        let env = Envelope::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        let again = Envelope::from_json(&env.to_json().unwrap()).unwrap();
        assert_eq!(env, again);
        assert_eq!(env.payload.as_f64(), Some(-8.88888888888e64));
    }
    use serde_json::json;

    fn sample() -> Envelope {
        Envelope::new("agg-1", "order.created", 3, json!({"a": [1, 2], "b": "x"}))
    }

    #[test]
    fn json_uses_exact_snake_case_names() {
        let env = sample().with_trace_id("t").with_correlation_id("c");
        let v: serde_json::Value = serde_json::from_slice(&env.to_json().unwrap()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "aggregate_id",
                "correlation_id",
                "event_id",
                "event_type",
                "event_version",
                "payload",
                "timestamp",
                "trace_id"
            ]
        );
        assert_eq!(v["event_version"], json!(3));
        assert_eq!(v["payload"], json!({"a": [1, 2], "b": "x"}));
    }

    #[test]
    fn optional_fields_are_omitted_and_null_is_accepted() {
        let v: serde_json::Value = serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        assert!(v.get("tenant_id").is_none());
        let mut obj = v.clone();
        obj["tenant_id"] = serde_json::Value::Null;
        let env = Envelope::from_json(&serde_json::to_vec(&obj).unwrap()).unwrap();
        assert_eq!(env.tenant_id, None);
    }

    #[test]
    fn default_event_id_is_uuid_v7() {
        let id = uuid::Uuid::parse_str(&sample().event_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_ne!(sample().event_id, sample().event_id);
    }

    #[test]
    fn validation_rejects_empty_fields() {
        assert_eq!(
            sample().with_event_id("").validate(),
            Err(EnvelopeError::EmptyEventId)
        );
        let mut e = sample();
        e.aggregate_id = " ".into();
        assert_eq!(e.validate(), Err(EnvelopeError::EmptyAggregateId));
        let mut e = sample();
        e.event_type.clear();
        assert_eq!(e.validate(), Err(EnvelopeError::EmptyEventType));
    }

    #[test]
    fn malformed_json_is_a_typed_error() {
        for bad in [
            &b"{not json"[..],
            b"",
            b"[]",
            b"{\"event_id\":1}",
            &[0xff, 0xfe],
        ] {
            assert!(matches!(
                Envelope::from_json(bad),
                Err(EnvelopeError::Malformed(_))
            ));
        }
        // Valid JSON with an empty required field is rejected by validation.
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        v["event_type"] = json!("");
        assert_eq!(
            Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(EnvelopeError::EmptyEventType)
        );
    }

    #[test]
    fn headers_carry_routing_fields() {
        let env = sample().with_trace_id("tr").with_correlation_id("co");
        let h = env.headers();
        assert_eq!(h.get(headers::EVENT_ID), Some(env.event_id.as_str()));
        assert_eq!(h.get(headers::AGGREGATE_ID), Some("agg-1"));
        assert_eq!(h.get(headers::EVENT_TYPE), Some("order.created"));
        assert_eq!(h.get(headers::EVENT_VERSION), Some("3"));
        assert_eq!(h.get(headers::TRACE_ID), Some("tr"));
        assert_eq!(h.get(headers::CORRELATION_ID), Some("co"));
        let ts = h.get(headers::TIMESTAMP).unwrap();
        assert_eq!(DateTime::parse_from_rfc3339(ts).unwrap(), env.timestamp);
    }

    #[test]
    fn peek_reads_aggregate_id_only() {
        assert_eq!(
            peek_aggregate_id(&sample().to_json().unwrap()).as_deref(),
            Some("agg-1")
        );
        assert_eq!(peek_aggregate_id(b"garbage"), None);
        assert_eq!(peek_aggregate_id(b"{\"aggregate_id\":\"\"}"), None);
    }
}
