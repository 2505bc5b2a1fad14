//! The one fetcher of a subscription.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::SubscribeOptions;
use crate::dispatcher::{Dispatcher, Route};
use crate::error::TransportError;
use crate::metrics::Metrics;
use crate::transport::{Delivery, Subscription, Transport};

/// Pause after a failed fetch before the fetcher tries again.
const FETCH_RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// What a fetcher needs besides its consumer.
pub(crate) struct FetcherParams<T: Transport> {
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
pub(crate) async fn run_fetcher<T: Transport>(
    mut subscription: T::Subscription,
    p: FetcherParams<T>,
) {
    let FetcherParams {
        route,
        dispatcher,
        options,
        stop,
        done,
        metrics,
        drain_timeout,
    } = p;
    // The fetch is never cancelled half-way (a broker may already have handed messages
    // over); the stop flag is checked between fetches, at most `max_wait` apart.
    while !*stop.borrow() && route.is_running() {
        match subscription
            .fetch(options.batch_size, options.max_wait)
            .await
        {
            Ok(batch) => {
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
        }
    }
    // Whatever ended the loop, messages not started yet go back to the broker.
    route.stop();
    subscription.release_prefetched().await;
    dispatcher.hand_back(&route).await;
    // Most of the deadline, so the consumer still closes (and commits) before close()
    // gives up on this task.
    if tokio::time::timeout(drain_timeout.mul_f64(0.8), route.wait_idle())
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
