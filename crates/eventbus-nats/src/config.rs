//! NATS configuration with the seed's defaults (DESIGN.md §1, fix 8).
//!
//! Every struct deserializes with serde (a `[nats]` table of the `eventbus` facade's
//! configuration file): missing fields keep their defaults, unknown fields are refused,
//! durations are written with a unit (`"30s"`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use eventbus_core::Secret;

/// How the client authenticates. In a configuration file: `auth = { token = "…" }`,
/// `auth = { user_password = { user = "…", password = "…" } }`, `auth = { nkey = "…" }`,
/// `auth = { credentials_file = "path" }` or `auth = "none"`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    /// No authentication.
    #[default]
    None,
    /// A token.
    Token(Secret),
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// An NKey seed.
    #[serde(rename = "nkey")]
    NKey(Secret),
    /// A `.creds` file (JWT + NKey seed).
    CredentialsFile(PathBuf),
}

/// TLS options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Require TLS even if the server does not ask for it.
    pub required: bool,
    /// Extra root certificates (PEM).
    pub root_certificates: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS (`["cert.pem", "key.pem"]`).
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// Where JetStream keeps a stream (`"file"` or `"memory"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk (default): survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost on restart.
    Memory,
}

/// Stream settings applied to every topic's stream (one stream per topic).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// Stream name = this prefix + the topic with `.` replaced by `_` (default `EB_`).
    pub name_prefix: String,
    /// Storage (default file).
    pub storage: Storage,
    /// Bytes kept per stream (default 1 GiB).
    pub max_bytes: i64,
    /// Messages kept per stream (default 1,000,000).
    pub max_messages: i64,
    /// Oldest message kept (default 0 = no age limit).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub max_age: Duration,
    /// Window in which a republished `event_id` (`Nats-Msg-Id`) is a duplicate (default 2 min).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub duplicate_window: Duration,
    /// Replicas (default 1).
    pub replicas: usize,
    /// Partitions of a new topic (default 16, like the Kafka backend's topics): the publisher
    /// puts an aggregate's events on `<topic>.<partition>`, partition = murmur2(aggregate id)
    /// mod partitions, as Kafka's Java client does, and a consumer group hands whole partitions
    /// to its instances. Fixed once the stream exists: the stream's metadata records it and an
    /// existing stream's count wins over this one.
    pub partitions: u16,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name_prefix: "EB_".into(),
            storage: Storage::File,
            max_bytes: 1 << 30,
            max_messages: 1_000_000,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            partitions: 16,
        }
    }
}

/// Durable pull consumer settings (one consumer per topic and group).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Redelivery after this long without an ack (default 30 s; in-progress acks extend it).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub ack_wait: Duration,
    /// Unacked messages the server lets the consumer have (default 10,000).
    pub max_ack_pending: i64,
    /// Pull requests waiting on the server at most (default 1,000).
    pub max_waiting: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            max_waiting: 1_000,
        }
    }
}

/// How the instances of a consumer group share a topic's partitions (see docs/nats.md).
///
/// Each partition is owned by one live instance at a time through a lease in a JetStream
/// key-value bucket next to the topic's stream; instances announce themselves in the same
/// bucket. Every `heartbeat` an instance renews its leases and its membership, looks at the
/// members and takes or hands over partitions, so a joining instance gets its share within a
/// few heartbeats and a partition of an instance that died moves once its lease expired.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    /// How long a lease and a membership entry live without renewal (default 10 s): the
    /// longest a dead instance's partitions wait for a new owner. An instance that cannot renew
    /// stops taking messages of its partitions one heartbeat before this, so a paused or cut-off
    /// instance stops before another one may start. Fixed per topic by the first instance: the
    /// bucket's age limit is the lease time.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub lease_ttl: Duration,
    /// How often leases and membership are renewed and partitions rebalanced (default 1 s). At
    /// most a third of `lease_ttl`, so two renewals can be lost before a lease lapses.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub heartbeat: Duration,
    /// This instance's name in its groups (`[A-Za-z0-9_-]`, default: a random one per
    /// subscription). Shown in the bucket, for operators.
    pub instance_id: Option<String>,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            instance_id: None,
        }
    }
}

/// Everything the NATS transport needs.
///
/// ```
/// use eventbus_nats::{Auth, NatsConfig, Secret};
/// let cfg = NatsConfig::new("nats://127.0.0.1:4222")
///     .with_auth(Auth::Token(Secret::new("s3cr3t")));
/// assert!(!format!("{cfg:?}").contains("s3cr3t"));
/// // Credentials in the URL are hidden too.
/// let cfg = NatsConfig::new("nats://bob:hunter2@127.0.0.1:4222");
/// assert!(!format!("{cfg:?}").contains("hunter2"));
/// ```
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://host:port`).
    pub url: String,
    /// Client name shown by the server (default `eventbus`).
    pub name: String,
    /// Authentication.
    pub auth: Auth,
    /// TLS.
    pub tls: Tls,
    /// Timeout of the first connection (default 5 s).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub connect_timeout: Duration,
    /// Per-stream settings.
    pub stream: StreamSettings,
    /// Per-consumer settings.
    pub consumer: ConsumerSettings,
    /// How a consumer group's instances share partitions.
    pub group: GroupSettings,
    /// Publishes awaiting a JetStream ACK at most, in the client (default 10,000; keep it at
    /// least the bus's `in_flight_window`).
    pub max_ack_inflight: usize,
    /// How long to wait for one publish ACK before republishing it (default 5 s). Also bounds
    /// each JetStream API request the transport makes (stream and consumer provisioning).
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub publish_ack_timeout: Duration,
    /// How long creating (or finding) a topic's stream and its groups' bucket may take in
    /// all (default 30 s): a request that times out, or finds JetStream unavailable, is sent
    /// again with backoff until then (each request bounded by `publish_ack_timeout`), so a
    /// busy cluster replicating a create does not fail a subscribe or a first publish.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub provision_timeout: Duration,
    /// Republishes (same `Nats-Msg-Id`, so never stored twice) after a lost ACK, before the
    /// publish is reported failed (default 5).
    pub publish_retries: u32,
    /// Pull request lifetime on the server (default 5 s); the fetcher hands messages on as
    /// they arrive, this only bounds how long one pull request lives.
    #[serde(deserialize_with = "eventbus_core::duration::deserialize")]
    pub pull_expires: Duration,
}

/// `Debug` with the URLs' credentials (`user:password@`, `token@`) replaced by `***`.
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &crate::url::redact_url(&self.url))
            .field("name", &self.name)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("group", &self.group)
            .field("max_ack_inflight", &self.max_ack_inflight)
            .field("publish_ack_timeout", &self.publish_ack_timeout)
            .field("provision_timeout", &self.provision_timeout)
            .field("publish_retries", &self.publish_retries)
            .field("pull_expires", &self.pull_expires)
            .finish()
    }
}

/// Default of [`NatsConfig::provision_timeout`].
pub const DEFAULT_PROVISION_TIMEOUT: Duration = Duration::from_secs(30);

/// The server a default configuration points at.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

impl Default for NatsConfig {
    /// Defaults for a server at [`DEFAULT_URL`].
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

impl NatsConfig {
    /// Defaults for a server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: "eventbus".into(),
            auth: Auth::None,
            tls: Tls::default(),
            connect_timeout: Duration::from_secs(5),
            stream: StreamSettings::default(),
            consumer: ConsumerSettings::default(),
            group: GroupSettings::default(),
            max_ack_inflight: 10_000,
            publish_ack_timeout: Duration::from_secs(5),
            provision_timeout: DEFAULT_PROVISION_TIMEOUT,
            publish_retries: 5,
            pull_expires: Duration::from_secs(5),
        }
    }

    /// Sets the authentication.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Sets the storage of new streams.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.stream.storage = storage;
        self
    }

    /// Sets the consumers' ack wait.
    pub fn with_ack_wait(mut self, d: Duration) -> Self {
        self.consumer.ack_wait = d;
        self
    }
}
