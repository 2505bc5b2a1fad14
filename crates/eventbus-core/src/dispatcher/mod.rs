//! The shared dispatcher: every backend's fetchers hand deliveries to it.
//!
//! - A message with an aggregate id goes to keyed worker `hash(id) % K`. Each keyed worker has
//!   a bounded queue and handles its messages one at a time, so one aggregate's messages are
//!   handled strictly in the order they were fetched.
//! - A message without one goes to the global pool: `G` workers sharing one bounded queue.
//! - Full queues make `dispatch` wait, which stops the fetcher: backpressure reaches the broker.
//! - The number of tasks is `K + G`, set by configuration, whatever the traffic.

mod dedup;
mod worker;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::DispatchConfig;
use crate::envelope::peek_aggregate_id;
use crate::handler::SharedHandler;
use crate::headers;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::transport::{Delivery, Subscription, Transport};

pub(crate) use dedup::DedupSet;
use worker::{Dedup, WorkerContext};

pub(crate) type DeliveryOf<T> = <<T as Transport>::Subscription as Subscription>::Delivery;

/// One subscription's routing data, shared by its jobs.
pub(crate) struct Route {
    /// Unique within the bus: keys the workers' dedup sets.
    pub(crate) id: u64,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) handler: SharedHandler,
    /// Envelope subscription: the body may be read for the aggregate id.
    pub(crate) envelopes: bool,
    in_flight: AtomicUsize,
    idle: Notify,
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
            id,
            topic,
            group,
            dead_letter_topic,
            handler,
            envelopes,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
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
/// subscriptions, plain payloads) the envelope's `aggregate_id`, else the broker key.
pub(crate) fn routing_key(msg: &Message, envelopes: bool) -> Option<Cow<'_, [u8]>> {
    if let Some(id) = msg.aggregate_id() {
        return Some(Cow::Borrowed(id.as_bytes()));
    }
    if envelopes && msg.headers().get(headers::CONTENT_ENCODING).is_none() {
        if let Some(id) = peek_aggregate_id(msg.payload()) {
            return Some(Cow::Owned(id.into_bytes()));
        }
    }
    msg.key().filter(|k| !k.is_empty()).map(Cow::Borrowed)
}

/// FNV-1a: stable across processes and releases, so a given aggregate maps to the same worker
/// index everywhere (std's hasher is randomly seeded).
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The keyed and global worker pools of one bus.
pub(crate) struct Dispatcher<T: Transport> {
    keyed: Vec<async_channel::Sender<Job<DeliveryOf<T>>>>,
    global: async_channel::Sender<Job<DeliveryOf<T>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    worker_count: usize,
}

impl<T: Transport> Dispatcher<T> {
    /// Spawns `K` keyed and `G` global workers: the only consumer-side tasks besides one
    /// fetcher per subscription.
    pub(crate) fn start(
        config: &DispatchConfig,
        publisher: Arc<Publisher<T>>,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ctx = Arc::new(WorkerContext {
            publisher,
            retry: config.retry.clone(),
            progress_interval: config.progress_interval.max(Duration::from_millis(10)),
            max_message_bytes,
            dedup_enabled: config.dedup_window > 0,
            metrics,
        });
        let mut handles = Vec::with_capacity(config.keyed_workers + config.global_workers);
        let mut keyed = Vec::with_capacity(config.keyed_workers);
        for _ in 0..config.keyed_workers {
            let (tx, rx) = async_channel::bounded::<Job<DeliveryOf<T>>>(config.keyed_queue);
            keyed.push(tx);
            let ctx = ctx.clone();
            let window = config.dedup_window;
            handles.push(tokio::spawn(async move {
                let mut seen = DedupSet::new(window);
                while let Ok(job) = rx.recv().await {
                    ctx.process(job, Dedup::Local(&mut seen)).await;
                }
            }));
        }
        let (global, global_rx) = async_channel::bounded::<Job<DeliveryOf<T>>>(config.global_queue);
        let shared_seen = Arc::new(Mutex::new(DedupSet::new(
            config.dedup_window.saturating_mul(config.global_workers),
        )));
        for _ in 0..config.global_workers {
            let rx = global_rx.clone();
            let ctx = ctx.clone();
            let seen = shared_seen.clone();
            handles.push(tokio::spawn(async move {
                while let Ok(job) = rx.recv().await {
                    ctx.process(job, Dedup::Shared(&seen)).await;
                }
            }));
        }
        let worker_count = handles.len();
        Self {
            keyed,
            global,
            workers: Mutex::new(handles),
            worker_count,
        }
    }

    /// Queues one delivery; waits while the target queue is full.
    pub(crate) async fn dispatch(&self, delivery: DeliveryOf<T>, route: &Arc<Route>) {
        route.started();
        let target = routing_key(delivery.message(), route.envelopes)
            .map(|k| (stable_hash(&k) % self.keyed.len() as u64) as usize);
        let job = Job {
            delivery,
            route: route.clone(),
        };
        let sent = match target {
            Some(i) => self.keyed[i].send(job).await,
            None => self.global.send(job).await,
        };
        if let Err(async_channel::SendError(job)) = sent {
            // The pools are shut down (the bus is closing): hand the message back.
            let _ = job.delivery.nak(Duration::ZERO).await;
            job.route.finished();
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.keyed.iter().map(|q| q.len()).sum::<usize>() + self.global.len()
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.worker_count
    }

    /// Lets the workers finish what is queued, then stops them. Workers still busy at the
    /// deadline are aborted; their deliveries are dropped unsettled, so the broker redelivers.
    pub(crate) async fn shutdown(&self, deadline: Duration) {
        for q in &self.keyed {
            q.close();
        }
        self.global.close();
        let handles = match self.workers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        let all = futures_util::future::join_all(handles);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("dispatcher workers still busy at the close deadline; aborting them");
            for a in aborts {
                a.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests;
