//! The whole conformance kit against a real Kafka-protocol broker (Tansu, see BROKERS.md).

mod common;

use common::backend;

eventbus_core::conformance_tests!(backend);
