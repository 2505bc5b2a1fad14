//! W3C Trace Context across the broker: every publish carries a `traceparent` header naming
//! its trace and its publish span; every handling continues that trace as a child span.
//!
//! - **Publish**: the parent is the message's own `traceparent` header if it has one, else the
//!   context of the handling the publish runs in ([`TraceContext::current`]), else a new
//!   trace. The message leaves with a `traceparent` of a new span of that trace (the publish
//!   span) and the parent's `tracestate`, unchanged.
//! - **Handling**: the worker reads `traceparent` (a malformed one starts a new trace, it is
//!   never an error), runs the handler in a child context — so `current()` inside the handler
//!   has the publish span as parent and publishes from it continue the trace.
//! - Both open a `tracing` span (`eventbus.publish`, `eventbus.handle`) whose `trace_id`,
//!   `span_id` and `parent_span_id` fields carry these ids, for log correlation.
//! - Feature `opentelemetry`: with `tracing-opentelemetry`'s layer installed those spans are
//!   OpenTelemetry spans of the message's trace, and the ids above are theirs.
//!
//! ```
//! use eventbus_core::trace::TraceContext;
//! let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
//! let child = parent.child();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.span_id(), parent.span_id());
//! assert!(child.traceparent().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//! assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::headers::{self, Headers};

#[cfg(feature = "opentelemetry")]
pub(crate) mod otel;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Longest `tracestate` passed along (the W3C limit is 32 members of up to 256 characters;
/// 512 characters is the size every vendor must propagate).
const MAX_TRACESTATE_LEN: usize = 512;

/// A W3C trace context: trace id, span id, flags, and the vendors' `tracestate`.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The span this one is a child of, when made by [`TraceContext::child`].
    parent: Option<[u8; 8]>,
    flags: u8,
    state: Option<Arc<str>>,
}

impl TraceContext {
    /// A new trace (sampled), as its first span.
    pub fn new_root() -> Self {
        let trace_id = *uuid::Uuid::now_v7().as_bytes();
        Self {
            trace_id,
            span_id: new_span_id(),
            parent: None,
            flags: 0x01,
            state: None,
        }
    }

    /// A context from its parts (for bridges to tracing systems): trace id, span id, the
    /// parent's span id, flags and `tracestate`.
    pub fn from_parts(
        trace_id: [u8; 16],
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        flags: u8,
        tracestate: Option<&str>,
    ) -> Self {
        Self {
            trace_id,
            span_id,
            parent,
            flags,
            state: tracestate
                .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN)
                .map(Arc::from),
        }
    }

    /// A new span of the same trace, with this one as its parent.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent: Some(self.span_id),
            flags: self.flags,
            state: self.state.clone(),
        }
    }

    /// Parses a `traceparent` header (`version-traceid-spanid-flags`, lower-case hex). Future
    /// versions are read by their first four fields, as the specification asks; version `ff`,
    /// all-zero ids and malformed text give `None`.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let s = traceparent.trim();
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            parent: None,
            flags,
            state: None,
        })
    }

    /// The context a message's headers carry (`traceparent` and `tracestate`), if valid.
    pub fn from_headers(h: &Headers) -> Option<Self> {
        let mut ctx = Self::parse(h.get(headers::TRACEPARENT)?)?;
        ctx.state = h
            .get(headers::TRACESTATE)
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN)
            .map(Arc::from);
        Some(ctx)
    }

    /// Writes `traceparent` (and `tracestate`, when there is one) into `h`.
    pub fn inject(&self, h: &mut Headers) {
        h.insert(headers::TRACEPARENT, self.traceparent());
        match &self.state {
            Some(state) => h.insert(headers::TRACESTATE, state.as_ref()),
            None => {
                h.remove(headers::TRACESTATE);
            }
        }
    }

    /// The `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// The span id, 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.span_id);
        s
    }

    /// The parent's span id (16 hex digits) of a context made by [`TraceContext::child`]:
    /// inside a handler, the span that published the message.
    pub fn parent_span_id(&self) -> Option<String> {
        self.parent.map(|p| {
            let mut s = String::with_capacity(16);
            push_hex(&mut s, &p);
            s
        })
    }

    /// The raw ids, for bridging to a tracing system: (trace id, span id).
    pub fn ids(&self) -> ([u8; 16], [u8; 8]) {
        (self.trace_id, self.span_id)
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The vendors' `tracestate`, passed along unchanged.
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The context of the handling this code runs in: inside a handler, the handling span
    /// (its parent is the span that published the message). `None` outside handlers and
    /// [`TraceContext::scope`].
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `f` with `self` as [`TraceContext::current`]: publishes from `f` become children
    /// of this context (how an HTTP handler passes on the trace of its request).
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CURRENT.scope(self, f).await
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("parent_span_id", &self.parent_span_id())
            .field("tracestate", &self.state)
            .finish()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// The publish side: the context a message goes out with and its parent, given its headers
/// (an explicit `traceparent` wins over the handling it is published from).
pub(crate) fn for_publish(h: &Headers) -> (TraceContext, Option<TraceContext>) {
    let parent = TraceContext::from_headers(h).or_else(TraceContext::current);
    let ctx = parent
        .as_ref()
        .map(TraceContext::child)
        .unwrap_or_else(TraceContext::new_root);
    (ctx, parent)
}

/// Records `ctx`'s ids in `span`'s `trace_id`, `span_id` and `parent_span_id` fields.
fn record_ids(span: &tracing::Span, ctx: &TraceContext) {
    if span.is_disabled() {
        return;
    }
    span.record("trace_id", ctx.trace_id());
    span.record("span_id", ctx.span_id());
    if let Some(p) = ctx.parent_span_id() {
        span.record("parent_span_id", p);
    }
}

/// `ctx` adjusted to the span that carries it: with the `opentelemetry` feature and an
/// OpenTelemetry layer, `span` becomes a child of `parent` and `ctx` takes its ids.
pub(crate) fn bind(
    span: &tracing::Span,
    ctx: TraceContext,
    parent: Option<&TraceContext>,
) -> TraceContext {
    #[cfg(not(feature = "opentelemetry"))]
    let _ = parent;
    #[cfg(feature = "opentelemetry")]
    {
        if let Some(p) = parent {
            otel::set_parent(span, p);
        }
        if let Some(bridged) = otel::context_of(span, parent) {
            record_ids(span, &bridged);
            return bridged;
        }
    }
    record_ids(span, &ctx);
    ctx
}

/// The random half of a UUIDv7: 8 bytes, never all zero (the variant bits are set).
fn new_span_id() -> [u8; 8] {
    let bytes = uuid::Uuid::now_v7().into_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..16]);
    id
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(pair[0])? << 4 | nibble(pair[1])?)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0x0f) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let ctx = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(ctx.traceparent(), EXAMPLE);
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags(), 1);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_by_its_first_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let ctx = TraceContext::parse(v).expect("future versions parse");
        assert_eq!(ctx.traceparent(), EXAMPLE);
    }

    #[test]
    fn headers_carry_trace_state_through_a_child() {
        let mut h = Headers::new();
        h.insert("TraceParent", EXAMPLE);
        h.insert("tracestate", "congo=t61rcWkgMzE");
        let child = TraceContext::from_headers(&h).expect("valid").child();
        let mut out = Headers::new();
        child.inject(&mut out);
        assert_eq!(out.get(headers::TRACESTATE), Some("congo=t61rcWkgMzE"));
        let back = TraceContext::from_headers(&out).expect("valid");
        assert_eq!(back.traceparent(), child.traceparent());
        assert_eq!(back.tracestate(), Some("congo=t61rcWkgMzE"));
        assert_eq!(child.parent_span_id().as_deref(), Some("00f067aa0ba902b7"));
    }

    #[test]
    fn new_roots_and_children_get_distinct_ids() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        let (c, d) = (a.child(), a.child());
        assert_ne!(c.span_id(), d.span_id());
        assert_eq!(c.parent_span_id(), Some(a.span_id()));
        let parsed = TraceContext::parse(&c.traceparent()).expect("valid");
        assert_eq!(parsed.traceparent(), c.traceparent());
    }

    #[tokio::test]
    async fn a_publish_inside_a_scope_is_its_child() {
        let parent = TraceContext::parse(EXAMPLE).expect("valid");
        assert!(TraceContext::current().is_none());
        let (ctx, from) = parent
            .clone()
            .scope(async { for_publish(&Headers::new()) })
            .await;
        assert_eq!(from.as_ref(), Some(&parent));
        assert_eq!(ctx.trace_id(), parent.trace_id());
        assert_ne!(ctx.span_id(), parent.span_id());
        // An explicit header wins over the scope.
        let mut h = Headers::new();
        TraceContext::new_root().inject(&mut h);
        let explicit = TraceContext::from_headers(&h).expect("valid");
        let (ctx, _) = parent.scope(async { for_publish(&h) }).await;
        assert_eq!(ctx.trace_id(), explicit.trace_id());
        // Outside any scope and without a header: a new trace.
        let (root, none) = for_publish(&Headers::new());
        assert!(none.is_none());
        assert_ne!(root.trace_id(), explicit.trace_id());
    }
}
