//! The OpenTelemetry bridge (feature `opentelemetry`): the bus's `eventbus.publish` and
//! `eventbus.handle` spans become OpenTelemetry spans of the W3C trace the message carries,
//! when the application runs `tracing-opentelemetry`'s layer; the `traceparent` the bus
//! writes and the context handlers see are then those OpenTelemetry spans' ids. Without the
//! layer (or with the spans filtered out) the bus's own ids are used, as without the feature.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TraceContext;

/// Makes `parent` (a context from a message or the caller) the OpenTelemetry parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    let (trace_id, span_id) = parent.ids();
    let state = parent
        .tracestate()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::new(parent.flags()),
        true,
        state,
    );
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The OpenTelemetry span context of `span` as a [`TraceContext`] (child of `parent`), when
/// an OpenTelemetry layer gave it one.
pub(crate) fn context_of(
    span: &tracing::Span,
    parent: Option<&TraceContext>,
) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let state = parent.and_then(TraceContext::tracestate).map(str::to_owned);
    Some(TraceContext::from_parts(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        parent.map(|p| p.ids().1),
        sc.trace_flags().to_u8(),
        state.as_deref(),
    ))
}
