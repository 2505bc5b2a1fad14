//! The consuming side of a bus: one fetcher task per subscription feeding the shared
//! dispatcher, and the handle that stops it.

mod fetcher;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dispatcher::Route;

pub(crate) use fetcher::{run_fetcher, FetcherParams};

/// Stops one subscription.
pub(crate) struct SubscriptionControl {
    stop: watch::Sender<bool>,
    pub(crate) done: watch::Receiver<bool>,
    fetcher: Mutex<Option<JoinHandle<()>>>,
    route: Arc<Route>,
    /// Longest an `unsubscribe` waits for the fetcher (the bus's close deadline).
    deadline: Duration,
}

impl SubscriptionControl {
    pub(crate) fn new(
        route: Arc<Route>,
        deadline: Duration,
    ) -> (Arc<Self>, watch::Receiver<bool>, watch::Sender<bool>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let control = Arc::new(Self {
            stop: stop_tx,
            done: done_rx,
            fetcher: Mutex::new(None),
            route,
            deadline,
        });
        (control, stop_rx, done_tx)
    }

    pub(crate) fn set_fetcher(&self, task: JoinHandle<()>) {
        if let Ok(mut f) = self.fetcher.lock() {
            *f = Some(task);
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// This subscription, if its consumer is stalled.
    pub(crate) fn stalled(&self) -> Option<crate::StalledSubscription> {
        (!self.is_done() && self.route.is_stalled()).then(|| crate::StalledSubscription {
            topic: self.route.topic.clone(),
            group: self.route.group.clone(),
        })
    }

    /// Whether this running subscription consumes `topic` as `group`.
    pub(crate) fn consumes(&self, topic: &str, group: &str) -> bool {
        !self.is_done() && self.route.topic == topic && self.route.group == group
    }

    /// Stops fetching; messages fetched but not started go back to the broker, handlers
    /// already running finish and are settled; then the consumer leaves. Returns when the
    /// fetcher task is gone.
    pub(crate) async fn stop_and_wait(&self) {
        self.route.stop();
        let _ = self.stop.send(true);
        // The done flag is the fetcher's last step (or its sender is dropped if it ended
        // otherwise). The task's handle stays here meanwhile, so a caller giving up (the
        // close deadline) can still abort it.
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
        // Then await the task itself, so it is gone (not just finishing) when we return.
        let fetcher = self.fetcher.lock().ok().and_then(|mut f| f.take());
        if let Some(task) = fetcher {
            let _ = task.await;
        }
    }

    /// [`Self::stop_and_wait`] within the close deadline; past it the fetcher is ended.
    pub(crate) async fn stop_within_deadline(&self) {
        if tokio::time::timeout(self.deadline, self.stop_and_wait())
            .await
            .is_err()
        {
            tracing::warn!(topic = %self.route.topic, group = %self.route.group,
                "the subscription did not stop before the close deadline; ending its fetcher");
            self.abort().await;
        }
    }

    /// Ends the fetcher at once (the close deadline passed); waits until it is gone.
    pub(crate) async fn abort(&self) {
        let fetcher = self.fetcher.lock().ok().and_then(|mut f| f.take());
        if let Some(task) = fetcher {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A live subscription. Dropping the handle keeps the subscription running until the bus
/// closes; [`SubscriptionHandle::unsubscribe`] stops it gracefully.
pub struct SubscriptionHandle {
    pub(crate) control: Arc<SubscriptionControl>,
    pub(crate) topic: String,
    pub(crate) group: String,
}

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("running", &self.is_running())
            .finish()
    }
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

    /// True while the subscription fetches and handles messages.
    pub fn is_running(&self) -> bool {
        !self.control.is_done() && self.control.route.is_running()
    }

    /// Why the subscription stopped on its own, if it did: a message's dead letter could not
    /// be stored, and going on would have broken its aggregate's order. The message and
    /// everything after it went back to the broker; another member (or a new subscription
    /// once the dead-letter topic is writable) takes them.
    pub fn failure(&self) -> Option<String> {
        self.control.route.failure()
    }

    /// Stops fetching, hands messages fetched but not started back to the broker, waits for
    /// running handlers to finish and be settled, and leaves the group — all within the
    /// bus's close deadline ([`crate::PublishConfig::close_timeout`]); past it the fetcher is
    /// ended and unsettled messages are redelivered by the broker.
    pub async fn unsubscribe(self) {
        self.control.stop_within_deadline().await;
    }
}
