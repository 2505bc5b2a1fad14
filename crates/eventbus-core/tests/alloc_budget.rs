//! The allocation budget per message, guarded in CI: a count, not a timing, so it cannot
//! flake with the machine's load. 10,000 envelopes over 100 aggregates go through a bus on
//! the memory backend — publish (encode, window, ACK, result), fetch, dispatch, handle, ack —
//! and every allocation of the process meanwhile (all threads) is counted. The budget only
//! goes down: a change that cuts allocations lowers it in the same commit, and one that
//! needs more says so (DESIGN.md §5; issue "per-message budget").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use eventbus_core::memory::MemoryTransport;
use eventbus_core::{Bus, BusConfig, Envelope, HandlerError};
use tokio::sync::Notify;

/// Allocations per message allowed, end to end on the memory backend. Measured 2026-12-05:
/// 32.9–33.3 over 3 runs (`cargo nextest run -p eventbus-core --test alloc_budget
/// --no-capture`), then 30.9–31.2 with every header value in one buffer; the budget leaves
/// room for scheduling noise (batch sizes, wake-ups).
const BUDGET_PER_MESSAGE: f64 = 32.0;

const WARMUP: usize = 1_000;
const MEASURED: usize = 10_000;
const AGGREGATES: usize = 100;

#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Allocations and reallocations so far, by every thread of the process.
fn allocations() -> u64 {
    let s = GLOBAL.stats();
    (s.allocations + s.reallocations) as u64
}

fn envelopes(n: usize, from_version: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            Envelope::new(
                format!("agg-{}", i % AGGREGATES),
                "order.created",
                (from_version + i / AGGREGATES) as i64,
                serde_json::json!({ "total": 42, "currency": "EUR" }),
            )
        })
        .collect()
}

async fn run(
    bus: &Bus<MemoryTransport>,
    handled: &AtomicUsize,
    progress: &Notify,
    batch: &[Envelope],
) {
    let target = handled.load(Ordering::Acquire) + batch.len();
    for e in batch {
        bus.publish_envelope("alloc-budget", e)
            .await
            .expect("publish");
    }
    loop {
        let notified = progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if handled.load(Ordering::Acquire) >= target {
            return;
        }
        notified.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_message_stay_within_the_budget() {
    let bus = Bus::new(MemoryTransport::new(), BusConfig::default()).expect("bus");
    let handled = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let (h, p) = (handled.clone(), progress.clone());
    bus.subscribe_envelope("alloc-budget", "g", move |_e: Envelope| {
        let (h, p) = (h.clone(), p.clone());
        async move {
            h.fetch_add(1, Ordering::AcqRel);
            p.notify_waiters();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    // Built before counting: what the application allocates for its events is not the bus's.
    let warmup = envelopes(WARMUP, 1);
    let measured = envelopes(MEASURED, 1 + WARMUP / AGGREGATES);
    run(&bus, &handled, &progress, &warmup).await;
    let before = allocations();
    run(&bus, &handled, &progress, &measured).await;
    let per_message = (allocations() - before) as f64 / MEASURED as f64;
    println!(
        "allocations per message (publish + consume + ack, memory backend): {per_message:.1} (budget {BUDGET_PER_MESSAGE})"
    );
    bus.close().await.expect("close");
    assert!(
        per_message <= BUDGET_PER_MESSAGE,
        "{per_message:.1} allocations per message, over the budget of {BUDGET_PER_MESSAGE}"
    );
}
