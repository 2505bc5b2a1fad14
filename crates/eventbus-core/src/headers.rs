//! Header names of the wire format and the [`Headers`] map carried by every message.

/// Unique id of the event; the idempotency key on every backend.
pub const EVENT_ID: &str = "X-Event-ID";
/// Aggregate (entity) id: messages with the same value are handled strictly in order.
pub const AGGREGATE_ID: &str = "X-Aggregate-ID";
/// Event type, e.g. `order.created`.
pub const EVENT_TYPE: &str = "X-Event-Type";
/// Event version, increasing per aggregate.
pub const EVENT_VERSION: &str = "X-Event-Version";
/// RFC 3339 timestamp of the event.
pub const TIMESTAMP: &str = "X-Timestamp";
/// Optional trace id.
pub const TRACE_ID: &str = "X-Trace-ID";
/// W3C Trace Context: the trace and the publishing span a message belongs to (see
/// [`crate::trace`]).
pub const TRACEPARENT: &str = "traceparent";
/// W3C Trace Context: vendor trace state, passed along unchanged.
pub const TRACESTATE: &str = "tracestate";
/// Optional correlation id.
pub const CORRELATION_ID: &str = "X-Correlation-ID";
/// Optional tenant id.
pub const TENANT_ID: &str = "X-Tenant-ID";
/// Payload encoding set by the codec (`lz4`); absent for plain payloads.
pub const CONTENT_ENCODING: &str = "X-Content-Encoding";
/// On a dead-lettered message: the last handler error.
pub const DLQ_ERROR: &str = "X-DLQ-Error";
/// On a dead-lettered message: the topic it came from.
pub const DLQ_TOPIC: &str = "X-DLQ-Topic";
/// On a dead-lettered message: the consumer group that gave up on it.
pub const DLQ_GROUP: &str = "X-DLQ-Group";
/// On a dead-lettered message: how many times the handler was tried.
pub const DLQ_ATTEMPTS: &str = "X-DLQ-Attempts";
/// On a dead letter whose payload could not be decoded: its original `X-Content-Encoding`
/// (moved here so a dead-letter reader gets the raw bytes instead of failing again).
pub const DLQ_CONTENT_ENCODING: &str = "X-DLQ-Content-Encoding";
/// On a dead-lettered message: why it was dead-lettered (`handler`, `malformed`, `codec`).
pub const DLQ_REASON: &str = "X-DLQ-Reason";

/// Every header name eventbus itself writes: stored without allocating.
pub const WELL_KNOWN: &[&str] = &[
    EVENT_ID,
    AGGREGATE_ID,
    EVENT_TYPE,
    EVENT_VERSION,
    TIMESTAMP,
    TRACE_ID,
    TRACEPARENT,
    TRACESTATE,
    CORRELATION_ID,
    TENANT_ID,
    CONTENT_ENCODING,
    DLQ_ERROR,
    DLQ_TOPIC,
    DLQ_GROUP,
    DLQ_ATTEMPTS,
    DLQ_REASON,
    DLQ_CONTENT_ENCODING,
];

/// A header name: one of [`WELL_KNOWN`] (no allocation) or any other.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Known(&'static str),
    Other(String),
}

impl Name {
    fn new<N: AsRef<str> + Into<String>>(name: N) -> Self {
        match WELL_KNOWN.iter().find(|k| **k == name.as_ref()) {
            Some(k) => Name::Known(k),
            None => Name::Other(name.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Name::Known(s) => s,
            Name::Other(s) => s,
        }
    }
}

/// Ordered message headers. Names compare ASCII case-insensitively, because Kafka and NATS
/// clients differ in how they case header names.
///
/// ```
/// use eventbus_core::Headers;
/// let mut h = Headers::new();
/// h.insert("X-Trace-ID", "t-1");
/// assert_eq!(h.get("x-trace-id"), Some("t-1"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(Name, String)>,
}

impl Headers {
    /// An empty header map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty header map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: Vec::with_capacity(n),
        }
    }

    /// Sets `name` to `value`, replacing an existing value of the same name.
    pub fn insert<N: AsRef<str> + Into<String>>(&mut self, name: N, value: impl Into<String>) {
        let value = value.into();
        match self
            .entries
            .iter_mut()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name.as_ref()))
        {
            Some(entry) => entry.1 = value,
            None => self.entries.push((Name::new(name), value)),
        }
    }

    /// Appends a well-known header the map does not have yet: no lookup, no name allocation.
    /// For building fresh maps (the caller knows the names are distinct).
    pub(crate) fn push_known(&mut self, name: &'static str, value: String) {
        debug_assert!(self.get(name).is_none(), "{name} set twice");
        self.entries.push((Name::Known(name), value));
    }

    /// Sets `name` to `value` unless it already has that value (no allocation then).
    pub(crate) fn set_str(&mut self, name: &'static str, value: &str) {
        if self.get(name) != Some(value) {
            self.insert(name, value);
        }
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let idx = self
            .entries
            .iter()
            .position(|(n, _)| n.as_str().eq_ignore_ascii_case(name))?;
        Some(self.entries.remove(idx).1)
    }

    /// Iterates over `(name, value)` pairs in insertion order; the name is `'static` for the
    /// [`WELL_KNOWN`] ones, so transports can skip copying it.
    pub fn iter_known(&self) -> impl Iterator<Item = (Option<&'static str>, &str, &str)> {
        self.entries.iter().map(|(n, v)| match n {
            Name::Known(k) => (Some(*k), *k, v.as_str()),
            Name::Other(o) => (None, o.as_str(), v.as_str()),
        })
    }

    /// Iterates over `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate wire size of the headers, used for the message size limit.
    pub fn wire_len(&self) -> usize {
        self.entries
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum()
    }
}

/// Checks that every header can travel on every backend: names of visible ASCII without `:`,
/// values without CR or LF (NATS headers are line-based).
pub fn validate(headers: &Headers) -> Result<(), crate::TransportError> {
    for (name, value) in headers.iter() {
        let bad = |reason: &str| {
            Err(crate::TransportError::InvalidHeader {
                name: name.to_string(),
                reason: reason.to_string(),
            })
        };
        if name.is_empty() {
            return bad("empty name");
        }
        if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return bad("names are visible ASCII characters without ':'");
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return bad("values cannot contain CR or LF");
        }
    }
    Ok(())
}

impl<K: AsRef<str> + Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_case_insensitively() {
        let mut h = Headers::new();
        h.insert("X-Event-ID", "a");
        h.insert("x-event-id", "b");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get(EVENT_ID), Some("b"));
        assert_eq!(h.remove("X-EVENT-ID").as_deref(), Some("b"));
        assert!(h.is_empty());
    }

    #[test]
    fn well_known_names_are_recognised_whatever_their_source() {
        let mut h = Headers::new();
        h.insert(String::from("X-Event-ID"), "a");
        h.insert("X-Custom", "b");
        let known: Vec<_> = h.iter_known().map(|(k, n, _)| (k.is_some(), n)).collect();
        assert_eq!(known, [(true, "X-Event-ID"), (false, "X-Custom")]);
    }

    #[test]
    fn validation_rejects_what_a_broker_cannot_carry() {
        let ok: Headers = [("X-A", "any value, even ünïcode")].into_iter().collect();
        assert!(validate(&ok).is_ok());
        for (n, v) in [
            ("", "x"),
            ("a:b", "x"),
            ("sp ace", "x"),
            ("é", "x"),
            ("X", "a\r\nb"),
        ] {
            let h: Headers = [(n, v)].into_iter().collect();
            assert!(validate(&h).is_err(), "{n:?} {v:?}");
        }
    }
}
