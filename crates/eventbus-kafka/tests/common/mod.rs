//! Shared by the Kafka integration tests: the bootstrap address comes from the environment
//! (`scripts/test.sh` starts the broker and sets it). Missing or unreachable fails the test.

#![allow(dead_code)]

use std::time::Duration;

pub mod raw;

use eventbus_core::testkit::{Backend, StoredMessage};
use eventbus_core::{Bus, BusConfig, BusError};
use eventbus_kafka::{KafkaConfig, KafkaTransport};

pub fn brokers() -> String {
    std::env::var("EVENTBUS_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "EVENTBUS_KAFKA_BROKERS is not set. Run scripts/test.sh (it starts the Kafka-protocol \
             broker), or `scripts/kafka.sh start` and export what `scripts/kafka.sh env` prints."
        )
    })
}

/// Test settings: Tansu makes a group join wait about half the session timeout.
pub fn test_config(brokers: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(brokers);
    c.consumer.session_timeout = Duration::from_secs(6);
    c.consumer.commit_interval = Duration::from_millis(200);
    c.topic.partitions = 4;
    c
}

pub struct Kafka {
    pub config: KafkaConfig,
}

impl Backend for Kafka {
    type Transport = KafkaTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<KafkaTransport>, BusError> {
        let t = KafkaTransport::connect(self.config.clone()).await?;
        Bus::new(t, config)
    }

    fn supports_current_thread(&self) -> bool {
        false
    }

    async fn read_stored(&self, topic: &str, count: usize) -> Option<Vec<StoredMessage>> {
        let (broker, topic) = (self.config.brokers.clone(), topic.to_string());
        let partitions = self.config.topic.partitions;
        let read = move || raw::stored(&broker, &topic, partitions, count);
        Some(tokio::task::spawn_blocking(read).await.expect("raw read"))
    }
}

pub async fn backend() -> Kafka {
    Kafka {
        config: test_config(&brokers()),
    }
}
