//! The seed's scenario: N envelopes over N/10 aggregates (clamped to 50..1,000) spread over
//! several topics; each aggregate's versions are published in order; the consumer checks
//! order, losses and duplicates per aggregate.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::{BackendConfig, BusConfig, BusError, Compression, Envelope, HandlerError};
use serde_json::json;

/// Topics the aggregates are spread over.
const TOPICS: usize = 4;
/// The longest a run may take to deliver everything before it counts the rest as lost.
const DRAIN_DEADLINE: Duration = Duration::from_secs(300);

/// Pressure levels of the seed plus two scale levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Low,
    Medium,
    High,
    Extreme,
    Scale100k,
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

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == s)
    }

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

    pub fn aggregates(self) -> usize {
        (self.messages() / 10).clamp(50, 1_000)
    }
}

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub payload_bytes: usize,
    pub compression: Compression,
    pub publishers: usize,
    pub keyed_workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub window: Option<usize>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            payload_bytes: 256,
            compression: Compression::None,
            publishers: 8,
            keyed_workers: None,
            batch_size: None,
            window: None,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub level: &'static str,
    pub messages: usize,
    pub aggregates: usize,
    pub send_per_sec: f64,
    pub e2e_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub delivered: u64,
    pub ordering_violations: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub peak_tasks: usize,
    pub peak_threads: usize,
    pub peak_rss_mb: f64,
}

impl Report {
    pub fn header() -> String {
        format!(
            "{:<11} {:>9} {:>6} {:>11} {:>11} {:>8} {:>8} {:>8} {:>9} {:>6} {:>5} {:>5} {:>6} {:>8} {:>8}",
            "level", "messages", "aggs", "send msg/s", "e2e msg/s", "p50 ms", "p99 ms", "max ms",
            "delivered", "order", "lost", "dup", "tasks", "threads", "rss MB"
        )
    }

    pub fn row(&self) -> String {
        format!(
            "{:<11} {:>9} {:>6} {:>11.0} {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>6} {:>5} {:>5} {:>6} {:>8} {:>8.1}",
            self.level, self.messages, self.aggregates, self.send_per_sec, self.e2e_per_sec,
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms, self.delivered,
            self.ordering_violations, self.lost, self.duplicates, self.peak_tasks,
            self.peak_threads, self.peak_rss_mb
        )
    }
}

/// Per-aggregate order, loss and duplicate accounting, lock-free on the hot path.
struct Checker {
    versions: usize,
    last_version: Vec<AtomicI64>,
    seen: Vec<AtomicU8>,
    violations: AtomicU64,
    delivered: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

impl Checker {
    fn new(aggregates: usize, versions: usize) -> Self {
        Self {
            versions,
            last_version: (0..aggregates).map(|_| AtomicI64::new(0)).collect(),
            seen: (0..aggregates * versions)
                .map(|_| AtomicU8::new(0))
                .collect(),
            violations: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::with_capacity(aggregates * versions)),
        }
    }

    fn check(&self, e: &Envelope) -> Result<(), HandlerError> {
        let agg: usize = e
            .aggregate_id
            .strip_prefix("agg-")
            .and_then(|n| n.parse().ok())
            .filter(|a| *a < self.last_version.len())
            .ok_or_else(|| HandlerError::permanent("foreign aggregate id"))?;
        let v = e.event_version;
        if v < 1 || v as usize > self.versions {
            return Err(HandlerError::permanent("version out of range"));
        }
        let prev = self.last_version[agg].swap(v, Ordering::AcqRel);
        if v != prev + 1 {
            self.violations.fetch_add(1, Ordering::Relaxed);
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
}

fn payload(bytes: usize, agg: usize, version: usize) -> serde_json::Value {
    // Varied, realistic JSON: repeated bytes would flatter compression.
    let mut items = Vec::new();
    let mut size = 0;
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

fn proc_status(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

/// Runs one level on the memory backend.
pub async fn run(level: Level, opts: &RunOptions) -> Result<Report, BusError> {
    let messages = level.messages();
    let aggregates = level.aggregates();
    let versions = messages / aggregates;
    let mut config = BusConfig::default().with_compression(opts.compression);
    if let Some(k) = opts.keyed_workers {
        config = config.with_keyed_workers(k);
    }
    if let Some(b) = opts.batch_size {
        config = config.with_batch_size(b);
    }
    if let Some(w) = opts.window {
        config = config.with_in_flight_window(w);
        config.publish.results_capacity = w;
    }
    let bus = eventbus::connect(BackendConfig::from_url("memory://")?, config).await?;
    let checker = Arc::new(Checker::new(aggregates, versions));
    let run_id = eventbus::Envelope::new("x", "x", 1, json!(null)).event_id;
    let topics: Vec<String> = (0..TOPICS)
        .map(|t| format!("bench-{}-{t}-{}", level.name(), &run_id[run_id.len() - 8..]))
        .collect();
    for topic in &topics {
        let c = checker.clone();
        bus.subscribe_envelope(topic, "bench", move |e: Envelope| {
            let c = c.clone();
            async move { c.check(&e) }
        })
        .await?;
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    let start = Instant::now();
    let publishers = opts.publishers.clamp(1, aggregates);
    let mut tasks = Vec::with_capacity(publishers);
    for p in 0..publishers {
        let bus = bus.clone();
        let topics = topics.clone();
        let payload_bytes = opts.payload_bytes;
        tasks.push(tokio::spawn(async move {
            for v in 1..=versions {
                for agg in (p..aggregates).step_by(publishers) {
                    let e = Envelope::new(
                        format!("agg-{agg}"),
                        "order.updated",
                        v as i64,
                        payload(payload_bytes, agg, v),
                    );
                    bus.publish_envelope(&topics[agg % TOPICS], &e).await?;
                }
            }
            Ok::<(), BusError>(())
        }));
    }
    let mut peak_tasks = 0;
    let mut peak_threads = 0.0f64;
    let mut sent_at = None;
    let deadline = start + DRAIN_DEADLINE;
    loop {
        peak_tasks = peak_tasks.max(metrics.num_alive_tasks());
        peak_threads = peak_threads.max(proc_status("Threads:").unwrap_or(0.0));
        if sent_at.is_none() && tasks.iter().all(|t| t.is_finished()) {
            sent_at = Some(start.elapsed());
        }
        let delivered = checker.delivered.load(Ordering::Relaxed) as usize;
        if (delivered >= messages && sent_at.is_some()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let e2e = start.elapsed();
    for t in tasks {
        t.await
            .map_err(|e| BusError::Config(format!("publisher task failed: {e}")))??;
    }
    let send = sent_at.unwrap_or(e2e);
    bus.close().await?;
    let mut lat = checker
        .latencies_us
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    let (mut lost, mut duplicates) = (0, 0);
    for s in &checker.seen {
        match s.load(Ordering::Relaxed) {
            0 => lost += 1,
            1 => {}
            n => duplicates += u64::from(n - 1),
        }
    }
    Ok(Report {
        level: level.name(),
        messages,
        aggregates,
        send_per_sec: messages as f64 / send.as_secs_f64(),
        e2e_per_sec: messages as f64 / e2e.as_secs_f64(),
        latency_p50_ms: percentile(&lat, 0.50),
        latency_p99_ms: percentile(&lat, 0.99),
        latency_max_ms: percentile(&lat, 1.0),
        delivered: checker.delivered.load(Ordering::Relaxed),
        ordering_violations: checker.violations.load(Ordering::Relaxed),
        lost,
        duplicates,
        peak_tasks,
        peak_threads: peak_threads as usize,
        peak_rss_mb: proc_status("VmHWM:").unwrap_or(0.0) / 1024.0,
    })
}
