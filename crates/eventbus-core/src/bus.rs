//! [`Bus`]: the public API, the same over every transport.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::cloudevents::{self, CloudEvent, CloudEventError};
use crate::codec::{self, Compression};
use crate::config::{BusConfig, SubscribeOptions};
use crate::consume::{run_fetcher, FetcherParams, SubscriptionControl, SubscriptionHandle};
use crate::dispatcher::{Dispatcher, Route};
use crate::envelope::{new_event_id, Envelope, EnvelopeError};
use crate::error::{BusError, TransportError};
use crate::handler::{EnvelopeAdapter, EnvelopeHandler, Handler, SharedHandler};
use crate::headers::{self, Headers};
use crate::message::OutgoingMessage;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::middleware::{Layer, Layers};
use crate::publish::{PublishResult, PublishResults, Publisher, ResultCallback};
use crate::trace;
use crate::transport::{
    validate_topic, Capabilities, ConnectionState, Health, Lag, Subscription, SubscriptionSpec,
    Transport,
};

/// One message to publish, with its options.
///
/// ```
/// use eventbus_core::{Compression, Publication};
/// let p = Publication::new("orders", &b"{}"[..])
///     .aggregate_id("order-1")
///     .header("X-Trace-ID", "t1")
///     .compression(Compression::Lz4);
/// assert_eq!(p.topic(), "orders");
/// ```
#[derive(Debug, Clone)]
pub struct Publication {
    topic: String,
    payload: Bytes,
    event_id: Option<String>,
    aggregate_id: Option<String>,
    headers: Headers,
    compression: Option<Compression>,
}

impl Publication {
    /// A message for `topic`.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            event_id: None,
            aggregate_id: None,
            headers: Headers::new(),
            compression: None,
        }
    }

    /// An envelope for `topic`: JSON body, routing headers, key = aggregate id.
    pub fn envelope(topic: impl Into<String>, envelope: &Envelope) -> Result<Self, EnvelopeError> {
        envelope.validate()?;
        let mut payload = envelope.to_json()?;
        // The bytes live until the broker's ACK (a lost ACK republishes them), so a window of
        // pending publishes holds thousands: keep what they need, not the serialiser's
        // doubled capacity (shrinking in place, no copy with the common allocators).
        payload.shrink_to_fit();
        Ok(Self::encoded_envelope(topic, envelope, payload))
    }

    /// An envelope already encoded, e.g. as an outbox stored it: routing headers and key come
    /// from `envelope`, the payload is `json` as it is (not validated or encoded again; it
    /// must be `envelope`'s JSON).
    pub fn encoded_envelope(
        topic: impl Into<String>,
        envelope: &Envelope,
        json: impl Into<Bytes>,
    ) -> Self {
        Self {
            topic: topic.into(),
            payload: json.into(),
            event_id: Some(envelope.event_id.clone()),
            aggregate_id: Some(envelope.aggregate_id.clone()),
            headers: envelope.headers(),
            compression: None,
        }
    }

    /// A CloudEvent for `topic` in structured mode: the JSON event format as the payload,
    /// `content-type: application/cloudevents+json`; event id = `id`, aggregate = `subject`
    /// (else the `partitionkey` extension).
    ///
    /// ```
    /// use eventbus_core::{cloudevents::CloudEvent, Envelope, Publication};
    /// let env = Envelope::new("order-1", "order.created", 1, serde_json::json!({}));
    /// let ce = CloudEvent::from_envelope(&env, "/shop");
    /// let p = Publication::cloud_event("orders", &ce).unwrap();
    /// assert_eq!(p.topic(), "orders");
    /// ```
    pub fn cloud_event(topic: impl Into<String>, ce: &CloudEvent) -> Result<Self, CloudEventError> {
        ce.validate()?;
        let mut p = Self::new(topic, ce.to_json()).event_id(ce.id.as_str());
        p.headers.insert(
            cloudevents::CONTENT_TYPE,
            format!("{}; charset=UTF-8", cloudevents::STRUCTURED_CONTENT_TYPE),
        );
        p.aggregate_id = cloud_event_aggregate(ce);
        Ok(p)
    }

    /// A CloudEvent for `topic` in binary mode: attributes as headers named `prefix` +
    /// attribute ([`cloudevents::KAFKA_PREFIX`] `ce_` or [`cloudevents::NATS_PREFIX`] `ce-`,
    /// as the consumers' protocol binding expects; eventbus reads both), the data as the
    /// payload.
    pub fn cloud_event_binary(
        topic: impl Into<String>,
        ce: &CloudEvent,
        prefix: &str,
    ) -> Result<Self, CloudEventError> {
        ce.validate()?;
        let (headers, payload) = ce.to_binary(prefix);
        let mut p = Self::new(topic, payload).event_id(ce.id.as_str());
        p.headers = headers;
        p.aggregate_id = cloud_event_aggregate(ce);
        Ok(p)
    }

    /// Sets the event id (default: a new UUIDv7).
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
    }

    /// Sets the aggregate id: messages with the same one are consumed in order.
    pub fn aggregate_id(mut self, id: impl Into<String>) -> Self {
        self.aggregate_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn header<N: AsRef<str> + Into<String>>(mut self, name: N, value: impl AsRef<str>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Overrides the bus's compression for this message.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = Some(c);
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Builds a [`Bus`].
pub struct BusBuilder<T: Transport> {
    transport: T,
    config: BusConfig,
    layers: Layers,
}

impl<T: Transport> BusBuilder<T> {
    /// Sets the configuration (default: [`BusConfig::default`]). A result callback set
    /// before is kept unless `config` has one.
    pub fn config(mut self, mut config: BusConfig) -> Self {
        if config.publish.on_result.is_none() {
            config.publish.on_result = self.config.publish.on_result.take();
        }
        self.config = config;
        self
    }

    /// Calls `f` with every publish result, on the bus's ACK collector task: keep it short.
    pub fn on_publish_result(mut self, f: impl Fn(&PublishResult) + Send + Sync + 'static) -> Self {
        self.config.publish.on_result = Some(ResultCallback::new(f));
        self
    }

    /// Adds a middleware layer around the handler of every subscription of the bus, inside
    /// the layers added before and outside each subscription's own
    /// ([`crate::middleware`]).
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Validates the configuration and starts the bus. Must run inside a Tokio runtime.
    pub fn build(self) -> Result<Bus<T>, BusError> {
        self.config.validate()?;
        tokio::runtime::Handle::try_current().map_err(|_| BusError::NoRuntime)?;
        let metrics = Arc::new(Metrics::default());
        let transport = Arc::new(self.transport);
        let native_compression = transport.capabilities().native_compression;
        let (publisher, collector) = Publisher::start(
            transport.clone(),
            self.config.publish.clone(),
            metrics.clone(),
        );
        let (closed, _) = watch::channel(false);
        Ok(Bus {
            inner: Arc::new(BusInner {
                transport,
                native_compression,
                config: self.config,
                publisher,
                collector: Mutex::new(Some(collector)),
                life: Mutex::new(Life {
                    state: State::Running,
                    subscriptions: Vec::new(),
                    dispatcher: None,
                }),
                closed,
                metrics,
                layers: self.layers,
                next_route: AtomicU64::new(1),
            }),
        })
    }
}

/// Where a bus is in its life. It only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Publishing and subscribing.
    Running,
    /// `close()` runs: nothing new is accepted.
    Closing,
    /// `close()` returned.
    Closed,
}

/// The lifecycle state and what it guards: a subscription is registered, and the dispatcher
/// started, only under this lock while the state is `Running`, so `close()` (which moves
/// the state under the same lock) sees every subscription or none is created.
struct Life<T: Transport> {
    state: State,
    subscriptions: Vec<Arc<SubscriptionControl>>,
    dispatcher: Option<Arc<Dispatcher<T>>>,
}

struct BusInner<T: Transport> {
    transport: Arc<T>,
    /// The transport compresses batches itself: the bus leaves payloads as they are.
    native_compression: bool,
    config: BusConfig,
    publisher: Arc<Publisher<T>>,
    collector: Mutex<Option<JoinHandle<()>>>,
    life: Mutex<Life<T>>,
    /// Set once `close()` finished: later callers of `close()` wait for it.
    closed: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    /// Middleware around every subscription's handler.
    layers: Layers,
    next_route: AtomicU64,
}

impl<T: Transport> BusInner<T> {
    fn life(&self) -> MutexGuard<'_, Life<T>> {
        // Nothing under this lock panics; a poisoned lock still holds a consistent state.
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> State {
        self.life().state
    }
}

/// An event bus over transport `T`. Cheap to clone; clones share everything.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use eventbus_core::{memory::MemoryTransport, Bus, Envelope, HandlerError};
/// let bus = Bus::builder(MemoryTransport::new()).build()?;
/// bus.subscribe_envelope("orders", "billing", |env: Envelope| async move {
///     println!("{} v{}", env.aggregate_id, env.event_version);
///     Ok::<(), HandlerError>(())
/// }).await?;
/// let env = Envelope::new("order-1", "order.created", 1, serde_json::json!({"total": 3}));
/// let result = bus.publish_envelope_and_wait("orders", &env).await?;
/// assert!(result.is_ok());
/// bus.close().await?;
/// # Ok::<(), eventbus_core::BusError>(()) }).unwrap();
/// ```
pub struct Bus<T: Transport> {
    inner: Arc<BusInner<T>>,
}

impl<T: Transport> Clone for Bus<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Transport> Bus<T> {
    /// A builder over `transport`.
    pub fn builder(transport: T) -> BusBuilder<T> {
        BusBuilder {
            transport,
            config: BusConfig::default(),
            layers: Layers::new(),
        }
    }

    /// A bus with `config` and no result callback.
    pub fn new(transport: T, config: BusConfig) -> Result<Self, BusError> {
        Self::builder(transport).config(config).build()
    }

    /// The configuration.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// What the backend can do.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.transport.capabilities()
    }

    /// Publishes raw bytes. Returns the event id once the message is handed to the broker
    /// client; the broker's ACK arrives later as a [`PublishResult`].
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<String, BusError> {
        self.send(Publication::new(topic, payload)).await
    }

    /// Publishes an envelope (validated; JSON body; routing headers; key = aggregate id).
    pub async fn publish_envelope(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<String, BusError> {
        self.send(Publication::envelope(topic, envelope)?).await
    }

    /// Publishes raw bytes and waits for the broker's answer.
    pub async fn publish_and_wait(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishResult, BusError> {
        self.send_and_wait(Publication::new(topic, payload)).await
    }

    /// Publishes an envelope and waits for the broker's answer.
    pub async fn publish_envelope_and_wait(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<PublishResult, BusError> {
        self.send_and_wait(Publication::envelope(topic, envelope)?)
            .await
    }

    /// Publishes `p`; returns its event id once handed over. Exactly one [`PublishResult`]
    /// follows for every `Ok`; an `Err` means the message was not accepted.
    pub async fn send(&self, p: Publication) -> Result<String, BusError> {
        let (out, span) = self.prepare(p)?;
        let id = out.event_id.clone();
        self.inner
            .publisher
            .submit(out, None)
            .instrument(span)
            .await?;
        Ok(id)
    }

    /// Publishes `p` and waits for its result (which is also reported to the callback and
    /// stream).
    pub async fn send_and_wait(&self, p: Publication) -> Result<PublishResult, BusError> {
        let (out, span) = self.prepare(p)?;
        self.inner
            .publisher
            .submit_and_wait(out)
            .instrument(span)
            .await
    }

    /// The message as the transport gets it, and its publish span.
    fn prepare(&self, p: Publication) -> Result<(OutgoingMessage, tracing::Span), BusError> {
        validate_topic(&p.topic)?;
        let Publication {
            topic,
            payload,
            event_id,
            aggregate_id,
            mut headers,
            compression,
        } = p;
        let event_id = match event_id {
            Some(id) if id.trim().is_empty() => return Err(EnvelopeError::EmptyEventId.into()),
            Some(id) => id,
            None => new_event_id(),
        };
        // An envelope's headers already carry both: then nothing is copied.
        headers.set_str(headers::EVENT_ID, &event_id);
        let aggregate_id = aggregate_id.filter(|a| !a.is_empty());
        if let Some(a) = &aggregate_id {
            headers.set_str(headers::AGGREGATE_ID, a);
        }
        let cfg = self.inner.publisher.config();
        let span = publish_span(&topic, &event_id);
        if cfg.propagate_trace {
            // The parent: the message's own traceparent, else the handling this runs in.
            let (ctx, parent) = trace::for_publish(&headers);
            let ctx = trace::bind(&span, ctx, parent.as_ref());
            ctx.inject(&mut headers);
        }
        headers::validate(&headers)?;
        let size = payload.len() + headers.wire_len();
        if size > cfg.max_message_bytes {
            return Err(TransportError::PayloadTooLarge {
                actual: size,
                limit: cfg.max_message_bytes,
            }
            .into());
        }
        let compression = if self.inner.native_compression {
            // The client compresses whole batches: compressing payloads too would do it twice.
            Compression::None
        } else {
            compression.unwrap_or_else(|| cfg.compression_for(&topic))
        };
        let payload = codec::encode(
            payload,
            compression,
            cfg.compression_min_bytes,
            &mut headers,
        );
        let out = OutgoingMessage {
            topic,
            event_id,
            key: aggregate_id,
            headers,
            payload,
        };
        Ok((out, span))
    }

    /// The stream of publish results. It can be taken once; take it before publishing to see
    /// every result. Read it steadily: when it is full, publishing waits.
    pub fn results(&self) -> Result<PublishResults, BusError> {
        if self.inner.state() == State::Closed {
            return Err(BusError::Closed);
        }
        self.inner
            .publisher
            .take_results(self.inner.config.publish.results_capacity)
    }

    /// Subscribes `handler` to `topic` in consumer `group`.
    pub async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        handler: impl Handler,
    ) -> Result<SubscriptionHandle, BusError> {
        let opts = self.inner.config.subscribe.clone();
        self.subscribe_inner(topic, group, opts, Arc::new(handler), false)
            .await
    }

    /// Subscribes an envelope handler; malformed envelopes go to the dead-letter topic.
    pub async fn subscribe_envelope(
        &self,
        topic: &str,
        group: &str,
        handler: impl EnvelopeHandler,
    ) -> Result<SubscriptionHandle, BusError> {
        let opts = self.inner.config.subscribe.clone();
        self.subscribe_inner(topic, group, opts, Arc::new(EnvelopeAdapter(handler)), true)
            .await
    }

    /// Subscribes with per-subscription options.
    pub async fn subscribe_with(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        handler: impl Handler,
    ) -> Result<SubscriptionHandle, BusError> {
        self.subscribe_inner(topic, group, options, Arc::new(handler), false)
            .await
    }

    /// Subscribes an envelope handler with per-subscription options.
    pub async fn subscribe_envelope_with(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        handler: impl EnvelopeHandler,
    ) -> Result<SubscriptionHandle, BusError> {
        self.subscribe_inner(
            topic,
            group,
            options,
            Arc::new(EnvelopeAdapter(handler)),
            true,
        )
        .await
    }

    async fn subscribe_inner(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        handler: SharedHandler,
        envelopes: bool,
    ) -> Result<SubscriptionHandle, BusError> {
        if self.inner.state() != State::Running {
            return Err(BusError::Closed);
        }
        validate_topic(topic)?;
        validate_group(group)?;
        if options.batch_size == 0 {
            return Err(BusError::Config("batch_size must be at least 1".into()));
        }
        let dead_letter_topic = options
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}{}", self.inner.config.dispatch.dead_letter_suffix));
        validate_topic(&dead_letter_topic)?;
        if dead_letter_topic == topic {
            return Err(BusError::Config(
                "the dead-letter topic must differ from the topic".into(),
            ));
        }
        let already = |topic: &str, group: &str| {
            BusError::Config(format!(
                "group {group:?} is already subscribed to {topic:?} on this bus: one \
                 subscription per group and topic per bus (unsubscribe it first; to share the \
                 work, run another instance: a second bus)"
            ))
        };
        if self
            .inner
            .life()
            .subscriptions
            .iter()
            .any(|c| c.consumes(topic, group))
        {
            return Err(already(topic, group));
        }
        let subscription = match self
            .inner
            .transport
            .subscribe(SubscriptionSpec {
                topic: topic.to_string(),
                group: group.to_string(),
            })
            .await
        {
            Ok(s) => s,
            Err(TransportError::Closed) => return Err(BusError::Closed),
            Err(e) => return Err(e.into()),
        };
        let handler = self.inner.layers.apply(options.layers.apply(handler));
        let route = Arc::new(Route::new(
            self.inner.next_route.fetch_add(1, Ordering::Relaxed),
            topic.to_string(),
            group.to_string(),
            dead_letter_topic,
            handler,
            envelopes,
        ));
        let (control, stop_rx, done_tx) =
            SubscriptionControl::new(route.clone(), self.inner.config.publish.close_timeout);
        // Registered under the lifecycle lock, re-checking the state after the await above:
        // a close() that started meanwhile has taken the subscription list already.
        let refused = {
            let mut life = self.inner.life();
            if life.subscriptions.iter().any(|c| c.consumes(topic, group)) {
                // Another subscribe of the same group won the race meanwhile.
                Some((subscription, already(topic, group)))
            } else if life.state == State::Running {
                let dispatcher = self.dispatcher(&mut life);
                let task = tokio::spawn(run_fetcher::<T>(
                    subscription,
                    FetcherParams {
                        transport: self.inner.transport.clone(),
                        route,
                        dispatcher,
                        options,
                        stop: stop_rx,
                        done: done_tx,
                        metrics: self.inner.metrics.clone(),
                        drain_timeout: self.inner.config.publish.close_timeout,
                    },
                ));
                control.set_fetcher(task);
                // Unsubscribed ones are done: drop them, so subscribe/unsubscribe cycles stay
                // bounded.
                life.subscriptions.retain(|c| !c.is_done());
                life.subscriptions.push(control.clone());
                None
            } else {
                Some((subscription, BusError::Closed))
            }
        };
        if let Some((subscription, refusal)) = refused {
            if let Err(e) = subscription.close().await {
                tracing::debug!(topic, group, error = %e, "closing a refused consumer");
            }
            return Err(refusal);
        }
        Ok(SubscriptionHandle {
            control,
            topic: topic.to_string(),
            group: group.to_string(),
        })
    }

    /// The dispatcher, started with the first subscription: a publish-only bus spawns no
    /// worker.
    fn dispatcher(&self, life: &mut Life<T>) -> Arc<Dispatcher<T>> {
        life.dispatcher
            .get_or_insert_with(|| {
                Arc::new(Dispatcher::start(
                    &self.inner.config.dispatch,
                    self.inner.publisher.clone(),
                    self.inner.config.publish.max_message_bytes,
                    self.inner.metrics.clone(),
                    self.inner.config.publish.close_timeout,
                ))
            })
            .clone()
    }

    /// Waits until every publish accepted before this call has its result, up to the
    /// configured close timeout.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.inner
            .publisher
            .flush(self.inner.config.publish.close_timeout)
            .await
    }

    /// Graceful shutdown, every phase bounded by the close timeout whatever the application
    /// does (a handler that never returns, a results stream nobody reads):
    /// 1. stops the subscriptions: no more fetches; messages fetched but not started go back
    ///    to the broker at once (another instance gets them now); running handlers finish
    ///    and are settled;
    /// 2. stops the dispatcher's workers (aborted at the deadline: their messages are
    ///    redelivered by the broker);
    /// 3. refuses new publishes and waits for every pending ACK; ACKs still missing at the
    ///    deadline are reported as failed, and results a lagging stream reader has no room
    ///    for are dropped from the stream (counted in `results_dropped`; the callback sees
    ///    every result);
    /// 4. disconnects.
    ///
    /// A second call waits for the first to finish. Afterwards `publish` and `subscribe`
    /// return [`BusError::Closed`] and no task of the bus is left running.
    pub async fn close(&self) -> Result<(), BusError> {
        let taken = {
            let mut life = self.inner.life();
            if life.state == State::Running {
                life.state = State::Closing;
                Some((
                    std::mem::take(&mut life.subscriptions),
                    life.dispatcher.take(),
                ))
            } else {
                None
            }
        };
        let Some((subs, dispatcher)) = taken else {
            let mut closed = self.inner.closed.subscribe();
            let _ = closed.wait_for(|c| *c).await;
            return Ok(());
        };
        let deadline = self.inner.config.publish.close_timeout;
        let stops = futures_util::future::join_all(subs.iter().map(|s| s.stop_and_wait()));
        if tokio::time::timeout(deadline, stops).await.is_err() {
            tracing::warn!(
                "subscriptions did not stop before the close deadline; ending their fetchers"
            );
            for s in &subs {
                s.abort().await;
            }
        }
        if let Some(d) = dispatcher {
            d.shutdown(deadline).await;
        }
        let publisher = &self.inner.publisher;
        publisher.close_gate();
        let flushed = publisher.flush(deadline).await;
        if flushed.is_err() {
            publisher.abandon_pending();
        }
        publisher.shutdown_collector();
        let collector = self.inner.collector.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = collector {
            if tokio::time::timeout(deadline, &mut c).await.is_err() {
                tracing::warn!("publish results not delivered before the close deadline");
                publisher.abandon_pending();
                if tokio::time::timeout(deadline, &mut c).await.is_err() {
                    c.abort();
                }
            }
        }
        let closed = match tokio::time::timeout(deadline, self.inner.transport.close()).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(
                format!("the transport did not disconnect within {deadline:?}").into(),
            )),
        };
        self.inner.life().state = State::Closed;
        self.inner.closed.send_replace(true);
        flushed?;
        closed?;
        Ok(())
    }

    /// Connection state of the backend.
    pub fn health(&self) -> Health {
        let mut h = self.inner.transport.health();
        if self.inner.state() == State::Closed {
            h.state = ConnectionState::Closed;
        }
        h.stalled = self
            .inner
            .life()
            .subscriptions
            .iter()
            .filter_map(|c| c.stalled())
            .collect();
        h
    }

    /// How far consumer `group` is behind on `topic`, as the broker reports it (`None`: the
    /// backend cannot tell). Any group can be asked, not only this bus's.
    pub async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, BusError> {
        validate_topic(topic)?;
        validate_group(group)?;
        if self.inner.state() == State::Closed {
            return Err(BusError::Closed);
        }
        Ok(self.inner.transport.lag(topic, group).await?)
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.inner.metrics.snapshot();
        m.in_flight_publishes = self.inner.publisher.in_flight() as u64;
        let life = self.inner.life();
        if let Some(d) = &life.dispatcher {
            m.queued_messages = d.queued() as u64;
            m.workers = d.worker_count() as u64;
        }
        m.subscriptions = life.subscriptions.iter().filter(|c| !c.is_done()).count() as u64;
        m
    }

    /// True once `close()` has started.
    pub fn is_closed(&self) -> bool {
        self.inner.state() != State::Running || self.inner.publisher.is_closed()
    }
}

/// The aggregate of a CloudEvent: its subject, else its `partitionkey` extension.
fn cloud_event_aggregate(ce: &CloudEvent) -> Option<String> {
    ce.subject.clone().filter(|s| !s.is_empty()).or_else(|| {
        ce.extensions
            .get("partitionkey")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    })
}

/// The `eventbus.publish` span: from the call to the hand-over to the broker client (the ACK
/// is reported as a [`PublishResult`]). Its ids are recorded once the trace context is known.
fn publish_span(topic: &str, event_id: &str) -> tracing::Span {
    tracing::debug_span!(
        "eventbus.publish",
        topic,
        event_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    )
}

fn validate_group(group: &str) -> Result<(), BusError> {
    let ok = !group.is_empty()
        && group.len() <= crate::transport::MAX_TOPIC_LEN
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BusError::Config(format!(
            "consumer group {group:?} must be 1-249 characters of A-Z a-z 0-9 _ -"
        )))
    }
}
