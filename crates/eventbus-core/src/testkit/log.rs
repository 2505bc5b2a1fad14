//! The test process's log as text: every `tracing` event and every new span, at every level,
//! ours and the broker clients', recorded from the first call on.

use std::sync::OnceLock;

use tracing_subscriber::layer::{Context, SubscriberExt};

use super::Recorder;

/// The log of this test process, one line per event (`LEVEL target field=value…`) and per
/// new span (`span name field=value…`). The first call installs the process's global
/// subscriber (a test binary that has one of its own records nothing here); wait on lines
/// with [`Recorder::wait_until`].
pub fn captured_log() -> Recorder<String> {
    static LOG: OnceLock<Recorder<String>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Recorder::default();
        let subscriber = tracing_subscriber::registry().with(Capture(log.clone()));
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            tracing::warn!("captured_log: another global subscriber is installed");
        }
        log
    })
    .clone()
}

struct Capture(Recorder<String>);

struct Text<'a>(&'a mut String);

impl tracing::field::Visit for Text<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut line = format!("{} {}", event.metadata().level(), event.metadata().target());
        event.record(&mut Text(&mut line));
        self.0.push(line);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut line = format!("span {}", attrs.metadata().name());
        attrs.record(&mut Text(&mut line));
        self.0.push(line);
    }
}
