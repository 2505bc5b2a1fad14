//! The allocation budget per message through the NATS transport, guarded in CI: a count, not
//! a timing. 10,000 envelopes over 100 aggregates go through a bus on a real nats-server
//! (publish with its JetStream ACK, pull, dispatch, handle, ack), and every allocation of the
//! process meanwhile (all threads, async-nats's included) is counted. The budget only goes
//! down (DESIGN.md §5).

mod common;

use eventbus_core::testkit::{allocations_per_message, kit_config, unique, Backend};

/// Allocations per message allowed, end to end through nats-server. Measured 2026-12-05:
/// 106.4 in each of 3 runs (`cargo nextest run -p eventbus-nats --test alloc_budget
/// --no-capture`), then 99.4 with every header value in one buffer (the consumer's copy of
/// async-nats's headers: one allocation instead of one per value); the budget leaves room
/// for scheduling noise (pull batch sizes).
const BUDGET_PER_MESSAGE: f64 = 102.0;

#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Allocations and reallocations so far, by every thread of the process.
fn allocations() -> u64 {
    let s = GLOBAL.stats();
    (s.allocations + s.reallocations) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_message_stay_within_the_budget() {
    let bus = common::backend()
        .await
        .connect(kit_config())
        .await
        .expect("connect");
    let topic = unique("alloc-budget");
    let per_message = allocations_per_message(&bus, &topic, allocations).await;
    println!(
        "allocations per message (publish + consume + ack, NATS): {per_message:.1} (budget {BUDGET_PER_MESSAGE})"
    );
    bus.close().await.expect("close");
    assert!(
        per_message <= BUDGET_PER_MESSAGE,
        "{per_message:.1} allocations per message, over the budget of {BUDGET_PER_MESSAGE}"
    );
}
