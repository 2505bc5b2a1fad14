//! The allocation budget per message, guarded in CI: a count, not a timing, so it cannot
//! flake with the machine's load. 10,000 envelopes over 100 aggregates go through a bus on
//! the memory backend — publish (encode, window, ACK, result), fetch, dispatch, handle, ack —
//! and every allocation of the process meanwhile (all threads) is counted. The budget only
//! goes down: a change that cuts allocations lowers it in the same commit, and one that
//! needs more says so (DESIGN.md §5; issue "per-message budget").

use eventbus_core::memory::MemoryTransport;
use eventbus_core::testkit::allocations_per_message;
use eventbus_core::{Bus, BusConfig};

/// Allocations per message allowed, end to end on the memory backend. Measured 2026-12-05:
/// 32.9–33.3 over 3 runs (`cargo nextest run -p eventbus-core --test alloc_budget
/// --no-capture`), then 30.9–31.2 with every header value in one buffer; the budget leaves
/// room for scheduling noise (batch sizes, wake-ups).
const BUDGET_PER_MESSAGE: f64 = 32.0;

#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Allocations and reallocations so far, by every thread of the process.
fn allocations() -> u64 {
    let s = GLOBAL.stats();
    (s.allocations + s.reallocations) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_message_stay_within_the_budget() {
    let bus = Bus::new(MemoryTransport::new(), BusConfig::default()).expect("bus");
    let per_message = allocations_per_message(&bus, "alloc-budget", allocations).await;
    println!(
        "allocations per message (publish + consume + ack, memory backend): {per_message:.1} (budget {BUDGET_PER_MESSAGE})"
    );
    bus.close().await.expect("close");
    assert!(
        per_message <= BUDGET_PER_MESSAGE,
        "{per_message:.1} allocations per message, over the budget of {BUDGET_PER_MESSAGE}"
    );
}
