//! [`Bus`]: the public API, the same over every transport.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::{self, Compression};
use crate::config::{BusConfig, SubscribeOptions};
use crate::dispatcher::{Dispatcher, Route};
use crate::envelope::{new_event_id, Envelope, EnvelopeError};
use crate::error::{BusError, TransportError};
use crate::handler::{EnvelopeAdapter, EnvelopeHandler, Handler, SharedHandler};
use crate::headers::{self, Headers};
use crate::message::OutgoingMessage;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::publish::{PublishResult, PublishResults, Publisher, ResultCallback};
use crate::transport::{
    validate_topic, Capabilities, ConnectionState, Health, Subscription, SubscriptionSpec,
    Transport,
};

/// Pause after a failed fetch before the fetcher tries again.
const FETCH_RETRY_BACKOFF: Duration = Duration::from_millis(250);

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
        let payload = envelope.to_json()?;
        Ok(Self {
            topic: topic.into(),
            payload: Bytes::from(payload),
            event_id: Some(envelope.event_id.clone()),
            aggregate_id: Some(envelope.aggregate_id.clone()),
            headers: envelope.headers(),
            compression: None,
        })
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
    pub fn header<N: AsRef<str> + Into<String>>(
        mut self,
        name: N,
        value: impl Into<String>,
    ) -> Self {
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

struct SubscriptionControl {
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    fetcher: Mutex<Option<JoinHandle<()>>>,
}

impl SubscriptionControl {
    async fn stop_and_wait(&self) {
        let _ = self.stop.send(true);
        // Await the task itself, so it is gone (not just finishing) when we return; a second
        // caller (unsubscribe racing close) waits for the done flag instead.
        let fetcher = self.fetcher.lock().ok().and_then(|mut f| f.take());
        match fetcher {
            Some(task) => {
                let _ = task.await;
            }
            None => {
                let mut done = self.done.clone();
                let _ = done.wait_for(|d| *d).await;
            }
        }
    }
}

/// A live subscription. Dropping the handle keeps the subscription running until the bus
/// closes; [`SubscriptionHandle::unsubscribe`] stops it gracefully.
pub struct SubscriptionHandle {
    control: Arc<SubscriptionControl>,
    topic: String,
    group: String,
}

impl SubscriptionHandle {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Stops fetching, waits for the messages already fetched to be handled and settled, and
    /// leaves the group.
    pub async fn unsubscribe(self) {
        self.control.stop_and_wait().await;
    }
}

/// Builds a [`Bus`].
pub struct BusBuilder<T: Transport> {
    transport: T,
    config: BusConfig,
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

    /// Validates the configuration and starts the bus. Must run inside a Tokio runtime.
    pub fn build(self) -> Result<Bus<T>, BusError> {
        self.config.validate()?;
        tokio::runtime::Handle::try_current().map_err(|_| BusError::NoRuntime)?;
        let metrics = Arc::new(Metrics::default());
        let transport = Arc::new(self.transport);
        let (publisher, collector) = Publisher::start(
            transport.clone(),
            self.config.publish.clone(),
            metrics.clone(),
        );
        Ok(Bus {
            inner: Arc::new(BusInner {
                transport,
                config: self.config,
                publisher,
                collector: Mutex::new(Some(collector)),
                dispatcher: Mutex::new(None),
                subscriptions: Mutex::new(Vec::new()),
                metrics,
                closing: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                next_route: AtomicU64::new(1),
            }),
        })
    }
}

struct BusInner<T: Transport> {
    transport: Arc<T>,
    config: BusConfig,
    publisher: Arc<Publisher<T>>,
    collector: Mutex<Option<JoinHandle<()>>>,
    dispatcher: Mutex<Option<Arc<Dispatcher<T>>>>,
    subscriptions: Mutex<Vec<Arc<SubscriptionControl>>>,
    metrics: Arc<Metrics>,
    closing: AtomicBool,
    closed: AtomicBool,
    next_route: AtomicU64,
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
        let out = self.prepare(p)?;
        let id = out.event_id.clone();
        self.inner.publisher.submit(out, None, false).await?;
        Ok(id)
    }

    /// Publishes `p` and waits for its result (which is also reported to the callback and
    /// stream).
    pub async fn send_and_wait(&self, p: Publication) -> Result<PublishResult, BusError> {
        let out = self.prepare(p)?;
        self.inner.publisher.submit_and_wait(out, false).await
    }

    fn prepare(&self, p: Publication) -> Result<OutgoingMessage, BusError> {
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
        headers.insert(headers::EVENT_ID, event_id.as_str());
        let aggregate_id = aggregate_id.filter(|a| !a.is_empty());
        if let Some(a) = &aggregate_id {
            headers.insert(headers::AGGREGATE_ID, a.as_str());
        }
        headers::validate(&headers)?;
        let cfg = self.inner.publisher.config();
        let size = payload.len() + headers.wire_len();
        if size > cfg.max_message_bytes {
            return Err(TransportError::PayloadTooLarge {
                actual: size,
                limit: cfg.max_message_bytes,
            }
            .into());
        }
        let compression = compression.unwrap_or_else(|| cfg.compression_for(&topic));
        let payload = codec::encode(
            payload,
            compression,
            cfg.compression_min_bytes,
            &mut headers,
        );
        Ok(OutgoingMessage {
            topic,
            event_id,
            key: aggregate_id,
            headers,
            payload,
        })
    }

    /// The stream of publish results. It can be taken once; take it before publishing to see
    /// every result. Read it steadily: when it is full, publishing waits.
    pub fn results(&self) -> Result<PublishResults, BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
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
        if self.inner.closing.load(Ordering::Acquire) {
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
        let subscription = self
            .inner
            .transport
            .subscribe(SubscriptionSpec {
                topic: topic.to_string(),
                group: group.to_string(),
            })
            .await?;
        let dispatcher = self.dispatcher()?;
        let route = Arc::new(Route::new(
            self.inner.next_route.fetch_add(1, Ordering::Relaxed),
            topic.to_string(),
            group.to_string(),
            dead_letter_topic,
            handler,
            envelopes,
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let control = Arc::new(SubscriptionControl {
            stop: stop_tx,
            done: done_rx,
            fetcher: Mutex::new(None),
        });
        let task = tokio::spawn(run_fetcher::<T>(
            subscription,
            route,
            dispatcher,
            options,
            stop_rx,
            done_tx,
            self.inner.metrics.clone(),
            self.inner.config.publish.close_timeout,
        ));
        if let Ok(mut f) = control.fetcher.lock() {
            *f = Some(task);
        }
        if let Ok(mut subs) = self.inner.subscriptions.lock() {
            // Unsubscribed ones are done: drop them, so subscribe/unsubscribe cycles stay bounded.
            subs.retain(|c| !*c.done.borrow());
            subs.push(control.clone());
        }
        Ok(SubscriptionHandle {
            control,
            topic: topic.to_string(),
            group: group.to_string(),
        })
    }

    fn dispatcher(&self) -> Result<Arc<Dispatcher<T>>, BusError> {
        let mut slot = self.inner.dispatcher.lock().map_err(|_| BusError::Closed)?;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        // Started with the first subscription: a publish-only bus spawns no worker.
        let d = Arc::new(Dispatcher::start(
            &self.inner.config.dispatch,
            self.inner.publisher.clone(),
            self.inner.config.publish.max_message_bytes,
            self.inner.metrics.clone(),
        ));
        *slot = Some(d.clone());
        Ok(d)
    }

    /// Waits until every publish accepted before this call has its result, up to the
    /// configured close timeout.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.inner
            .publisher
            .flush(self.inner.config.publish.close_timeout)
            .await
    }

    /// Graceful shutdown: stops the subscriptions (messages already fetched are handled and
    /// settled), stops accepting publishes, waits for every pending ACK (each phase bounded by
    /// the close timeout; ACKs still missing then are reported as failed), then disconnects.
    pub async fn close(&self) -> Result<(), BusError> {
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let deadline = self.inner.config.publish.close_timeout;
        let subs = self
            .inner
            .subscriptions
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let stops = futures_util::future::join_all(subs.iter().map(|s| s.stop_and_wait()));
        if tokio::time::timeout(deadline, stops).await.is_err() {
            tracing::warn!("subscriptions did not stop before the close deadline");
        }
        let dispatcher = self.inner.dispatcher.lock().ok().and_then(|mut d| d.take());
        if let Some(d) = dispatcher {
            d.shutdown(deadline).await;
        }
        let publisher = &self.inner.publisher;
        publisher.close_gate();
        let flushed = publisher.flush(deadline).await;
        if flushed.is_err() {
            publisher.abandon_pending().await;
        }
        publisher.shutdown_collector().await;
        let collector = self.inner.collector.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = collector {
            let _ = c.await;
        }
        self.inner.closed.store(true, Ordering::Release);
        let closed = self.inner.transport.close().await;
        flushed?;
        closed?;
        Ok(())
    }

    /// Connection state of the backend.
    pub fn health(&self) -> Health {
        let mut h = self.inner.transport.health();
        if self.inner.closed.load(Ordering::Acquire) {
            h.state = ConnectionState::Closed;
        }
        h
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.inner.metrics.snapshot();
        m.in_flight_publishes = self.inner.publisher.in_flight() as u64;
        if let Some(d) = self.inner.dispatcher.lock().ok().and_then(|d| d.clone()) {
            m.queued_messages = d.queued() as u64;
            m.workers = d.worker_count() as u64;
        }
        m.subscriptions = self
            .inner
            .subscriptions
            .lock()
            .map(|s| s.iter().filter(|c| !*c.done.borrow()).count() as u64)
            .unwrap_or(0);
        m
    }

    /// True once `close()` has started.
    pub fn is_closed(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire) || self.inner.publisher.is_closed()
    }
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

/// The one fetcher of a subscription: pulls batches and hands them to the dispatcher in
/// order. On stop it waits for what it dispatched to be settled, then closes the consumer.
#[allow(clippy::too_many_arguments)]
async fn run_fetcher<T: Transport>(
    mut subscription: T::Subscription,
    route: Arc<Route>,
    dispatcher: Arc<Dispatcher<T>>,
    options: SubscribeOptions,
    stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    drain_timeout: Duration,
) {
    // The fetch is never cancelled half-way (a broker may already have handed messages
    // over); the stop flag is checked between fetches, at most `max_wait` apart.
    while !*stop.borrow() {
        match subscription
            .fetch(options.batch_size, options.max_wait)
            .await
        {
            Ok(batch) => {
                for delivery in batch {
                    Metrics::inc(&metrics.fetched);
                    dispatcher.dispatch(delivery, &route).await;
                }
            }
            Err(TransportError::Closed) => break,
            Err(e) => {
                Metrics::inc(&metrics.fetch_errors);
                tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "fetch failed; retrying");
                let mut stop = stop.clone();
                let _ = tokio::time::timeout(FETCH_RETRY_BACKOFF, stop.wait_for(|s| *s)).await;
            }
        }
    }
    if tokio::time::timeout(drain_timeout, route.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(topic = %route.topic, group = %route.group, "in-flight messages not settled before the drain deadline");
    }
    if let Err(e) = subscription.close().await {
        tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "closing the consumer failed");
    }
    let _ = done.send(true);
}
