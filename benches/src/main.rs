//! `eventbus-bench`: the broker comparison tool (DESIGN.md §5).
//!
//! Runs the seed's scenario per level through the bus on each backend and through the raw
//! clients on the same brokers, interleaved and repeated, then prints medians, the bus/raw
//! ratio, and writes a JSON report and an SVG chart.
//!
//! ```text
//! cargo run --release -p eventbus-benches --bin eventbus-bench                      # memory, extreme
//! scripts/nats.sh start; scripts/kafka.sh start
//! eval "$(scripts/nats.sh env; scripts/kafka.sh env)"; export EVENTBUS_NATS_URL EVENTBUS_KAFKA_BROKERS
//! cargo run --release -p eventbus-benches --bin eventbus-bench -- --levels all --repeats 3
//! # OpenMessaging Benchmark workload files in, OMB result JSON out (target/eventbus-bench/omb/):
//! cargo run --release -p eventbus-benches --bin eventbus-bench -- \
//!     --workload benches/workloads/1-topic-16-partitions-100b.yaml --duration-secs 60
//! ```

mod alloc;
mod latency;
mod omb;
mod raw;
mod report;
mod sweep;
mod targets;
mod timeline;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use targets::{Knobs, RunResult, Target};
use workload::{Level, PayloadKind, Shape};

#[derive(Parser, Debug)]
#[command(
    name = "eventbus-bench",
    about = "Compare eventbus backends and the raw clients under the seed's pressure levels"
)]
struct Args {
    /// Targets, comma-separated. Default: memory, plus the NATS and Kafka targets (bus and
    /// raw) whose broker address is given.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Levels, comma-separated: low, medium, high, extreme, scale-100k, scale-1m, or all.
    #[arg(
        long,
        alias = "level",
        value_delimiter = ',',
        default_value = "extreme"
    )]
    levels: Vec<String>,
    /// Runs per target and level (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Payload content.
    #[arg(long, value_enum, default_value_t = PayloadKind::Json)]
    payload: PayloadKind,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Bus compression: none or lz4 (raw Kafka and the Kafka backend always use native lz4).
    #[arg(long, default_value = "none")]
    compression: String,
    /// In-flight publish window (bus and raw).
    #[arg(long, default_value_t = 10_000)]
    window: usize,
    /// Pull batch size (bus and raw NATS).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Keyed workers of the bus dispatcher.
    #[arg(long, default_value_t = 32)]
    keyed_workers: usize,
    /// Deliveries the bus's keyed scheduler buffers (default: the library's, 8,192).
    #[arg(long)]
    keyed_buffer: Option<usize>,
    /// Event ids each bus worker remembers to skip redeliveries (0: off; default: the
    /// library's, 1,024).
    #[arg(long)]
    dedup_window: Option<usize>,
    /// No W3C `traceparent` on the bus's publishes (default: on, as in the library).
    #[arg(long)]
    no_trace_context: bool,
    /// Global workers of the bus dispatcher (default 2 × cores).
    #[arg(long)]
    global_workers: Option<usize>,
    /// Bus instances consuming in one group, comma-separated (e.g. `1,2,3`): each count is a
    /// scenario of its own (named `<level>/<n>i` when more than one count is given). Each
    /// instance has its own connection and dispatcher in this process; raw baselines always
    /// run one consumer.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    instances: Vec<usize>,
    /// Publisher tasks (each owns a slice of the aggregates and publishes their versions in order).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// NATS server URL.
    #[arg(long, env = "EVENTBUS_NATS_URL")]
    nats_url: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "EVENTBUS_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Kafka consumers' `fetch.wait.max.ms` (bus and raw; default: the library's default).
    #[arg(long)]
    kafka_fetch_wait_ms: Option<u64>,
    /// Open loop: publish at this total rate (msg/s) on a fixed schedule, latencies measured
    /// from each message's due time. Default: closed loop, as fast as the window allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Sweep: starting at `--rate` (default 1,000 msg/s), double the rate while the median
    /// end-to-end p99 stays under this bound (ms) and the target keeps up (e2e ≥ 95 % of the
    /// rate); report the highest rate that passed per target and level.
    #[arg(long)]
    sweep_p99_ms: Option<f64>,
    /// OpenMessaging Benchmark workload files (YAML), comma-separated: run these instead of
    /// the seed levels, and write one OMB result JSON per run into `--omb-dir`.
    #[arg(long, value_delimiter = ',')]
    workload: Vec<PathBuf>,
    /// Workload files: run this many seconds instead of `testDurationMinutes`.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Workload files: seconds per reported period (OMB reports every 10 s).
    #[arg(long, default_value_t = 10.0)]
    period_secs: f64,
    /// Workload files: where the OMB result JSON files go.
    #[arg(long, default_value = "target/eventbus-bench/omb")]
    omb_dir: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/eventbus-bench/report.json")]
    json: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "target/eventbus-bench/chart.svg")]
    svg: PathBuf,
}

fn levels(names: &[String]) -> Result<Vec<Level>, String> {
    if names.iter().any(|n| n == "all") {
        return Ok(Level::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Level::ALL
                .into_iter()
                .find(|l| l.name() == n)
                .ok_or_else(|| format!("unknown level {n:?}"))
        })
        .collect()
}

/// Fails fast, naming the address, if a requested broker is not there.
async fn preflight(targets: &[Target], k: &Knobs) -> Result<(), String> {
    let needs_nats = targets.iter().any(|t| {
        matches!(
            t,
            Target::Nats | Target::NatsMem | Target::RawNats | Target::RawNatsMem
        )
    });
    if needs_nats {
        let url = k
            .nats_url
            .as_deref()
            .ok_or("NATS targets need --nats-url or EVENTBUS_NATS_URL")?;
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .map_err(|_| format!("NATS at {url} did not answer within 5 s"))?
            .map_err(|e| format!("NATS at {url} is unreachable: {e}"))?;
        drop(client);
    }
    if targets
        .iter()
        .any(|t| matches!(t, Target::Kafka | Target::RawKafka))
    {
        let brokers = k
            .kafka_brokers
            .clone()
            .ok_or("Kafka targets need --kafka-brokers or EVENTBUS_KAFKA_BROKERS")?;
        let mut cfg = eventbus::kafka::KafkaConfig::new(&brokers);
        cfg.request_timeout = Duration::from_secs(5);
        eventbus::kafka::KafkaTransport::connect(cfg)
            .await
            .map_err(|e| format!("Kafka at {brokers} is unreachable: {e}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let levels = match levels(&args.levels) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let knobs = Knobs {
        payload: args.payload,
        payload_bytes: args.payload_bytes,
        compression: args.compression.clone(),
        window: args.window.max(1),
        batch: args.batch.max(1),
        keyed_workers: args.keyed_workers.max(1),
        global_workers: args.global_workers.unwrap_or(2 * cores).max(1),
        publishers: args.publishers.max(1),
        nats_url: args.nats_url.clone(),
        kafka_brokers: args.kafka_brokers.clone(),
        rate: args.rate,
        kafka_fetch_wait_ms: args
            .kafka_fetch_wait_ms
            .unwrap_or(eventbus::kafka::DEFAULT_FETCH_WAIT.as_millis() as u64),
        keyed_buffer: args.keyed_buffer,
        dedup_window: args.dedup_window,
        trace_context: !args.no_trace_context,
        publishers_per_topic: None,
        period: None,
        instances: 1,
    };
    // What to run: the seed levels, or the workload files (each with its own knobs).
    let mut scenarios: Vec<(Shape, Knobs, Option<omb::Workload>)> = Vec::new();
    if args.workload.is_empty() {
        scenarios.extend(
            levels
                .iter()
                .map(|l| (Shape::level(*l), knobs.clone(), None)),
        );
    } else {
        let Ok(period) = Duration::try_from_secs_f64(args.period_secs) else {
            eprintln!("error: --period-secs must be a positive number of seconds");
            return ExitCode::from(2);
        };
        for path in &args.workload {
            let w = match omb::Workload::load(path) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let duration = match w.duration(args.duration_secs) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let k = Knobs {
                rate: Some(w.producer_rate),
                publishers_per_topic: Some(w.producers_per_topic),
                instances: w.consumer_per_subscription,
                period: Some(period),
                ..knobs.clone()
            };
            scenarios.push((w.shape(duration), k, Some(w)));
        }
    }
    // One scenario per instance count.
    let counts: Vec<usize> = args.instances.iter().map(|n| (*n).max(1)).collect();
    if counts != [1] {
        scenarios = scenarios
            .into_iter()
            .flat_map(|(shape, k, w)| {
                counts.iter().map(move |n| {
                    let mut shape = shape.clone();
                    shape.name = format!("{}/{n}i", shape.name);
                    let k = Knobs {
                        instances: *n,
                        ..k.clone()
                    };
                    (shape, k, w.clone())
                })
            })
            .collect();
    }
    let mut targets = args.targets.clone();
    if targets.is_empty() {
        targets.push(Target::Memory);
        if knobs.nats_url.is_some() {
            targets.extend([
                Target::Nats,
                Target::RawNats,
                Target::NatsMem,
                Target::RawNatsMem,
            ]);
        }
        if knobs.kafka_brokers.is_some() {
            targets.extend([Target::Kafka, Target::RawKafka]);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = runtime.block_on(preflight(&targets, &knobs)) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(bound) = args.sweep_p99_ms {
        return sweep::run(
            &runtime,
            &targets,
            &levels,
            &knobs,
            args.repeats.max(1),
            bound,
            (&args.json, &args.svg),
        );
    }
    let total = scenarios.len() * args.repeats.max(1) * targets.len();
    let mut results: Vec<RunResult> = Vec::new();
    let mut failed = false;
    let mut done = 0;
    for (shape, k, workload) in &scenarios {
        for repeat in 1..=args.repeats.max(1) {
            // Interleaved: every target runs once before any runs twice.
            for target in &targets {
                done += 1;
                eprint!(
                    "[{done:>3}/{total}] {:<10} {:<12} run {repeat}/{} ... ",
                    shape.name,
                    target.name(),
                    args.repeats.max(1)
                );
                match runtime.block_on(targets::run(*target, shape, repeat, k)) {
                    Ok(r) => {
                        eprintln!(
                            "{:>9.0} msg/s e2e, {:>9.0} msg/s acked, lost {}, order {}",
                            r.e2e_per_sec,
                            r.send_per_sec,
                            r.lost,
                            r.ordering_violations.map_or("-".into(), |v| v.to_string())
                        );
                        if !target.is_raw()
                            && (r.lost > 0 || r.ordering_violations.unwrap_or(0) > 0)
                        {
                            failed = true;
                        }
                        if let Some(w) = workload {
                            match write_omb(&args.omb_dir, w, *target, &r) {
                                Ok(path) => eprintln!("    wrote {}", path.display()),
                                Err(e) => {
                                    eprintln!("error: {e}");
                                    failed = true;
                                }
                            }
                        }
                        results.push(r);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed = true;
                    }
                }
            }
        }
    }
    let summaries = report::summarize(&results);
    let width = report::name_width(&summaries);
    println!("{}", report::header(width));
    for s in &summaries {
        println!("{}", report::row(s, width));
    }
    println!(
        "medians of {} run(s) per row; \"vs raw\" = bus e2e / raw e2e on the same broker (send in parentheses); \
         raw baselines check no order (\"-\"); kafka = Tansu 0.6.0 (Kafka protocol), not Apache Kafka",
        args.repeats.max(1)
    );
    let report = serde_json::json!({
        "tool": "eventbus-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "machine": { "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
        "allocator": alloc::name(),
        "brokers": {
            "nats": knobs.nats_url.as_ref().map(|_| "nats-server (see docs/benchmarks.md)"),
            "kafka": knobs.kafka_brokers.as_ref().map(|_| "Tansu 0.6.0, Kafka protocol, memory storage"),
        },
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "knobs": knobs,
        "repeats": args.repeats.max(1),
        "summaries": summaries,
        "runs": results,
    });
    let report = serde_json::to_string_pretty(&report).unwrap_or_default();
    if !report::write_files(&[(&args.json, report), (&args.svg, report::svg(&summaries))]) {
        failed = true;
    }
    if failed {
        eprintln!("error: a run failed, lost messages or broke per-aggregate order (see above)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes one run's OMB result JSON as `<dir>/<workload>-<driver>-<run>.json`.
fn write_omb(
    dir: &std::path::Path,
    w: &omb::Workload,
    target: Target,
    r: &RunResult,
) -> Result<PathBuf, String> {
    let slug: String = w
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let path = dir.join(format!("{slug}-{}-{}.json", target.name(), r.repeat));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let body = serde_json::to_string_pretty(&omb::result_json(w, target, r))
        .map_err(|e| format!("cannot encode the OMB result: {e}"))?;
    std::fs::write(&path, body).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
