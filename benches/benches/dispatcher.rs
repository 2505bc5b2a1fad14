//! Dispatcher micro-benchmark: messages through a memory bus, publish to handler, keyed
#![allow(missing_docs)] // criterion_group!/criterion_main! generate undocumented functions
//! (1,000 aggregates) and global (no aggregate). The memory transport is the cheapest there
//! is, so this measures the shared dispatcher and publish plumbing themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventbus::{BackendConfig, BusConfig, EventBus, HandlerError, Message, Publication};

const BATCH: usize = 10_000;

fn run_batch(
    rt: &tokio::runtime::Runtime,
    bus: &EventBus,
    topic: &str,
    seen: &AtomicUsize,
    keyed: bool,
) {
    rt.block_on(async {
        let target = seen.load(Ordering::Relaxed) + BATCH;
        for i in 0..BATCH {
            let mut p = Publication::new(topic, &b"{\"amount\":42}"[..]);
            if keyed {
                p = p.aggregate_id(format!("agg-{}", i % 1000));
            }
            if bus.send(p).await.is_err() {
                return;
            }
        }
        while seen.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    })
}

fn dispatcher(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let mut group = c.benchmark_group("dispatcher");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    for (name, keyed) in [("keyed_10k", true), ("global_10k", false)] {
        let seen = Arc::new(AtomicUsize::new(0));
        let bus = rt.block_on(async {
            let backend = BackendConfig::from_url("memory://").ok()?;
            let bus = eventbus::connect(backend, BusConfig::default())
                .await
                .ok()?;
            let s = seen.clone();
            bus.subscribe("bench", "g", move |_m: Message| {
                s.fetch_add(1, Ordering::Relaxed);
                async { Ok::<(), HandlerError>(()) }
            })
            .await
            .ok()?;
            Some(bus)
        });
        let Some(bus) = bus else { return };
        group.bench_function(name, |b| {
            b.iter(|| run_batch(&rt, &bus, "bench", &seen, keyed))
        });
        let _ = rt.block_on(bus.close());
    }
    group.finish();
}

criterion_group!(benches, dispatcher);
criterion_main!(benches);
