//! Where a backend stores an aggregate's events: on the partition Kafka's Java client picks.

use serde_json::json;

use crate::partitioner::partition_for;
use crate::{Bus, Envelope, Transport};

/// Publishes one envelope for each of 40 aggregates to `topic` (with `partitions` partitions)
/// and returns those whose receipt names another partition than Kafka's Java client would
/// pick, as `(aggregate, stored, Java client's)`. Empty on a backend that places keys right.
pub async fn java_partition_mismatches<T: Transport>(
    bus: &Bus<T>,
    topic: &str,
    partitions: u32,
) -> Vec<(String, u32, u32)> {
    let mut mismatches = Vec::new();
    for a in 0..40 {
        let aggregate = format!("order-{a}");
        let e = Envelope::new(aggregate.as_str(), "t", 1, json!({}));
        let stored = bus
            .publish_envelope_and_wait(topic, &e)
            .await
            .expect("publish")
            .outcome
            .expect("acked")
            .position
            .and_then(|p| p.partition)
            .expect("a partition in the receipt");
        let java = partition_for(aggregate.as_bytes(), partitions);
        if stored != java {
            mismatches.push((aggregate, stored, java));
        }
    }
    mismatches
}
