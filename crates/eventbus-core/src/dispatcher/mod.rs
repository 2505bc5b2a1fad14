//! The shared dispatcher: every backend's fetchers hand deliveries to it.
//!
//! - A message with an aggregate id joins that aggregate's lane in the key-ordered
//!   [`scheduler`]: one bounded buffer of per-aggregate FIFO lanes served by `K` keyed
//!   workers, each taking the next message of any aggregate no other worker is on. One
//!   aggregate's messages are handled strictly in the order they were fetched; a slow,
//!   retrying or blocked aggregate holds one worker and stalls no other aggregate.
//! - A message without one goes to the global pool: `G` workers sharing one bounded queue.
//! - A full buffer makes `dispatch` wait, which stops the fetcher: backpressure reaches the
//!   broker.
//! - The number of tasks is `K + G`, set by configuration, whatever the traffic.

mod dedup;
mod prehashed;
mod scheduler;
mod worker;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cloudevents;
use crate::config::DispatchConfig;
use crate::envelope::peek_aggregate_id;
use crate::handler::SharedHandler;
use crate::headers;
use crate::message::Message;
use crate::metrics::{Metrics, RouteExport};
use crate::publish::Publisher;
use crate::transport::{Delivery, Subscription, Transport};

use dedup::SharedDedup;
use scheduler::KeyedScheduler;
use worker::WorkerContext;

pub(crate) type DeliveryOf<T> = <<T as Transport>::Subscription as Subscription>::Delivery;

/// Where a subscription is in its life, as its workers see it.
const ROUTE_RUNNING: u8 = 0;
/// Stopping (unsubscribe or close): messages not yet started are handed back to the broker.
const ROUTE_STOPPING: u8 = 1;
/// Stopped by a failure that would otherwise break order (a dead letter that could not be
/// stored): nothing more is handled; everything not settled goes back to the broker.
const ROUTE_FAILED: u8 = 2;

/// One subscription's routing data, shared by its jobs.
pub(crate) struct Route {
    /// Unique within the bus: keys the dedup set and the scheduler's lanes.
    pub(crate) id: u64,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) handler: SharedHandler,
    /// Envelope subscription: the body may be read for the aggregate id.
    pub(crate) envelopes: bool,
    /// This subscription's series of the `metrics` facade.
    pub(crate) export: RouteExport,
    in_flight: AtomicUsize,
    idle: Notify,
    state: AtomicU8,
    failure: Mutex<Option<String>>,
    /// Wakes the fetcher when the route fails.
    pub(crate) failed: Notify,
    /// Wakes whoever waits for the route to stop running (stop or failure).
    stopped: Notify,
    /// The fetcher found its consumer stalled and has not received anything since.
    stalled: std::sync::atomic::AtomicBool,
}

impl Route {
    pub(crate) fn new(
        id: u64,
        topic: String,
        group: String,
        dead_letter_topic: String,
        handler: SharedHandler,
        envelopes: bool,
    ) -> Self {
        Self {
            export: RouteExport::new(&topic, &group),
            id,
            topic,
            group,
            dead_letter_topic,
            handler,
            envelopes,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            state: AtomicU8::new(ROUTE_RUNNING),
            failure: Mutex::new(None),
            failed: Notify::new(),
            stopped: Notify::new(),
            stalled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Nothing dispatched is waiting or running.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Marks the subscription stalled (or recovered).
    pub(crate) fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Release);
    }

    /// Whether the subscription is stalled.
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// `n` deliveries were dropped unstarted: their partition is no longer owned.
    pub(crate) fn not_owned(&self, n: usize, metrics: &Metrics) {
        self.export.not_owned_dropped.increment(n as u64);
        metrics
            .not_owned_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
        tracing::debug!(topic = %self.topic, group = %self.group, n,
            "partition no longer owned: messages dropped unstarted for its next owner");
    }

    fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Messages not yet started are handed back to the broker from now on.
    pub(crate) fn stop(&self) {
        let _ = self.state.compare_exchange(
            ROUTE_RUNNING,
            ROUTE_STOPPING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.stopped.notify_waiters();
    }

    /// Stops the subscription for good with `reason`.
    pub(crate) fn fail(&self, reason: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(reason);
        }
        self.state.store(ROUTE_FAILED, Ordering::Release);
        self.failed.notify_waiters();
        self.stopped.notify_waiters();
    }

    /// Resolves once the subscription no longer runs (stopping or failed).
    pub(crate) async fn until_stopped(&self) {
        loop {
            let notified = self.stopped.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_running() {
                return;
            }
            notified.await;
        }
    }

    /// Handlers may run.
    pub(crate) fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == ROUTE_RUNNING
    }

    /// Why the subscription failed, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Waits until every message this subscription dispatched has been settled.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A delivery on its way to a worker.
pub(crate) struct Job<D> {
    delivery: D,
    route: Arc<Route>,
}

/// The aggregate id used for routing: the `X-Aggregate-ID` header, else (envelope
/// subscriptions) a binary-mode CloudEvent's subject, else (plain payloads) the envelope's
/// `aggregate_id`, else the broker key.
pub(crate) fn routing_key(msg: &Message, envelopes: bool) -> Option<Cow<'_, [u8]>> {
    if let Some(id) = msg.aggregate_id() {
        return Some(Cow::Borrowed(id.as_bytes()));
    }
    if envelopes {
        if let Some(subject) = cloudevents::binary_subject(msg.headers()) {
            return Some(Cow::Borrowed(subject.as_bytes()));
        }
        if msg.headers().get(headers::CONTENT_ENCODING).is_none() {
            if let Some(id) = peek_aggregate_id(msg.payload()) {
                return Some(Cow::Owned(id.into_bytes()));
            }
        }
    }
    msg.key().filter(|k| !k.is_empty()).map(Cow::Borrowed)
}

/// Whether `delivery`'s partition is still owned under the epoch it was fetched in.
pub(crate) fn owned(delivery: &impl Delivery) -> bool {
    delivery
        .owner()
        .map_or(true, crate::ownership::OwnershipToken::is_current)
}

/// The keyed and global worker pools of one bus.
pub(crate) struct Dispatcher<T: Transport> {
    keyed: Arc<KeyedScheduler<Job<DeliveryOf<T>>>>,
    global: async_channel::Sender<Job<DeliveryOf<T>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    worker_count: usize,
    metrics: Arc<Metrics>,
}

impl<T: Transport> Dispatcher<T> {
    /// Spawns `K` keyed and `G` global workers: the only consumer-side tasks besides one
    /// fetcher per subscription.
    pub(crate) fn start(
        config: &DispatchConfig,
        publisher: Arc<Publisher<T>>,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
        dead_letter_timeout: Duration,
    ) -> Self {
        let workers = config.keyed_workers + config.global_workers;
        let ctx = Arc::new(WorkerContext {
            publisher,
            retry: config.retry.clone(),
            progress_interval: config.progress_interval.max(Duration::from_millis(10)),
            max_message_bytes,
            dedup: (config.dedup_window > 0).then(|| {
                SharedDedup::new(config.dedup_window.saturating_mul(workers), workers.max(1))
            }),
            metrics: metrics.clone(),
            dead_letter_timeout,
        });
        let mut handles = Vec::with_capacity(workers);
        let keyed = Arc::new(KeyedScheduler::new(config.keyed_buffer));
        for _ in 0..config.keyed_workers {
            let ctx = ctx.clone();
            let sched = keyed.clone();
            handles.push(tokio::spawn(async move {
                while let Some((mut lane, mut job)) = sched.next().await {
                    // A busy scheduler hands over the next job under the same lock.
                    loop {
                        ctx.process(job).await;
                        match sched.finish_and_take(lane) {
                            Some((l, j)) => (lane, job) = (l, j),
                            None => break,
                        }
                    }
                }
            }));
        }
        let (global, global_rx) = async_channel::bounded::<Job<DeliveryOf<T>>>(config.global_queue);
        for _ in 0..config.global_workers {
            let rx = global_rx.clone();
            let ctx = ctx.clone();
            handles.push(tokio::spawn(async move {
                while let Ok(job) = rx.recv().await {
                    ctx.process(job).await;
                }
            }));
        }
        let worker_count = handles.len();
        Self {
            keyed,
            global,
            workers: Mutex::new(handles),
            worker_count,
            metrics,
        }
    }

    /// Queues one delivery; waits while the buffer is full. A delivery whose partition this
    /// member no longer owns is dropped unsettled (its next owner delivers it).
    pub(crate) async fn dispatch(&self, delivery: DeliveryOf<T>, route: &Arc<Route>) {
        if !owned(&delivery) {
            route.not_owned(1, &self.metrics);
            return;
        }
        route.started();
        let lane = routing_key(delivery.message(), route.envelopes)
            .map(|k| self.keyed.key_of(route.id, &k));
        let job = Job {
            delivery,
            route: route.clone(),
        };
        // Waiting for room ends when the subscription stops: with every worker stuck in a
        // hung handler, `unsubscribe` must not wait for room that never comes.
        let refused = match lane {
            Some(lane) => {
                let room = self.keyed.try_reserve()
                    || tokio::select! {
                        room = self.keyed.reserve() => room,
                        () = route.until_stopped() => false,
                    };
                if room {
                    self.keyed.push_reserved(lane, job).err()
                } else {
                    Some(job)
                }
            }
            None => match self.global.try_send(job) {
                Ok(()) => None,
                Err(async_channel::TrySendError::Closed(job)) => Some(job),
                Err(async_channel::TrySendError::Full(job)) => {
                    let sent = tokio::select! {
                        sent = self.global.send(job) => Some(sent),
                        () = route.until_stopped() => None,
                    };
                    match sent {
                        Some(Ok(())) => None,
                        Some(Err(e)) => Some(e.0),
                        None => {
                            // Dropped unsettled inside the abandoned send: the broker
                            // redelivers it.
                            route.finished();
                            return;
                        }
                    }
                }
            },
        };
        if let Some(job) = refused {
            // The pools are shut down (the bus is closing) or the subscription is stopping:
            // hand the message back.
            let _ = job.delivery.nak(Duration::ZERO).await;
            job.route.finished();
        }
    }

    /// Hands the stopping `route`'s buffered messages back to the broker at once, except
    /// those queued behind a running handler (its worker hands them back, in order, when it
    /// is done).
    pub(crate) async fn hand_back(&self, route: &Arc<Route>) {
        let jobs = self.keyed.drain_idle(|j| Arc::ptr_eq(&j.route, route));
        for job in jobs {
            if let Err(e) = job.delivery.nak(Duration::ZERO).await {
                tracing::debug!(topic = %route.topic, error = %e, "handing a message back failed; the broker redelivers it");
            }
            job.route.finished();
        }
    }

    /// Drops, unsettled, `route`'s buffered jobs whose partition is no longer owned: they
    /// must never start here, and the partition's next owner delivers them. Called when the
    /// transport loses a partition; jobs of the global pool are checked as workers take them.
    pub(crate) fn drop_not_owned(&self, route: &Arc<Route>) {
        let jobs = self
            .keyed
            .remove_where(|j| Arc::ptr_eq(&j.route, route) && !owned(&j.delivery));
        if jobs.is_empty() {
            return;
        }
        route.not_owned(jobs.len(), &self.metrics);
        for job in jobs {
            drop(job.delivery);
            job.route.finished();
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.keyed.queued() + self.global.len()
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.worker_count
    }

    /// Lets the workers settle what is queued (subscriptions are stopped by now, so queued
    /// messages are handed back to the broker rather than handled), then stops them. Workers
    /// still busy at the deadline are aborted; their deliveries are dropped unsettled, so the
    /// broker redelivers.
    pub(crate) async fn shutdown(&self, deadline: Duration) {
        self.keyed.close();
        self.global.close();
        let handles = match self.workers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        let all = futures_util::future::join_all(handles);
        tokio::pin!(all);
        if tokio::time::timeout(deadline, &mut all).await.is_err() {
            tracing::warn!("dispatcher workers still busy at the close deadline; aborting them");
            for a in aborts {
                a.abort();
            }
            // Aborted tasks end at their next await: wait for that (bounded: a handler that
            // blocks its thread cannot be aborted), so none outlives close().
            let _ = tokio::time::timeout(Duration::from_secs(1), all).await;
        }
    }
}

#[cfg(test)]
mod tests;
