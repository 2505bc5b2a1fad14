//! Codec and envelope micro-benchmarks: LZ4 encode/decode of varied JSON, envelope JSON.
#![allow(missing_docs)] // criterion_group!/criterion_main! generate undocumented functions

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventbus::{codec, Compression, Envelope, Headers};
use serde_json::json;

fn varied_json(bytes: usize) -> Bytes {
    let mut rows = Vec::new();
    let mut size = 0;
    let mut i = 0usize;
    while size < bytes {
        let sku = format!("SKU-{:06}", (i * 7919) % 1_000_000);
        size += sku.len() + 40;
        rows.push(json!({"sku": sku, "qty": i % 17, "price_cents": (i * 101) % 99_999}));
        i += 1;
    }
    Bytes::from(serde_json::to_vec(&json!({ "rows": rows })).unwrap_or_default())
}

fn lz4(c: &mut Criterion) {
    let mut group = c.benchmark_group("lz4");
    for size in [1024usize, 16 * 1024] {
        let plain = varied_json(size);
        group.throughput(Throughput::Bytes(plain.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &plain, |b, p| {
            b.iter(|| {
                let mut h = Headers::new();
                codec::encode(p.clone(), Compression::Lz4, 0, &mut h)
            })
        });
        let mut headers = Headers::new();
        let encoded = codec::encode(plain.clone(), Compression::Lz4, 0, &mut headers);
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, e| {
            b.iter(|| codec::decode(e, &headers, 1 << 20))
        });
    }
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    let e = Envelope::new(
        "order-42",
        "order.updated",
        7,
        json!({"total": 1299, "items": [1, 2, 3], "note": "leave at the door"}),
    )
    .with_trace_id("trace-abc");
    let bytes = e.to_json().unwrap_or_default();
    group.throughput(Throughput::Elements(1));
    group.bench_function("to_json", |b| b.iter(|| e.to_json()));
    group.bench_function("from_json", |b| b.iter(|| Envelope::from_json(&bytes)));
    group.bench_function("headers", |b| b.iter(|| e.headers()));
    group.finish();
}

criterion_group!(benches, lz4, envelope);
criterion_main!(benches);
