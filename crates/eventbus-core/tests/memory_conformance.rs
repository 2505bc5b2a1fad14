//! The conformance kit on the embedded memory backend.

use eventbus_core::memory::MemoryBroker;

async fn backend() -> MemoryBroker {
    MemoryBroker::new()
}

eventbus_core::conformance_tests!(backend);
