//! The conformance kit through the facade's `EventBus` on NATS (feature `nats`): the same
//! application-facing type as the memory backend, chosen by configuration.

#![cfg(feature = "nats")]

use eventbus::{AnyTransport, BackendConfig, Bus, BusConfig, BusError};
use eventbus_core::testkit::Backend;

struct FacadeNats(String);

impl Backend for FacadeNats {
    type Transport = AnyTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<AnyTransport>, BusError> {
        eventbus::connect(BackendConfig::from_url(&self.0)?, config).await
    }
}

async fn backend() -> FacadeNats {
    FacadeNats(std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| {
        panic!("EVENTBUS_NATS_URL is not set: run scripts/test.sh, which starts nats-server")
    }))
}

eventbus_core::conformance_tests!(backend);
