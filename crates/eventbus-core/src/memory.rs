//! The embedded in-memory backend: a real broker inside the process, not a test double.
//!
//! - Topics are created on first use and split into partitions; a message's partition is
//!   `hash(aggregate id) % partitions` (keyless messages go round-robin).
//! - Messages are kept for the life of the [`MemoryBroker`], up to the retention limits (the
//!   oldest are dropped first, like a JetStream limits stream). A new consumer group starts
//!   at the oldest retained message.
//! - Consumer groups: every group gets every message; inside a group each partition is owned
//!   by one member at a time, so an aggregate's messages are handled in order even with
//!   several bus instances in one group. A partition changes owner only once the previous
//!   owner has settled everything it fetched from it (drain before handover).
//! - Nak'ed and unsettled deliveries (dropped, or of a member that left) are redelivered.
//! - A republished `event_id` inside the duplicate window is reported as a duplicate and not
//!   stored again.
//!
//! Several buses share one broker (as several services share one NATS server) by building
//! their transports from the same [`MemoryBroker`]:
//!
//! ```
//! use eventbus_core::memory::MemoryBroker;
//! let broker = MemoryBroker::new();
//! let (a, b) = (broker.transport(), broker.transport());
//! # drop((a, b));
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::dispatcher::stable_hash;
use crate::error::TransportError;
use crate::headers::Headers;
use crate::message::{BrokerPosition, Message, OutgoingMessage};
use crate::transport::{
    Capabilities, ConnectionState, Delivery, Health, Receipt, Subscription, SubscriptionSpec,
    Transport,
};

/// Memory broker limits.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Partitions per topic (default 16).
    pub partitions: u32,
    /// Messages kept per topic (default 1,000,000, as the NATS stream default).
    pub max_messages_per_topic: usize,
    /// Bytes kept per topic (default 1 GiB, as the NATS stream default).
    pub max_bytes_per_topic: usize,
    /// A republished `event_id` within this window is a duplicate (default 2 min).
    pub duplicate_window: Duration,
    /// Event ids remembered per topic for duplicate detection at most (default 100,000).
    pub max_duplicate_ids: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            max_messages_per_topic: 1_000_000,
            max_bytes_per_topic: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            max_duplicate_ids: 100_000,
        }
    }
}

/// An in-process broker shared by the transports made from it.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<BrokerState>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct BrokerState {
    config: MemoryConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    next_member: AtomicU64,
}

impl MemoryBroker {
    /// A broker with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker with `config` (partitions are at least 1).
    pub fn with_config(mut config: MemoryConfig) -> Self {
        config.partitions = config.partitions.max(1);
        Self {
            state: Arc::new(BrokerState {
                config,
                ..BrokerState::default()
            }),
        }
    }

    /// A new client connection to this broker.
    pub fn transport(&self) -> MemoryTransport {
        MemoryTransport {
            broker: self.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Messages currently stored in `topic`.
    pub fn stored(&self, topic: &str) -> usize {
        let topics = lock(&self.state.topics);
        topics
            .get(topic)
            .map(|t| lock(&t.state).partitions.iter().map(|p| p.log.len()).sum())
            .unwrap_or(0)
    }

    /// The messages stored in `topic`, partition by partition, as the broker holds them
    /// (payloads still compressed when the publisher compressed them): for inspection.
    pub fn messages(&self, topic: &str) -> Vec<(Headers, Bytes)> {
        let topics = lock(&self.state.topics);
        let Some(t) = topics.get(topic) else {
            return Vec::new();
        };
        let state = lock(&t.state);
        state
            .partitions
            .iter()
            .flat_map(|p| p.log.iter())
            .map(|s| (Headers::clone(&s.headers), s.payload.clone()))
            .collect()
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = lock(&self.state.topics);
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        let cfg = &self.state.config;
        let parts = cfg.partitions.max(1);
        let t = Arc::new(Topic {
            name: Arc::from(name),
            notify: Notify::new(),
            state: Mutex::new(TopicState {
                partitions: (0..parts).map(|_| Partition::default()).collect(),
                groups: Vec::new(),
                group_index: HashMap::new(),
                dedup: DuplicateWindow::default(),
                round_robin: 0,
                max_messages_per_partition: (cfg.max_messages_per_topic / parts as usize).max(1),
                max_bytes_per_partition: (cfg.max_bytes_per_topic / parts as usize).max(1),
                duplicate_window: cfg.duplicate_window,
                max_duplicate_ids: cfg.max_duplicate_ids,
            }),
        });
        topics.insert(name.to_string(), t.clone());
        t
    }
}

/// Poisoning only follows a panic inside our own short critical sections; the data is still
/// consistent there, so carry on rather than cascade the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Topic {
    name: Arc<str>,
    state: Mutex<TopicState>,
    /// Wakes fetchers when messages arrive, are nak'ed, or partitions change owner.
    notify: Notify,
}

struct Stored {
    payload: Bytes,
    headers: Arc<Headers>,
    key: Option<Bytes>,
    size: usize,
}

#[derive(Default)]
struct Partition {
    base: u64,
    log: VecDeque<Stored>,
    bytes: usize,
}

impl Partition {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }
}

#[derive(Default)]
struct DuplicateWindow {
    ids: HashMap<Arc<str>, BrokerPosition>,
    order: VecDeque<(Instant, Arc<str>)>,
}

struct GroupPartition {
    owner: Option<u64>,
    next: u64,
    /// offset → (member, delivery count)
    in_flight: HashMap<u64, (u64, u32)>,
    /// offset → (due, delivery count so far)
    redeliver: BTreeMap<u64, (Instant, u32)>,
}

struct Group {
    members: Vec<u64>,
    parts: Vec<GroupPartition>,
}

impl Group {
    fn desired_owner(&self, partition: usize) -> Option<u64> {
        if self.members.is_empty() {
            None
        } else {
            Some(self.members[partition % self.members.len()])
        }
    }

    /// Hands each partition to its desired owner once the current owner has nothing in flight
    /// from it. Returns true if any owner changed.
    fn rebalance(&mut self) -> bool {
        let mut changed = false;
        for p in 0..self.parts.len() {
            let desired = self.desired_owner(p);
            let part = &mut self.parts[p];
            if part.owner == desired {
                continue;
            }
            let busy = part
                .owner
                .is_some_and(|o| part.in_flight.values().any(|(m, _)| *m == o));
            if !busy {
                part.owner = desired;
                changed = true;
            }
        }
        changed
    }
}

struct TopicState {
    partitions: Vec<Partition>,
    groups: Vec<Group>,
    group_index: HashMap<String, usize>,
    dedup: DuplicateWindow,
    round_robin: u32,
    max_messages_per_partition: usize,
    max_bytes_per_partition: usize,
    duplicate_window: Duration,
    max_duplicate_ids: usize,
}

impl TopicState {
    fn append(&mut self, msg: OutgoingMessage) -> Receipt {
        let now = Instant::now();
        while let Some((at, _)) = self.dedup.order.front() {
            if now.duration_since(*at) < self.duplicate_window
                && self.dedup.order.len() < self.max_duplicate_ids
            {
                break;
            }
            if let Some((_, id)) = self.dedup.order.pop_front() {
                self.dedup.ids.remove(&id);
            }
        }
        if let Some(pos) = self.dedup.ids.get(msg.event_id.as_str()) {
            return Receipt {
                position: Some(*pos),
                duplicate: true,
            };
        }
        let parts = self.partitions.len() as u64;
        let p = match &msg.key {
            Some(k) => (stable_hash(k.as_bytes()) % parts) as usize,
            None => {
                self.round_robin = self.round_robin.wrapping_add(1);
                (u64::from(self.round_robin) % parts) as usize
            }
        };
        let size = msg.payload.len() + msg.headers.wire_len();
        let partition = &mut self.partitions[p];
        let offset = partition.end();
        partition.log.push_back(Stored {
            payload: msg.payload,
            headers: Arc::new(msg.headers),
            key: msg.key.map(Bytes::from),
            size,
        });
        partition.bytes += size;
        while partition.log.len() > self.max_messages_per_partition
            || partition.bytes > self.max_bytes_per_partition
        {
            match partition.log.pop_front() {
                Some(old) => {
                    partition.bytes -= old.size;
                    partition.base += 1;
                }
                None => break,
            }
        }
        let position = BrokerPosition {
            partition: Some(p as u32),
            offset,
        };
        let id: Arc<str> = Arc::from(msg.event_id);
        self.dedup.ids.insert(id.clone(), position);
        self.dedup.order.push_back((now, id));
        Receipt {
            position: Some(position),
            duplicate: false,
        }
    }

    fn join(&mut self, group: &str, member: u64) -> usize {
        let idx = match self.group_index.get(group) {
            Some(i) => *i,
            None => {
                let parts = self
                    .partitions
                    .iter()
                    .map(|p| GroupPartition {
                        owner: None,
                        next: p.base,
                        in_flight: HashMap::new(),
                        redeliver: BTreeMap::new(),
                    })
                    .collect();
                self.groups.push(Group {
                    members: Vec::new(),
                    parts,
                });
                self.group_index
                    .insert(group.to_string(), self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        self.groups[idx].members.push(member);
        self.groups[idx].rebalance();
        idx
    }

    fn leave(&mut self, group: usize, member: u64) {
        let now = Instant::now();
        let g = &mut self.groups[group];
        g.members.retain(|m| *m != member);
        for part in &mut g.parts {
            let mine: Vec<u64> = part
                .in_flight
                .iter()
                .filter(|(_, (m, _))| *m == member)
                .map(|(o, _)| *o)
                .collect();
            for offset in mine {
                if let Some((_, count)) = part.in_flight.remove(&offset) {
                    part.redeliver.insert(offset, (now, count));
                }
            }
        }
        g.rebalance();
    }

    /// Takes up to `max` deliveries for `member`: due redeliveries first, then new messages,
    /// from the partitions it owns. Also returns the earliest future redelivery time.
    fn take(
        &mut self,
        topic: &Arc<Topic>,
        group: usize,
        member: u64,
        max: usize,
    ) -> (Vec<MemoryDelivery>, Option<Instant>) {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut next_due: Option<Instant> = None;
        let g = &mut self.groups[group];
        let n = g.parts.len();
        let start = (member as usize) % n.max(1);
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let p = (start + i) % n;
            if g.parts[p].owner != Some(member) || g.desired_owner(p) != Some(member) {
                continue;
            }
            let log = &self.partitions[p];
            let part = &mut g.parts[p];
            let due: Vec<u64> = part
                .redeliver
                .iter()
                .filter(|(_, (at, _))| *at <= now)
                .map(|(o, _)| *o)
                .take(max - out.len())
                .collect();
            for offset in due {
                let Some((_, count)) = part.redeliver.remove(&offset) else {
                    continue;
                };
                if offset < log.base {
                    // Dropped by retention before it could be redelivered.
                    continue;
                }
                part.in_flight.insert(offset, (member, count + 1));
                out.push(delivery(topic, log, group, member, p, offset, count + 1));
            }
            if let Some((at, _)) = part.redeliver.values().min_by_key(|(at, _)| *at) {
                next_due = Some(next_due.map_or(*at, |d| d.min(*at)));
            }
            part.next = part.next.max(log.base);
            while out.len() < max && part.next < log.end() {
                let offset = part.next;
                part.next += 1;
                part.in_flight.insert(offset, (member, 1));
                out.push(delivery(topic, log, group, member, p, offset, 1));
            }
        }
        (out, next_due)
    }

    /// Settles one delivery: `Some(due)` to redeliver at `due`, `None` for done.
    /// Returns true if fetchers should be woken.
    fn settle(
        &mut self,
        group: usize,
        member: u64,
        partition: usize,
        offset: u64,
        redeliver_at: Option<Instant>,
    ) -> bool {
        let g = &mut self.groups[group];
        let part = &mut g.parts[partition];
        let count = match part.in_flight.get(&offset) {
            Some((m, c)) if *m == member => *c,
            // Not ours any more (we left and it was handed back): a late ack still means done.
            _ => {
                if redeliver_at.is_none() {
                    part.redeliver.remove(&offset);
                }
                return false;
            }
        };
        part.in_flight.remove(&offset);
        if let Some(at) = redeliver_at {
            part.redeliver.insert(offset, (at, count));
        }
        let owner = part.owner;
        let handover = owner != g.desired_owner(partition);
        let changed = handover && g.rebalance();
        redeliver_at.is_some() || changed
    }
}

fn delivery(
    topic: &Arc<Topic>,
    log: &Partition,
    group: usize,
    member: u64,
    partition: usize,
    offset: u64,
    count: u32,
) -> MemoryDelivery {
    let stored = &log.log[(offset - log.base) as usize];
    MemoryDelivery {
        message: Message::new(
            topic.name.clone(),
            stored.payload.clone(),
            stored.headers.clone(),
            stored.key.clone(),
            Some(BrokerPosition {
                partition: Some(partition as u32),
                offset,
            }),
            count,
        ),
        topic: topic.clone(),
        group,
        member,
        partition,
        offset,
        settled: false,
    }
}

/// A client of a [`MemoryBroker`]. [`MemoryTransport::new`] makes one with a private broker.
pub struct MemoryTransport {
    broker: MemoryBroker,
    closed: Arc<AtomicBool>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A transport over its own new broker.
    pub fn new() -> Self {
        MemoryBroker::new().transport()
    }

    /// The broker this transport talks to.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

impl Transport for MemoryTransport {
    type Ack = Ready<Result<Receipt, TransportError>>;
    type Subscription = MemorySubscription;

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            partitioned_groups: true,
            native_compression: false,
            publish_dedup: true,
        }
    }

    async fn send(&self, message: OutgoingMessage) -> Result<Self::Ack, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let topic = self.broker.topic(&message.topic);
        let receipt = lock(&topic.state).append(message);
        if !receipt.duplicate {
            topic.notify.notify_waiters();
        }
        Ok(ready(Ok(receipt)))
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<Self::Subscription, TransportError> {
        // A broker's subscribe is a round trip: yield like one, so callers meet the same
        // interleavings (a close racing the subscribe) on every backend.
        tokio::task::yield_now().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let topic = self.broker.topic(&spec.topic);
        let member = self
            .broker
            .state
            .next_member
            .fetch_add(1, Ordering::Relaxed);
        let group = lock(&topic.state).join(&spec.group, member);
        topic.notify.notify_waiters();
        Ok(MemorySubscription {
            topic,
            group,
            member,
            left: false,
            transport_closed: self.closed.clone(),
        })
    }

    fn health(&self) -> Health {
        Health {
            backend: "memory",
            state: if self.closed.load(Ordering::Acquire) {
                ConnectionState::Closed
            } else {
                ConnectionState::Connected
            },
        }
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// One member of a consumer group.
pub struct MemorySubscription {
    topic: Arc<Topic>,
    group: usize,
    member: u64,
    left: bool,
    transport_closed: Arc<AtomicBool>,
}

impl MemorySubscription {
    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            lock(&self.topic.state).leave(self.group, self.member);
            self.topic.notify.notify_waiters();
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Subscription for MemorySubscription {
    type Delivery = MemoryDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<MemoryDelivery>, TransportError> {
        let deadline = Instant::now() + max_wait;
        loop {
            if self.left || self.transport_closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            let notified = self.topic.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next_due) =
                lock(&self.topic.state).take(&self.topic, self.group, self.member, max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(batch);
            }
            let wake = next_due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
        }
    }

    async fn close(mut self) -> Result<(), TransportError> {
        self.leave();
        Ok(())
    }
}

/// One delivered message. Dropped unsettled, it is redelivered.
pub struct MemoryDelivery {
    message: Message,
    topic: Arc<Topic>,
    group: usize,
    member: u64,
    partition: usize,
    offset: u64,
    settled: bool,
}

impl MemoryDelivery {
    fn settle(&mut self, redeliver_at: Option<Instant>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let wake = lock(&self.topic.state).settle(
            self.group,
            self.member,
            self.partition,
            self.offset,
            redeliver_at,
        );
        if wake {
            self.topic.notify.notify_waiters();
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        self.settle(Some(Instant::now()));
    }
}

impl Delivery for MemoryDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.settle(None);
        Ok(())
    }

    async fn nak(mut self, delay: Duration) -> Result<(), TransportError> {
        self.settle(Some(Instant::now() + delay));
        Ok(())
    }

    async fn term(mut self) -> Result<(), TransportError> {
        self.settle(None);
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        Ok(())
    }
}
