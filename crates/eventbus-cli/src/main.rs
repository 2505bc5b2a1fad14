//! `eventbus`: publish envelopes, tail topics, list and replay dead letters, run the broker
//! comparison — on memory, NATS JetStream or Kafka, chosen by `--url`, `EVENTBUS_URL` or the
//! configuration file. `eventbus --help` lists everything; exit codes are in [`args::Cli`].

mod args;
mod dlq;
mod output;
mod publish;
mod read;
mod tail;

use std::process::ExitCode;

use clap::Parser;
use eventbus::{BusError, Config, ConfigError};

use args::{Cli, Command, DlqCommand, Output};

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Configuration could not be read.
    Config(ConfigError),
    /// Connecting, publishing or subscribing failed.
    Bus(BusError),
    /// Bad input (an envelope, a dead letter without its source).
    Input(String),
    /// Publishes the broker did not acknowledge.
    Rejected(usize),
    /// Fewer messages than `--count` before the deadline.
    Short {
        /// Messages handled.
        got: usize,
        /// Messages asked for.
        want: usize,
    },
    /// Options that do not go together.
    Usage(String),
    /// The bench could not run.
    Bench(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Short { .. } => 3,
            Failure::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Config(e) => write!(f, "configuration: {e}"),
            Failure::Bus(e) => write!(f, "{e}"),
            Failure::Input(e) => write!(f, "bad input: {e}"),
            Failure::Rejected(n) => write!(f, "{n} publish(es) not acknowledged by the broker"),
            Failure::Short { got, want } => {
                write!(f, "timed out after {got} of {want} messages")
            }
            Failure::Usage(e) => write!(f, "{e}"),
            Failure::Bench(e) => write!(f, "bench: {e}"),
        }
    }
}

fn config(cli: &Cli) -> Result<Config, Failure> {
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
            Config::from_sources(Some(&text), std::env::vars()).map_err(Failure::Config)?
        }
        None => Config::from_env().map_err(Failure::Config)?,
    };
    if let Some(url) = &cli.url {
        config.url = url.clone();
    }
    Ok(config)
}

/// `bench`: the comparison tool next to this binary, its exit code passed on.
fn bench(args: &[String]) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Bench(e.to_string()))?;
    let tool = exe.with_file_name(format!("eventbus-bench{}", std::env::consts::EXE_SUFFIX));
    let status = std::process::Command::new(&tool)
        .args(args)
        .status()
        .map_err(|e| {
            Failure::Bench(format!(
                "cannot run {} ({e}); build it with `cargo build --release -p eventbus-benches`",
                tool.display()
            ))
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Bench(format!(
            "eventbus-bench exited with {status}"
        )))
    }
}

/// `lag`: per partition and in total.
async fn lag(
    bus: &eventbus::EventBus,
    topic: &str,
    group: &str,
    output: Output,
) -> Result<(), Failure> {
    let Some(lag) = bus.lag(topic, group).await.map_err(Failure::Bus)? else {
        return Err(Failure::Usage(format!(
            "the {} backend does not report consumer lag",
            bus.health().backend
        )));
    };
    match output {
        Output::Json => {
            let partitions: Vec<serde_json::Value> = lag
                .partitions
                .iter()
                .map(|p| serde_json::json!({"partition": p.partition, "pending": p.pending, "unacked": p.unacked}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"topic": topic, "group": group, "total": lag.total(), "partitions": partitions})
            );
        }
        Output::Text => {
            println!("{topic} / {group}: {} behind", lag.total());
            for p in lag
                .partitions
                .iter()
                .filter(|p| p.pending + p.unacked.unwrap_or(0) > 0)
            {
                match p.unacked {
                    Some(u) => println!(
                        "  partition {:>3}: {} pending, {u} unacknowledged",
                        p.partition, p.pending
                    ),
                    None => println!("  partition {:>3}: {} behind", p.partition, p.pending),
                }
            }
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Bench { args } = &cli.command {
        return bench(args);
    }
    let config = config(&cli)?;
    let suffix = config.bus.dispatch.dead_letter_suffix.clone();
    let bus = config.connect().await.map_err(Failure::Bus)?;
    let result = match cli.command {
        Command::Publish(args) => publish::run(&bus, args, cli.output).await,
        Command::Tail(args) => {
            let topic = args.read.topic.clone();
            tail::run(&bus, &topic, &args.read, cli.output, false).await
        }
        Command::Dlq(DlqCommand::List(args)) => {
            let topic = format!("{}{suffix}", args.read.topic);
            tail::run(&bus, &topic, &args.read, cli.output, true).await
        }
        Command::Dlq(DlqCommand::Replay(args)) => {
            let topic = format!("{}{suffix}", args.read.topic);
            dlq::replay(&bus, &topic, &args.read, cli.output).await
        }
        Command::Lag { topic, group } => lag(&bus, &topic, &group, cli.output).await,
        Command::Bench { .. } => Ok(()),
    };
    let closed = bus.close().await.map_err(Failure::Bus);
    result.and(closed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("eventbus: {f}");
            ExitCode::from(f.code())
        }
    }
}
