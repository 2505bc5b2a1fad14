//! The offset commits of one subscription, on a thread of their own: a commit waits for the
//! group coordinator (up to librdkafka's `socket.timeout.ms` when it does not answer), and
//! the fetcher must go on fetching and handing out work meanwhile. Commits are synchronous
//! on that thread, so each one's result is known (rdkafka's `StreamConsumer` never serves
//! the queue where librdkafka reports an asynchronous commit's result), and they go out one
//! at a time, in order.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// See the module docs. `M` is one commit's points; the thread runs `commit` on each, in
/// the order sent.
pub(crate) struct Committer<M: Send + 'static> {
    /// At most one commit waits while another is being made.
    tx: Option<SyncSender<M>>,
    thread: Option<JoinHandle<()>>,
}

impl<M: Send + 'static> Committer<M> {
    /// Starts the thread; `commit` makes one commit and waits for the broker (and deals with
    /// its refusal).
    pub(crate) fn start(topic: &str, commit: impl Fn(M) + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<M>(1);
        let thread = std::thread::Builder::new()
            .name(format!("eventbus-commit-{}", short(topic)))
            .spawn(move || {
                for points in rx {
                    commit(points);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands `points` to the thread without waiting; gives them back when a commit is
    /// already waiting behind the one in progress (the caller makes them pending again).
    pub(crate) fn send(&self, points: M) -> Result<(), M> {
        let Some(tx) = &self.tx else {
            return Err(points);
        };
        tx.try_send(points).map_err(|e| match e {
            TrySendError::Full(p) | TrySendError::Disconnected(p) => p,
        })
    }

    /// Lets the thread finish the commits it has, then waits for it. Blocking: call it off
    /// the runtime (the subscription's close thread does).
    pub(crate) fn stop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<M: Send + 'static> Drop for Committer<M> {
    /// Not waited for: the thread ends after its current commit.
    fn drop(&mut self) {
        self.tx = None;
    }
}

/// A thread name stays short (Linux keeps 15 bytes).
fn short(topic: &str) -> String {
    topic.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn commits_go_out_in_order_one_waiting_at_most() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut c = Committer::start("t", move |n: u32| {
            s.lock().unwrap_or_else(|e| e.into_inner()).push(n);
        })
        .expect("thread");
        for n in 1..=3 {
            let mut m = n;
            // One waits at most: retry until the thread took the previous one.
            while let Err(back) = c.send(m) {
                m = back;
                std::thread::yield_now();
            }
        }
        c.stop();
        assert_eq!(
            *seen.lock().unwrap_or_else(|e| e.into_inner()),
            vec![1, 2, 3]
        );
        assert_eq!(c.send(4), Err(4), "stopped: nothing more is taken");
    }
}
