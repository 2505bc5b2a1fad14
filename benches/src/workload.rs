//! The seed's workload: levels, envelopes, payloads, and the consumer-side checker.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use eventbus::Envelope;
use serde_json::json;

/// Topics the aggregates are spread over.
pub const TOPICS: usize = 4;

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

/// Per-aggregate order, loss and duplicate accounting; lock-free except the latency list.
pub struct Checker {
    versions: usize,
    last_version: Vec<AtomicI64>,
    seen: Vec<AtomicU8>,
    violations: AtomicU64,
    delivered: AtomicU64,
    check_order: bool,
    latencies_us: Mutex<Vec<u32>>,
}

impl Checker {
    pub fn new(aggregates: usize, versions: usize, check_order: bool) -> Self {
        Self {
            versions,
            last_version: (0..aggregates).map(|_| AtomicI64::new(0)).collect(),
            seen: (0..aggregates * versions)
                .map(|_| AtomicU8::new(0))
                .collect(),
            violations: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            check_order,
            latencies_us: Mutex::new(Vec::with_capacity(aggregates * versions)),
        }
    }

    /// Records one handled envelope. `Err` for envelopes that are not part of the run
    /// (the warm-up message).
    pub fn check(&self, e: &Envelope) -> Result<(), &'static str> {
        let agg: usize = e
            .aggregate_id
            .strip_prefix("agg-")
            .and_then(|n| n.parse().ok())
            .filter(|a| *a < self.last_version.len())
            .ok_or("foreign aggregate id")?;
        let v = e.event_version;
        if v < 1 || v as usize > self.versions {
            return Err("version out of range");
        }
        if self.check_order {
            let prev = self.last_version[agg].swap(v, Ordering::AcqRel);
            if v != prev + 1 {
                self.violations.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.seen[agg * self.versions + (v as usize - 1)].fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let latency = (chrono::Utc::now() - e.timestamp)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .clamp(0, u32::MAX as i64) as u32;
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(latency);
        }
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

    pub fn latencies(&self) -> Vec<u32> {
        self.latencies_us
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub p9999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut us: Vec<u32>) -> Self {
        if us.is_empty() {
            return Self::default();
        }
        us.sort_unstable();
        let at = |p: f64| {
            let i = ((us.len() as f64 - 1.0) * p).round() as usize;
            f64::from(us[i.min(us.len() - 1)]) / 1000.0
        };
        Self {
            p50_ms: at(0.5),
            p75_ms: at(0.75),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            p9999_ms: at(0.9999),
            max_ms: at(1.0),
        }
    }
}
