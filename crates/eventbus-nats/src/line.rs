//! Publish order per partition across lost ACKs.
//!
//! Publishes are pipelined: many are in flight before the first ACK comes back. When ACKs are
//! lost (a stream leader dies, the connection drops) the messages are republished with their
//! `Nats-Msg-Id`. Republished independently, each on its own backoff, they would be stored in
//! whatever order their timers fire, and publishes sent meanwhile would overtake them: an
//! aggregate's events stored out of order (seen on a 3-node cluster when the stream leader was
//! killed: thousands of inversions). A [`Line`] per partition prevents it:
//!
//! * every publish takes a ticket (its place in the partition's send order);
//! * a message whose ACK was lost republishes only once every earlier ticket of its partition
//!   is resolved (acknowledged, given up, or republished itself), one at a time, waiting for
//!   each ACK: republishes go in send order;
//! * while any message of the partition is being republished, new publishes to it wait, so
//!   nothing overtakes the republished ones.
//!
//! What a line cannot undo: a message sent *after* a lost one, before the loss was known, that
//! the broker stored (a leader elected between the two). The window is the ACK timeout; the
//! cluster test measures what remains.
//!
//! Cost on the normal path: one uncontended lock at send and one at the ACK; memory one flag
//! per message in flight (bounded by the in-flight window).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// One partition's send order.
#[derive(Default)]
pub(crate) struct Line {
    state: Mutex<LineState>,
    changed: Notify,
}

#[derive(Default)]
struct LineState {
    /// The lowest unresolved ticket (every ticket below is resolved).
    front: u64,
    /// The next ticket to hand out.
    next: u64,
    /// Whether each ticket from `front` on is resolved.
    resolved: VecDeque<bool>,
    /// Tickets being republished: new tickets wait while this is above zero.
    recovering: usize,
}

impl Line {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The lines of a topic's partitions.
pub(crate) type Lines = Arc<[Line]>;

/// New lines for `partitions` partitions.
pub(crate) fn lines(partitions: u16) -> Lines {
    (0..partitions).map(|_| Line::default()).collect()
}

/// A message's place in its partition's send order; resolved when dropped.
pub(crate) struct Ticket {
    lines: Lines,
    partition: usize,
    number: u64,
    recovering: bool,
}

impl Ticket {
    /// The next ticket of `partition`, waiting while a lost ACK of it is being republished.
    pub(crate) async fn take(lines: &Lines, partition: u16) -> Ticket {
        let index = usize::from(partition);
        let line = &lines[index];
        loop {
            // The normal path: one lock, no waiter registered.
            if let Some(t) = Self::try_take(lines, index) {
                return t;
            }
            let notified = line.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if line.lock().recovering == 0 {
                continue;
            }
            notified.await;
        }
    }

    fn try_take(lines: &Lines, index: usize) -> Option<Ticket> {
        let mut s = lines[index].lock();
        if s.recovering > 0 {
            return None;
        }
        let number = s.next;
        s.next += 1;
        s.resolved.push_back(false);
        Some(Ticket {
            lines: lines.clone(),
            partition: index,
            number,
            recovering: false,
        })
    }

    fn line(&self) -> &Line {
        &self.lines[self.partition]
    }

    /// This message's ACK was lost: from now until it is resolved, new publishes to its
    /// partition wait.
    pub(crate) fn start_recovery(&mut self) {
        if !self.recovering {
            self.recovering = true;
            self.line().lock().recovering += 1;
        }
    }

    /// Waits until every earlier ticket of the partition is resolved.
    pub(crate) async fn turn(&self) {
        let line = self.line();
        loop {
            let notified = line.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if line.lock().front == self.number {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let line = &self.lines[self.partition];
        let wake = {
            let mut s = line.lock();
            let index = (self.number - s.front) as usize;
            if let Some(r) = s.resolved.get_mut(index) {
                *r = true;
            }
            while s.resolved.front() == Some(&true) {
                s.resolved.pop_front();
                s.front += 1;
            }
            if self.recovering {
                s.recovering -= 1;
            }
            // Someone waits only while a recovery runs (or just ended).
            self.recovering || s.recovering > 0
        };
        if wake {
            line.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tickets_resolve_in_any_order_and_the_front_follows() {
        let l = lines(1);
        let a = Ticket::take(&l, 0).await;
        let b = Ticket::take(&l, 0).await;
        let c = Ticket::take(&l, 0).await;
        drop(b);
        assert_eq!(l[0].lock().front, 0);
        drop(a);
        assert_eq!(l[0].lock().front, 2);
        c.turn().await;
        drop(c);
        let s = l[0].lock();
        assert_eq!((s.front, s.next, s.resolved.len()), (3, 3, 0));
    }

    #[tokio::test]
    async fn a_recovery_holds_new_tickets_and_earlier_ones_go_first() {
        let l = lines(2);
        let first = Ticket::take(&l, 0).await;
        let mut lost = Ticket::take(&l, 0).await;
        lost.start_recovery();
        // Another partition is not held.
        drop(Ticket::take(&l, 1).await);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let waiter = {
            let l = l.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let t = Ticket::take(&l, 0).await;
                tx.send("new ticket").await.unwrap();
                drop(t);
            })
        };
        let turn = {
            let tx = tx.clone();
            tokio::spawn(async move {
                lost.turn().await;
                tx.send("lost one's turn").await.unwrap();
                drop(lost);
            })
        };
        tokio::task::yield_now().await;
        assert!(
            rx.try_recv().is_err(),
            "nothing moves before the first resolves"
        );
        drop(first);
        assert_eq!(rx.recv().await, Some("lost one's turn"));
        assert_eq!(rx.recv().await, Some("new ticket"));
        waiter.await.unwrap();
        turn.await.unwrap();
    }
}
