//! Handler middleware: layers that wrap a subscription's handler, in the style of tower's
//! `Layer` and Watermill's router middleware. A layer runs in the worker that handles the
//! message — no task, no queue — around every attempt (retries run the layers again).
//!
//! Layers come from two places: [`crate::BusBuilder::layer`] wraps every subscription of a
//! bus, [`SubscribeOptions::layer`](crate::SubscribeOptions::layer) one subscription; the
//! bus's layers are outermost, and within each list the first added is outermost. Retries,
//! panic catching, dead letters, the `eventbus.handle` tracing span and the handler metrics
//! are the worker's own layers around all of them.
//!
//! Built in: [`Timeout`], [`ConcurrencyLimit`]; [`from_fn`] makes a layer from a closure.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use eventbus_core::middleware::{from_fn, ConcurrencyLimit, Next, Timeout};
//! use eventbus_core::{memory::MemoryTransport, Bus, HandlerError, Message, SubscribeOptions};
//!
//! let bus = Bus::builder(MemoryTransport::new())
//!     .layer(from_fn(|msg: Message, next: Next| async move {
//!         let topic = msg.topic().to_string();
//!         let result = next.run(msg).await;
//!         if let Err(e) = &result { eprintln!("{topic}: {e}"); }
//!         result
//!     }))
//!     .build()?;
//! let options = SubscribeOptions::default()
//!     .layer(Timeout::new(Duration::from_secs(5)))
//!     .layer(ConcurrencyLimit::new(8));
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1);
//! bus.subscribe_with("orders", "billing", options, move |msg: Message| {
//!     let tx = tx.clone();
//!     async move { tx.send(msg.payload().len()).await.map_err(|e| HandlerError::retryable(e.to_string())) }
//! }).await?;
//! bus.publish("orders", &b"{}"[..]).await?;
//! assert_eq!(rx.recv().await, Some(2));
//! bus.close().await?;
//! # Ok::<(), eventbus_core::BusError>(()) }).unwrap();
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::error::HandlerError;
use crate::handler::Handler;
use crate::message::Message;

/// Wraps a handler in another one.
pub trait Layer: Send + Sync + 'static {
    /// The handler that runs `inner` with this layer's behaviour around it.
    fn layer(&self, inner: Arc<dyn Handler>) -> Arc<dyn Handler>;
}

/// An ordered list of layers; the first is outermost. Compares by identity.
#[derive(Clone, Default)]
pub struct Layers(Vec<Arc<dyn Layer>>);

impl Layers {
    /// No layers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `layer` inside the ones added before.
    pub fn push(&mut self, layer: impl Layer) {
        self.0.push(Arc::new(layer));
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `handler` wrapped in every layer, the first outermost.
    pub fn apply(&self, handler: Arc<dyn Handler>) -> Arc<dyn Handler> {
        self.0
            .iter()
            .rev()
            .fold(handler, |inner, layer| layer.layer(inner))
    }
}

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Layers({})", self.0.len())
    }
}

impl PartialEq for Layers {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The rest of the chain, as a [`from_fn`] middleware sees it.
#[derive(Clone)]
pub struct Next(Arc<dyn Handler>);

impl Next {
    /// Runs the inner layers and the handler.
    pub async fn run(&self, msg: Message) -> Result<(), HandlerError> {
        self.0.handle(msg).await
    }
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Next")
    }
}

/// A layer from a closure `f(msg, next)`: do something before, call `next.run(msg)` (or
/// not: returning without it short-circuits), do something after.
pub fn from_fn<F, Fut>(f: F) -> FnLayer<F>
where
    F: Fn(Message, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnLayer(Arc::new(f))
}

/// The layer [`from_fn`] makes.
pub struct FnLayer<F>(Arc<F>);

impl<F, Fut> Layer for FnLayer<F>
where
    F: Fn(Message, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn layer(&self, inner: Arc<dyn Handler>) -> Arc<dyn Handler> {
        Arc::new(FnHandler {
            f: self.0.clone(),
            next: Next(inner),
        })
    }
}

struct FnHandler<F> {
    f: Arc<F>,
    next: Next,
}

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Message, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        (self.f)(msg, self.next.clone()).await
    }
}

/// Fails an attempt that takes longer than its limit with a retryable error (the handler's
/// future is dropped); the retry policy decides what follows.
#[derive(Debug, Clone, Copy)]
pub struct Timeout(Duration);

impl Timeout {
    /// At most `limit` per attempt.
    pub fn new(limit: Duration) -> Self {
        Self(limit)
    }
}

impl Layer for Timeout {
    fn layer(&self, inner: Arc<dyn Handler>) -> Arc<dyn Handler> {
        Arc::new(TimeoutHandler {
            limit: self.0,
            inner,
        })
    }
}

struct TimeoutHandler {
    limit: Duration,
    inner: Arc<dyn Handler>,
}

#[async_trait]
impl Handler for TimeoutHandler {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        match tokio::time::timeout(self.limit, self.inner.handle(msg)).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::retryable(format!(
                "handler timed out after {:?}",
                self.limit
            ))),
        }
    }
}

/// At most `n` handler runs at once across everything the layer wraps (a layer added to the
/// bus limits all its subscriptions together). A worker over the limit waits for a permit:
/// the messages queued behind it wait too, so keep `n` near the workers' count or the
/// dependency's real limit.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit(Arc<Semaphore>);

impl ConcurrencyLimit {
    /// At most `n` (at least 1) at once.
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))))
    }

    /// Permits free now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

impl Layer for ConcurrencyLimit {
    fn layer(&self, inner: Arc<dyn Handler>) -> Arc<dyn Handler> {
        Arc::new(LimitHandler {
            permits: self.0.clone(),
            inner,
        })
    }
}

struct LimitHandler {
    permits: Arc<Semaphore>,
    inner: Arc<dyn Handler>,
}

#[async_trait]
impl Handler for LimitHandler {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HandlerError::retryable("concurrency limit closed"))?;
        self.inner.handle(msg).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn msg() -> Message {
        Message::new(
            Arc::from("t"),
            bytes::Bytes::from_static(b"x"),
            Default::default(),
            None,
            None,
            1,
        )
    }

    fn recording(log: &Arc<Mutex<Vec<String>>>, name: &'static str) -> impl Layer {
        let log = log.clone();
        from_fn(move |m: Message, next: Next| {
            let log = log.clone();
            async move {
                log.lock().expect("log").push(format!("{name} in"));
                let r = next.run(m).await;
                log.lock().expect("log").push(format!("{name} out"));
                r
            }
        })
    }

    #[tokio::test]
    async fn the_first_layer_is_outermost() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut layers = Layers::new();
        layers.push(recording(&log, "a"));
        layers.push(recording(&log, "b"));
        let inner_log = log.clone();
        let handler: Arc<dyn Handler> = Arc::new(move |_m: Message| {
            let log = inner_log.clone();
            async move {
                log.lock().expect("log").push("handler".into());
                Ok(())
            }
        });
        layers.apply(handler).handle(msg()).await.expect("ok");
        assert_eq!(
            *log.lock().expect("log"),
            ["a in", "b in", "handler", "b out", "a out"]
        );
    }

    #[tokio::test]
    async fn a_layer_can_short_circuit() {
        let mut layers = Layers::new();
        layers.push(from_fn(|_m: Message, _next: Next| async {
            Err(HandlerError::permanent("refused"))
        }));
        let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = called.clone();
        let handler: Arc<dyn Handler> = Arc::new(move |_m: Message| {
            c.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok(()) }
        });
        let err = layers.apply(handler).handle(msg()).await.unwrap_err();
        assert!(err.is_permanent());
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fails_a_slow_attempt_as_retryable() {
        let mut layers = Layers::new();
        layers.push(Timeout::new(Duration::from_millis(50)));
        let handler: Arc<dyn Handler> = Arc::new(|_m: Message| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let err = layers.apply(handler).handle(msg()).await.unwrap_err();
        assert!(!err.is_permanent());
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn concurrency_limit_holds_a_permit_while_the_handler_runs() {
        let limit = ConcurrencyLimit::new(1);
        let mut layers = Layers::new();
        layers.push(limit.clone());
        let (entered_tx, mut entered_rx) = tokio::sync::mpsc::channel::<()>(1);
        let release = Arc::new(tokio::sync::Notify::new());
        let r = release.clone();
        let handler: Arc<dyn Handler> = Arc::new(move |_m: Message| {
            let (tx, r) = (entered_tx.clone(), r.clone());
            async move {
                let _ = tx.send(()).await;
                r.notified().await;
                Ok(())
            }
        });
        let wrapped = layers.apply(handler);
        let running = tokio::spawn({
            let w = wrapped.clone();
            async move { w.handle(msg()).await }
        });
        entered_rx.recv().await.expect("entered");
        assert_eq!(limit.available(), 0);
        release.notify_one();
        running.await.expect("joined").expect("ok");
        assert_eq!(limit.available(), 1);
    }

    #[tokio::test]
    async fn bus_layers_wrap_subscription_layers() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let bus = crate::Bus::builder(crate::memory::MemoryTransport::new())
            .layer(recording(&log, "bus"))
            .build()
            .expect("bus");
        let options = crate::SubscribeOptions::default().layer(recording(&log, "sub"));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        bus.subscribe_with("layered", "g", options, move |_m: Message| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(()).await;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
        // A subscription with default options gets the bus's layer only.
        let plain = crate::SubscribeOptions::default();
        assert!(plain.layers.is_empty());
        bus.publish("layered", &b"x"[..]).await.expect("publish");
        rx.recv().await.expect("handled");
        bus.close().await.expect("close");
        assert_eq!(
            *log.lock().expect("log"),
            ["bus in", "sub in", "sub out", "bus out"]
        );
    }
}
