//! Outbox relay throughput against the bus's own publish rate, on the same broker, in one run.
//!
//! For each broker (NATS, the Kafka-protocol broker) and database (SQLite, PostgreSQL), per
//! repeat: the bus publishes `--events` envelopes over `--aggregates` aggregates as fast as
//! its window allows (rate = events / time until the last ACK); then the same number of events
//! is committed to a fresh outbox (transactions of 500, not timed) and a relay is started:
//! rate = events / time until the last row is marked published (each mark follows its ACK).
//!
//! ```sh
//! eval "$(scripts/nats.sh env; scripts/kafka.sh env; scripts/postgres.sh env)"
//! export EVENTBUS_NATS_URL EVENTBUS_KAFKA_BROKERS EVENTBUS_POSTGRES_URL
//! cargo run --release -p eventbus-benches --bin eventbus-outbox-bench -- --repeats 3
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use eventbus::{BackendConfig, BusConfig, Envelope, EventBus};
use eventbus_outbox::{enqueue, OutboxDb, OutboxExecutor, Relay, RelayConfig};
use sqlx::Connection;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Outbox relay throughput against the bus's own publish rate"
)]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Aggregates the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    aggregates: usize,
    /// Brokers: nats, kafka (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["nats".to_string(), "kafka".to_string()])]
    brokers: Vec<String>,
    /// Databases: sqlite, postgres (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["sqlite".to_string(), "postgres".to_string()])]
    databases: Vec<String>,
    /// Runs per pair (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Aggregates per relay round (`RelayConfig::batch_size`).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Rows per relay round (`RelayConfig::round_rows`), shared by its aggregates.
    #[arg(long, default_value_t = RelayConfig::default().round_rows)]
    round_rows: usize,
    /// The Kafka producer's `linger.ms` (the backend's default: 5). Both the bus's rate and the
    /// relay's are measured with it.
    #[arg(long)]
    kafka_linger_ms: Option<u32>,
    #[arg(long, env = "EVENTBUS_NATS_URL")]
    nats_url: Option<String>,
    #[arg(long, env = "EVENTBUS_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    #[arg(long, env = "EVENTBUS_POSTGRES_URL")]
    postgres_url: Option<String>,
}

fn events(n: usize, aggregates: usize) -> Vec<Envelope> {
    let aggregates = aggregates.max(1);
    (0..n)
        .map(|i| {
            Envelope::new(
                format!("agg-{}", i % aggregates),
                "bench.event",
                (i / aggregates) as i64 + 1,
                serde_json::json!({"i": i, "note": "outbox relay throughput"}),
            )
        })
        .collect()
}

fn unique(name: &str) -> String {
    let id = eventbus::new_event_id();
    format!("{name}_{}", &id[id.len() - 12..])
}

async fn connect(args: &Args, broker: &str) -> Result<EventBus, String> {
    let backend = match broker {
        "nats" => BackendConfig::Nats(eventbus::nats::NatsConfig::new(
            args.nats_url
                .clone()
                .ok_or("NATS needs EVENTBUS_NATS_URL")?,
        )),
        "kafka" => {
            let mut c = eventbus::kafka::KafkaConfig::new(
                args.kafka_brokers
                    .clone()
                    .ok_or("Kafka needs EVENTBUS_KAFKA_BROKERS")?,
            );
            c.consumer.session_timeout = Duration::from_secs(6);
            if let Some(ms) = args.kafka_linger_ms {
                c.producer.linger_ms = ms;
            }
            BackendConfig::Kafka(c)
        }
        other => return Err(format!("unknown broker {other:?}")),
    };
    eventbus::connect(backend, BusConfig::default())
        .await
        .map_err(|e| e.to_string())
}

/// The outbox of `pool`, migrated, with `all` committed to it, 500 per transaction.
async fn fill<DB: sqlx::Database>(
    pool: sqlx::Pool<DB>,
    all: &[Envelope],
    topic: &str,
) -> Result<OutboxDb, String>
where
    sqlx::Transaction<'static, DB>: OutboxExecutor,
    OutboxDb: From<sqlx::Pool<DB>>,
{
    let db = OutboxDb::from(pool.clone());
    db.migrate().await.map_err(|e| e.to_string())?;
    for chunk in all.chunks(500) {
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        for env in chunk {
            enqueue(&mut tx, topic, env)
                .await
                .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
    }
    Ok(db)
}

/// A fresh, migrated outbox, with the events committed to it.
async fn outbox_with(
    args: &Args,
    database: &str,
    all: &[Envelope],
    topic: &str,
) -> Result<OutboxDb, String> {
    let e = |e: sqlx::Error| e.to_string();
    match database {
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("{}.sqlite", unique("outbox-bench")));
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await
                .map_err(e)?;
            fill(pool, all, topic).await
        }
        "postgres" => {
            let admin = args
                .postgres_url
                .clone()
                .ok_or("PostgreSQL needs EVENTBUS_POSTGRES_URL")?;
            let name = unique("outbox_bench");
            let mut conn = sqlx::PgConnection::connect(&admin).await.map_err(e)?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .map_err(e)?;
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(&format!("{base}/{name}"))
                .await
                .map_err(e)?;
            fill(pool, all, topic).await
        }
        other => Err(format!("unknown database {other:?}")),
    }
}

/// Events per second the bus publishes (to the last ACK).
async fn bus_rate(bus: &EventBus, all: &[Envelope]) -> Result<f64, String> {
    let topic = unique("bus-rate").replace('_', "-");
    let start = Instant::now();
    for e in all {
        bus.publish_envelope(&topic, e)
            .await
            .map_err(|e| e.to_string())?;
    }
    bus.flush().await.map_err(|e| e.to_string())?;
    Ok(all.len() as f64 / start.elapsed().as_secs_f64())
}

/// Events per second the relay drains from a committed outbox (to the last mark).
async fn relay_rate(
    args: &Args,
    bus: &EventBus,
    database: &str,
    all: &[Envelope],
) -> Result<f64, String> {
    let topic = unique("outbox-rate").replace('_', "-");
    let db = outbox_with(args, database, all, &topic).await?;
    let start = Instant::now();
    let relay = Relay::start(
        db,
        bus.clone(),
        RelayConfig {
            batch_size: args.batch,
            round_rows: args.round_rows,
            ..RelayConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut progress = relay.progress();
    let n = all.len() as u64;
    tokio::time::timeout(
        Duration::from_secs(600),
        progress.wait_for(|m| m.published >= n),
    )
    .await
    .map_err(|_| "the relay did not finish within 10 minutes".to_string())?
    .map_err(|e| e.to_string())?;
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    let m = relay.stop().await.map_err(|e| e.to_string())?;
    if m.mark_failures > 0 || m.retried > 0 {
        eprintln!(
            "  ({database}: {} rounds could not be marked, {} publishes retried)",
            m.mark_failures, m.retried
        );
    }
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run(args: &Args) -> Result<(), String> {
    let all = events(args.events, args.aggregates);
    println!(
        "{:<8} {:<10} {:>12} {:>14} {:>7}",
        "broker", "database", "bus ev/s", "relay ev/s", "ratio"
    );
    for broker in &args.brokers {
        let bus = connect(args, broker).await?;
        for database in &args.databases {
            let (mut b, mut r) = (Vec::new(), Vec::new());
            for _ in 0..args.repeats.max(1) {
                // Interleaved: the bus's rate and the relay's, one after the other.
                b.push(bus_rate(&bus, &all).await?);
                r.push(relay_rate(args, &bus, database, &all).await?);
            }
            let (b, r) = (median(b), median(r));
            println!(
                "{broker:<8} {database:<10} {b:>12.0} {r:>14.0} {:>7.2}",
                r / b
            );
        }
        bus.close().await.map_err(|e| e.to_string())?;
    }
    println!(
        "medians of {} runs; {} events over {} aggregates; relay rounds of {} aggregates, {} rows; kafka = Tansu (Kafka protocol), not Apache Kafka",
        args.repeats.max(1),
        args.events,
        args.aggregates,
        args.batch,
        args.round_rows
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
