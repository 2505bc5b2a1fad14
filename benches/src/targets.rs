//! One measured run of one target: the bus over a backend, or a raw client baseline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::{BackendConfig, BusConfig, Compression, Envelope, EventBus, HandlerError};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::latency::{Latencies, Percentiles};
use crate::timeline::Timeline;
use crate::workload::{envelope, Checker, Level, PayloadKind, Shape};

/// Longest a run may take before what is missing counts as lost.
const RUN_DEADLINE: Duration = Duration::from_secs(600);
const WARMUP_DEADLINE: Duration = Duration::from_secs(60);
/// Aggregates of one warm-up round per topic: enough to reach every partition.
const WARMUP_AGGREGATES: usize = 64;
/// After every instance of a group got work, warm-up goes on this long so the group's last
/// moves (NATS hands partitions over a few heartbeats) happen before the timed run.
const GROUP_SETTLE: Duration = Duration::from_secs(3);

/// What can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The bus on the embedded memory backend.
    Memory,
    /// The bus on NATS JetStream, file storage.
    Nats,
    /// The bus on NATS JetStream, memory storage.
    NatsMem,
    /// The bus on Kafka (Tansu here).
    Kafka,
    /// async-nats directly, file storage.
    RawNats,
    /// async-nats directly, memory storage.
    RawNatsMem,
    /// rdkafka directly.
    RawKafka,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Memory => "memory",
            Target::Nats => "nats",
            Target::NatsMem => "nats-mem",
            Target::Kafka => "kafka",
            Target::RawNats => "raw-nats",
            Target::RawNatsMem => "raw-nats-mem",
            Target::RawKafka => "raw-kafka",
        }
    }

    pub fn is_raw(self) -> bool {
        matches!(
            self,
            Target::RawNats | Target::RawNatsMem | Target::RawKafka
        )
    }

    /// The raw baseline a bus target is compared with.
    pub fn baseline(self) -> Option<Target> {
        match self {
            Target::Nats => Some(Target::RawNats),
            Target::NatsMem => Some(Target::RawNatsMem),
            Target::Kafka => Some(Target::RawKafka),
            _ => None,
        }
    }

    pub fn storage(self) -> &'static str {
        match self {
            Target::Memory => "in-process memory",
            Target::Nats | Target::RawNats => "JetStream file",
            Target::NatsMem | Target::RawNatsMem => "JetStream memory",
            Target::Kafka | Target::RawKafka => "Tansu memory (Kafka protocol)",
        }
    }
}

/// Knobs shared by every run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Knobs {
    pub payload: PayloadKind,
    pub payload_bytes: usize,
    pub compression: String,
    pub window: usize,
    pub batch: usize,
    pub keyed_workers: usize,
    pub global_workers: usize,
    pub publishers: usize,
    #[serde(skip)]
    pub nats_url: Option<String>,
    #[serde(skip)]
    pub kafka_brokers: Option<String>,
    /// Kafka consumers' `fetch.wait.max.ms`, bus and raw alike.
    pub kafka_fetch_wait_ms: u64,
    /// Open loop: total publish rate in msg/s (`None`: as fast as the window allows).
    pub rate: Option<f64>,
    /// The bus's keyed buffer and dedup window (`None`: the library's defaults).
    pub keyed_buffer: Option<usize>,
    pub dedup_window: Option<usize>,
    /// W3C trace context on the bus's publishes.
    pub trace_context: bool,
    /// Publisher tasks per topic (`None`: `publishers` in all).
    pub publishers_per_topic: Option<usize>,
    /// Sample rates and latencies per period of this length (workload-file runs).
    pub period: Option<Duration>,
    /// Bus instances consuming in one group (each its own connection and dispatcher, in this
    /// process); the first one also publishes. Raw baselines always run one consumer.
    pub instances: usize,
}

/// The open-loop schedule: message `i` of publisher `p` is due at `start + (i·P + p) / rate`,
/// whatever happened to the messages before it. Latencies are measured from the due time
/// (the envelope's timestamp and the ACK clock are set to it), so a stall delays every message
/// scheduled during it and shows in the percentiles instead of pausing the load
/// (no coordinated omission).
#[derive(Clone, Copy)]
pub(crate) struct Pacer {
    start: Instant,
    wall: chrono::DateTime<chrono::Utc>,
    rate: Option<f64>,
    publishers: usize,
}

impl Pacer {
    pub(crate) fn new(rate: Option<f64>, publishers: usize) -> Self {
        Self {
            start: Instant::now(),
            wall: chrono::Utc::now(),
            rate: rate.filter(|r| *r > 0.0),
            publishers: publishers.max(1),
        }
    }

    /// Waits until message `i` of publisher `p` is due; its due time, in the open loop.
    pub(crate) async fn due(
        &self,
        p: usize,
        i: usize,
    ) -> Option<(Instant, chrono::DateTime<chrono::Utc>)> {
        let rate = self.rate?;
        let offset = Duration::from_secs_f64((i * self.publishers + p) as f64 / rate);
        let at = self.start + offset;
        tokio::time::sleep_until(at.into()).await;
        let wall = self.wall + chrono::Duration::from_std(offset).unwrap_or_default();
        Some((at, wall))
    }

    /// `envelope` as due: its timestamp is the due time in the open loop.
    pub(crate) fn stamp(
        due: Option<(Instant, chrono::DateTime<chrono::Utc>)>,
        mut envelope: Envelope,
    ) -> Envelope {
        if let Some((_, wall)) = due {
            envelope.timestamp = wall;
        }
        envelope
    }
}

impl Knobs {
    fn compression(&self) -> Compression {
        if self.compression == "lz4" {
            Compression::Lz4
        } else {
            Compression::None
        }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub target: Target,
    pub storage: &'static str,
    /// The seed level (`None` for a workload file's run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// The level's or the workload's name.
    pub scenario: String,
    /// Bus instances in the consuming group (1 for raw baselines).
    pub instances: usize,
    pub repeat: usize,
    pub messages: usize,
    pub aggregates: usize,
    /// Messages published and acknowledged per second.
    pub send_per_sec: f64,
    /// Messages delivered to the handler per second, from the first publish.
    pub e2e_per_sec: f64,
    pub publish_ack_latency: Percentiles,
    pub e2e_latency: Percentiles,
    pub peak_rss_mb: f64,
    pub peak_tasks: usize,
    pub peak_threads: usize,
    /// Allocations per message over the whole run, both sides and the workload included
    /// (`None` unless built with the `alloc-count` feature).
    pub allocs_per_message: Option<f64>,
    /// Highest live heap during the run, in MB, and live heap before it started (`None`
    /// unless built with `alloc-count`): what the run itself holds, without allocator slack.
    pub peak_heap_mb: Option<f64>,
    pub heap_before_mb: Option<f64>,
    /// `None` for raw baselines: they check nothing about order.
    pub ordering_violations: Option<u64>,
    pub lost: u64,
    pub duplicates: u64,
    /// Per-period samples (workload-file runs only).
    #[serde(skip)]
    pub timeline: Option<Timeline>,
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

/// Send timestamps by sequence number (the event id): lock-free for bus and raw alike.
pub(crate) struct SendClock {
    start: Instant,
    sent_ns: Vec<AtomicU64>,
    pub(crate) acked: Latencies,
}

impl SendClock {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            start: Instant::now(),
            sent_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            acked: Latencies::new(),
        }
    }

    /// Message `seq` was sent now, or was due at `due` (open loop).
    pub(crate) fn sent(&self, seq: usize, due: Option<Instant>) {
        if let Some(s) = self.sent_ns.get(seq) {
            let at = due.map_or_else(
                || self.start.elapsed(),
                |d| d.saturating_duration_since(self.start),
            );
            s.store(at.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn acked(&self, seq: Option<usize>) {
        let Some(sent) = seq.and_then(|s| self.sent_ns.get(s)) else {
            return;
        };
        let now = self.start.elapsed().as_nanos() as u64;
        self.acked
            .record_us(now.saturating_sub(sent.load(Ordering::Relaxed)) / 1000);
    }
}

/// Samples tasks, threads and memory while a run is in progress.
pub(crate) struct Peaks {
    tasks: usize,
    threads: usize,
    allocations_at_start: Option<u64>,
    heap_at_start: Option<u64>,
    peak_heap: Option<u64>,
    timeline: Option<Timeline>,
}

impl Peaks {
    pub(crate) fn reset(k: &Knobs) -> Self {
        // Writing 5 resets the kernel's peak-RSS mark, so VmHWM is this run's peak.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self {
            tasks: 0,
            threads: 0,
            allocations_at_start: crate::alloc::allocations(),
            heap_at_start: crate::alloc::live_bytes(),
            peak_heap: None,
            timeline: k.period.map(Timeline::new),
        }
    }

    fn sample(&mut self) {
        self.tasks = self.tasks.max(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        );
        self.threads = self
            .threads
            .max(proc_status("Threads:").unwrap_or(0.0) as usize);
        if let Some(live) = crate::alloc::live_bytes() {
            self.peak_heap = Some(self.peak_heap.unwrap_or(0).max(live));
        }
    }
}

/// The envelopes of one run, in publishing order per publisher.
pub(crate) struct Plan {
    pub(crate) shape: Shape,
    pub(crate) run_id: String,
    /// Bus instances in the consuming group.
    pub(crate) instances: usize,
}

impl Plan {
    pub(crate) fn new(shape: &Shape) -> Self {
        let id = eventbus::new_event_id();
        Self {
            shape: shape.clone(),
            run_id: id[id.len() - 8..].to_string(),
            instances: 1,
        }
    }

    pub(crate) fn topics(&self) -> usize {
        self.shape.topics.max(1)
    }

    /// The topic of aggregate `agg`'s events.
    pub(crate) fn topic_of(&self, agg: usize) -> usize {
        agg % self.topics()
    }

    pub(crate) fn messages(&self) -> usize {
        self.shape.messages()
    }

    pub(crate) fn topic(&self, t: usize) -> String {
        let name: String = self
            .shape
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("bench-{name}-{}-{t}", self.run_id)
    }

    /// Sequence number of (aggregate, version): also the event id.
    pub(crate) fn seq(&self, agg: usize, version: usize) -> usize {
        agg * self.shape.versions + (version - 1)
    }

    pub(crate) fn event(&self, k: &Knobs, agg: usize, version: usize) -> Envelope {
        let bytes = self.shape.payload_bytes.unwrap_or(k.payload_bytes);
        envelope(k.payload, bytes, agg, version).with_event_id(format!(
            "{}-{}",
            self.run_id,
            self.seq(agg, version)
        ))
    }
}

fn seq_of(event_id: &str) -> Option<usize> {
    event_id.rsplit('-').next()?.parse().ok()
}

/// Waits for the run to finish, sampling peaks (and the timeline's periods, if any).
/// Returns (acked time, delivered time).
pub(crate) async fn watch(
    checker: &Checker,
    clock: &SendClock,
    acked: &AtomicUsize,
    messages: usize,
    start: Instant,
    peaks: &mut Peaks,
) -> (Duration, Duration) {
    let mut acked_at = None;
    loop {
        peaks.sample();
        let done = acked.load(Ordering::Relaxed);
        if let Some(t) = peaks.timeline.as_mut() {
            t.observe(start, done as u64, (checker, clock), false);
        }
        if acked_at.is_none() && done >= messages {
            acked_at = Some(start.elapsed());
        }
        let delivered = checker.delivered() as usize >= messages;
        if (delivered && acked_at.is_some()) || start.elapsed() > RUN_DEADLINE {
            let e2e = start.elapsed();
            if let Some(t) = peaks.timeline.as_mut() {
                t.observe(start, done as u64, (checker, clock), true);
            }
            return (acked_at.unwrap_or(e2e), e2e);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn result(
    target: Target,
    plan: &Plan,
    repeat: usize,
    send: Duration,
    e2e: Duration,
    clock: &SendClock,
    checker: &Checker,
    peaks: &mut Peaks,
) -> RunResult {
    let n = plan.messages();
    let (lost, duplicates) = checker.losses();
    RunResult {
        target,
        storage: target.storage(),
        level: plan.shape.level,
        scenario: plan.shape.name.clone(),
        instances: plan.instances,
        repeat,
        messages: n,
        aggregates: plan.shape.aggregates,
        send_per_sec: n as f64 / send.as_secs_f64(),
        e2e_per_sec: n as f64 / e2e.as_secs_f64(),
        publish_ack_latency: clock.acked.percentiles(),
        e2e_latency: checker.latencies().percentiles(),
        peak_rss_mb: proc_status("VmHWM:").unwrap_or(0.0) / 1024.0,
        peak_tasks: peaks.tasks,
        peak_threads: peaks.threads,
        allocs_per_message: peaks
            .allocations_at_start
            .zip(crate::alloc::allocations())
            .map(|(start, now)| now.saturating_sub(start) as f64 / n.max(1) as f64),
        peak_heap_mb: peaks.peak_heap.map(|b| b as f64 / 1e6),
        heap_before_mb: peaks.heap_at_start.map(|b| b as f64 / 1e6),
        ordering_violations: checker.violations(),
        lost,
        duplicates,
        timeline: peaks.timeline.take(),
    }
}

/// Runs `target` once with `shape`.
pub async fn run(
    target: Target,
    shape: &Shape,
    repeat: usize,
    k: &Knobs,
) -> Result<RunResult, String> {
    match target {
        Target::Memory | Target::Nats | Target::NatsMem | Target::Kafka => {
            run_bus(target, shape, repeat, k).await
        }
        Target::RawNats | Target::RawNatsMem => crate::raw::nats(target, shape, repeat, k).await,
        Target::RawKafka => crate::raw::kafka(shape, repeat, k).await,
    }
}

/// Publisher tasks of a run: `publishers_per_topic` per topic, or `publishers` in all; never
/// more than there are aggregates.
pub(crate) fn publishers(plan: &Plan, k: &Knobs) -> usize {
    k.publishers_per_topic
        .map_or(k.publishers, |p| p * plan.topics())
        .clamp(1, plan.shape.aggregates.max(1))
}

fn backend(target: Target, plan: &Plan, k: &Knobs) -> Result<BackendConfig, String> {
    match target {
        Target::Memory => BackendConfig::from_url("memory://").map_err(|e| e.to_string()),
        Target::Nats | Target::NatsMem => {
            let url = k
                .nats_url
                .clone()
                .ok_or("no NATS address (--nats-url or EVENTBUS_NATS_URL)")?;
            let mut c = eventbus::nats::NatsConfig::new(url);
            c.max_ack_inflight = k.window;
            c.stream.partitions = u16::try_from(plan.shape.partitions.max(1)).unwrap_or(u16::MAX);
            if target == Target::NatsMem {
                c.stream.storage = eventbus::nats::Storage::Memory;
            }
            Ok(BackendConfig::Nats(c))
        }
        Target::Kafka => {
            let brokers = k
                .kafka_brokers
                .clone()
                .ok_or("no Kafka address (--kafka-brokers or EVENTBUS_KAFKA_BROKERS)")?;
            let mut c = eventbus::kafka::KafkaConfig::new(brokers);
            c.consumer.session_timeout = Duration::from_secs(6);
            c.consumer.fetch_wait = Duration::from_millis(k.kafka_fetch_wait_ms);
            c.topic.partitions = plan.shape.partitions;
            Ok(BackendConfig::Kafka(c))
        }
        _ => Err("not a bus target".into()),
    }
}

async fn run_bus(
    target: Target,
    shape: &Shape,
    repeat: usize,
    k: &Knobs,
) -> Result<RunResult, String> {
    let plan = Arc::new(Plan {
        instances: k.instances.max(1),
        ..Plan::new(shape)
    });
    let n = plan.messages();
    let clock = Arc::new(SendClock::new(n));
    let acked = Arc::new(AtomicUsize::new(0));
    let (c, a) = (clock.clone(), acked.clone());
    let mut config = BusConfig::default()
        .with_compression(k.compression())
        .with_in_flight_window(k.window)
        .with_batch_size(k.batch)
        .with_keyed_workers(k.keyed_workers)
        .with_global_workers(k.global_workers)
        .with_result_callback(move |r| {
            if r.is_ok() {
                c.acked(seq_of(&r.event_id));
                a.fetch_add(1, Ordering::Relaxed);
            }
        });
    config.publish.results_capacity = k.window;
    if let Some(n) = k.keyed_buffer {
        config.dispatch.keyed_buffer = n.max(1);
    }
    if let Some(n) = k.dedup_window {
        config.dispatch.dedup_window = n;
    }
    config.publish.propagate_trace = k.trace_context;
    let mut peaks = Peaks::reset(k);
    let bus: EventBus = eventbus::connect(backend(target, &plan, k)?, config)
        .await
        .map_err(|e| format!("{}: {e}", target.name()))?;
    // The other instances of the group: their own connections, no publishing.
    let mut others: Vec<EventBus> = Vec::new();
    for _ in 1..k.instances.max(1) {
        let config = BusConfig::default()
            .with_compression(k.compression())
            .with_batch_size(k.batch)
            .with_keyed_workers(k.keyed_workers)
            .with_global_workers(k.global_workers);
        others.push(
            eventbus::connect(backend(target, &plan, k)?, config)
                .await
                .map_err(|e| format!("{}: {e}", target.name()))?,
        );
    }
    let checker = Arc::new(Checker::new(
        plan.shape.aggregates,
        plan.shape.versions,
        true,
    ));
    // Warm-up messages handled, per instance.
    let warm: Vec<Arc<AtomicUsize>> = (0..=others.len())
        .map(|_| Arc::new(AtomicUsize::new(0)))
        .collect();
    for (i, member) in std::iter::once(&bus).chain(&others).enumerate() {
        for t in 0..plan.topics() {
            let (c, w) = (checker.clone(), warm[i].clone());
            member
                .subscribe_envelope(
                    &plan.topic(t),
                    &format!("bench-{}", plan.run_id),
                    move |e: Envelope| {
                        let (c, w) = (c.clone(), w.clone());
                        async move {
                            if c.check(&e).is_err() {
                                w.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok::<(), HandlerError>(())
                        }
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    // Warm-up, so stream creation and group joins are not timed: rounds of warm-up messages
    // on many aggregates until every instance handled some, then a settling time for the
    // group's last moves while warm-up continues.
    let started = Instant::now();
    let mut settled: Option<Instant> = None;
    let mut round = 0i64;
    loop {
        round += 1;
        for t in 0..plan.topics() {
            for a in 0..WARMUP_AGGREGATES {
                let e = Envelope::new(
                    format!("warmup-{a}"),
                    "warmup",
                    round,
                    serde_json::Value::Null,
                );
                bus.publish_envelope(&plan.topic(t), &e)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let everyone = warm.iter().all(|w| w.load(Ordering::Relaxed) > 0);
        match settled {
            None if everyone && others.is_empty() => break,
            None if everyone => settled = Some(Instant::now() + GROUP_SETTLE),
            Some(at) if Instant::now() >= at => break,
            _ => {}
        }
        if started.elapsed() > WARMUP_DEADLINE {
            return Err(format!(
                "{}: warm-up messages never reached every instance",
                target.name()
            ));
        }
    }
    let published_warmup = round as usize * plan.topics() * WARMUP_AGGREGATES;
    while warm
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .sum::<usize>()
        < published_warmup
    {
        if started.elapsed() > WARMUP_DEADLINE {
            return Err(format!("{}: warm-up messages never arrived", target.name()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bus.flush().await.map_err(|e| e.to_string())?;
    acked.store(0, Ordering::Relaxed);

    let start = Instant::now();
    let publishers = publishers(&plan, k);
    let mut tasks = Vec::new();
    let pacer = Pacer::new(k.rate, publishers);
    for p in 0..publishers {
        let (bus, plan, clock, k) = (bus.clone(), plan.clone(), clock.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            for v in 1..=plan.shape.versions {
                for agg in (p..plan.shape.aggregates).step_by(publishers) {
                    let due = pacer.due(p, i).await;
                    i += 1;
                    let e = Pacer::stamp(due, plan.event(&k, agg, v));
                    clock.sent(plan.seq(agg, v), due.map(|(at, _)| at));
                    bus.publish_envelope(&plan.topic(plan.topic_of(agg)), &e)
                        .await?;
                }
            }
            Ok::<(), eventbus::BusError>(())
        }));
    }
    let (send, e2e) = watch(&checker, &clock, &acked, n, start, &mut peaks).await;
    for t in tasks {
        t.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let r = result(
        target, &plan, repeat, send, e2e, &clock, &checker, &mut peaks,
    );
    bus.close().await.map_err(|e| e.to_string())?;
    for other in others {
        other.close().await.map_err(|e| e.to_string())?;
    }
    if let Some(url) = k
        .nats_url
        .as_deref()
        .filter(|_| matches!(target, Target::Nats | Target::NatsMem))
    {
        // Each topic's stream and its groups' bucket.
        crate::raw::delete_nats_streams(
            url,
            (0..plan.topics()).flat_map(|t| {
                let stream = format!("EB_{}", plan.topic(t).replace('.', "_"));
                [format!("KV_{stream}_groups"), stream]
            }),
        )
        .await;
    }
    Ok(r)
}

/// Shared by the raw baselines: collects ACK futures in one task, like the bus does.
pub(crate) async fn collect_acks<F>(
    mut rx: tokio::sync::mpsc::Receiver<(usize, F)>,
    clock: Arc<SendClock>,
    acked: Arc<AtomicUsize>,
) where
    F: std::future::Future<Output = bool> + Send,
{
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            Some((seq, ok)) = pending.next(), if !pending.is_empty() => {
                if ok {
                    clock.acked(Some(seq));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            next = rx.recv(), if open => match next {
                Some((seq, f)) => pending.push(async move { (seq, f.await) }),
                None => open = false,
            },
        }
    }
}
