//! Kafka transport for eventbus.
