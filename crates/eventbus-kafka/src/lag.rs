//! A consumer group's backlog: per partition, the end offset minus the group's committed
//! offset (the whole retained log for a group that never committed), read with a consumer
//! of that group that joins nothing.

use std::time::Duration;

use eventbus_core::{Lag, PartitionLag, TransportError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::transport::kafka_error;

/// `group`'s backlog on `topic` (blocking: run off the runtime's threads).
pub(crate) fn group_lag(
    config: &KafkaConfig,
    topic: &str,
    group: &str,
    timeout: Duration,
) -> Result<Lag, TransportError> {
    let mut cc = config.base();
    cc.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cc
        .create()
        .map_err(|e| kafka_error("lag: creating a consumer", &e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error("lag: metadata", &e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Lag::default());
    };
    if t.error().is_some() {
        // Unknown topic: nothing stored, nothing behind.
        return Ok(Lag::default());
    }
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| kafka_error("lag: committed offsets", &e))?;
    let mut out = Vec::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(|e| kafka_error("lag: watermarks", &e))?;
        let position = match committed.find_partition(topic, p.id()).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        out.push(PartitionLag {
            partition: u32::try_from(p.id()).unwrap_or_default(),
            pending: u64::try_from(high - position).unwrap_or(0),
            unacked: None,
        });
    }
    out.sort_by_key(|p| p.partition);
    Ok(Lag { partitions: out })
}
