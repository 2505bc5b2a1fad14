//! OpenMessaging Benchmark compatibility: its workload files in, its result JSON out.
//!
//! A workload file is flat YAML (`key: value` lines, `#` comments), as in OMB's `workloads/`.
//! How each field maps onto a run (docs/benchmarks.md has the table):
//!
//! - `topics`, `producersPerTopic`, `messageSize`: as in OMB (the payload is the bus's JSON
//!   envelope with a body of `messageSize` bytes);
//! - `partitionsPerTopic`: the topics get that many partitions (Kafka partitions; NATS
//!   partition subjects of the topic's stream);
//! - `producerRate`: the open-loop rate in msg/s for the whole run, for `testDurationMinutes`
//!   (`--duration-secs` overrides it); the run publishes `rate × duration` messages;
//! - `keyDistributor`: `KEY_ROUND_ROBIN` cycles through 10,000 keys as OMB does (per-key order
//!   is checked); `RANDOM_NANO` and `NO_KEY` give every message its own key (envelopes always
//!   carry an aggregate id, so "no key" is "no two messages share one");
//! - `payloadFile`, `useRandomizedPayloads`, `randomBytesRatio`, `randomizedPayloadPoolSize`,
//!   `warmupDurationMinutes`, `backlogDrainRatio`: accepted and recorded, not used;
//! - `consumerPerSubscription`: that many bus instances in the topic's consumer group (each its
//!   own connection and dispatcher, in the benchmark's process; `--instances` overrides it);
//! - `subscriptionsPerTopic` other than 1, `consumerBacklogSizeGB` other than 0 and
//!   `producerRate: 0` (rate probing) are refused with an error.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::targets::{RunResult, Target};
use crate::timeline::Sample;
use crate::workload::Shape;

/// Keys OMB's `KeyRoundRobin` cycles through.
const OMB_UNIQUE_KEYS: usize = 10_000;

/// OMB's key distributors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyDistributor {
    NoKey,
    KeyRoundRobin,
    RandomNano,
}

/// An OMB workload (the fields of OMB's `Workload.java`, with its defaults).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub topics: usize,
    pub partitions_per_topic: i32,
    pub key_distributor: KeyDistributor,
    pub message_size: usize,
    pub use_randomized_payloads: bool,
    pub random_bytes_ratio: f64,
    pub randomized_payload_pool_size: usize,
    pub payload_file: Option<String>,
    pub subscriptions_per_topic: usize,
    pub producers_per_topic: usize,
    pub consumer_per_subscription: usize,
    pub producer_rate: f64,
    pub consumer_backlog_size_gb: f64,
    pub backlog_drain_ratio: f64,
    pub test_duration_minutes: f64,
    pub warmup_duration_minutes: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            name: String::new(),
            topics: 0,
            partitions_per_topic: 0,
            key_distributor: KeyDistributor::NoKey,
            message_size: 0,
            use_randomized_payloads: false,
            random_bytes_ratio: 0.0,
            randomized_payload_pool_size: 0,
            payload_file: None,
            subscriptions_per_topic: 0,
            producers_per_topic: 0,
            consumer_per_subscription: 0,
            producer_rate: 0.0,
            consumer_backlog_size_gb: 0.0,
            backlog_drain_ratio: 1.0,
            test_duration_minutes: 0.0,
            warmup_duration_minutes: 1.0,
        }
    }
}

/// Strips a trailing `# comment` that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('#', None) => return &line[..i],
            _ => {}
        }
    }
    line
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

impl Workload {
    /// Reads a workload file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read workload {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("workload {}: {e}", path.display()))
    }

    /// Parses a workload file's text; every error names the line and the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut w = Workload::default();
        let mut seen: Vec<String> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = strip_comment(raw);
            if line.trim().is_empty() || line.trim() == "---" {
                continue;
            }
            let at = || format!("line {}", n + 1);
            if line.starts_with(char::is_whitespace) || line.trim_start().starts_with('-') {
                return Err(format!(
                    "{}: nested values and lists are not part of the workload format: {raw:?}",
                    at()
                ));
            }
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| format!("{}: expected `key: value`, got {raw:?}", at()))?;
            let (key, value) = (key.trim(), unquote(value));
            if seen.iter().any(|k| k == key) {
                return Err(format!("{}: `{key}` is given twice", at()));
            }
            seen.push(key.to_string());
            let bad = |what: &str| format!("{}: `{key}` must be {what}, got {value:?}", at());
            let count = || {
                value
                    .parse::<usize>()
                    .map_err(|_| bad("a whole number ≥ 0"))
            };
            let number = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| bad("a number ≥ 0"))
            };
            let flag = || value.parse::<bool>().map_err(|_| bad("true or false"));
            match key {
                "name" => w.name = value.to_string(),
                "topics" => w.topics = count()?,
                "partitionsPerTopic" => {
                    w.partitions_per_topic = value
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p >= 1)
                        .ok_or_else(|| bad("a whole number ≥ 1"))?
                }
                "keyDistributor" => {
                    w.key_distributor = match value {
                        "NO_KEY" => KeyDistributor::NoKey,
                        "KEY_ROUND_ROBIN" => KeyDistributor::KeyRoundRobin,
                        "RANDOM_NANO" => KeyDistributor::RandomNano,
                        _ => return Err(bad("NO_KEY, KEY_ROUND_ROBIN or RANDOM_NANO")),
                    }
                }
                "messageSize" => w.message_size = count()?,
                "useRandomizedPayloads" => w.use_randomized_payloads = flag()?,
                "randomBytesRatio" => w.random_bytes_ratio = number()?,
                "randomizedPayloadPoolSize" => w.randomized_payload_pool_size = count()?,
                "payloadFile" => w.payload_file = Some(value.to_string()),
                "subscriptionsPerTopic" => w.subscriptions_per_topic = count()?,
                "producersPerTopic" => w.producers_per_topic = count()?,
                "consumerPerSubscription" => w.consumer_per_subscription = count()?,
                "producerRate" => w.producer_rate = number()?,
                "consumerBacklogSizeGB" => w.consumer_backlog_size_gb = number()?,
                "backlogDrainRatio" => w.backlog_drain_ratio = number()?,
                "testDurationMinutes" => w.test_duration_minutes = number()?,
                "warmupDurationMinutes" => w.warmup_duration_minutes = number()?,
                other => {
                    return Err(format!(
                        "{}: unknown field `{other}` (OpenMessaging workload fields: name, topics, \
                         partitionsPerTopic, keyDistributor, messageSize, payloadFile, \
                         useRandomizedPayloads, randomBytesRatio, randomizedPayloadPoolSize, \
                         subscriptionsPerTopic, consumerPerSubscription, producersPerTopic, \
                         producerRate, consumerBacklogSizeGB, backlogDrainRatio, \
                         testDurationMinutes, warmupDurationMinutes)",
                        at()
                    ))
                }
            }
        }
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), String> {
        let need = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        need(!self.name.is_empty(), "`name` is required")?;
        need(self.topics >= 1, "`topics` must be at least 1")?;
        need(
            self.partitions_per_topic >= 1,
            "`partitionsPerTopic` must be at least 1",
        )?;
        need(self.message_size >= 1, "`messageSize` must be at least 1")?;
        need(
            self.producers_per_topic >= 1,
            "`producersPerTopic` must be at least 1",
        )?;
        need(
            self.subscriptions_per_topic == 1,
            "`subscriptionsPerTopic` other than 1 is not supported yet (one consumer group per topic)",
        )?;
        need(
            self.consumer_per_subscription >= 1,
            "`consumerPerSubscription` must be at least 1",
        )?;
        need(
            self.producer_rate > 0.0,
            "`producerRate` must be above 0 (OMB's rate probing, `producerRate: 0`, is not supported)",
        )?;
        need(
            self.consumer_backlog_size_gb == 0.0,
            "`consumerBacklogSizeGB` other than 0 (backlog drain tests) is not supported yet",
        )?;
        Ok(())
    }

    /// The run's duration: `testDurationMinutes`, or `override_secs`.
    pub fn duration(&self, override_secs: Option<f64>) -> Result<Duration, String> {
        let secs = override_secs.unwrap_or(self.test_duration_minutes * 60.0);
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                format!(
                    "workload {:?}: the test duration must be above 0",
                    self.name
                )
            })
    }

    /// The shape of one run: `producerRate × duration` messages over the keys of the key
    /// distributor.
    pub fn shape(&self, duration: Duration) -> Shape {
        let messages = ((self.producer_rate * duration.as_secs_f64()).round() as usize).max(1);
        let aggregates = match self.key_distributor {
            KeyDistributor::KeyRoundRobin => messages.min(OMB_UNIQUE_KEYS),
            KeyDistributor::NoKey | KeyDistributor::RandomNano => messages,
        };
        Shape {
            level: None,
            name: self.name.clone(),
            aggregates,
            versions: (messages / aggregates).max(1),
            topics: self.topics,
            partitions: self.partitions_per_topic,
            payload_bytes: Some(self.message_size),
        }
    }
}

/// Which percentiles of a period a latency family reports.
type Pick = fn(&Sample) -> crate::latency::Percentiles;

/// Rounds to 3 decimals, as a JSON number.
fn num(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

/// One run in OMB's `TestResult` JSON shape. Latencies are milliseconds; lists hold one value
/// per period. OMB's `publishDelayLatency*` (how late the producer sent against its schedule)
/// is not measured: this tool measures latency from the schedule itself, so the delay is
/// inside `publishLatency*` and `endToEndLatency*` already; those fields are left out.
pub fn result_json(w: &Workload, target: Target, run: &RunResult) -> Value {
    let (samples, quantiles) = match &run.timeline {
        Some(t) => (
            t.samples.as_slice(),
            [t.publish_quantiles.as_slice(), t.e2e_quantiles.as_slice()],
        ),
        None => (&[][..], [&[][..], &[][..]]),
    };
    let mut out = Map::new();
    out.insert("workload".into(), json!(w.name));
    out.insert("driver".into(), json!(driver(target)));
    out.insert("messageSize".into(), json!(w.message_size));
    out.insert("topics".into(), json!(w.topics));
    out.insert("partitions".into(), json!(w.partitions_per_topic));
    out.insert("producersPerTopic".into(), json!(w.producers_per_topic));
    out.insert(
        "consumersPerTopic".into(),
        json!(w.subscriptions_per_topic * w.consumer_per_subscription),
    );
    let list = |f: &dyn Fn(&Sample) -> f64| -> Value {
        Value::Array(samples.iter().map(|s| num(f(s))).collect())
    };
    out.insert("publishRate".into(), list(&|s| s.publish_rate));
    out.insert("publishErrorRate".into(), list(&|_| 0.0));
    out.insert("consumeRate".into(), list(&|s| s.consume_rate));
    out.insert(
        "backlog".into(),
        Value::Array(samples.iter().map(|s| json!(s.backlog)).collect()),
    );
    let pick_publish: Pick = |s| s.publish;
    let pick_e2e: Pick = |s| s.e2e;
    for (prefix, total, pick, q) in [
        (
            "publishLatency",
            &run.publish_ack_latency,
            pick_publish,
            quantiles[0],
        ),
        ("endToEndLatency", &run.e2e_latency, pick_e2e, quantiles[1]),
    ] {
        let per_period: Vec<_> = samples.iter().map(|s| pick(s).omb_fields()).collect();
        for (i, (suffix, value)) in total.omb_fields().into_iter().enumerate() {
            out.insert(
                format!("{prefix}{suffix}"),
                Value::Array(per_period.iter().map(|f| num(f[i].1)).collect()),
            );
            out.insert(
                format!("aggregated{}{suffix}", capitalized(prefix)),
                num(value),
            );
        }
        let quantile_map: Map<String, Value> =
            q.iter().map(|(k, v)| (format!("{k}"), num(*v))).collect();
        out.insert(
            format!("aggregated{}Quantiles", capitalized(prefix)),
            Value::Object(quantile_map),
        );
    }
    // Ours, beside OMB's: what the bus adds to the comparison.
    out.insert(
        "eventbus".into(),
        json!({
            "target": target.name(),
            "storage": run.storage,
            "messages": run.messages,
            "keys": run.aggregates,
            "lost": run.lost,
            "duplicates": run.duplicates,
            "orderingViolations": run.ordering_violations,
            "peakRssMb": run.peak_rss_mb,
            "peakTasks": run.peak_tasks,
            "workload": w,
        }),
    );
    Value::Object(out)
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// OMB's `driver` field: which system ran.
fn driver(target: Target) -> String {
    if target.is_raw() {
        target.name().to_string()
    } else {
        format!("eventbus-{}", target.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMB_16: &str = r#"
# Licensed under the Apache License, Version 2.0
name: 1 topic / 16 partition / 100b

topics: 1
partitionsPerTopic: 16
messageSize: 100
payloadFile: "payload/payload-100b.data"   # a comment after a value
subscriptionsPerTopic: 1
consumerPerSubscription: 1
producersPerTopic: 1
producerRate: 50000
consumerBacklogSizeGB: 0
testDurationMinutes: 15
"#;

    #[test]
    fn reads_an_omb_workload_file() {
        let w = Workload::parse(OMB_16).expect("valid");
        assert_eq!(w.name, "1 topic / 16 partition / 100b");
        assert_eq!(w.partitions_per_topic, 16);
        assert_eq!(w.payload_file.as_deref(), Some("payload/payload-100b.data"));
        assert_eq!(w.key_distributor, KeyDistributor::NoKey, "OMB's default");
        assert_eq!(w.warmup_duration_minutes, 1.0, "OMB's default");
        let shape = w.shape(w.duration(Some(2.0)).expect("duration"));
        assert_eq!(shape.messages(), 100_000);
        assert_eq!(
            shape.aggregates, 100_000,
            "no key: no two messages share one"
        );
        assert_eq!(shape.payload_bytes, Some(100));
    }

    #[test]
    fn round_robin_keys_cycle_through_ten_thousand() {
        let w = Workload::parse(
            &OMB_16.replace("topics: 1", "topics: 1\nkeyDistributor: KEY_ROUND_ROBIN"),
        )
        .expect("valid");
        let shape = w.shape(Duration::from_secs(60));
        assert_eq!(shape.aggregates, 10_000);
        assert_eq!(shape.versions, 300);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let e = Workload::parse(&OMB_16.replace("messageSize: 100", "messageSize: big"))
            .expect_err("bad number");
        assert!(e.contains("line 7") && e.contains("messageSize"), "{e}");
        let e = Workload::parse(&format!("{OMB_16}\nproducerRat: 5")).expect_err("typo");
        assert!(e.contains("unknown field `producerRat`"), "{e}");
        let e = Workload::parse(&format!("{OMB_16}\n  nested: 1")).expect_err("nested");
        assert!(e.contains("nested"), "{e}");
        let e = Workload::parse(
            &OMB_16.replace("subscriptionsPerTopic: 1", "subscriptionsPerTopic: 2"),
        )
        .expect_err("unsupported");
        assert!(e.contains("subscriptionsPerTopic"), "{e}");
        let e = Workload::parse(
            &OMB_16.replace("consumerPerSubscription: 1", "consumerPerSubscription: 0"),
        )
        .expect_err("no consumer");
        assert!(e.contains("consumerPerSubscription"), "{e}");
        let e = Workload::parse(&OMB_16.replace("producerRate: 50000", "producerRate: 0"))
            .expect_err("probing");
        assert!(e.contains("producerRate"), "{e}");
        let e = Workload::parse(&format!("{OMB_16}\ntopics: 2")).expect_err("twice");
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn consumers_per_subscription_are_the_group_s_instances() {
        let w = Workload::parse(
            &OMB_16.replace("consumerPerSubscription: 1", "consumerPerSubscription: 3"),
        )
        .expect("three consumers");
        assert_eq!(w.consumer_per_subscription, 3);
    }

    #[test]
    fn the_shipped_workloads_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("benches/workloads") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Workload::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4, "only {n} workloads in {}", dir.display());
    }
}
