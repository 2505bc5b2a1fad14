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
///
/// Every value lives in one text buffer (an entry keeps its range), so a map built with
/// [`Headers::with_capacity_for`] from a broker's headers costs two allocations whatever the
/// number of headers, not one per value. A replaced or removed value's bytes stay in the
/// buffer until the map is dropped.
#[derive(Clone, Default)]
pub struct Headers {
    entries: Vec<(Name, usize, usize)>,
    text: String,
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl Headers {
    /// An empty header map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty header map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: Vec::with_capacity(n),
            text: String::new(),
        }
    }

    /// An empty header map with room for `entries` headers whose values take `value_bytes`
    /// in all: filling it allocates nothing more.
    pub fn with_capacity_for(entries: usize, value_bytes: usize) -> Self {
        Self {
            entries: Vec::with_capacity(entries),
            text: String::with_capacity(value_bytes),
        }
    }

    /// `value` appended to the text buffer: its range.
    fn store(&mut self, value: &str) -> (usize, usize) {
        let start = self.text.len();
        self.text.push_str(value);
        (start, self.text.len())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|(n, _, _)| n.as_str().eq_ignore_ascii_case(name))
    }

    /// Sets `name` to `value`, replacing an existing value of the same name.
    pub fn insert<N: AsRef<str> + Into<String>>(&mut self, name: N, value: impl AsRef<str>) {
        let (start, end) = self.store(value.as_ref());
        match self.position(name.as_ref()) {
            Some(i) => {
                self.entries[i].1 = start;
                self.entries[i].2 = end;
            }
            None => self.entries.push((Name::new(name), start, end)),
        }
    }

    /// Appends a well-known header the map does not have yet: no lookup, no name allocation.
    /// For building fresh maps (the caller knows the names are distinct).
    pub(crate) fn push_known(&mut self, name: &'static str, value: &str) {
        debug_assert!(self.get(name).is_none(), "{name} set twice");
        let (start, end) = self.store(value);
        self.entries.push((Name::Known(name), start, end));
    }

    /// [`Self::push_known`] with `value` written as text straight into the buffer.
    pub(crate) fn push_known_display(&mut self, name: &'static str, value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        debug_assert!(self.get(name).is_none(), "{name} set twice");
        let start = self.text.len();
        // Writing into a String cannot fail.
        let _ = write!(self.text, "{value}");
        self.entries
            .push((Name::Known(name), start, self.text.len()));
    }

    /// Sets `name` to `value` unless it already has that value (no allocation then).
    pub(crate) fn set_str(&mut self, name: &'static str, value: &str) {
        if self.get(name) != Some(value) {
            self.insert(name, value);
        }
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name)
            .map(|i| &self.text[self.entries[i].1..self.entries[i].2])
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.position(name)?;
        let (_, start, end) = self.entries.remove(i);
        Some(self.text[start..end].to_string())
    }

    /// Iterates over `(name, value)` pairs in insertion order; the name is `'static` for the
    /// [`WELL_KNOWN`] ones, so transports can skip copying it.
    pub fn iter_known(&self) -> impl Iterator<Item = (Option<&'static str>, &str, &str)> {
        self.entries.iter().map(|(n, start, end)| {
            let v = &self.text[*start..*end];
            match n {
                Name::Known(k) => (Some(*k), *k, v),
                Name::Other(o) => (None, o.as_str(), v),
            }
        })
    }

    /// Iterates over `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(n, start, end)| (n.as_str(), &self.text[*start..*end]))
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
            .map(|(n, start, end)| n.as_str().len() + (end - start) + 4)
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

impl<K: AsRef<str> + Into<String>, V: AsRef<str>> FromIterator<(K, V)> for Headers {
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
    fn replaced_and_removed_values_read_back_right() {
        let mut h = Headers::with_capacity_for(2, 8);
        h.insert("A", "one");
        h.insert("B", "two");
        h.insert("a", "three");
        assert_eq!(h.get("A"), Some("three"));
        assert_eq!(h.remove("b").as_deref(), Some("two"));
        h.insert("C", "four");
        let all: Vec<_> = h.iter().collect();
        assert_eq!(all, [("A", "three"), ("C", "four")]);
        let same: Headers = [("A", "three"), ("C", "four")].into_iter().collect();
        assert_eq!(h, same, "equal by content, whatever the buffer holds");
        assert_eq!(format!("{h:?}"), r#"{"A": "three", "C": "four"}"#);
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
