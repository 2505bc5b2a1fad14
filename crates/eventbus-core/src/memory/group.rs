//! Consumer groups: partition ownership, drain before handover, in-flight and redelivery.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::message::{BrokerPosition, Message};
use crate::transport::{Lag, PartitionLag};

use super::log::{Partition, Topic, TopicState};
use super::transport::MemoryDelivery;

pub(super) struct GroupPartition {
    pub(super) owner: Option<u64>,
    pub(super) next: u64,
    /// offset → (member, delivery count)
    pub(super) in_flight: HashMap<u64, (u64, u32)>,
    /// offset → (due, delivery count so far)
    pub(super) redeliver: BTreeMap<u64, (Instant, u32)>,
}

pub(super) struct Group {
    pub(super) members: Vec<u64>,
    pub(super) parts: Vec<GroupPartition>,
}

impl Group {
    pub(super) fn desired_owner(&self, partition: usize) -> Option<u64> {
        if self.members.is_empty() {
            None
        } else {
            Some(self.members[partition % self.members.len()])
        }
    }

    /// Hands each partition to its desired owner once the current owner has nothing in flight
    /// from it. Returns true if any owner changed.
    pub(super) fn rebalance(&mut self) -> bool {
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

impl TopicState {
    /// `group`'s backlog: per partition, messages past its position plus those waiting for
    /// redelivery (pending) and those out for delivery (unacked); a group that never
    /// consumed has everything stored pending.
    pub(super) fn lag(&self, group: &str) -> Lag {
        let g = self.group_index.get(group).map(|i| &self.groups[*i]);
        let partitions = self
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (pending, unacked) = match g.and_then(|g| g.parts.get(i)) {
                    Some(gp) => (
                        p.end().saturating_sub(gp.next.max(p.base)) + gp.redeliver.len() as u64,
                        gp.in_flight.len() as u64,
                    ),
                    None => (p.end() - p.base, 0),
                };
                PartitionLag {
                    partition: i as u32,
                    pending,
                    unacked: Some(unacked),
                }
            })
            .collect();
        Lag { partitions }
    }

    /// The partitions `member` of `group` owns now.
    pub(super) fn owned(&self, group: usize, member: u64) -> Vec<u32> {
        self.groups.get(group).map_or_else(Vec::new, |g| {
            (0..g.parts.len())
                .filter(|p| g.parts[*p].owner == Some(member))
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
    }

    pub(super) fn join(&mut self, group: &str, member: u64) -> usize {
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

    pub(super) fn leave(&mut self, group: usize, member: u64) {
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
    pub(super) fn take(
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
    pub(super) fn settle(
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

pub(super) fn delivery(
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
