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

mod group;
mod log;
mod transport;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::headers::Headers;

use log::{DuplicateWindow, Partition, Topic, TopicState};
pub use transport::{MemoryDelivery, MemorySubscription, MemoryTransport};

/// Memory broker limits.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Partitions per topic (default 16).
    pub partitions: u32,
    /// Messages kept per topic (default 1,000,000, as the NATS stream default).
    pub max_messages_per_topic: usize,
    /// Bytes kept per topic (default 1 GiB, as the NATS stream default).
    pub max_bytes_per_topic: usize,
    /// A republished `event_id` within this window is a duplicate (default 2 min).
    #[serde(deserialize_with = "crate::duration::deserialize")]
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
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
