//! The bus's `tracing` spans carry linked W3C ids: the `eventbus.handle` span's
//! `parent_span_id` is the `eventbus.publish` span's `span_id` (memory backend; every
//! backend's kit checks the contexts in `trace_context_crosses_the_broker`).

use std::fmt;
use std::sync::Arc;

use eventbus_core::memory::MemoryTransport;
use eventbus_core::trace::TraceContext;
use eventbus_core::{Bus, Message};

/// Records the fields of every span, for the span-linking test.
#[derive(Default)]
struct Spans(std::sync::Mutex<Vec<(&'static str, std::collections::HashMap<String, String>)>>);

struct Fields<'a>(&'a mut std::collections::HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

struct Collector(Arc<Spans>);

impl tracing::Subscriber for Collector {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_span()
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = std::collections::HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.0 .0.lock().expect("spans");
        spans.push((attrs.metadata().name(), fields));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.0 .0.lock().expect("spans");
        if let Some((_, fields)) = spans.get_mut(id.into_u64() as usize - 1) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The `eventbus.handle` span's `parent_span_id` is the `eventbus.publish` span's
/// `span_id`, in the same trace (memory backend; every backend's kit checks the
/// contexts themselves in `trace_context_crosses_the_broker`).
#[test]
fn handle_span_is_a_child_of_the_publish_span() {
    let spans = Arc::new(Spans::default());
    // The only test of this binary: a global subscriber sees every thread's spans (a
    // thread-local one races with other tests over tracing's callsite interest cache).
    tracing::subscriber::set_global_default(Collector(spans.clone()))
        .expect("the first subscriber");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bus = Bus::builder(MemoryTransport::new()).build().expect("bus");
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        bus.subscribe("traced", "g", move |_m: Message| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(TraceContext::current()).await;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
        bus.publish("traced", &b"x"[..]).await.expect("publish");
        let current = rx.recv().await.expect("handled").expect("a context");
        bus.close().await.expect("close");
        let spans = spans.0.lock().expect("spans");
        let find = |name: &str| {
            spans
                .iter()
                .find(|(n, f)| *n == name && f.get("topic").map(String::as_str) == Some("traced"))
                .map(|(_, f)| f.clone())
                .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
        };
        let (publish, handle) = (find("eventbus.publish"), find("eventbus.handle"));
        assert_eq!(handle["trace_id"], publish["trace_id"]);
        assert_eq!(handle["parent_span_id"], publish["span_id"]);
        assert_eq!(handle["span_id"], current.span_id());
        assert_eq!(handle["group"], "g");
    });
}
