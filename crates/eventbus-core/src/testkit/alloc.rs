//! The allocation budget's measurement, shared by every backend's `tests/alloc_budget.rs`
//! (each test binary installs its own counting allocator and passes its counter in).

use super::*;

use tokio::sync::Notify;

/// Envelopes measured, after `ALLOC_WARMUP` not measured.
pub const ALLOC_MEASURED: usize = 10_000;
const ALLOC_WARMUP: usize = 1_000;
const ALLOC_AGGREGATES: usize = 100;

fn budget_envelopes(n: usize, from_version: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            Envelope::new(
                format!("agg-{}", i % ALLOC_AGGREGATES),
                "order.created",
                (from_version + i / ALLOC_AGGREGATES) as i64,
                json!({ "total": 42, "currency": "EUR" }),
            )
        })
        .collect()
}

async fn publish_and_wait<T: Transport>(
    bus: &Bus<T>,
    topic: &str,
    handled: &AtomicUsize,
    progress: &Notify,
    batch: &[Envelope],
) {
    let target = handled.load(Ordering::Acquire) + batch.len();
    for e in batch {
        bus.publish_envelope(topic, e).await.expect("publish");
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

/// Allocations per message, end to end (publish with its ACK and result, fetch, dispatch,
/// handle, ack), over [`ALLOC_MEASURED`] envelopes on 100 aggregates after a warm-up.
/// `allocations` reads the test binary's counter (every thread). The envelopes are built
/// before counting: what the application allocates for its events is not the bus's.
pub async fn allocations_per_message<T: Transport>(
    bus: &Bus<T>,
    topic: &str,
    allocations: fn() -> u64,
) -> f64 {
    let handled = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let (h, p) = (handled.clone(), progress.clone());
    bus.subscribe_envelope(topic, "alloc-budget", move |_e: Envelope| {
        let (h, p) = (h.clone(), p.clone());
        async move {
            h.fetch_add(1, Ordering::AcqRel);
            p.notify_waiters();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let warmup = budget_envelopes(ALLOC_WARMUP, 1);
    let measured = budget_envelopes(ALLOC_MEASURED, 1 + ALLOC_WARMUP / ALLOC_AGGREGATES);
    publish_and_wait(bus, topic, &handled, &progress, &warmup).await;
    let before = allocations();
    publish_and_wait(bus, topic, &handled, &progress, &measured).await;
    (allocations() - before) as f64 / ALLOC_MEASURED as f64
}
