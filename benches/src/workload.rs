//! The seed's workload: levels, envelopes, payloads, and the consumer-side checker.

use eventbus::Envelope;
use serde_json::json;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};

use crate::latency::Latencies;

/// Topics the aggregates of a seed level are spread over.
pub const TOPICS: usize = 4;
/// Partitions per topic of a seed level: the bus's default on both brokers.
pub const PARTITIONS: i32 = 16;

/// What one run publishes: a seed level, or an OpenMessaging workload file's shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shape {
    /// The seed level, when it is one.
    pub level: Option<Level>,
    /// The level's or the workload's name.
    pub name: String,
    pub aggregates: usize,
    /// Events per aggregate.
    pub versions: usize,
    pub topics: usize,
    /// Partitions per topic (Kafka partitions, NATS partition subjects).
    pub partitions: i32,
    /// Payload size in bytes (`None`: the `--payload-bytes` knob).
    pub payload_bytes: Option<usize>,
}

impl Shape {
    pub fn level(level: Level) -> Self {
        Self {
            level: Some(level),
            name: level.name().to_string(),
            aggregates: level.aggregates(),
            versions: level.messages() / level.aggregates(),
            topics: TOPICS,
            partitions: PARTITIONS,
            payload_bytes: None,
        }
    }

    pub fn messages(&self) -> usize {
        self.aggregates * self.versions
    }
}

/// Pressure levels of the seed plus two scale levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Low,
    Medium,
    High,
    Extreme,
    #[value(name = "scale-100k")]
    #[serde(rename = "scale-100k")]
    Scale100k,
    #[value(name = "scale-1m")]
    #[serde(rename = "scale-1m")]
    Scale1m,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Low,
        Level::Medium,
        Level::High,
        Level::Extreme,
        Level::Scale100k,
        Level::Scale1m,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
            Level::Extreme => "extreme",
            Level::Scale100k => "scale-100k",
            Level::Scale1m => "scale-1m",
        }
    }

    pub fn messages(self) -> usize {
        match self {
            Level::Low => 500,
            Level::Medium => 2_000,
            Level::High => 5_000,
            Level::Extreme => 10_000,
            Level::Scale100k => 100_000,
            Level::Scale1m => 1_000_000,
        }
    }

    /// messages / 10, clamped to 50..1,000 (the seed's rule).
    pub fn aggregates(self) -> usize {
        (self.messages() / 10).clamp(50, 1_000)
    }
}

/// Payload content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// Realistic order JSON with varied values.
    Json,
    /// JSON carrying pseudo-random hex: LZ4 cannot shrink it.
    Incompressible,
}

/// A deterministic pseudo-random generator (xorshift): varied, reproducible payloads.
fn mix(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The payload of `agg`'s event `version`, about `bytes` long once serialised.
pub fn payload(kind: PayloadKind, bytes: usize, agg: usize, version: usize) -> serde_json::Value {
    match kind {
        PayloadKind::Json => {
            let mut items = Vec::new();
            let mut size = 40;
            let mut i = 0usize;
            while size < bytes {
                let sku = format!(
                    "SKU-{:06}",
                    (agg * 7919 + version * 104_729 + i * 31) % 1_000_000
                );
                size += sku.len() + 40;
                items.push(json!({"sku": sku, "qty": (i * 7 + version) % 17, "price_cents": (agg * 13 + i * 101) % 99_999}));
                i += 1;
            }
            json!({ "order": format!("order-{agg}"), "items": items })
        }
        PayloadKind::Incompressible => {
            let mut x = ((agg as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version as u64) | 1;
            let mut s = String::with_capacity(bytes);
            while s.len() < bytes {
                x = mix(x);
                s.push_str(&format!("{x:016x}"));
            }
            s.truncate(bytes);
            json!({ "order": format!("order-{agg}"), "blob": s })
        }
    }
}

/// Builds the envelope for one event.
pub fn envelope(kind: PayloadKind, bytes: usize, agg: usize, version: usize) -> Envelope {
    Envelope::new(
        format!("agg-{agg}"),
        "order.updated",
        version as i64,
        payload(kind, bytes, agg, version),
    )
}

/// Per-aggregate order, loss and duplicate accounting; lock-free except the latency histogram.
pub struct Checker {
    aggregates: usize,
    versions: usize,
    /// Last version seen per aggregate (empty when there is no order to check: one event per
    /// aggregate, or a raw baseline).
    last_version: Vec<AtomicI64>,
    seen: Vec<AtomicU8>,
    violations: AtomicU64,
    delivered: AtomicU64,
    check_order: bool,
    latencies: Latencies,
}

impl Checker {
    pub fn new(aggregates: usize, versions: usize, check_order: bool) -> Self {
        let track = check_order && versions > 1;
        Self {
            aggregates,
            versions,
            last_version: (0..if track { aggregates } else { 0 })
                .map(|_| AtomicI64::new(0))
                .collect(),
            seen: (0..aggregates * versions)
                .map(|_| AtomicU8::new(0))
                .collect(),
            violations: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            check_order,
            latencies: Latencies::new(),
        }
    }

    /// Records one handled envelope. `Err` for envelopes that are not part of the run
    /// (the warm-up message).
    pub fn check(&self, e: &Envelope) -> Result<(), &'static str> {
        let agg: usize = e
            .aggregate_id
            .strip_prefix("agg-")
            .and_then(|n| n.parse().ok())
            .filter(|a| *a < self.aggregates)
            .ok_or("foreign aggregate id")?;
        let v = e.event_version;
        if v < 1 || v as usize > self.versions {
            return Err("version out of range");
        }
        if let Some(last) = self.last_version.get(agg) {
            let prev = last.swap(v, Ordering::AcqRel);
            if v != prev + 1 {
                self.violations.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.seen[agg * self.versions + (v as usize - 1)].fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let latency = (chrono::Utc::now() - e.timestamp)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .max(0) as u64;
        self.latencies.record_us(latency);
        Ok(())
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn violations(&self) -> Option<u64> {
        self.check_order
            .then(|| self.violations.load(Ordering::Relaxed))
    }

    /// (lost, duplicates)
    pub fn losses(&self) -> (u64, u64) {
        let (mut lost, mut dup) = (0, 0);
        for s in &self.seen {
            match s.load(Ordering::Relaxed) {
                0 => lost += 1,
                1 => {}
                n => dup += u64::from(n - 1),
            }
        }
        (lost, dup)
    }

    pub fn latencies(&self) -> &Latencies {
        &self.latencies
    }
}
