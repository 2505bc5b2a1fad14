//! Kafka configuration with documented defaults.
//!
//! Every struct deserializes with serde (a `[kafka]` table of the `eventbus` facade's
//! configuration file): missing fields keep their defaults, unknown fields are refused,
//! durations are written with a unit (`"10s"`), `extra` librdkafka properties as a table.

use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::Secret;
use rdkafka::ClientConfig;
use serde::Deserialize;

/// `security.protocol` and what goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user.
    pub sasl_username: Option<String>,
    /// SASL password.
    pub sasl_password: Option<Secret>,
    /// CA certificate (PEM).
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    pub ssl_certificate_location: Option<PathBuf>,
    /// Client key (PEM).
    pub ssl_key_location: Option<PathBuf>,
    /// Password of the client key.
    pub ssl_key_password: Option<Secret>,
}

/// The most copies a new topic gets by default (Kafka's usual production setting).
pub const DEFAULT_MAX_REPLICATION: i32 = 3;

/// The replication factor of a new topic on a cluster of `brokers` brokers when none is
/// configured: one copy per broker, at most [`DEFAULT_MAX_REPLICATION`].
pub fn default_replication(brokers: usize) -> i32 {
    i32::try_from(brokers)
        .unwrap_or(i32::MAX)
        .clamp(1, DEFAULT_MAX_REPLICATION)
}

/// How topics are created (through the admin API; broker auto-create is never relied on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    /// Partitions of new topics (default 16): the ceiling of consumer parallelism per group.
    pub partitions: i32,
    /// Replication factor of new topics (default `None`: as many copies as the cluster has
    /// brokers, at most [`DEFAULT_MAX_REPLICATION`] — 1 on a single broker, 3 on a cluster of
    /// three or more, so `acks=all` keeps three copies where it can).
    pub replication: Option<i32>,
    /// `retention.ms` of new topics (default: the broker's).
    pub retention_ms: Option<i64>,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            partitions: 16,
            replication: None,
            retention_ms: None,
        }
    }
}

/// Producer tuning.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerSettings {
    /// `compression.type` (default `lz4`: native Kafka batch compression). The only
    /// compression on Kafka: the bus's own per-message `Compression` is not applied here.
    pub compression: String,
    /// `linger.ms` (default 5): a little batching at a small latency cost.
    pub linger_ms: u32,
    /// `batch.num.messages` (default 10,000).
    pub batch_num_messages: u32,
    /// `message.timeout.ms` (default 120 s): how long librdkafka retries one message before
    /// its result is a failure.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub message_timeout: Duration,
    /// Any other librdkafka producer property.
    #[serde(deserialize_with = "properties")]
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Debug for ProducerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSettings")
            .field("compression", &self.compression)
            .field("linger_ms", &self.linger_ms)
            .field("batch_num_messages", &self.batch_num_messages)
            .field("message_timeout", &self.message_timeout)
            .field("extra", &Properties(&self.extra))
            .finish()
    }
}

/// `extra` librdkafka properties in `Debug` output: the values of secret ones (passwords,
/// keys, tokens, JAAS/OAuth configurations) are printed as `***`.
struct Properties<'a>(&'a [(String, String)]);

impl std::fmt::Debug for Properties<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SECRET: [&str; 6] = [
            "password",
            "secret",
            "token",
            "jaas",
            "oauthbearer.config",
            ".pem",
        ];
        f.debug_list()
            .entries(self.0.iter().map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let hidden = SECRET.iter().any(|s| lower.contains(s));
                (k.as_str(), if hidden { "***" } else { v.as_str() })
            }))
            .finish()
    }
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            compression: "lz4".into(),
            linger_ms: 5,
            batch_num_messages: 10_000,
            message_timeout: Duration::from_secs(120),
            extra: Vec::new(),
        }
    }
}

/// Default `fetch.wait.max.ms` (see [`ConsumerSettings::fetch_wait`]).
pub const DEFAULT_FETCH_WAIT: Duration = Duration::from_millis(100);

/// Default `queued.max.messages.kbytes` (see [`ConsumerSettings::prefetch_kbytes`]).
pub const DEFAULT_PREFETCH_KBYTES: usize = 16 * 1024;

/// Consumer tuning.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// `session.timeout.ms` (default 10 s).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub session_timeout: Duration,
    /// How often completed offsets are committed (default 1 s; also on close and revoke).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub commit_interval: Duration,
    /// How long a revocation waits for in-flight messages of revoked partitions (default 10 s).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub drain_timeout: Duration,
    /// `fetch.wait.max.ms`: the longest a fetch request waits at the broker for data
    /// (default 100 ms, the seed's short max-wait; librdkafka's own default is 500 ms).
    /// Apache Kafka answers as soon as data arrives, so this only paces idle polling there.
    /// A broker that holds fetches longer, as Tansu does, adds up to this much to a message's
    /// latency: 10 ms gave e2e p50 14 ms on Tansu against 22 ms at 100 ms and 238 ms at
    /// 500 ms (docs/kafka.md), at the price of more fetch requests while a topic is idle.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub fetch_wait: Duration,
    /// `queued.max.messages.kbytes`: how much librdkafka prefetches ahead of the fetcher
    /// (default 16 MiB; librdkafka's own default is 64 MiB). The bus buffers fetched messages
    /// itself (the dispatcher's bounded buffer), so a deep client queue on top only holds
    /// memory: 16 MiB still covers about a second of 1 KB messages at 16,000 msg/s.
    pub prefetch_kbytes: usize,
    /// Any other librdkafka consumer property.
    #[serde(deserialize_with = "properties")]
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Debug for ConsumerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSettings")
            .field("session_timeout", &self.session_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("fetch_wait", &self.fetch_wait)
            .field("prefetch_kbytes", &self.prefetch_kbytes)
            .field("extra", &Properties(&self.extra))
            .finish()
    }
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            fetch_wait: DEFAULT_FETCH_WAIT,
            prefetch_kbytes: DEFAULT_PREFETCH_KBYTES,
            extra: Vec::new(),
        }
    }
}

/// Everything the Kafka transport needs.
///
/// ```
/// use eventbus_kafka::KafkaConfig;
/// let mut cfg = KafkaConfig::new("127.0.0.1:9092");
/// cfg.security.sasl_password = Some(eventbus_core::Secret::new("pw"));
/// assert!(!format!("{cfg:?}").contains("\"pw\""));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `client.id` (default `eventbus`).
    pub client_id: String,
    /// Security settings.
    pub security: Security,
    /// New topics.
    pub topic: TopicSettings,
    /// Producer.
    pub producer: ProducerSettings,
    /// Consumers.
    pub consumer: ConsumerSettings,
    /// Timeout of admin and metadata requests (default 10 s).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub request_timeout: Duration,
}

/// The brokers a default configuration points at.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

impl Default for KafkaConfig {
    /// Defaults for the brokers at [`DEFAULT_BROKERS`].
    fn default() -> Self {
        Self::new(DEFAULT_BROKERS)
    }
}

/// librdkafka properties from a table: `extra = { "queue.buffering.max.kbytes" = 65536 }`;
/// numbers and booleans are written as librdkafka reads them.
fn properties<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    let table = std::collections::BTreeMap::<String, Value>::deserialize(d)?;
    Ok(table
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Text(s) => s,
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Flag(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl KafkaConfig {
    /// Defaults for the brokers at `brokers` (`host:port[,host:port]`).
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            client_id: "eventbus".into(),
            security: Security::default(),
            topic: TopicSettings::default(),
            producer: ProducerSettings::default(),
            consumer: ConsumerSettings::default(),
            request_timeout: Duration::from_secs(10),
        }
    }

    pub(crate) fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        let s = &self.security;
        let opt = |c: &mut ClientConfig, k: &str, v: Option<&str>| {
            if let Some(v) = v {
                c.set(k, v);
            }
        };
        opt(&mut c, "security.protocol", s.protocol.as_deref());
        opt(&mut c, "sasl.mechanism", s.sasl_mechanism.as_deref());
        opt(&mut c, "sasl.username", s.sasl_username.as_deref());
        opt(
            &mut c,
            "sasl.password",
            s.sasl_password.as_ref().map(Secret::expose),
        );
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        opt(
            &mut c,
            "ssl.ca.location",
            path(&s.ssl_ca_location).as_deref(),
        );
        opt(
            &mut c,
            "ssl.certificate.location",
            path(&s.ssl_certificate_location).as_deref(),
        );
        opt(
            &mut c,
            "ssl.key.location",
            path(&s.ssl_key_location).as_deref(),
        );
        opt(
            &mut c,
            "ssl.key.password",
            s.ssl_key_password.as_ref().map(Secret::expose),
        );
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_topics_get_a_copy_per_broker_up_to_three() {
        assert_eq!(default_replication(0), 1);
        assert_eq!(default_replication(1), 1);
        assert_eq!(default_replication(2), 2);
        assert_eq!(default_replication(3), 3);
        assert_eq!(default_replication(5), 3);
        assert_eq!(TopicSettings::default().replication, None);
    }

    #[test]
    fn secret_extra_properties_are_not_printed() {
        let mut cfg = KafkaConfig::new("127.0.0.1:9092");
        cfg.producer.extra = vec![
            ("sasl.password".into(), "hunter2".into()),
            ("linger.ms".into(), "7".into()),
        ];
        cfg.consumer.extra = vec![
            ("ssl.key.pem".into(), "-----BEGIN PRIVATE KEY-----".into()),
            (
                "sasl.oauthbearer.config".into(),
                "principal=x secret=y2k".into(),
            ),
        ];
        let printed = format!("{cfg:?}");
        for secret in ["hunter2", "BEGIN PRIVATE", "y2k"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("(\"linger.ms\", \"7\")"), "{printed}");
    }
}
