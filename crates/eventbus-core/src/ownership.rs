//! Which partitions a subscription owns now: an epoch per partition, checked by the shared
//! dispatcher before it starts a job and between a job's retries.
//!
//! A consumer group hands partitions to one member at a time (Kafka's assignment, NATS's
//! leases). When a member loses one — a Kafka assignment *lost* after a session timeout, a
//! NATS lease lapsed while the instance was cut off or paused, or any revoke — another member
//! may already be handling the same aggregates from the partition's last committed position.
//! Work of that partition still queued in this member's dispatcher must then never start, or
//! two members handle one aggregate at once and a late retry may dead-letter an event the new
//! owner handled.
//!
//! A transport records ownership here and stamps every delivery with the
//! [`OwnershipToken`] of its partition's current epoch ([`crate::Delivery::owner`]):
//! - [`Ownership::claim`] starts a new epoch when the partition is taken (optionally with a
//!   deadline: a lease that lapses unless renewed, [`Ownership::extend`]);
//! - [`Ownership::lose`] ends the epoch at once and tells the dispatcher, which drops the
//!   partition's jobs not yet started, unsettled (the next owner gets them from the
//!   partition's ack floor or committed offset); [`Ownership::running`] then counts the
//!   jobs already under way, the only ones a revoke has to wait for.
//!
//! A token is current while its epoch is the partition's and its deadline (if any) has not
//! passed, so a member whose lease lapses stops starting work at the deadline even when the
//! code that renews leases is itself stuck. Checking one costs an atomic load (and a clock
//! read while a deadline is set); stamping one is an `Arc` clone — no allocation per message.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Deadline value meaning "none".
const NO_DEADLINE: u64 = u64::MAX;

/// Called when a partition is lost (see [`Ownership::on_lost`]).
type LostHook = Arc<dyn Fn() + Send + Sync>;

/// One partition's ownership state.
struct Slot {
    /// Odd while owned, even while not; bumped on every claim and every loss, so a token
    /// (always of an odd epoch) of another epoch is stale.
    epoch: AtomicU64,
    /// Nanoseconds after `origin` past which the current epoch is no longer owned
    /// (`NO_DEADLINE`: none).
    deadline: AtomicU64,
    origin: Instant,
    /// Jobs of this partition started and not yet settled.
    running: AtomicUsize,
}

impl Slot {
    fn current(&self, epoch: u64) -> bool {
        // Even epochs are "not owned": a token taken then is never current.
        if epoch % 2 == 0 || self.epoch.load(Ordering::SeqCst) != epoch {
            return false;
        }
        let deadline = self.deadline.load(Ordering::Acquire);
        deadline == NO_DEADLINE || nanos_since(self.origin, Instant::now()) < deadline
    }
}

/// A job of a partition is running (see [`OwnershipToken::begin`]); dropped when it was
/// settled.
#[derive(Debug)]
pub struct Running {
    slot: Arc<Slot>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.slot.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .field("running", &self.running.load(Ordering::Relaxed))
            .finish()
    }
}

fn nanos_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(NO_DEADLINE - 1)
}

/// The partitions one subscription owns, by epoch. Shared by the transport (which claims and
/// loses partitions) and its deliveries' tokens. See the module docs.
///
/// ```
/// use eventbus_core::ownership::Ownership;
/// let ownership = Ownership::new();
/// // A transport takes partition 3 and stamps what it fetches with the current token.
/// ownership.claim(3, None);
/// let token = ownership.token(3);
/// let job = token.begin().expect("owned: the job may start");
/// // The partition is lost (revoked, lease lapsed): nothing more of it starts.
/// ownership.lose(3);
/// assert!(token.begin().is_none());
/// // A revoke waits only for what is already running.
/// assert_eq!(ownership.running(3), 1);
/// drop(job);
/// assert_eq!(ownership.running(3), 0);
/// ```
pub struct Ownership {
    slots: Mutex<HashMap<u32, Arc<Slot>>>,
    origin: Instant,
    on_lost: Mutex<Option<LostHook>>,
}

impl fmt::Debug for Ownership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots = self.lock();
        let mut owned: Vec<u32> = slots.keys().copied().collect();
        owned.sort_unstable();
        f.debug_struct("Ownership")
            .field("partitions", &owned)
            .finish()
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            origin: Instant::now(),
            on_lost: Mutex::new(None),
        }
    }
}

/// Proof that a delivery's partition was owned under one epoch; [`Self::is_current`] tells
/// whether it still is.
#[derive(Clone)]
pub struct OwnershipToken {
    slot: Arc<Slot>,
    epoch: u64,
}

impl fmt::Debug for OwnershipToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnershipToken")
            .field("epoch", &self.epoch)
            .field("current", &self.is_current())
            .finish()
    }
}

impl OwnershipToken {
    /// The partition is still owned under this token's epoch and its deadline has not passed.
    pub fn is_current(&self) -> bool {
        self.slot.current(self.epoch)
    }

    /// A job of this delivery starts: counted as running (see [`Ownership::running`]) until
    /// the returned guard is dropped, or `None` when the partition is no longer owned under
    /// this epoch (the job must not start).
    ///
    /// Counted first, checked second, while [`Ownership::lose`] changes the epoch first and
    /// counts second: a job is either refused or counted by a loser that waits for running
    /// jobs, never neither.
    pub fn begin(&self) -> Option<Running> {
        self.slot.running.fetch_add(1, Ordering::SeqCst);
        let running = Running {
            slot: self.slot.clone(),
        };
        self.is_current().then_some(running)
    }

    /// The epoch this token was issued under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Ownership {
    /// Nothing owned yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Arc<Slot>>> {
        // Nothing under this lock panics; a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, partition: u32) -> Arc<Slot> {
        self.lock()
            .entry(partition)
            .or_insert_with(|| {
                Arc::new(Slot {
                    epoch: AtomicU64::new(0),
                    deadline: AtomicU64::new(NO_DEADLINE),
                    origin: self.origin,
                    running: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// `partition` is taken: a new epoch starts (tokens of earlier ones are stale), owned
    /// until [`Self::lose`] or, with `valid_until`, until then unless [`Self::extend`]ed.
    /// Returns the token deliveries of this epoch carry.
    pub fn claim(&self, partition: u32, valid_until: Option<Instant>) -> OwnershipToken {
        let slot = self.slot(partition);
        let deadline = valid_until.map_or(NO_DEADLINE, |t| nanos_since(self.origin, t));
        // The deadline first: a token of the new epoch never sees the old deadline.
        slot.deadline.store(deadline, Ordering::Release);
        // Claimed again while owned (a restart): skip to the next odd epoch.
        let mut epoch = 0;
        let _ = slot
            .epoch
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                epoch = if e % 2 == 0 { e + 1 } else { e + 2 };
                Some(epoch)
            });
        OwnershipToken { slot, epoch }
    }

    /// The lease of `token`'s epoch was renewed: owned until `valid_until`. No effect on a
    /// stale token (the partition was lost or taken again meanwhile).
    pub fn extend(&self, token: &OwnershipToken, valid_until: Instant) {
        if token.slot.epoch.load(Ordering::Acquire) == token.epoch {
            token
                .slot
                .deadline
                .store(nanos_since(self.origin, valid_until), Ordering::Release);
        }
    }

    /// `partition` is no longer owned, from now on: every token issued for it is stale, and
    /// the dispatcher drops the partition's jobs not yet started.
    pub fn lose(&self, partition: u32) {
        let slot = self.lock().get(&partition).cloned();
        if let Some(slot) = slot {
            let _ = slot
                .epoch
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                    (e % 2 == 1).then_some(e + 1)
                });
        }
        let hook = self
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook();
        }
    }

    /// The token of `partition`'s current epoch, for a delivery fetched now: stale from the
    /// start when the partition is not owned (a message the client fetched before it learnt
    /// of a revoke).
    pub fn token(&self, partition: u32) -> OwnershipToken {
        let slot = self.slot(partition);
        let epoch = slot.epoch.load(Ordering::SeqCst);
        OwnershipToken { epoch, slot }
    }

    /// Jobs of `partition` started and not yet settled, whatever their epoch: after
    /// [`Self::lose`], what a transport waits for before it gives the partition up (queued
    /// jobs never start, so they are not waited for).
    pub fn running(&self, partition: u32) -> usize {
        self.lock()
            .get(&partition)
            .map_or(0, |slot| slot.running.load(Ordering::SeqCst))
    }

    /// Runs `hook` each time a partition is lost (the bus drops the partition's queued jobs
    /// there). One hook; a later call replaces it.
    pub fn on_lost(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.on_lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(hook));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn a_lost_partition_makes_every_token_of_its_epoch_stale() {
        let o = Ownership::new();
        let a = o.claim(3, None);
        let other = o.claim(4, None);
        assert!(a.is_current());
        assert_eq!(o.token(3).epoch(), a.epoch());
        o.lose(3);
        assert!(!a.is_current(), "a job of a lost partition must not start");
        assert!(other.is_current(), "another partition is not affected");
        assert!(!o.token(3).is_current(), "fetched after the loss: stale");
        assert!(!o.token(9).is_current(), "never owned: stale");
        // Taken again: a new epoch; the old token stays stale.
        let again = o.claim(3, None);
        assert!(again.is_current() && !a.is_current());
        assert_ne!(again.epoch(), a.epoch());
    }

    #[test]
    fn a_lease_deadline_ends_ownership_unless_extended() {
        let o = Ownership::new();
        let now = Instant::now();
        let t = o.claim(0, Some(now + Duration::from_secs(60)));
        assert!(t.is_current());
        o.extend(&t, now - Duration::from_millis(1));
        assert!(
            !t.is_current(),
            "past its deadline the lease may be another's"
        );
        o.extend(&t, now + Duration::from_secs(60));
        assert!(t.is_current(), "renewed in time");
        // A renewal of a stale epoch changes nothing.
        let newer = o.claim(0, Some(now + Duration::from_secs(60)));
        o.extend(&t, now - Duration::from_millis(1));
        assert!(newer.is_current());
    }

    #[test]
    fn running_jobs_are_counted_and_a_stale_one_never_begins() {
        let o = Ownership::new();
        let t = o.claim(2, None);
        let job = t.begin().expect("owned: the job starts");
        assert_eq!(o.running(2), 1);
        o.lose(2);
        assert!(t.begin().is_none(), "lost: no job starts");
        assert_eq!(o.running(2), 1, "the refused one is not counted");
        drop(job);
        assert_eq!(o.running(2), 0);
    }

    #[test]
    fn losing_a_partition_runs_the_hook() {
        let o = Ownership::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        o.on_lost(move || {
            r.fetch_add(1, Ordering::Relaxed);
        });
        o.claim(1, None);
        o.lose(1);
        o.lose(7); // never owned: still tells (the hook only drops what is stale)
        assert_eq!(runs.load(Ordering::Relaxed), 2);
    }
}
