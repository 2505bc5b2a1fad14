//! The offset commits of one subscription, on a thread of their own: a commit waits for the
//! group coordinator (up to librdkafka's `socket.timeout.ms` when it does not answer), and
//! the fetcher must go on fetching and handing out work meanwhile. Commits are synchronous
//! on that thread, so each one's result is known (rdkafka's `StreamConsumer` never serves
//! the queue where librdkafka reports an asynchronous commit's result), and they go out one
//! at a time, in order.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::TopicPartitionList;

/// See the module docs.
pub(crate) struct Committer {
    /// At most one list waits while another is being committed.
    tx: Option<SyncSender<TopicPartitionList>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the thread: `commit` sends one list and waits for the broker; `failed` is told
    /// of each list the broker refused (or never answered).
    pub(crate) fn start(
        topic: &str,
        commit: impl Fn(&TopicPartitionList) -> KafkaResult<()> + Send + 'static,
        failed: impl Fn(&TopicPartitionList, &KafkaError) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<TopicPartitionList>(1);
        let thread = std::thread::Builder::new()
            .name(format!("eventbus-commit-{}", short(topic)))
            .spawn(move || {
                for list in rx {
                    if let Err(e) = commit(&list) {
                        failed(&list, &e);
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands `list` to the thread without waiting; gives it back when a commit is already
    /// waiting behind the one in progress (the caller makes its points pending again).
    pub(crate) fn send(&self, list: TopicPartitionList) -> Result<(), TopicPartitionList> {
        let Some(tx) = &self.tx else {
            return Err(list);
        };
        tx.try_send(list).map_err(|e| match e {
            TrySendError::Full(l) | TrySendError::Disconnected(l) => l,
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

impl Drop for Committer {
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
    fn commits_go_out_in_order_and_refusals_are_reported() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let (s, r) = (seen.clone(), refused.clone());
        let mut c = Committer::start(
            "t",
            move |l| {
                let n = l.count();
                s.lock().unwrap_or_else(|e| e.into_inner()).push(n);
                if n == 2 {
                    Err(KafkaError::Canceled)
                } else {
                    Ok(())
                }
            },
            move |_, _| *r.lock().unwrap_or_else(|e| e.into_inner()) += 1,
        )
        .expect("thread");
        let list = |n: i32| {
            let mut l = TopicPartitionList::new();
            for p in 0..n {
                l.add_partition("t", p);
            }
            l
        };
        // Sent one at a time (the channel holds one): wait for room by retrying.
        for n in 1..=3 {
            let mut l = list(n);
            loop {
                match c.send(l) {
                    Ok(()) => break,
                    Err(back) => {
                        l = back;
                        std::thread::yield_now();
                    }
                }
            }
        }
        c.stop();
        assert_eq!(
            *seen.lock().unwrap_or_else(|e| e.into_inner()),
            vec![1, 2, 3]
        );
        assert_eq!(*refused.lock().unwrap_or_else(|e| e.into_inner()), 1);
        assert!(c.send(list(1)).is_err(), "stopped: nothing more is taken");
    }
}
