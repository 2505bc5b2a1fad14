//! NATS configuration with the seed's defaults (DESIGN.md §1, fix 8).

use std::path::PathBuf;
use std::time::Duration;

pub use eventbus_core::Secret;

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
    NKey(Secret),
    /// A `.creds` file (JWT + NKey seed).
    CredentialsFile(PathBuf),
}

/// TLS options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    /// Require TLS even if the server does not ask for it.
    pub required: bool,
    /// Extra root certificates (PEM).
    pub root_certificates: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// Where JetStream keeps a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// On disk (default): survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost on restart.
    Memory,
}

/// Stream settings applied to every topic's stream (one stream per topic).
#[derive(Debug, Clone, PartialEq)]
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
    pub max_age: Duration,
    /// Window in which a republished `event_id` (`Nats-Msg-Id`) is a duplicate (default 2 min).
    pub duplicate_window: Duration,
    /// Replicas (default 1).
    pub replicas: usize,
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
        }
    }
}

/// Durable pull consumer settings (one consumer per topic and group).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    /// Redelivery after this long without an ack (default 30 s; in-progress acks extend it).
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

/// Everything the NATS transport needs.
///
/// ```
/// use eventbus_nats::{Auth, NatsConfig, Secret};
/// let cfg = NatsConfig::new("nats://127.0.0.1:4222")
///     .with_auth(Auth::Token(Secret::new("s3cr3t")));
/// assert!(!format!("{cfg:?}").contains("s3cr3t"));
/// ```
#[derive(Debug, Clone, PartialEq)]
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
    pub connect_timeout: Duration,
    /// Per-stream settings.
    pub stream: StreamSettings,
    /// Per-consumer settings.
    pub consumer: ConsumerSettings,
    /// Publishes awaiting a JetStream ACK at most, in the client (default 10,000; keep it at
    /// least the bus's `in_flight_window`).
    pub max_ack_inflight: usize,
    /// How long to wait for one publish ACK before republishing it (default 5 s). Also bounds
    /// each JetStream API request the transport makes (stream and consumer provisioning).
    pub publish_ack_timeout: Duration,
    /// Republishes (same `Nats-Msg-Id`, so never stored twice) after a lost ACK, before the
    /// publish is reported failed (default 5).
    pub publish_retries: u32,
    /// Pull request lifetime on the server (default 5 s); the fetcher hands messages on as
    /// they arrive, this only bounds how long one pull request lives.
    pub pull_expires: Duration,
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
            max_ack_inflight: 10_000,
            publish_ack_timeout: Duration::from_secs(5),
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
