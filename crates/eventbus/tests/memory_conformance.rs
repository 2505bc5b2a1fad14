//! The conformance kit through the facade's `EventBus` (enum dispatch) on the memory backend.

use eventbus::{AnyTransport, BackendConfig, Bus, BusConfig, BusError, MemoryBroker};
use eventbus_core::testkit::Backend;

struct Facade(MemoryBroker);

impl Backend for Facade {
    type Transport = AnyTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<AnyTransport>, BusError> {
        let t = AnyTransport::connect(BackendConfig::SharedMemory(self.0.clone())).await?;
        Bus::new(t, config)
    }
}

async fn backend() -> Facade {
    Facade(MemoryBroker::new())
}

eventbus_core::conformance_tests!(backend);
