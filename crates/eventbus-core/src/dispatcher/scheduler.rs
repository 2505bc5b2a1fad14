//! The key-ordered scheduler: per-aggregate FIFO lanes inside one bounded buffer, served by
//! a fixed pool of workers.
//!
//! - A job joins the lane of its key. A lane is *ready* when it has jobs and no worker is on
//!   it; ready lanes wait in one FIFO.
//! - A worker takes the first job of the first ready lane and owns that lane until the job is
//!   finished ([`KeyedScheduler::finish`]); then the lane goes to the back of the ready FIFO
//!   if it has more jobs. So one key's jobs run strictly one after another, in the order they
//!   were pushed, and different keys run concurrently: a slow, retrying or blocked key holds
//!   one worker and nothing else (no head-of-line blocking, as in Confluent's Parallel
//!   Consumer's key ordering or Pulsar's Key_Shared).
//! - Fairness: a lane gets one job per turn, so a hot key cannot starve the others.
//! - Bounded: at most `capacity` jobs are buffered or running; `push` waits for room
//!   (backpressure up to the fetcher). Lanes exist only for keys with a job buffered or
//!   running, so the map is bounded by `capacity` too.
//!
//! Keys are 64-bit hashes of (subscription, aggregate id) under a per-scheduler random seed:
//! two aggregates colliding (probability about n²/2⁶⁵) would share a lane, which keeps both
//! orders and only serialises the two.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore};

use super::prehashed::PassThrough;

/// Recycled lane queues kept at most (spares avoid an allocation per new lane).
const MAX_SPARE_LANES: usize = 1024;

/// Jobs a worker runs from one lane in a row before the lane goes to the back of the ready
/// FIFO. A burst of one key is then handled back to back (its latency is not multiplied by
/// the number of ready lanes), and a hot key still delays any other by at most this many jobs.
pub(crate) const LANE_QUANTUM: u32 = 16;

/// A scheduled job's key: see the module docs.
pub(crate) type LaneKey = u64;

struct Lane<J> {
    jobs: VecDeque<J>,
    /// A worker holds this lane's first job.
    busy: bool,
    /// Jobs run in a row in the current turn.
    streak: u32,
}

struct State<J> {
    lanes: HashMap<LaneKey, Lane<J>, BuildHasherDefault<PassThrough>>,
    ready: VecDeque<LaneKey>,
    spare: Vec<VecDeque<J>>,
    /// Jobs buffered, not yet taken by a worker.
    queued: usize,
    closed: bool,
}

impl<J> State<J> {
    /// Drops lane `key`, keeping its (empty) queue for a later lane while spares are few.
    fn remove_lane(&mut self, key: LaneKey) {
        if let Some(lane) = self.lanes.remove(&key) {
            if self.spare.len() < MAX_SPARE_LANES {
                self.spare.push(lane.jobs);
            }
        }
    }
}

/// See the module docs.
pub(crate) struct KeyedScheduler<J> {
    state: Mutex<State<J>>,
    /// Wakes idle workers.
    work: Notify,
    /// Room in the buffer: one permit per job buffered or running.
    room: Semaphore,
    seed: RandomState,
}

impl<J> KeyedScheduler<J> {
    /// A scheduler holding at most `capacity` jobs (buffered or running).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                lanes: HashMap::default(),
                ready: VecDeque::new(),
                spare: Vec::new(),
                queued: 0,
                closed: false,
            }),
            work: Notify::new(),
            room: Semaphore::new(capacity.max(1)),
            seed: RandomState::new(),
        }
    }

    /// The lane key of aggregate `key` in subscription `route`.
    pub(crate) fn key_of(&self, route: u64, key: &[u8]) -> LaneKey {
        let mut h = self.seed.build_hasher();
        h.write_u64(route);
        h.write(key);
        h.finish()
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        // No code under this lock can panic; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers `job` in lane `key`, waiting while the buffer is full. Gives the job back
    /// when the scheduler is closed.
    #[cfg(test)]
    pub(crate) async fn push(&self, key: LaneKey, job: J) -> Result<(), J> {
        if !self.reserve().await {
            return Err(job);
        }
        self.push_reserved(key, job)
    }

    /// Takes room for one job if there is some now; then [`Self::push_reserved`] must follow.
    pub(crate) fn try_reserve(&self) -> bool {
        match self.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for room for one job (false: the scheduler is closed); then
    /// [`Self::push_reserved`] must follow. Cancelling the wait takes no room.
    pub(crate) async fn reserve(&self) -> bool {
        match self.room.acquire().await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Buffers `job` in lane `key` in the room reserved for it. Gives the job back (and the
    /// room) when the scheduler is closed.
    pub(crate) fn push_reserved(&self, key: LaneKey, job: J) -> Result<(), J> {
        let mut st = self.lock();
        if st.closed {
            drop(st);
            self.room.add_permits(1);
            return Err(job);
        }
        let state = &mut *st;
        let lane = state.lanes.entry(key).or_insert_with(|| Lane {
            jobs: state.spare.pop().unwrap_or_default(),
            busy: false,
            streak: 0,
        });
        lane.jobs.push_back(job);
        let wake = !lane.busy && lane.jobs.len() == 1;
        if wake {
            state.ready.push_back(key);
        }
        state.queued += 1;
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// The next job of a ready lane; the caller owns that lane until [`Self::finish`].
    /// `None` once the scheduler is closed and no lane is ready.
    pub(crate) async fn next(&self) -> Option<(LaneKey, J)> {
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(taken) = Self::take(&mut st) {
                    return Some(taken);
                }
                if st.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Ends the job taken from lane `key` and takes the next ready job in the same critical
    /// section (one lock per job on a busy scheduler).
    pub(crate) fn finish_and_take(&self, key: LaneKey) -> Option<(LaneKey, J)> {
        let mut st = self.lock();
        // The same lane again while its turn lasts.
        let state = &mut *st;
        if let Some(lane) = state.lanes.get_mut(&key) {
            if lane.streak + 1 < LANE_QUANTUM {
                if let Some(job) = lane.jobs.pop_front() {
                    lane.streak += 1;
                    state.queued -= 1;
                    drop(st);
                    self.room.add_permits(1);
                    return Some((key, job));
                }
            }
        }
        let woke_other = Self::release(&mut st, key);
        let next = Self::take(&mut st);
        let more = !st.ready.is_empty();
        drop(st);
        self.room.add_permits(1);
        if woke_other && more {
            self.work.notify_one();
        }
        next
    }

    /// Ends the job taken from lane `key`.
    #[cfg(test)]
    pub(crate) fn finish(&self, key: LaneKey) {
        let mut st = self.lock();
        let woke = Self::release(&mut st, key);
        drop(st);
        self.room.add_permits(1);
        if woke {
            self.work.notify_one();
        }
    }

    fn take(st: &mut State<J>) -> Option<(LaneKey, J)> {
        while let Some(key) = st.ready.pop_front() {
            // A key may be stale (its lane was emptied by `drain_idle` or `remove_where` and
            // made again): a lane that is gone or already taken is skipped.
            let Some(lane) = st.lanes.get_mut(&key).filter(|l| !l.busy) else {
                continue;
            };
            if let Some(job) = lane.jobs.pop_front() {
                lane.busy = true;
                st.queued -= 1;
                return Some((key, job));
            }
        }
        None
    }

    /// Frees lane `key`; true when it became ready again.
    fn release(st: &mut State<J>, key: LaneKey) -> bool {
        let Some(lane) = st.lanes.get_mut(&key) else {
            return false;
        };
        lane.busy = false;
        lane.streak = 0;
        if lane.jobs.is_empty() {
            st.remove_lane(key);
            false
        } else {
            st.ready.push_back(key);
            true
        }
    }

    /// Removes and returns, in lane order, the jobs of every lane no worker is on whose jobs
    /// match `pred`. Lanes with a running job keep theirs: handing back what follows a job
    /// before that job is settled would let another consumer overtake it.
    pub(crate) fn drain_idle(&self, pred: impl Fn(&J) -> bool) -> Vec<J> {
        let mut st = self.lock();
        let state = &mut *st;
        let keys: Vec<LaneKey> = state
            .lanes
            .iter()
            .filter(|(_, l)| !l.busy && l.jobs.front().is_some_and(&pred))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for k in keys {
            if let Some(lane) = state.lanes.get_mut(&k) {
                out.extend(lane.jobs.drain(..));
            }
            state.remove_lane(k);
        }
        state.queued -= out.len();
        drop(st);
        self.room.add_permits(out.len());
        out
    }

    /// Removes and returns every buffered job (not yet taken by a worker) matching `pred`,
    /// whatever its lane: for jobs that must never start (their partition was lost), so
    /// order behind a running job does not matter.
    pub(crate) fn remove_where(&self, pred: impl Fn(&J) -> bool) -> Vec<J> {
        let mut st = self.lock();
        let state = &mut *st;
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (key, lane) in state.lanes.iter_mut() {
            if !lane.jobs.iter().any(&pred) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(lane.jobs.len());
            for job in lane.jobs.drain(..) {
                if pred(&job) {
                    out.push(job);
                } else {
                    kept.push_back(job);
                }
            }
            lane.jobs = kept;
            if lane.jobs.is_empty() && !lane.busy {
                emptied.push(*key);
            }
        }
        for key in emptied {
            state.remove_lane(key);
        }
        state.queued -= out.len();
        drop(st);
        self.room.add_permits(out.len());
        out
    }

    /// Accepts nothing more; workers take what is buffered, then [`Self::next`] returns
    /// `None`. Pushes waiting for room get their job back.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.room.close();
        self.work.notify_waiters();
    }

    /// Jobs buffered and not yet taken.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Lanes alive (buffered or running keys): bounded by the capacity.
    #[cfg(test)]
    pub(crate) fn lanes(&self) -> usize {
        self.lock().lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::sync::Arc;

    #[tokio::test]
    async fn one_key_runs_in_order_and_other_keys_pass_a_busy_one() {
        let s = KeyedScheduler::new(16);
        let (a, b) = (s.key_of(1, b"a"), s.key_of(1, b"b"));
        s.push(a, "a1").await.expect("push");
        s.push(a, "a2").await.expect("push");
        s.push(b, "b1").await.expect("push");
        let (k1, j1) = s.next().await.expect("job");
        assert_eq!((k1, j1), (a, "a1"));
        // a is busy: its second job waits, b's goes first.
        let (k2, j2) = s.next().await.expect("job");
        assert_eq!((k2, j2), (b, "b1"));
        assert_eq!(s.queued(), 1);
        s.finish(b);
        let next = s.finish_and_take(a);
        assert_eq!(next, Some((a, "a2")));
        s.finish(a);
        assert_eq!(s.lanes(), 0, "finished lanes are removed");
    }

    #[tokio::test]
    async fn ready_lanes_take_turns() {
        let q = LANE_QUANTUM as usize;
        let s = KeyedScheduler::new(4 * q);
        let (hot, cold) = (s.key_of(1, b"hot"), s.key_of(1, b"cold"));
        for j in 0..2 * q {
            s.push(hot, j).await.expect("push");
        }
        s.push(cold, 1000).await.expect("push");
        let (k, j) = s.next().await.expect("job");
        assert_eq!((k, j), (hot, 0));
        // One turn: the hot lane's burst runs back to back...
        for want in 1..q {
            assert_eq!(s.finish_and_take(hot), Some((hot, want)));
        }
        // ...then it goes to the back and the cold lane is next, then the hot one again.
        assert_eq!(s.finish_and_take(hot), Some((cold, 1000)));
        assert_eq!(s.finish_and_take(cold), Some((hot, q)));
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_and_close_returns_waiting_jobs() {
        let s = Arc::new(KeyedScheduler::new(2));
        let k = s.key_of(1, b"k");
        s.push(k, 1).await.expect("push");
        s.push(k, 2).await.expect("push");
        let s2 = s.clone();
        let blocked = tokio::spawn(async move { s2.push(k, 3).await });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "a third job must wait for room");
        s.close();
        assert_eq!(blocked.await.expect("task"), Err(3));
        // What was buffered is still handed out, then `next` ends.
        assert_eq!(s.next().await.map(|(_, j)| j), Some(1));
        assert_eq!(s.finish_and_take(k).map(|(_, j)| j), Some(2));
        s.finish(k);
        assert_eq!(s.next().await, None);
    }

    #[tokio::test]
    async fn drain_takes_idle_lanes_only() {
        let s = KeyedScheduler::new(16);
        let (a, b) = (s.key_of(1, b"a"), s.key_of(1, b"b"));
        s.push(a, "a1").await.expect("push");
        s.push(a, "a2").await.expect("push");
        s.push(b, "b1").await.expect("push");
        s.push(b, "b2").await.expect("push");
        let (k, j) = s.next().await.expect("job");
        assert_eq!((k, j), (a, "a1"));
        // a is running: a2 must stay behind it; b is idle: handed back whole, in order.
        assert_eq!(s.drain_idle(|_| true), vec!["b1", "b2"]);
        assert_eq!(s.queued(), 1);
        assert_eq!(s.finish_and_take(a), Some((a, "a2")));
    }

    #[tokio::test]
    async fn removed_jobs_leave_no_lane_to_run_twice() {
        let s = KeyedScheduler::new(16);
        let (a, b) = (s.key_of(1, b"a"), s.key_of(1, b"b"));
        s.push(a, 1).await.expect("push");
        s.push(a, 2).await.expect("push");
        s.push(b, 10).await.expect("push");
        s.push(b, 11).await.expect("push");
        let (k, j) = s.next().await.expect("job");
        assert_eq!((k, j), (a, 1));
        // Lost: 2 (behind the running 1) and all of b, even though b's key is still ready.
        let mut removed = s.remove_where(|j| *j != 1);
        removed.sort_unstable();
        assert_eq!(removed, vec![2, 10, 11]);
        assert_eq!(s.queued(), 0);
        // b comes again: its stale ready entry must not hand out a job twice or out of order.
        s.push(b, 12).await.expect("push");
        s.push(b, 13).await.expect("push");
        let (k, j) = s.next().await.expect("job");
        assert_eq!((k, j), (b, 12));
        assert!(
            s.next().now_or_never().is_none(),
            "b is busy and a has nothing queued: nothing else is ready"
        );
        assert_eq!(s.finish_and_take(b), Some((b, 13)));
        assert_eq!(s.finish_and_take(b), None);
        assert_eq!(s.finish_and_take(a), None);
        assert_eq!(s.lanes(), 0);
    }

    #[test]
    fn keys_differ_by_subscription_and_aggregate() {
        let s: KeyedScheduler<()> = KeyedScheduler::new(1);
        assert_eq!(s.key_of(1, b"a"), s.key_of(1, b"a"));
        assert_ne!(s.key_of(1, b"a"), s.key_of(2, b"a"));
        assert_ne!(s.key_of(1, b"a"), s.key_of(1, b"b"));
    }
}
