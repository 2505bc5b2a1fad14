//! The topic log: partitions with retention, and the duplicate window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::headers::Headers;
use crate::message::{BrokerPosition, OutgoingMessage};
use crate::partitioner::partition_for;
use crate::transport::Receipt;

use super::group::Group;

pub(super) struct Topic {
    pub(super) name: Arc<str>,
    pub(super) state: Mutex<TopicState>,
    /// Wakes fetchers when messages arrive, are nak'ed, or partitions change owner.
    pub(super) notify: Notify,
}

pub(super) struct Stored {
    pub(super) payload: Bytes,
    pub(super) headers: Arc<Headers>,
    pub(super) key: Option<Bytes>,
    pub(super) size: usize,
}

#[derive(Default)]
pub(super) struct Partition {
    pub(super) base: u64,
    pub(super) log: VecDeque<Stored>,
    pub(super) bytes: usize,
}

impl Partition {
    pub(super) fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }
}

#[derive(Default)]
pub(super) struct DuplicateWindow {
    pub(super) ids: HashMap<Arc<str>, BrokerPosition>,
    pub(super) order: VecDeque<(Instant, Arc<str>)>,
}

pub(super) struct TopicState {
    pub(super) partitions: Vec<Partition>,
    pub(super) groups: Vec<Group>,
    pub(super) group_index: HashMap<String, usize>,
    pub(super) dedup: DuplicateWindow,
    pub(super) round_robin: u32,
    pub(super) max_messages_per_partition: usize,
    pub(super) max_bytes_per_partition: usize,
    pub(super) duplicate_window: Duration,
    pub(super) max_duplicate_ids: usize,
}

impl TopicState {
    pub(super) fn append(&mut self, msg: OutgoingMessage) -> Receipt {
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
        let parts = u32::try_from(self.partitions.len())
            .unwrap_or(u32::MAX)
            .max(1);
        let p = match &msg.key {
            // As Kafka places keys: the same partition number on every backend.
            Some(k) => partition_for(k.as_bytes(), parts) as usize,
            None => {
                self.round_robin = self.round_robin.wrapping_add(1);
                (self.round_robin % parts) as usize
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
}
