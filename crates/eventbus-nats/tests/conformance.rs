//! The whole conformance kit against a real nats-server.

mod common;

use common::backend;

eventbus_core::conformance_tests!(backend);
