//! Reading a topic for `tail`, `dlq list` and `dlq replay`: a subscription whose handler
//! hands each message to the command and is acknowledged only once the command is done with
//! it, so stopping early (a `--count`, Ctrl-C, a failed replay) hands every message not done
//! back to the broker instead of acknowledging it unseen.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use eventbus::{BusError, EventBus, HandlerError, Message, SubscribeOptions, SubscriptionHandle};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Messages handed over but not yet done, at most.
const HANDED_OVER: usize = 64;

/// One message the command has to finish.
pub struct Item {
    /// The message.
    pub msg: Message,
    done: oneshot::Sender<()>,
}

impl Item {
    /// The command is done with it: it is acknowledged.
    pub fn done(self) {
        let _ = self.done.send(());
    }
}

/// Why reading ended.
pub enum Next {
    /// A message.
    Item(Item),
    /// No message for the idle time.
    Idle,
    /// The deadline passed.
    TimedOut,
    /// Ctrl-C.
    Interrupted,
}

/// A subscription read one message at a time.
pub struct Reader {
    rx: mpsc::Receiver<Item>,
    handle: SubscriptionHandle,
}

impl Reader {
    /// Subscribes to `topic` in `group`.
    pub async fn open(bus: &EventBus, topic: &str, group: &str) -> Result<Self, BusError> {
        let (tx, rx) = mpsc::channel::<Item>(HANDED_OVER);
        let options = SubscribeOptions::default();
        let handle = bus
            .subscribe_with(topic, group, options, move |msg: Message| {
                let tx = tx.clone();
                async move {
                    let (done, wait) = oneshot::channel();
                    tx.send(Item { msg, done })
                        .await
                        .map_err(|_| HandlerError::retryable("the command stopped reading"))?;
                    // Released without `done` only once the subscription is stopping: the
                    // error then hands the message back to the broker, no retry.
                    wait.await
                        .map_err(|_| HandlerError::retryable("the command stopped reading"))
                }
            })
            .await?;
        Ok(Self { rx, handle })
    }

    /// The next message, unless `idle` passes without one, `deadline` passes, or Ctrl-C.
    pub async fn next(&mut self, idle: Option<Duration>, deadline: Option<Instant>) -> Next {
        let idle_sleep = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let deadline_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = self.rx.recv() => match item {
                Some(item) => Next::Item(item),
                // The handler is gone only when the subscription ended.
                None => Next::Interrupted,
            },
            _ = idle_sleep => Next::Idle,
            _ = deadline_sleep => Next::TimedOut,
            _ = tokio::signal::ctrl_c() => Next::Interrupted,
        }
    }

    /// Stops the subscription first (messages not yet started go back to the broker), then
    /// releases the handlers waiting on the command — among them `unfinished`, an item the
    /// command took but could not finish — whose messages go back too. Releasing one before
    /// the stop would count as a failed attempt and be retried, or dead-lettered.
    pub async fn stop(self, unfinished: Option<Item>) {
        let Reader { rx, handle } = self;
        let mut unsubscribe = pin!(handle.unsubscribe());
        // Its first poll marks the subscription stopping before it waits for the handlers.
        let finished =
            std::future::poll_fn(|cx| Poll::Ready(unsubscribe.as_mut().poll(cx).is_ready())).await;
        drop(rx);
        drop(unfinished);
        if !finished {
            unsubscribe.await;
        }
    }
}
