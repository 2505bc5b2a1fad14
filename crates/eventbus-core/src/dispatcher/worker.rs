//! What a worker does with one message: decode, skip duplicates, run the handler with retries
//! in place (keeping the broker's ack deadline alive), then ack, or dead-letter and terminate.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tracing::Instrument;

use super::dedup::{DedupKey, SharedDedup};
use super::{owned, DeliveryOf, Job, Route};
use crate::codec;
use crate::config::RetryPolicy;
use crate::envelope::new_event_id;
use crate::error::{FailureKind, HandlerError, TransportError};
use crate::headers;
use crate::message::{Message, OutgoingMessage};
use crate::metrics::Metrics;
use crate::ownership::OwnershipToken;
use crate::publish::Publisher;
use crate::trace::{self, TraceContext};
use crate::transport::{Delivery, Transport};

/// Longest error text copied into a dead letter's header.
const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// How the retry layer ended.
enum Outcome {
    /// The handler succeeded.
    Handled,
    /// Permanent failure or attempts exhausted: dead-letter it.
    GaveUp { error: HandlerError, attempts: u32 },
    /// The subscription is stopping: hand the message back.
    Stopped,
    /// The message's partition is no longer owned: leave it to the next owner, unsettled.
    NotOwned,
}

/// Shared by every worker of a bus.
pub(crate) struct WorkerContext<T: Transport> {
    pub(crate) publisher: Arc<Publisher<T>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) progress_interval: Duration,
    pub(crate) max_message_bytes: usize,
    /// Recently handled event ids, shared by every worker (`None`: dedup off).
    pub(crate) dedup: Option<SharedDedup>,
    pub(crate) metrics: Arc<Metrics>,
    /// Longest wait for one dead-letter publish's ACK.
    pub(crate) dead_letter_timeout: Duration,
}

impl<T: Transport> WorkerContext<T> {
    /// Handles one job and settles its delivery. The layers, outermost first: lifecycle (a
    /// stopping subscription hands unstarted messages back), decode, dedup, retry in place
    /// with panic catching, dead letter.
    pub(crate) async fn process(&self, job: Job<DeliveryOf<T>>) {
        let Job { delivery, route } = job;
        // Counted as running while it is handled and settled, so a revoke waits for it.
        let running = delivery.owner().map(OwnershipToken::begin);
        if matches!(running, Some(None)) {
            // Its partition was lost: another member may be on this aggregate now. Never
            // started, never settled here; the partition's next owner delivers it.
            drop(delivery);
            route.not_owned(1, &self.metrics);
        } else if route.is_running() {
            self.handle(delivery, &route).await;
        } else {
            // Not started: back to the broker at once, so another member takes it now.
            self.settle("nak", delivery.nak(Duration::ZERO).await);
        }
        drop(running);
        route.finished();
    }

    async fn handle(&self, delivery: DeliveryOf<T>, route: &Route) {
        let msg = match self.decode(delivery.message()) {
            Ok(msg) => msg,
            Err(e) => {
                route.export.malformed.increment(1);
                return self.dead_letter(delivery, route, &e, 0).await;
            }
        };
        let key = self.dedup_key(route, &msg);
        if let (Some(k), Some(seen)) = (&key, &self.dedup) {
            if seen.contains(k) {
                Metrics::inc(&self.metrics.deduplicated);
                route.export.deduplicated.increment(1);
                tracing::debug!(topic = %route.topic, event_id = ?msg.event_id(), "duplicate skipped");
                return self.settle("ack", delivery.ack().await);
            }
        }
        route
            .export
            .end_to_end(msg.headers().get(headers::TIMESTAMP));
        // Tracing layer: the handling is a child of the span that published the message.
        let parent = TraceContext::from_headers(msg.headers());
        let trace = parent
            .as_ref()
            .map(TraceContext::child)
            .unwrap_or_else(TraceContext::new_root);
        let span = tracing::debug_span!(
            "eventbus.handle",
            topic = %route.topic,
            group = %route.group,
            event_id = msg.event_id().unwrap_or_default(),
            aggregate_id = msg.aggregate_id().unwrap_or_default(),
            delivery = msg.delivery_count(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let trace = trace::bind(&span, trace, parent.as_ref());
        let outcome = trace
            .scope(self.retry_in_place(route, msg, &delivery))
            .instrument(span)
            .await;
        match outcome {
            Outcome::Handled => {
                Metrics::inc(&self.metrics.handled);
                route.export.handled.increment(1);
                if let (Some(k), Some(seen)) = (key, &self.dedup) {
                    seen.insert(k);
                }
                self.settle("ack", delivery.ack().await);
            }
            Outcome::GaveUp { error, attempts } => {
                self.dead_letter(delivery, route, &error, attempts).await
            }
            Outcome::NotOwned => route.not_owned(1, &self.metrics),
            // Stopping: no more waiting; the broker redelivers it, in order.
            Outcome::Stopped => self.settle("nak", delivery.nak(Duration::ZERO).await),
        }
    }

    /// Decoding layer: the payload as the handler sees it (decompressed, encoding header
    /// gone). A corrupt frame is a permanent failure.
    fn decode(&self, raw: &Message) -> Result<Message, HandlerError> {
        match codec::decode(raw.payload(), raw.headers(), self.max_message_bytes) {
            Ok(payload) if raw.headers().get(headers::CONTENT_ENCODING).is_some() => {
                Ok(raw.with_decoded(payload))
            }
            Ok(_) => Ok(raw.clone()),
            Err(e) => {
                Metrics::inc(&self.metrics.malformed);
                Err(HandlerError::codec(e))
            }
        }
    }

    /// Dedup layer: the key a handled message is remembered by (`None`: dedup off, or no id).
    fn dedup_key(&self, route: &Route, msg: &Message) -> Option<DedupKey> {
        let dedup = self.dedup.as_ref()?;
        msg.event_id().map(|id| dedup.key(route.id, id))
    }

    /// Retry layer: runs the handler until it succeeds, fails permanently, runs out of
    /// attempts, or the subscription stops; waits the policy's backoff in between, keeping
    /// the broker's ack deadline alive.
    async fn retry_in_place(
        &self,
        route: &Route,
        msg: Message,
        delivery: &DeliveryOf<T>,
    ) -> Outcome {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = Instant::now();
            let result = self.run_handler(route, msg.clone(), delivery).await;
            route
                .export
                .handler_seconds
                .record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => return Outcome::Handled,
                Err(error) => error,
            };
            Metrics::inc(&self.metrics.handler_errors);
            route.export.handler_errors.increment(1);
            match error.kind() {
                FailureKind::Panic => {
                    Metrics::inc(&self.metrics.handler_panics);
                    route.export.handler_panics.increment(1);
                }
                FailureKind::Malformed => {
                    Metrics::inc(&self.metrics.malformed);
                    route.export.malformed.increment(1);
                }
                _ => {}
            }
            if error.is_permanent() || attempts >= self.retry.max_attempts {
                return Outcome::GaveUp { error, attempts };
            }
            if !route.is_running() {
                return Outcome::Stopped;
            }
            if !owned(delivery) {
                return Outcome::NotOwned;
            }
            Metrics::inc(&self.metrics.retries);
            route.export.retries.increment(1);
            tracing::debug!(topic = %route.topic, attempts, error = %error, "handler failed; retrying in place");
            self.wait_keeping_alive(delivery, self.retry.backoff(attempts))
                .await;
            // Lost during the backoff: the next owner may be handling it already.
            if !owned(delivery) {
                return Outcome::NotOwned;
            }
        }
    }

    /// Runs the handler; a panic becomes an error and the worker lives on. While it runs, the
    /// broker is told every `progress_interval` that the message is still being worked on.
    async fn run_handler(
        &self,
        route: &Route,
        msg: Message,
        delivery: &DeliveryOf<T>,
    ) -> Result<(), HandlerError> {
        let fut = AssertUnwindSafe(route.handler.handle(msg)).catch_unwind();
        tokio::pin!(fut);
        loop {
            match tokio::time::timeout(self.progress_interval, &mut fut).await {
                Ok(Ok(result)) => return result,
                Ok(Err(panic)) => return Err(HandlerError::panic(panic_text(panic.as_ref()))),
                Err(_) => self.settle("in_progress", delivery.in_progress().await),
            }
        }
    }

    async fn wait_keeping_alive(&self, delivery: &DeliveryOf<T>, mut wait: Duration) {
        while wait > self.progress_interval {
            tokio::time::sleep(self.progress_interval).await;
            self.settle("in_progress", delivery.in_progress().await);
            wait -= self.progress_interval;
        }
        tokio::time::sleep(wait).await;
    }

    /// Publishes the message as received (still encoded) to the dead-letter topic with the
    /// error in headers and waits for the ACK; only then terminates the original. The publish
    /// bypasses the application's results (its own path, no window slot). If the dead letter
    /// cannot be stored after the retry policy's attempts, the message is handed back and the
    /// subscription stops with an error: moving on would hand the aggregate's later events
    /// to the handler before this one.
    async fn dead_letter(
        &self,
        delivery: DeliveryOf<T>,
        route: &Route,
        err: &HandlerError,
        attempts: u32,
    ) {
        // A partition lost meanwhile: its next owner decides about this message (dead-letter
        // it here and that owner might handle it too, or have handled it already).
        if !owned(&delivery) {
            return route.not_owned(1, &self.metrics);
        }
        let out = dead_letter_message(delivery.message(), route, err, attempts);
        let mut tries = 0;
        let stored = loop {
            tries += 1;
            let sent = self
                .publisher
                .publish_internal(out.clone(), self.dead_letter_timeout)
                .await;
            match sent {
                Ok(_) => break Ok(()),
                Err(e) if tries >= self.retry.max_attempts.max(1) || !route.is_running() => {
                    break Err(e)
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.dead_letter_failures);
                    route.export.dead_letter_failures.increment(1);
                    tracing::warn!(topic = %route.topic, dlq = %route.dead_letter_topic, error = %e,
                        tries, "dead-letter publish failed; retrying");
                    self.wait_keeping_alive(&delivery, self.retry.backoff(tries))
                        .await;
                }
            }
        };
        match stored {
            Ok(()) => {
                Metrics::inc(&self.metrics.dead_lettered);
                route.export.dead_lettered.increment(1);
                tracing::warn!(topic = %route.topic, group = %route.group, dlq = %route.dead_letter_topic,
                    attempts, error = %err, "message dead-lettered");
                self.settle("term", delivery.term().await);
            }
            Err(e) => {
                Metrics::inc(&self.metrics.dead_letter_failures);
                route.export.dead_letter_failures.increment(1);
                let reason = format!(
                    "dead-letter publish to {} failed after {tries} tries ({e}); the subscription \
                     stopped so the aggregate's order holds; its messages return to the broker",
                    route.dead_letter_topic
                );
                tracing::error!(topic = %route.topic, group = %route.group, "{reason}");
                route.fail(reason);
                self.settle("nak", delivery.nak(Duration::ZERO).await);
            }
        }
    }

    fn settle(&self, what: &'static str, result: Result<(), TransportError>) {
        if let Err(e) = result {
            Metrics::inc(&self.metrics.settle_failures);
            tracing::warn!(error = %e, "{what} failed; the broker will redeliver and the duplicate is skipped by event id");
        }
    }
}

/// The dead letter of `raw`: its bytes as received, the error in headers, its own
/// idempotency key.
fn dead_letter_message(
    raw: &Message,
    route: &Route,
    err: &HandlerError,
    attempts: u32,
) -> OutgoingMessage {
    let mut hdrs = raw.headers().clone();
    let event_id = raw
        .event_id()
        .map(str::to_owned)
        .unwrap_or_else(new_event_id);
    hdrs.insert(headers::EVENT_ID, event_id.as_str());
    // Its own idempotency key: the X-Event-ID header stays the original's, but two groups
    // dead-lettering the same event must not be deduplicated into one dead letter.
    let dead_letter_id = format!("{event_id}:{}:dlq", route.group);
    if err.kind() == FailureKind::Codec {
        if let Some(enc) = hdrs.remove(headers::CONTENT_ENCODING) {
            hdrs.insert(headers::DLQ_CONTENT_ENCODING, enc);
        }
    }
    hdrs.insert(headers::DLQ_ERROR, header_safe(err.message()));
    hdrs.insert(headers::DLQ_REASON, err.kind().as_str());
    hdrs.insert(headers::DLQ_TOPIC, route.topic.as_str());
    hdrs.insert(headers::DLQ_GROUP, route.group.as_str());
    hdrs.insert(headers::DLQ_ATTEMPTS, attempts.to_string());
    let key = raw.aggregate_id().map(str::to_owned).or_else(|| {
        raw.key()
            .and_then(|k| std::str::from_utf8(k).ok().map(str::to_owned))
    });
    OutgoingMessage {
        topic: route.dead_letter_topic.clone(),
        event_id: dead_letter_id,
        key,
        headers: hdrs,
        payload: raw.payload().clone(),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The error text as a header value: one line, at most `MAX_ERROR_HEADER_BYTES`.
fn header_safe(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_HEADER_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].replace(['\r', '\n'], " ")
}
