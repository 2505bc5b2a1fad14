//! A consumer group's backlog: per partition, its durable consumer's pending and
//! unacknowledged counts; partitions without a consumer yet count every stored message.

use std::collections::HashMap;

use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use eventbus_core::{Lag, PartitionLag, TransportError};
use futures_util::StreamExt;

use crate::naming::{consumer_epoch, partition_subject, stream_subjects, PARTITIONS_METADATA};
use crate::transport::NatsTransport;

fn unavailable(what: String) -> TransportError {
    TransportError::Unavailable(what.into())
}

/// Longest list of per-subject counts read (a topic has at most `u16::MAX` partitions).
const MAX_SUBJECTS: usize = u16::MAX as usize;

impl NatsTransport {
    /// `group`'s backlog on `topic`; an empty one when the topic has no stream yet.
    pub(crate) async fn group_lag(&self, topic: &str, group: &str) -> Result<Lag, TransportError> {
        let js = self.jetstream()?;
        let name = self.stream_name(topic);
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.code() == 404) => {
                return Ok(Lag::default())
            }
            Err(e) => return Err(unavailable(format!("stream {name}: {e}"))),
        };
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable(format!("stream {name}: {e}")))?;
        let partitions: u16 = info
            .config
            .metadata
            .get(PARTITIONS_METADATA)
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        // Each partition's current consumer: the one of the newest ownership epoch.
        let mut current: HashMap<u16, (u64, String)> = HashMap::new();
        let mut names = stream.consumer_names();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| unavailable(format!("consumers of {topic}: {e}")))?;
            // Not every name is a group's: a partition number is tried only where it parses.
            let Some((p, epoch)) = partition_of(&name, group)
                .and_then(|p| consumer_epoch(&name, group, p).map(|e| (p, e)))
            else {
                continue;
            };
            if current.get(&p).map_or(true, |(e, _)| epoch > *e) {
                current.insert(p, (epoch, name));
            }
        }
        let mut stored: Option<HashMap<String, usize>> = None;
        let mut out = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let info = match current.get(&p) {
                Some((_, consumer)) => match stream.consumer_info(consumer).await {
                    Ok(ci) => Some(ci),
                    // Replaced by a new owner's meanwhile: as if none yet.
                    Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
                    Err(e) => return Err(unavailable(format!("consumer {consumer}: {e}"))),
                },
                None => None,
            };
            let lag = match info {
                Some(ci) => PartitionLag {
                    partition: u32::from(p),
                    pending: ci.num_pending,
                    unacked: Some(ci.num_ack_pending as u64),
                },
                None => {
                    if stored.is_none() {
                        stored = Some(subject_counts(&stream, topic).await?);
                    }
                    let n = stored
                        .as_ref()
                        .and_then(|s| s.get(&partition_subject(topic, p)).copied())
                        .unwrap_or(0);
                    PartitionLag {
                        partition: u32::from(p),
                        pending: n as u64,
                        unacked: Some(0),
                    }
                }
            };
            out.push(lag);
        }
        Ok(Lag { partitions: out })
    }
}

/// Messages stored per partition subject of `topic`.
async fn subject_counts(
    stream: &async_nats::jetstream::stream::Stream,
    topic: &str,
) -> Result<HashMap<String, usize>, TransportError> {
    let mut counts = HashMap::new();
    let mut subjects = stream
        .info_with_subjects(stream_subjects(topic))
        .await
        .map_err(|e| unavailable(format!("subjects of {topic}: {e}")))?;
    while let Some(entry) = subjects.next().await {
        let (subject, n) = entry.map_err(|e| unavailable(format!("subjects of {topic}: {e}")))?;
        counts.insert(subject, n);
        if counts.len() >= MAX_SUBJECTS {
            break;
        }
    }
    Ok(counts)
}

/// The partition number in consumer name `name` of `group` (`<group>-p<n>[-e<epoch>]`).
fn partition_of(name: &str, group: &str) -> Option<u16> {
    let rest = name.strip_prefix(group)?.strip_prefix("-p")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
