//! [`Recorder`]: collects what handlers saw and wakes the case waiting for it.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::kit_timeout;
use crate::{Envelope, HandlerError, Message};

/// Collects what handlers saw and wakes waiters.
pub struct Recorder<T> {
    items: Arc<(Mutex<Vec<T>>, Notify)>,
}

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self {
            items: self.items.clone(),
        }
    }
}

impl<T: Clone + Send + 'static> Default for Recorder<T> {
    fn default() -> Self {
        Self {
            items: Arc::new((Mutex::new(Vec::new()), Notify::new())),
        }
    }
}

impl<T: Clone + Send + 'static> Recorder<T> {
    /// Records one item.
    pub fn push(&self, item: T) {
        self.items
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.items.1.notify_waiters();
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Vec<T> {
        self.items
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `pred` holds for the recorded items; panics after the kit timeout.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[T]) -> bool) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + kit_timeout();
        loop {
            let notified = self.items.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let items = self.snapshot();
            if pred(&items) {
                return items;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let items = self.snapshot();
                if pred(&items) {
                    return items;
                }
                panic!(
                    "timed out after {:?} waiting for {what}: {} items recorded",
                    kit_timeout(),
                    items.len()
                );
            }
        }
    }

    /// Waits until at least `n` items are recorded.
    pub async fn wait_for(&self, n: usize, what: &str) -> Vec<T> {
        self.wait_until(what, |items| items.len() >= n).await
    }
}

impl Recorder<Message> {
    /// A handler that records every message.
    pub fn handler(
        &self,
    ) -> impl Fn(Message) -> futures_util::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
    {
        let r = self.clone();
        move |m: Message| {
            r.push(m);
            futures_util::future::ready(Ok(()))
        }
    }
}

impl Recorder<Envelope> {
    /// An envelope handler that records every envelope.
    pub fn envelope_handler(
        &self,
    ) -> impl Fn(Envelope) -> futures_util::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
    {
        let r = self.clone();
        move |e: Envelope| {
            r.push(e);
            futures_util::future::ready(Ok(()))
        }
    }
}
