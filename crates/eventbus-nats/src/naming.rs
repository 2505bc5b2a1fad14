//! Topic → subject, stream, consumer and bucket names.
//!
//! A topic is split into partitions: partition `n` of topic `orders` is the subject
//! `orders.n`, and the topic's stream captures `orders.*`. The core's topic rule makes every
//! topic a valid subject (no wildcards, no spaces, no empty tokens), and two topics never
//! overlap: `orders.*` and `orders.dlq.*` differ in their number of tokens, and a subject
//! `x.n` belongs to topic `x` alone. Each topic has its own stream,
//! `<prefix><topic with '.' → '_'>`, so each has its own limits and its own duplicate window
//! (a dead letter keeps its original `X-Event-ID` and is never taken for a duplicate of it).

/// The stream metadata key recording a topic's partition count.
pub(crate) const PARTITIONS_METADATA: &str = "eventbus.partitions";

/// The subject of `topic`'s partition `partition`.
pub(crate) fn partition_subject(topic: &str, partition: u16) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(topic.len() + 6);
    s.push_str(topic);
    // Writing a number into a String cannot fail.
    let _ = write!(s, ".{partition}");
    s
}

/// The subjects a topic's stream captures: every partition.
pub(crate) fn stream_subjects(topic: &str) -> String {
    format!("{topic}.*")
}

/// The stream holding `topic`.
pub(crate) fn stream_name(prefix: &str, topic: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + topic.len());
    s.push_str(prefix);
    s.extend(topic.chars().map(|c| if c == '.' { '_' } else { c }));
    s
}

/// The durable consumer of `group` on one partition for the ownership epoch `epoch`: the
/// revision of the lease write that proved the owner held the partition when it readied the
/// consumer. Every owner pulls (and acks) through a consumer of its own, so a stale owner can
/// never pull from or ack on its successor's.
pub(crate) fn consumer_name(group: &str, partition: u16, epoch: u64) -> String {
    format!("{group}-p{partition}-e{epoch}")
}

/// The epoch of `name` if it is a consumer of `group`'s `partition`: one of
/// [`consumer_name`], or the name consumers had before epochs (`<group>-p<n>`, epoch 0).
pub(crate) fn consumer_epoch(name: &str, group: &str, partition: u16) -> Option<u64> {
    let rest = name
        .strip_prefix(group)?
        .strip_prefix("-p")?
        .strip_prefix(partition.to_string().as_str())?;
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix("-e")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The key-value bucket where the groups of a stream keep membership and partition leases.
pub(crate) fn group_bucket(stream: &str) -> String {
    format!("{stream}_groups")
}

/// The membership key of `instance` in `group`.
pub(crate) fn member_key(group: &str, instance: &str) -> String {
    format!("{group}.m.{instance}")
}

/// The prefix of every membership key of `group`.
pub(crate) fn member_prefix(group: &str) -> String {
    format!("{group}.m.")
}

/// The lease key of `partition` in `group`.
pub(crate) fn lease_key(group: &str, partition: u16) -> String {
    format!("{group}.l.{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_of_a_partition_are_told_apart_from_others() {
        assert_eq!(consumer_epoch("svc-p3-e42", "svc", 3), Some(42));
        assert_eq!(
            consumer_epoch("svc-p3", "svc", 3),
            Some(0),
            "the name before epochs"
        );
        assert_eq!(
            consumer_epoch("svc-p31-e5", "svc", 3),
            None,
            "another partition"
        );
        assert_eq!(consumer_epoch("svc-p3-e", "svc", 3), None);
        assert_eq!(
            consumer_epoch("svc-p3-e1-p0-e5", "svc", 3),
            None,
            "group svc-p3-e1"
        );
        assert_eq!(consumer_epoch("svc-x-p3-e5", "svc", 3), None, "group svc-x");
        assert_eq!(consumer_epoch("svc-p3-e7", "svc-p3-e1", 0), None);
    }

    #[test]
    fn stream_names_have_no_dots() {
        assert_eq!(stream_name("EB_", "orders.created"), "EB_orders_created");
        assert_eq!(stream_name("", "a-b"), "a-b");
    }

    #[test]
    fn partitions_are_one_token_under_the_topic() {
        assert_eq!(partition_subject("orders.created", 7), "orders.created.7");
        assert_eq!(stream_subjects("orders.created"), "orders.created.*");
        assert_eq!(consumer_name("billing", 3, 42), "billing-p3-e42");
        assert_eq!(lease_key("billing", 3), "billing.l.3");
        assert!(member_key("billing", "i-1").starts_with(&member_prefix("billing")));
    }
}
