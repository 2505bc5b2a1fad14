//! Feature `opentelemetry`: with `tracing-opentelemetry`'s layer the bus's spans are
//! OpenTelemetry spans of the message's W3C trace: request → eventbus.publish →
//! eventbus.handle, as an OpenTelemetry backend receives them.

#![cfg(feature = "opentelemetry")]

use eventbus_core::memory::MemoryTransport;
use eventbus_core::trace::TraceContext;
use eventbus_core::{headers, Bus, Message};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use opentelemetry::trace::TracerProvider as _;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Finished(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::export::trace::SpanData>>>);

impl opentelemetry_sdk::export::trace::SpanExporter for Finished {
    fn export(
        &mut self,
        batch: Vec<opentelemetry_sdk::export::trace::SpanData>,
    ) -> futures_util::future::BoxFuture<'static, opentelemetry_sdk::export::trace::ExportResult>
    {
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(batch);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// With `tracing-opentelemetry`'s layer: the message carries the OpenTelemetry publish
/// span (a child of the application's span), and the handle span is an OpenTelemetry
/// span of the same trace whose parent is that publish span; `TraceContext::current()`
/// inside the handler is the handle span.
#[test]
fn the_spans_are_opentelemetry_spans_of_the_message_trace() {
    let finished = Finished::default();
    let provider = opentelemetry_sdk::trace::TracerProvider::builder()
        .with_simple_exporter(finished.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("eventbus-test"));
    // The only test of this binary: a global subscriber (a thread-local one races with other
    // tests over tracing's callsite interest cache).
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the first subscriber");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bus = Bus::builder(MemoryTransport::new()).build().expect("bus");
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        bus.subscribe("otel", "g", move |m: Message| {
            let tx = tx.clone();
            async move {
                let handle = tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .clone();
                let header = m.headers().get(headers::TRACEPARENT).map(str::to_owned);
                let _ = tx.send((TraceContext::current(), handle, header)).await;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
        let request = tracing::info_span!("request");
        let app = request.context().span().span_context().clone();
        assert!(app.is_valid());
        bus.publish("otel", &b"x"[..])
            .instrument(request)
            .await
            .expect("publish");
        let (current, handle, header) = rx.recv().await.expect("handled");
        bus.close().await.expect("close");
        let publish = TraceContext::parse(&header.expect("traceparent")).expect("valid");
        let current = current.expect("a context in the handler");
        assert_eq!(
            publish.ids().0,
            app.trace_id().to_bytes(),
            "the application's trace"
        );
        assert_ne!(
            publish.ids().1,
            app.span_id().to_bytes(),
            "a publish span of its own"
        );
        assert_eq!(handle.trace_id().to_bytes(), app.trace_id().to_bytes());
        assert_eq!(
            current.ids().1,
            handle.span_id().to_bytes(),
            "current() is the handle span"
        );
        assert_eq!(
            current.parent_span_id(),
            Some(publish.span_id()),
            "whose parent is the publish span"
        );
    });
    // What an OpenTelemetry backend receives: request → eventbus.publish → eventbus.handle.
    let spans = finished.0.lock().expect("spans").clone();
    let by_name = |n: &str| {
        spans.iter().find(|s| s.name == n).unwrap_or_else(|| {
            panic!(
                "no {n} span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let (request, publish, handle) = (
        by_name("request"),
        by_name("eventbus.publish"),
        by_name("eventbus.handle"),
    );
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(handle.parent_span_id, publish.span_context.span_id());
    assert_eq!(
        handle.span_context.trace_id(),
        request.span_context.trace_id()
    );
}
