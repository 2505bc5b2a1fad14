//! The conformance kit through the facade's `EventBus` on Kafka (feature `kafka`).

#![cfg(feature = "kafka")]

use std::time::Duration;

use eventbus::{AnyTransport, BackendConfig, Bus, BusConfig, BusError};
use eventbus_core::testkit::Backend;

struct FacadeKafka(String);

impl Backend for FacadeKafka {
    type Transport = AnyTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<AnyTransport>, BusError> {
        let mut kafka = eventbus::kafka::KafkaConfig::new(&self.0);
        // Tansu makes a group join wait about half the session timeout.
        kafka.consumer.session_timeout = Duration::from_secs(6);
        kafka.topic.partitions = 4;
        eventbus::connect(BackendConfig::Kafka(kafka), config).await
    }

    fn supports_current_thread(&self) -> bool {
        false
    }
}

async fn backend() -> FacadeKafka {
    FacadeKafka(std::env::var("EVENTBUS_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!("EVENTBUS_KAFKA_BROKERS is not set: run scripts/test.sh, which starts the broker")
    }))
}

eventbus_core::conformance_tests!(backend);
