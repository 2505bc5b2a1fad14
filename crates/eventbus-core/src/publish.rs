//! Publish-side plumbing shared by every backend: the bounded in-flight window, the one ACK
//! collector task per bus, and the results (callback, stream, awaiting caller).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::PublishConfig;
use crate::error::{BusError, TransportError};
use crate::message::OutgoingMessage;
use crate::metrics::Metrics;
use crate::transport::{Receipt, Transport};

/// The outcome of one publish: exactly one per message accepted by `publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// Topic it was published to.
    pub topic: String,
    /// Its event id.
    pub event_id: String,
    /// Its aggregate id, when it has one.
    pub aggregate_id: Option<String>,
    /// The broker's receipt, or why it was not stored.
    pub outcome: Result<Receipt, TransportError>,
}

impl PublishResult {
    /// True when the broker acknowledged it.
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Callback invoked with every publish result, on the collector task: keep it short.
#[derive(Clone)]
pub struct ResultCallback(Arc<dyn Fn(&PublishResult) + Send + Sync>);

impl ResultCallback {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&PublishResult) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    fn call(&self, r: &PublishResult) {
        (self.0)(r)
    }
}

impl std::fmt::Debug for ResultCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResultCallback(..)")
    }
}

/// The stream of publish results, from [`crate::Bus::results`]. Bounded: a reader that falls
/// behind slows publishing down. Results are dropped from the stream only when `close()`
/// reaches its deadline with the reader still behind (counted in `results_dropped`; the
/// callback has seen every one).
#[derive(Debug)]
pub struct PublishResults {
    rx: mpsc::Receiver<PublishResult>,
}

impl PublishResults {
    /// The next result; `None` once the bus is closed and every result was delivered.
    pub async fn recv(&mut self) -> Option<PublishResult> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for PublishResults {
    type Item = PublishResult;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

struct Meta {
    topic: String,
    event_id: String,
    aggregate_id: Option<String>,
    waiter: Option<oneshot::Sender<PublishResult>>,
    /// When it was handed to the transport (ACK latency).
    sent_at: Instant,
    _permit: OwnedSemaphorePermit,
}

/// One handed-over message awaiting its ACK.
struct PendingAck<A> {
    meta: Option<Meta>,
    ack: A,
}

impl<A> Future for PendingAck<A>
where
    A: Future<Output = Result<Receipt, TransportError>> + Unpin,
{
    type Output = (Meta, Result<Receipt, TransportError>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = std::task::ready!(Pin::new(&mut self.ack).poll(cx));
        match self.meta.take() {
            Some(meta) => Poll::Ready((meta, outcome)),
            // Polled again after completion: FuturesUnordered never does this.
            None => Poll::Pending,
        }
    }
}

/// What the collector does besides collecting; moves forward only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Running,
    /// Accept nothing more; report what is pending, then end.
    Shutdown,
    /// The close deadline passed: report everything still pending as failed, and drop
    /// results the stream's reader has no room for; then end.
    Abandon,
}

/// Where results go.
struct Sinks {
    callback: Option<ResultCallback>,
    stream: Arc<Mutex<Option<mpsc::Sender<PublishResult>>>>,
    metrics: Arc<Metrics>,
    mode: watch::Receiver<Mode>,
}

impl Sinks {
    async fn report(&mut self, meta: Meta, outcome: Result<Receipt, TransportError>) {
        let export = &self.metrics.export;
        export.in_flight.decrement(1.0);
        export
            .ack_seconds
            .record(meta.sent_at.elapsed().as_secs_f64());
        match &outcome {
            Ok(r) => {
                Metrics::inc(&self.metrics.publish_acked);
                export.acked.increment(1);
                if r.duplicate {
                    Metrics::inc(&self.metrics.publish_duplicates);
                    export.duplicates.increment(1);
                }
            }
            Err(e) => {
                Metrics::inc(&self.metrics.publish_failed);
                export.failed.increment(1);
                tracing::warn!(topic = %meta.topic, event_id = %meta.event_id, error = %e, "publish failed");
            }
        }
        let Meta {
            topic,
            event_id,
            aggregate_id,
            waiter,
            sent_at: _,
            _permit,
        } = meta;
        let result = PublishResult {
            topic,
            event_id,
            aggregate_id,
            outcome,
        };
        if let Some(cb) = &self.callback {
            // A panicking callback must not kill the collector and strand every later result.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb.call(&result))).is_err()
            {
                tracing::error!(event_id = %result.event_id, "publish result callback panicked");
            }
        }
        let stream = self.stream.lock().ok().and_then(|g| g.clone());
        if let Some(waiter) = waiter {
            let _ = waiter.send(result.clone());
        }
        if let Some(tx) = stream {
            match tx.try_send(result) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(result)) => {
                    // Backpressure, not loss: wait for the reader, until close() gives up.
                    tokio::select! {
                        biased;
                        _ = tx.send(result) => {}
                        _ = self.mode.wait_for(|m| *m == Mode::Abandon) => {
                            Metrics::inc(&self.metrics.results_dropped);
                            self.metrics.export.results_dropped.increment(1);
                        }
                    }
                }
            }
        }
        // The permit is released here, after every sink has the result.
        drop(_permit);
    }
}

/// The publishing half of a bus.
pub(crate) struct Publisher<T: Transport> {
    transport: Arc<T>,
    window: Arc<Semaphore>,
    window_size: usize,
    pending_tx: mpsc::Sender<PendingAck<T::Ack>>,
    mode: watch::Sender<Mode>,
    stream: Arc<Mutex<Option<mpsc::Sender<PublishResult>>>>,
    stream_taken: AtomicBool,
    closed: AtomicBool,
    config: PublishConfig,
    metrics: Arc<Metrics>,
}

impl<T: Transport> Publisher<T> {
    /// Builds the publisher and spawns its ACK collector (the only task on the publish side).
    pub(crate) fn start(
        transport: Arc<T>,
        config: PublishConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let callback = config.on_result.clone();
        let window_size = config.in_flight_window;
        let (pending_tx, pending_rx) = mpsc::channel(window_size);
        let (mode, mode_rx) = watch::channel(Mode::Running);
        let stream = Arc::new(Mutex::new(None));
        let sinks = Sinks {
            callback,
            stream: stream.clone(),
            metrics: metrics.clone(),
            mode: mode_rx.clone(),
        };
        let task = tokio::spawn(collect_acks::<T>(pending_rx, mode_rx, sinks));
        let publisher = Arc::new(Self {
            transport,
            window: Arc::new(Semaphore::new(window_size)),
            window_size,
            pending_tx,
            mode,
            stream,
            stream_taken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            config,
            metrics,
        });
        (publisher, task)
    }

    pub(crate) fn config(&self) -> &PublishConfig {
        &self.config
    }

    /// Hands `msg` to the transport once the window has room.
    pub(crate) async fn submit(
        &self,
        msg: OutgoingMessage,
        waiter: Option<oneshot::Sender<PublishResult>>,
    ) -> Result<(), BusError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let permit = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BusError::Closed)?;
        // Checked again: a publish that got its permit after close() flushed must not slip in.
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let meta = Meta {
            topic: msg.topic.clone(),
            event_id: msg.event_id.clone(),
            aggregate_id: msg.key.clone(),
            waiter,
            sent_at: Instant::now(),
            _permit: permit,
        };
        let ack = self.transport.send(msg).await?;
        Metrics::inc(&self.metrics.published);
        self.metrics.export.published.increment(1);
        self.metrics.export.in_flight.increment(1.0);
        self.pending_tx
            .send(PendingAck {
                meta: Some(meta),
                ack,
            })
            .await
            .map_err(|_| {
                self.metrics.export.in_flight.decrement(1.0);
                // The broker client took the message, but close() already gave up on pending
                // ACKs: whether it is stored is unknown, which is not "closed" (= not sent).
                BusError::Transport(TransportError::Timeout(
                    "sent after the close deadline; its ACK was not awaited: the message may or \
                     may not be stored (publish it again with the same event id)"
                        .into(),
                ))
            })
    }

    /// Publishes and waits for the broker's answer.
    pub(crate) async fn submit_and_wait(
        &self,
        msg: OutgoingMessage,
    ) -> Result<PublishResult, BusError> {
        let (tx, rx) = oneshot::channel();
        self.submit(msg, Some(tx)).await?;
        rx.await.map_err(|_| BusError::Closed)
    }

    /// The bus's own publishes (dead letters): straight to the transport and awaited here,
    /// outside the window and the application's results, so an unread results stream or a
    /// full window cannot stall them and they never show up as the application's results.
    /// Accepted while the bus drains after `close()` started.
    pub(crate) async fn publish_internal(
        &self,
        msg: OutgoingMessage,
        timeout: Duration,
    ) -> Result<Receipt, TransportError> {
        let topic = msg.topic.clone();
        let sent = async { self.transport.send(msg).await?.await };
        match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(
                format!("no broker ACK for a publish to {topic} within {timeout:?}").into(),
            )),
        }
    }

    pub(crate) fn take_results(&self, capacity: usize) -> Result<PublishResults, BusError> {
        if self.stream_taken.swap(true, Ordering::AcqRel) {
            return Err(BusError::ResultsAlreadyTaken);
        }
        let (tx, rx) = mpsc::channel(capacity);
        if let Ok(mut slot) = self.stream.lock() {
            *slot = Some(tx);
        }
        Ok(PublishResults { rx })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.window_size - self.window.available_permits()
    }

    /// Waits until every publish accepted before this call has its result.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        // Taking the whole window waits for every outstanding permit; the semaphore is fair,
        // so publishes that start after us wait behind us instead of starving the flush.
        let all = self.window.acquire_many(self.window_size as u32);
        match tokio::time::timeout(timeout, all).await {
            Ok(_) => Ok(()),
            Err(_) => Err(BusError::FlushTimeout {
                pending: self.in_flight(),
                waited: timeout,
            }),
        }
    }

    /// Stops accepting publishes from users.
    pub(crate) fn close_gate(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Gives up on pending ACKs (each is reported as failed) and on a stream reader that is
    /// behind (results it has no room for are dropped and counted); the collector then ends.
    pub(crate) fn abandon_pending(&self) {
        self.mode.send_if_modified(|m| {
            let changed = *m < Mode::Abandon;
            *m = Mode::Abandon;
            changed
        });
    }

    /// Ends the collector once every pending ACK is reported.
    pub(crate) fn shutdown_collector(&self) {
        self.mode.send_if_modified(|m| {
            let changed = *m < Mode::Shutdown;
            if changed {
                *m = Mode::Shutdown;
            }
            changed
        });
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The one ACK collector of a bus: awaits every handed-over message's ACK in a single task
/// (no task per message) and reports each exactly once. Ends after shutdown once nothing is
/// pending, or when the publisher is dropped.
async fn collect_acks<T: Transport>(
    mut pending_rx: mpsc::Receiver<PendingAck<T::Ack>>,
    mut mode: watch::Receiver<Mode>,
    mut sinks: Sinks,
) {
    let mut pending: FuturesUnordered<PendingAck<T::Ack>> = FuturesUnordered::new();
    let mut open = true;
    let mut mode_open = true;
    let mut abandoned = false;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some((meta, outcome)) = pending.next(), if !pending.is_empty() => {
                sinks.report(meta, outcome).await;
                // ACKs arrive in bursts: report every one already in before selecting again
                // (a select round re-arms the mode and queue waits, a lock each).
                while let Poll::Ready(Some((meta, outcome))) =
                    std::future::poll_fn(|cx| Poll::Ready(pending.poll_next_unpin(cx))).await
                {
                    sinks.report(meta, outcome).await;
                }
            }
            changed = mode.changed(), if mode_open => {
                if changed.is_err() {
                    mode_open = false;
                    continue;
                }
                let now = *mode.borrow_and_update();
                if now >= Mode::Shutdown {
                    // Buffered messages are still received; then `recv` yields None.
                    pending_rx.close();
                }
                if now == Mode::Abandon && !abandoned {
                    abandoned = true;
                    while let Ok(p) = pending_rx.try_recv() {
                        pending.push(p);
                    }
                    for mut p in std::mem::take(&mut pending) {
                        if let Some(meta) = p.meta.take() {
                            let err = TransportError::Timeout(
                                "no broker ACK before the close deadline; the message may or may not be stored".into(),
                            );
                            sinks.report(meta, Err(err)).await;
                        }
                    }
                }
            }
            next = pending_rx.recv(), if open => match next {
                Some(p) => pending.push(p),
                None => open = false,
            },
        }
    }
    // Dropping the stream sender ends a reader's `recv` loop once it has every result.
    if let Ok(mut slot) = sinks.stream.lock() {
        slot.take();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::{Notify, Semaphore};

    use crate::memory::{MemoryBroker, MemoryTransport};
    use crate::{Bus, BusConfig, BusError, Transport, TransportError};

    /// Hands the message to the memory broker, then holds the ACK future back until the test
    /// opens the gate: a send that outlives the close deadline.
    struct SlowSend {
        inner: MemoryTransport,
        entered: Arc<Notify>,
        gate: Arc<Semaphore>,
    }

    impl Transport for SlowSend {
        type Ack = <MemoryTransport as Transport>::Ack;
        type Subscription = <MemoryTransport as Transport>::Subscription;

        fn backend(&self) -> &'static str {
            "memory-slow-send"
        }

        fn capabilities(&self) -> crate::Capabilities {
            self.inner.capabilities()
        }

        async fn send(&self, m: crate::OutgoingMessage) -> Result<Self::Ack, TransportError> {
            let ack = self.inner.send(m).await?;
            self.entered.notify_one();
            let _open = self.gate.acquire().await;
            Ok(ack)
        }

        async fn subscribe(
            &self,
            spec: crate::SubscriptionSpec,
        ) -> Result<Self::Subscription, TransportError> {
            self.inner.subscribe(spec).await
        }

        fn health(&self) -> crate::Health {
            self.inner.health()
        }

        async fn close(&self) -> Result<(), TransportError> {
            self.inner.close().await
        }
    }

    /// A publish whose message reached the broker client but whose ACK could no longer be
    /// awaited (close gave up on it) must not say `Closed` (= not sent): the caller is told
    /// the outcome is unknown, like a timeout, and retries idempotently by event id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_sent_after_the_close_deadline_is_reported_unknown_not_closed() {
        let broker = MemoryBroker::new();
        let entered = Arc::new(Notify::new());
        let gate = Arc::new(Semaphore::new(0));
        let t = SlowSend {
            inner: broker.transport(),
            entered: entered.clone(),
            gate: gate.clone(),
        };
        let bus = Bus::new(
            t,
            BusConfig::default().with_close_timeout(Duration::from_millis(200)),
        )
        .expect("bus");
        let b = bus.clone();
        let publish = tokio::spawn(async move { b.publish("slow", &b"x"[..]).await });
        entered.notified().await;
        let closed = bus.close().await;
        assert!(
            matches!(closed, Err(BusError::FlushTimeout { pending: 1, .. })),
            "{closed:?}"
        );
        gate.add_permits(1);
        let outcome = publish.await.expect("publish task");
        assert_eq!(broker.stored("slow"), 1, "the message did reach the broker");
        match outcome {
            Err(BusError::Transport(TransportError::Timeout(m))) => {
                assert!(m.contains("may or may not"), "{m}")
            }
            other => panic!("expected an unknown outcome (timeout), got {other:?}"),
        }
    }
}
