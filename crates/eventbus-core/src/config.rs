//! Configuration with the defaults of the design contract (`shared/DESIGN.md` §1).
//!
//! Every struct has public fields, a `Default` with the documented values, and chained
//! `with_*` setters for the common knobs. Each also deserializes with serde (from a TOML file
//! through the `eventbus` facade's `Config`, or any serde format): missing fields keep their
//! defaults, unknown fields are refused, durations are written with a unit (`"100ms"`, see
//! [`crate::duration`]).

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::codec::Compression;
use crate::error::BusError;
use crate::middleware::{Layer, Layers};
use crate::publish::ResultCallback;

/// Publishes awaiting a broker ACK at most (seed: `PublishAsyncMaxPending(10000)`).
pub const DEFAULT_IN_FLIGHT_WINDOW: usize = 10_000;
/// Largest message (payload + headers) accepted: 1 MiB, the default limit of both brokers.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Payloads shorter than this are not compressed: LZ4 gains nothing on them.
pub const DEFAULT_COMPRESSION_MIN_BYTES: usize = 512;
/// Deadline for `close()` phases and `flush()`.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages per pull (seed fix 2).
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Longest wait of one pull (seed fix 3).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(100);
/// Keyed workers: how many aggregates are handled at the same time. A slow or blocked
/// aggregate holds one of them and stalls no other aggregate.
pub const DEFAULT_KEYED_WORKERS: usize = 32;
/// Messages with an aggregate id buffered (or being handled) at most, over all aggregates:
/// the dispatcher's read-ahead. A full buffer stops the fetchers.
pub const DEFAULT_KEYED_BUFFER: usize = 8_192;
/// Global-pool queue slots per global worker (seed: `workerCount × 100`).
pub const GLOBAL_QUEUE_PER_WORKER: usize = 100;
/// Event ids remembered per worker to drop redelivered duplicates.
pub const DEFAULT_DEDUP_WINDOW: usize = 1024;
/// Interval of in-progress signals while a handler runs or a retry waits (a third of the
/// default NATS AckWait of 30 s).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// Default suffix of the dead-letter topic: `orders` → `orders.dlq`.
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".dlq";

/// Handler retry policy: exponential backoff, in place (the worker waits, so the order of an
/// aggregate's messages holds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Handler attempts per message, the first included (default 3). At least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt (default 100 ms).
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub initial_backoff: Duration,
    /// Longest wait between attempts (default 5 s).
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub max_backoff: Duration,
    /// Growth factor of the wait (default 2.0).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// Wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.initial_backoff.as_secs_f64() * exp;
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }
}

/// Publishing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// Publishes awaiting a broker ACK at most; `publish` waits when it is full (default 10,000).
    pub in_flight_window: usize,
    /// Capacity of the publish results stream (default 10,000). A reader that falls behind
    /// slows publishing down; results are never dropped.
    pub results_capacity: usize,
    /// Compression for every topic without an override (default none).
    pub compression: Compression,
    /// Per-topic compression overrides.
    pub topic_compression: HashMap<String, Compression>,
    /// Payloads shorter than this stay plain (default 512 bytes).
    pub compression_min_bytes: usize,
    /// Largest message accepted, payload and headers (default 1 MiB).
    pub max_message_bytes: usize,
    /// Deadline of `flush()` and of each phase of `close()` (default 30 s).
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub close_timeout: Duration,
    /// Give every message a W3C `traceparent` (and pass on `tracestate`) so its handling
    /// continues the publisher's trace (default true; see [`crate::trace`]).
    pub propagate_trace: bool,
    /// Called with every publish result on the bus's ACK collector task (default none; code
    /// only, not read from configuration files).
    #[serde(skip)]
    pub on_result: Option<ResultCallback>,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            in_flight_window: DEFAULT_IN_FLIGHT_WINDOW,
            results_capacity: DEFAULT_IN_FLIGHT_WINDOW,
            compression: Compression::None,
            topic_compression: HashMap::new(),
            compression_min_bytes: DEFAULT_COMPRESSION_MIN_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            propagate_trace: true,
            on_result: None,
        }
    }
}

impl PublishConfig {
    /// The compression for `topic`.
    pub fn compression_for(&self, topic: &str) -> Compression {
        self.topic_compression
            .get(topic)
            .copied()
            .unwrap_or(self.compression)
    }
}

/// The shared dispatcher: keyed pool, global pool, retries, dead letters.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "DispatchFields")]
pub struct DispatchConfig {
    /// Keyed workers `K`: each takes the next message of any aggregate no other worker is
    /// on, so up to `K` aggregates are handled at once, each strictly in order (default 32).
    pub keyed_workers: usize,
    /// Messages with an aggregate id buffered or being handled at most, all aggregates
    /// together (default 8,192). A full buffer stops the fetchers (backpressure).
    pub keyed_buffer: usize,
    /// Workers of the global pool for messages without an aggregate id (default 2 × cores).
    pub global_workers: usize,
    /// Queue depth of the global pool (default `global_workers × 100`; in a configuration
    /// file, of the `global_workers` given there).
    pub global_queue: usize,
    /// Handler retries.
    pub retry: RetryPolicy,
    /// Dead-letter topic = source topic + this suffix (default `.dlq`).
    pub dead_letter_suffix: String,
    /// Event ids each worker remembers to skip duplicates (default 1,024; 0 turns it off).
    pub dedup_window: usize,
    /// In-progress signal interval for long handlers and retry waits (default 10 s).
    pub progress_interval: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let global_workers = 2 * cores;
        Self {
            keyed_workers: DEFAULT_KEYED_WORKERS,
            keyed_buffer: DEFAULT_KEYED_BUFFER,
            global_workers,
            global_queue: global_workers * GLOBAL_QUEUE_PER_WORKER,
            retry: RetryPolicy::default(),
            dead_letter_suffix: DEFAULT_DEAD_LETTER_SUFFIX.to_string(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

/// [`DispatchConfig`] as a configuration file writes it: without `global_queue`, the queue
/// follows the `global_workers` given there.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DispatchFields {
    keyed_workers: usize,
    keyed_buffer: usize,
    global_workers: usize,
    global_queue: Option<usize>,
    retry: RetryPolicy,
    dead_letter_suffix: String,
    dedup_window: usize,
    #[serde(deserialize_with = "crate::duration::deserialize")]
    progress_interval: Duration,
}

impl Default for DispatchFields {
    fn default() -> Self {
        let d = DispatchConfig::default();
        Self {
            keyed_workers: d.keyed_workers,
            keyed_buffer: d.keyed_buffer,
            global_workers: d.global_workers,
            global_queue: None,
            retry: d.retry,
            dead_letter_suffix: d.dead_letter_suffix,
            dedup_window: d.dedup_window,
            progress_interval: d.progress_interval,
        }
    }
}

impl From<DispatchFields> for DispatchConfig {
    fn from(f: DispatchFields) -> Self {
        Self {
            keyed_workers: f.keyed_workers,
            keyed_buffer: f.keyed_buffer,
            global_queue: f
                .global_queue
                .unwrap_or_else(|| f.global_workers.saturating_mul(GLOBAL_QUEUE_PER_WORKER)),
            global_workers: f.global_workers,
            retry: f.retry,
            dead_letter_suffix: f.dead_letter_suffix,
            dedup_window: f.dedup_window,
            progress_interval: f.progress_interval,
        }
    }
}

/// Default [`SubscribeOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Pulling: one fetcher per subscription.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscribeOptions {
    /// Messages per pull (default 500).
    pub batch_size: usize,
    /// Longest wait of one pull (default 100 ms).
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub max_wait: Duration,
    /// Dead-letter topic; default: the topic plus the dispatcher's suffix.
    pub dead_letter_topic: Option<String>,
    /// A subscription that has received nothing for this long, has nothing in flight, and
    /// whose consumer holds a partition with messages waiting (the broker's lag) is stalled:
    /// health lists it, `fetch_stalls` counts it, and it gets a new consumer (default 60 s;
    /// zero turns the check off). Checked at most once per period, one lag query each.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub stall_timeout: Duration,
    /// Middleware around this subscription's handler, inside the bus's own (code only, not
    /// read from configuration files; see [`crate::middleware`]).
    #[serde(skip)]
    pub layers: Layers,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            max_wait: DEFAULT_MAX_WAIT,
            dead_letter_topic: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            layers: Layers::new(),
        }
    }
}

impl SubscribeOptions {
    /// Adds a middleware layer inside the ones added before.
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.layers.push(layer);
        self
    }
}

/// Everything a bus needs besides its transport.
///
/// ```
/// use eventbus_core::{BusConfig, Compression};
/// let cfg = BusConfig::default()
///     .with_compression(Compression::Lz4)
///     .with_keyed_workers(64)
///     .with_max_attempts(5);
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Publishing.
    pub publish: PublishConfig,
    /// Dispatching.
    pub dispatch: DispatchConfig,
    /// Default pull settings of subscriptions.
    pub subscribe: SubscribeOptions,
}

impl BusConfig {
    /// Sets the in-flight publish window.
    pub fn with_in_flight_window(mut self, n: usize) -> Self {
        self.publish.in_flight_window = n;
        self
    }
    /// Sets the bus-wide compression.
    pub fn with_compression(mut self, c: Compression) -> Self {
        self.publish.compression = c;
        self
    }
    /// Sets compression for one topic.
    pub fn with_topic_compression(mut self, topic: impl Into<String>, c: Compression) -> Self {
        self.publish.topic_compression.insert(topic.into(), c);
        self
    }
    /// Sets the message size limit.
    pub fn with_max_message_bytes(mut self, n: usize) -> Self {
        self.publish.max_message_bytes = n;
        self
    }
    /// Sets the flush/close deadline.
    pub fn with_close_timeout(mut self, d: Duration) -> Self {
        self.publish.close_timeout = d;
        self
    }
    /// Calls `f` with every publish result (on the ACK collector task: keep it short).
    pub fn with_result_callback(
        mut self,
        f: impl Fn(&crate::PublishResult) + Send + Sync + 'static,
    ) -> Self {
        self.publish.on_result = Some(ResultCallback::new(f));
        self
    }
    /// Sets the number of keyed workers.
    pub fn with_keyed_workers(mut self, n: usize) -> Self {
        self.dispatch.keyed_workers = n;
        self
    }
    /// Sets the number of global workers (and their queue to `n × 100`).
    pub fn with_global_workers(mut self, n: usize) -> Self {
        self.dispatch.global_workers = n;
        self.dispatch.global_queue = n.saturating_mul(GLOBAL_QUEUE_PER_WORKER);
        self
    }
    /// Sets the handler attempts per message.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.dispatch.retry.max_attempts = n;
        self
    }
    /// Sets the retry policy.
    pub fn with_retry(mut self, r: RetryPolicy) -> Self {
        self.dispatch.retry = r;
        self
    }
    /// Sets the pull batch size.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.subscribe.batch_size = n;
        self
    }
    /// Sets the pull max wait.
    pub fn with_max_wait(mut self, d: Duration) -> Self {
        self.subscribe.max_wait = d;
        self
    }

    /// Rejects settings that cannot work (zero-sized windows, pools or queues).
    pub fn validate(&self) -> Result<(), BusError> {
        let checks = [
            (self.publish.in_flight_window, "publish.in_flight_window"),
            (self.publish.results_capacity, "publish.results_capacity"),
            (self.publish.max_message_bytes, "publish.max_message_bytes"),
            (self.dispatch.keyed_workers, "dispatch.keyed_workers"),
            (self.dispatch.keyed_buffer, "dispatch.keyed_buffer"),
            (self.dispatch.global_workers, "dispatch.global_workers"),
            (self.dispatch.global_queue, "dispatch.global_queue"),
            (self.subscribe.batch_size, "subscribe.batch_size"),
        ];
        for (value, name) in checks {
            if value == 0 {
                return Err(BusError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.publish.in_flight_window > (u32::MAX as usize) {
            return Err(BusError::Config(
                "publish.in_flight_window must fit in u32".into(),
            ));
        }
        if self.dispatch.retry.max_attempts == 0 {
            return Err(BusError::Config(
                "dispatch.retry.max_attempts must be at least 1".into(),
            ));
        }
        if self.dispatch.dead_letter_suffix.is_empty() {
            return Err(BusError::Config(
                "dispatch.dead_letter_suffix must not be empty (it would dead-letter a topic into itself)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let c = BusConfig::default();
        assert_eq!(c.publish.in_flight_window, 10_000);
        assert_eq!(c.subscribe.batch_size, 500);
        assert_eq!(c.subscribe.max_wait, Duration::from_millis(100));
        assert_eq!(c.dispatch.global_queue, c.dispatch.global_workers * 100);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn zero_sizes_are_rejected() {
        assert!(BusConfig::default()
            .with_keyed_workers(0)
            .validate()
            .is_err());
        assert!(BusConfig::default()
            .with_max_attempts(0)
            .validate()
            .is_err());
        assert!(BusConfig::default()
            .with_in_flight_window(0)
            .validate()
            .is_err());
    }

    #[test]
    fn deserializes_with_defaults_for_what_is_missing() {
        let c: BusConfig = serde_json::from_value(serde_json::json!({
            "publish": { "in_flight_window": 20000, "close_timeout": "5s", "compression": "lz4",
                         "topic_compression": { "big": "lz4" } },
            "dispatch": { "global_workers": 3, "retry": { "max_attempts": 5, "initial_backoff": "10ms" } },
            "subscribe": { "max_wait": "250ms" }
        }))
        .expect("deserialize");
        assert_eq!(c.publish.in_flight_window, 20_000);
        assert_eq!(c.publish.close_timeout, Duration::from_secs(5));
        assert_eq!(c.publish.compression_for("big"), Compression::Lz4);
        assert_eq!(c.publish.results_capacity, DEFAULT_IN_FLIGHT_WINDOW);
        assert_eq!(
            c.dispatch.global_queue, 300,
            "the queue follows the workers given"
        );
        assert_eq!(c.dispatch.retry.max_attempts, 5);
        assert_eq!(c.dispatch.retry.initial_backoff, Duration::from_millis(10));
        assert_eq!(
            c.dispatch.retry.max_backoff,
            RetryPolicy::default().max_backoff
        );
        assert_eq!(c.dispatch.keyed_workers, DEFAULT_KEYED_WORKERS);
        assert_eq!(c.subscribe.max_wait, Duration::from_millis(250));
        assert_eq!(c.subscribe.batch_size, DEFAULT_BATCH_SIZE);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let unknown = serde_json::from_value::<BusConfig>(
            serde_json::json!({ "publish": { "in_flight_windw": 1 } }),
        )
        .expect_err("unknown field");
        assert!(unknown.to_string().contains("in_flight_windw"), "{unknown}");
        let bad = serde_json::from_value::<BusConfig>(
            serde_json::json!({ "subscribe": { "max_wait": "soon" } }),
        )
        .expect_err("bad duration");
        assert!(bad.to_string().contains("soon"), "{bad}");
        let compression = serde_json::from_value::<BusConfig>(
            serde_json::json!({ "publish": { "compression": "zstd" } }),
        )
        .expect_err("unknown compression");
        assert!(compression.to_string().contains("zstd"), "{compression}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryPolicy::default();
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(40), Duration::from_secs(5));
    }
}
