//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The eventbus command line: the same commands on memory, NATS JetStream and Kafka.
///
/// Exit codes: 0 done; 1 an error (configuration, broker, a rejected publish); 2 bad usage;
/// 3 fewer messages than `--count` before `--timeout`.
#[derive(Parser, Debug)]
#[command(name = "eventbus", version)]
pub struct Cli {
    /// Backend URL: nats://host:port, kafka://host:port, memory:// (default: the
    /// configuration's, i.e. EVENTBUS_URL or the file's `url`).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// TOML configuration file (default: EVENTBUS_CONFIG); EVENTBUS_* variables apply over it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Output: `text` for people, `json` (one JSON object per line) for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Pretty text.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Publish envelopes: JSON from the argument, or one per line from stdin; waits for
    /// every broker ACK.
    Publish(PublishArgs),
    /// Print a topic's messages as they arrive (stored ones first).
    Tail(TailArgs),
    /// Dead letters of a topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// How far a consumer group is behind on a topic, per partition.
    Lag {
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
    },
    /// The broker comparison tool (`eventbus-bench`, next to this binary); arguments pass
    /// through.
    Bench {
        /// Arguments for eventbus-bench (`-- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Topic.
    pub topic: String,
    /// An envelope as JSON (`{"aggregate_id": …, "event_type": …, "payload": …}`; missing
    /// `event_id`, `event_version` and `timestamp` are filled in). Without it, stdin is read,
    /// one envelope per line.
    pub json: Option<String>,
}

/// Reading a topic.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// Topic.
    pub topic: String,
    /// Consumer group (default: a new one, so every stored message is read). A named group
    /// resumes where it stopped.
    #[arg(long)]
    pub group: Option<String>,
    /// Only messages of this aggregate.
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<usize>,
    /// Stop when no message came for this long (e.g. `2s`; default: keep following until
    /// Ctrl-C, or until `--count`).
    #[arg(long, value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Give up after this long with exit code 3 when `--count` was not reached.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
}

/// `tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    /// What to read.
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `dlq`.
#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Print the dead letters of TOPIC (read from TOPIC.dlq) with why they failed.
    List(TailArgs),
    /// Republish dead letters to the topic they came from (after a fix). A named `--group`
    /// (default `eventbus-cli-replay`) remembers what was replayed.
    Replay(TailArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    eventbus::duration::parse(s).map_err(|e| e.to_string())
}
