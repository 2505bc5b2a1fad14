//! The one fetcher of a subscription.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::SubscribeOptions;
use crate::dispatcher::{Dispatcher, Route};
use crate::error::TransportError;
use crate::metrics::Metrics;
use crate::transport::{Delivery, Subscription, SubscriptionSpec, Transport};

/// Pause after a failed fetch before the fetcher tries again.
const FETCH_RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// Longest wait for the broker's lag during a stall check.
const LAG_TIMEOUT: Duration = Duration::from_secs(10);

/// What a fetcher needs besides its consumer.
pub(crate) struct FetcherParams<T: Transport> {
    /// For the stall check (the broker's lag) and a replacement consumer.
    pub(crate) transport: Arc<T>,
    pub(crate) route: Arc<Route>,
    pub(crate) dispatcher: Arc<Dispatcher<T>>,
    pub(crate) options: SubscribeOptions,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) done: watch::Sender<bool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) drain_timeout: Duration,
}

/// Pulls batches and hands them to the dispatcher in order. On stop (or when its route
/// fails) it waits for what it dispatched to be settled, then closes the consumer.
pub(crate) async fn run_fetcher<T: Transport>(subscription: T::Subscription, p: FetcherParams<T>) {
    let FetcherParams {
        transport,
        route,
        dispatcher,
        options,
        stop,
        done,
        metrics,
        drain_timeout,
    } = p;
    watch_ownership(&subscription, &dispatcher, &route);
    let mut current = Some(subscription);
    let mut watch = StallWatch::new(options.stall_timeout);
    // The fetch is never cancelled half-way (a broker may already have handed messages
    // over); the stop flag is checked between fetches, at most `max_wait` apart.
    while let Some(subscription) = current.as_mut() {
        if *stop.borrow() || !route.is_running() {
            break;
        }
        match subscription
            .fetch(options.batch_size, options.max_wait)
            .await
        {
            Ok(batch) => {
                if batch.is_empty() {
                    if watch.due() && route.is_idle() {
                        watch.checked();
                        if stalled(&*transport, &route, subscription.assigned()).await {
                            Metrics::inc(&metrics.fetch_stalls);
                            route.export.fetch_stalls.increment(1);
                            route.set_stalled(true);
                            tracing::warn!(topic = %route.topic, group = %route.group, after = ?options.stall_timeout, "nothing received while messages wait in the partitions this consumer holds: stalled; replacing the consumer");
                            if let Some(old) = current.take() {
                                current = renew(&*transport, &dispatcher, &route, old, &stop).await;
                            }
                            continue;
                        }
                        route.set_stalled(false);
                    }
                } else {
                    watch.delivered();
                    if route.is_stalled() {
                        route.set_stalled(false);
                        tracing::info!(topic = %route.topic, group = %route.group, "messages flow again after a stall");
                    }
                }
                for delivery in batch {
                    Metrics::inc(&metrics.fetched);
                    route.export.fetched.increment(1);
                    if delivery.message().delivery_count() > 1 {
                        route.export.redelivered.increment(1);
                    }
                    dispatcher.dispatch(delivery, &route).await;
                }
                metrics.export.queued.set(dispatcher.queued() as f64);
            }
            Err(TransportError::Closed) => break,
            Err(e) => {
                Metrics::inc(&metrics.fetch_errors);
                route.export.fetch_errors.increment(1);
                tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "fetch failed; retrying");
                pause(&route, &stop).await;
            }
        }
    }
    // Whatever ended the loop, messages not started yet go back to the broker.
    route.stop();
    route.set_stalled(false);
    if let Some(subscription) = current.as_mut() {
        subscription.release_prefetched().await;
    }
    dispatcher.hand_back(&route).await;
    // Most of the deadline, so the consumer still closes (and commits) before close()
    // gives up on this task.
    if tokio::time::timeout(drain_timeout.mul_f64(0.8), route.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(topic = %route.topic, group = %route.group, "in-flight messages not settled before the drain deadline");
    }
    if let Some(subscription) = current {
        if let Err(e) = subscription.close().await {
            tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "closing the consumer failed");
        }
    }
    let _ = done.send(true);
}

/// Has the dispatcher drop `route`'s queued jobs of a partition the subscription loses, as
/// it loses it (the transport calls the hook; jobs are checked again before they start).
fn watch_ownership<T: Transport>(
    subscription: &T::Subscription,
    dispatcher: &Arc<Dispatcher<T>>,
    route: &Arc<Route>,
) {
    if let Some(ownership) = subscription.ownership() {
        let (dispatcher, route) = (Arc::downgrade(dispatcher), Arc::downgrade(route));
        ownership.on_lost(move || {
            if let (Some(d), Some(r)) = (dispatcher.upgrade(), route.upgrade()) {
                d.drop_not_owned(&r);
            }
        });
    }
}

/// Waits `FETCH_RETRY_BACKOFF`, less if the subscription is stopped or fails meanwhile.
async fn pause(route: &Route, stop: &watch::Receiver<bool>) {
    let mut stop = stop.clone();
    let failed = route.failed.notified();
    let _ = tokio::time::timeout(FETCH_RETRY_BACKOFF, async {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = failed => {}
        }
    })
    .await;
}

/// When the next stall check is due: `timeout` after the last delivery and the last check.
struct StallWatch {
    timeout: Duration,
    last_delivery: Instant,
    last_check: Instant,
}

impl StallWatch {
    fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            last_delivery: now,
            last_check: now,
        }
    }

    fn due(&self) -> bool {
        !self.timeout.is_zero()
            && self.last_delivery.elapsed() >= self.timeout
            && self.last_check.elapsed() >= self.timeout
    }

    fn checked(&mut self) {
        self.last_check = Instant::now();
    }

    fn delivered(&mut self) {
        self.last_delivery = Instant::now();
    }
}

/// Whether a partition this consumer holds (`assigned`; every partition when the consumer
/// cannot tell) has messages waiting, as the broker's lag reports it. No answer (a backend
/// without lag, an error, no reply in time) is not a stall.
async fn stalled<T: Transport>(transport: &T, route: &Route, assigned: Option<Vec<u32>>) -> bool {
    let lag = match tokio::time::timeout(LAG_TIMEOUT, transport.lag(&route.topic, &route.group))
        .await
    {
        Ok(Ok(Some(lag))) => lag,
        Ok(Err(e)) => {
            tracing::debug!(topic = %route.topic, group = %route.group, error = %e, "stall check: no lag");
            return false;
        }
        _ => return false,
    };
    lag.partitions
        .iter()
        .filter(|p| assigned.as_ref().map_or(true, |a| a.contains(&p.partition)))
        .any(|p| p.pending > 0)
}

/// Closes a stalled consumer and creates a new one for the same topic and group, retrying
/// until it exists or the subscription stops (`None`: stopped, or the transport closed).
async fn renew<T: Transport>(
    transport: &T,
    dispatcher: &Arc<Dispatcher<T>>,
    route: &Arc<Route>,
    mut old: T::Subscription,
    stop: &watch::Receiver<bool>,
) -> Option<T::Subscription> {
    old.release_prefetched().await;
    if let Err(e) = old.close().await {
        tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "closing the stalled consumer failed");
    }
    loop {
        if *stop.borrow() || !route.is_running() {
            return None;
        }
        let spec = SubscriptionSpec {
            topic: route.topic.clone(),
            group: route.group.clone(),
        };
        match transport.subscribe(spec).await {
            Ok(fresh) => {
                watch_ownership(&fresh, dispatcher, route);
                return Some(fresh);
            }
            Err(TransportError::Closed) => return None,
            Err(e) => {
                tracing::warn!(topic = %route.topic, group = %route.group, error = %e, "replacing the stalled consumer failed; retrying");
                pause(route, stop).await;
            }
        }
    }
}
