//! The whole configuration from a TOML file and `EVENTBUS_*` environment variables: one
//! backend URL switches the broker, every other setting keeps the documented defaults.
//!
//! ```toml
//! url = "nats://127.0.0.1:4222"     # memory://, nats://host:port, kafka://host:port
//!
//! [bus.publish]
//! in_flight_window = 10000
//! close_timeout = "30s"
//!
//! [bus.dispatch]
//! keyed_workers = 32
//! retry = { max_attempts = 5, initial_backoff = "200ms" }
//!
//! [nats]                            # used when the URL is nats://
//! stream = { partitions = 16, storage = "file" }
//! auth = { token = "s3cr3t" }
//!
//! [kafka]                           # used when the URL is kafka://
//! producer = { linger_ms = 5 }
//! ```
//!
//! Environment variables override the file: `EVENTBUS_URL`, and a setting's path in the file
//! joined by double underscores, `EVENTBUS_BUS__PUBLISH__IN_FLIGHT_WINDOW=20000` or
//! `EVENTBUS_NATS__STREAM__PARTITIONS=8`; `EVENTBUS_CONFIG` names the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use eventbus_core::memory::MemoryConfig;
use eventbus_core::{BusConfig, BusError};
use serde::Deserialize;

use crate::BackendConfig;

/// The variable naming the configuration file read by [`Config::from_env`].
pub const CONFIG_FILE_VAR: &str = "EVENTBUS_CONFIG";
/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "EVENTBUS_";
/// What separates the levels of a setting's path in a variable's name.
pub const ENV_SEPARATOR: &str = "__";
/// The tables a variable may set (besides `EVENTBUS_URL`).
const SECTIONS: [&str; 4] = ["bus", "memory", "nats", "kafka"];

/// Everything a bus needs: which backend (a URL), the bus's own settings and each backend's.
///
/// ```
/// let config = eventbus::Config::from_toml(r#"
///     url = "memory://"
///     [bus.publish]
///     in_flight_window = 2000
/// "#)?;
/// assert_eq!(config.bus.publish.in_flight_window, 2000);
/// assert_eq!(config.bus.subscribe.batch_size, 500); // the default
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = config.connect().await?;
/// bus.close().await?;
/// # Ok::<(), eventbus::BusError>(()) }).unwrap();
/// # Ok::<(), eventbus::ConfigError>(())
/// ```
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The backend: `memory://` (default), `nats://host:port[,host:port]` (`tls://` too) or
    /// `kafka://host:port[,host:port]`. It picks which of the tables below is used, and its
    /// address replaces that table's `url` / `brokers`.
    pub url: String,
    /// The bus: publishing, dispatching, pulling.
    pub bus: BusConfig,
    /// The memory backend's limits.
    pub memory: MemoryConfig,
    /// The NATS backend's settings.
    #[cfg(feature = "nats")]
    pub nats: eventbus_nats::NatsConfig,
    /// The Kafka backend's settings.
    #[cfg(feature = "kafka")]
    pub kafka: eventbus_kafka::KafkaConfig,
}

/// `Debug` with credentials in the URL (`nats://user:password@…`) replaced by `***`.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Config");
        d.field("url", &eventbus_core::redact_url(&self.url))
            .field("bus", &self.bus)
            .field("memory", &self.memory);
        #[cfg(feature = "nats")]
        d.field("nats", &self.nats);
        #[cfg(feature = "kafka")]
        d.field("kafka", &self.kafka);
        d.finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "memory://".into(),
            bus: BusConfig::default(),
            memory: MemoryConfig::default(),
            #[cfg(feature = "nats")]
            nats: eventbus_nats::NatsConfig::default(),
            #[cfg(feature = "kafka")]
            kafka: eventbus_kafka::KafkaConfig::default(),
        }
    }
}

/// What went wrong with a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read,
    /// The file is not valid TOML.
    Syntax,
    /// A setting is unknown, has the wrong type or a value that cannot work.
    Invalid,
}

/// A configuration that cannot be used: what, where (the setting's path, and the variable when
/// one set it) and why.
#[derive(Debug)]
pub struct ConfigError {
    kind: ConfigErrorKind,
    field: Option<String>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    fn new(kind: ConfigErrorKind, field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            field,
            message: message.into(),
            source: None,
        }
    }

    /// What kind of problem it is.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// The setting at fault, as a dotted path (`bus.publish.in_flight_window`), when known.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "configuration setting `{field}`: {}", self.message),
            None => write!(f, "configuration: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ConfigError> for BusError {
    fn from(e: ConfigError) -> Self {
        BusError::Config(e.to_string())
    }
}

impl Config {
    /// Reads a TOML document; what it leaves out keeps its default.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_sources(Some(text), std::iter::empty())
    }

    /// Reads a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let text = read(path.as_ref())?;
        Self::from_toml(&text)
    }

    /// The process's configuration: the file named by `EVENTBUS_CONFIG` (if set), then the
    /// `EVENTBUS_*` variables over it (see the module documentation).
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let file = vars
            .iter()
            .find(|(k, _)| k == CONFIG_FILE_VAR)
            .map(|(_, v)| read(&PathBuf::from(v)))
            .transpose()?;
        Self::from_sources(file.as_deref(), vars)
    }

    /// A TOML document (or none) with variables over it, as [`Config::from_env`] does with the
    /// process's environment. Variables that do not start with `EVENTBUS_` are ignored, and so
    /// are `EVENTBUS_CONFIG` and any without a double underscore other than `EVENTBUS_URL`
    /// (test scripts' `EVENTBUS_NATS_URL`, for one); a variable that names a table but an
    /// unknown setting is an error.
    pub fn from_sources(
        text: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match text {
            Some(t) => toml::from_str::<toml::Table>(t).map_err(|e| {
                ConfigError::new(ConfigErrorKind::Syntax, None, e.to_string().trim_end())
            })?,
            None => toml::Table::new(),
        };
        let mut set_by = BTreeMap::new();
        for (name, value) in vars {
            let Some(path) = env_path(&name) else {
                continue;
            };
            set(&mut table, &path, env_value(&value));
            set_by.insert(path.join("."), name);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                let by = field.as_ref().and_then(|f| {
                    set_by
                        .iter()
                        .find(|(p, _)| p.starts_with(f.as_str()) || f.starts_with(p.as_str()))
                });
                // The TOML value deserializer adds its own "in `table`" lines: the path says it.
                let inner = e.into_inner().to_string();
                let mut message = inner
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with("in `"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if let Some((_, var)) = by {
                    message = format!("{message} (set by {var})");
                }
                ConfigError::new(ConfigErrorKind::Invalid, field, message)
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what deserializing cannot: the bus's limits and the backend URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.bus.validate().map_err(|e| {
            let message = match e {
                BusError::Config(m) => m,
                other => other.to_string(),
            };
            // The bus names its settings from its own root: `dispatch.keyed_workers`.
            let field = message
                .split_whitespace()
                .next()
                .filter(|w| w.contains('.'))
                .map(|w| format!("bus.{w}"));
            ConfigError::new(ConfigErrorKind::Invalid, field, message)
        })?;
        self.backend().map(|_| ())
    }

    /// The backend the URL names, with its table's settings.
    pub fn backend(&self) -> Result<BackendConfig, ConfigError> {
        let url = self.url.trim();
        let invalid = |m: String| ConfigError::new(ConfigErrorKind::Invalid, Some("url".into()), m);
        let scheme = url.split_once("://").map(|(s, _)| s).ok_or_else(|| {
            let url = eventbus_core::redact_url(url);
            invalid(format!("{url:?} is not a backend URL (scheme://address)"))
        })?;
        match scheme {
            "memory" => Ok(BackendConfig::Memory(self.memory.clone())),
            #[cfg(feature = "nats")]
            "nats" | "tls" => {
                let mut nats = self.nats.clone();
                nats.url = url.to_string();
                Ok(BackendConfig::Nats(nats))
            }
            #[cfg(feature = "kafka")]
            "kafka" => {
                let mut kafka = self.kafka.clone();
                kafka.brokers = url.trim_start_matches("kafka://").to_string();
                Ok(BackendConfig::Kafka(kafka))
            }
            // Unknown, or a backend this build leaves out: `from_url` says which.
            _ => Err(invalid(BackendConfig::from_url(url).err().map_or_else(
                || format!("unknown backend URL scheme {scheme:?}"),
                |e| e.to_string(),
            ))),
        }
    }

    /// Connects to the backend and starts a bus.
    pub async fn connect(self) -> Result<crate::EventBus, BusError> {
        let backend = self.backend()?;
        crate::connect(backend, self.bus).await
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        let mut err = ConfigError::new(
            ConfigErrorKind::Read,
            None,
            format!("cannot read {}: {e}", path.display()),
        );
        err.source = Some(Box::new(e));
        err
    })
}

/// The setting a variable names: `EVENTBUS_URL` → `url`,
/// `EVENTBUS_BUS__PUBLISH__IN_FLIGHT_WINDOW` → `bus.publish.in_flight_window`.
fn env_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest == "URL" {
        return Some(vec!["url".into()]);
    }
    let path: Vec<String> = rest
        .split(ENV_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect();
    (path.len() > 1 && SECTIONS.contains(&path[0].as_str())).then_some(path)
}

/// A variable's value as TOML reads it (a number, a boolean, an array, a quoted string), else
/// the text itself.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        at = next;
    }
    at.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_empty_file_is_every_default() {
        let c = Config::from_toml("").expect("empty");
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
        assert_eq!(c.bus.publish.in_flight_window, 10_000);
        assert_eq!(c.bus.subscribe.max_wait, Duration::from_millis(100));
        assert!(matches!(c.backend(), Ok(BackendConfig::Memory(_))));
    }

    #[test]
    fn a_file_sets_what_it_names() {
        let c = Config::from_toml(
            r#"
            url = "memory://"
            [bus.publish]
            in_flight_window = 2000
            compression = "lz4"
            close_timeout = "5s"
            [bus.dispatch]
            keyed_workers = 8
            retry = { max_attempts = 5, initial_backoff = "20ms" }
            [memory]
            partitions = 4
            "#,
        )
        .expect("parse");
        assert_eq!(c.bus.publish.in_flight_window, 2000);
        assert_eq!(c.bus.publish.compression, eventbus_core::Compression::Lz4);
        assert_eq!(c.bus.publish.close_timeout, Duration::from_secs(5));
        assert_eq!(c.bus.dispatch.keyed_workers, 8);
        assert_eq!(c.bus.dispatch.retry.max_attempts, 5);
        assert_eq!(
            c.bus.dispatch.retry.initial_backoff,
            Duration::from_millis(20)
        );
        assert_eq!(c.memory.partitions, 4);
        assert_eq!(c.bus.dispatch.keyed_buffer, 8_192, "untouched default");
    }

    #[test]
    fn unknown_settings_are_refused_with_their_place() {
        let e = Config::from_toml("[bus.publish]\nin_flight_windw = 1\n").expect_err("unknown");
        assert_eq!(e.kind(), ConfigErrorKind::Invalid);
        assert_eq!(e.field(), Some("bus.publish.in_flight_windw"));
        assert!(e.to_string().contains("in_flight_windw"), "{e}");
        let top = Config::from_toml("urll = \"memory://\"\n").expect_err("unknown");
        assert!(top.to_string().contains("urll"), "{top}");
    }

    #[test]
    fn bad_values_name_the_field_and_the_reason() {
        let e = Config::from_toml("[bus.dispatch]\nkeyed_workers = \"many\"\n").expect_err("type");
        assert_eq!(e.field(), Some("bus.dispatch.keyed_workers"));
        assert!(e.to_string().contains("invalid type"), "{e}");
        let d = Config::from_toml("[bus.subscribe]\nmax_wait = 100\n").expect_err("unit");
        assert_eq!(d.field(), Some("bus.subscribe.max_wait"));
        assert!(d.to_string().contains("no unit"), "{d}");
        let zero = Config::from_toml("[bus.dispatch]\nkeyed_workers = 0\n").expect_err("zero");
        assert_eq!(zero.field(), Some("bus.dispatch.keyed_workers"));
        assert!(zero.to_string().contains("at least 1"), "{zero}");
        let url = Config::from_toml("url = \"carrier-pigeon://coop\"\n").expect_err("scheme");
        assert_eq!(url.field(), Some("url"));
        let syntax = Config::from_toml("[bus\n").expect_err("syntax");
        assert_eq!(syntax.kind(), ConfigErrorKind::Syntax);
        assert!(syntax.to_string().contains("line 1"), "{syntax}");
    }

    #[test]
    fn variables_override_the_file() {
        let c = Config::from_sources(
            Some("[bus.publish]\nin_flight_window = 2000\nclose_timeout = \"5s\"\n"),
            vars(&[
                ("EVENTBUS_BUS__PUBLISH__IN_FLIGHT_WINDOW", "3000"),
                ("EVENTBUS_BUS__DISPATCH__RETRY__INITIAL_BACKOFF", "1s"),
                ("EVENTBUS_BUS__PUBLISH__COMPRESSION", "lz4"),
                // Not configuration: no double underscore, or not ours.
                ("EVENTBUS_NATS_URL", "nats://127.0.0.1:1"),
                ("EVENTBUS_CONFIG", "/nowhere.toml"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .expect("parse");
        assert_eq!(c.bus.publish.in_flight_window, 3000);
        assert_eq!(c.bus.publish.close_timeout, Duration::from_secs(5));
        assert_eq!(c.bus.dispatch.retry.initial_backoff, Duration::from_secs(1));
        assert_eq!(c.bus.publish.compression, eventbus_core::Compression::Lz4);
    }

    #[test]
    fn a_bad_variable_is_named() {
        let e = Config::from_sources(
            None,
            vars(&[("EVENTBUS_BUS__PUBLISH__IN_FLIGHT_WINDW", "1")]),
        )
        .expect_err("unknown");
        assert!(e.to_string().contains("in_flight_windw"), "{e}");
        assert!(
            e.to_string()
                .contains("EVENTBUS_BUS__PUBLISH__IN_FLIGHT_WINDW"),
            "{e}"
        );
        let t = Config::from_sources(
            None,
            vars(&[("EVENTBUS_BUS__DISPATCH__KEYED_WORKERS", "x")]),
        )
        .expect_err("type");
        assert_eq!(t.field(), Some("bus.dispatch.keyed_workers"));
    }

    #[cfg(feature = "nats")]
    #[test]
    fn the_url_picks_the_nats_table_and_secrets_stay_hidden() {
        let c = Config::from_sources(
            Some(
                r#"
                url = "memory://"
                [nats]
                name = "billing"
                auth = { token = "s3cr3t-token" }
                stream = { partitions = 4, storage = "memory", duplicate_window = "5m" }
                group = { lease_ttl = "6s", heartbeat = "2s" }
                "#,
            ),
            vars(&[("EVENTBUS_URL", "nats://127.0.0.1:4333")]),
        )
        .expect("parse");
        let Ok(BackendConfig::Nats(n)) = c.backend() else {
            panic!("not NATS: {:?}", c.backend());
        };
        assert_eq!(n.url, "nats://127.0.0.1:4333");
        assert_eq!(n.name, "billing");
        assert_eq!(n.stream.partitions, 4);
        assert_eq!(n.stream.storage, eventbus_nats::Storage::Memory);
        assert_eq!(n.stream.duplicate_window, Duration::from_secs(300));
        assert_eq!(n.group.heartbeat, Duration::from_secs(2));
        assert_eq!(n.consumer.max_ack_pending, 10_000, "default");
        assert!(matches!(&n.auth, eventbus_nats::Auth::Token(t) if t.expose() == "s3cr3t-token"));
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "a secret in Debug output"
        );
        let pw = Config::from_toml(
            "[nats.auth.user_password]\nuser = \"app\"\npassword = \"hunter2\"\n",
        )
        .expect("user and password");
        assert!(
            matches!(&pw.nats.auth, eventbus_nats::Auth::UserPassword { user, .. } if user == "app")
        );
        assert!(!format!("{pw:?}").contains("hunter2"));
        // Credentials written into the URL stay hidden as well, in the configuration, the
        // backend's settings and an error about the URL.
        let in_url =
            Config::from_sources(None, vars(&[("EVENTBUS_URL", "nats://app:hunter2@h:1")]))
                .expect("parse");
        assert!(!format!("{in_url:?}").contains("hunter2"), "{in_url:?}");
        assert!(!format!("{:?}", in_url.backend()).contains("hunter2"));
        let bad = Config::from_sources(None, vars(&[("EVENTBUS_URL", "app:hunter2@h:1")]))
            .expect_err("no scheme");
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn the_url_picks_the_kafka_table_with_extra_properties() {
        let c = Config::from_toml(
            r#"
            url = "kafka://127.0.0.1:19092"
            [kafka.producer]
            linger_ms = 0
            extra = { "queue.buffering.max.kbytes" = 65536, "enable.gapless.guarantee" = false }
            [kafka.security]
            sasl_password = "pw-123"
            "#,
        )
        .expect("parse");
        let Ok(BackendConfig::Kafka(k)) = c.backend() else {
            panic!("not Kafka: {:?}", c.backend());
        };
        assert_eq!(k.brokers, "127.0.0.1:19092");
        assert_eq!(k.producer.linger_ms, 0);
        assert_eq!(
            k.producer.extra,
            vec![
                ("enable.gapless.guarantee".to_string(), "false".to_string()),
                (
                    "queue.buffering.max.kbytes".to_string(),
                    "65536".to_string()
                ),
            ]
        );
        assert!(!format!("{c:?}").contains("pw-123"));
    }

    #[test]
    fn a_missing_file_is_a_read_error_with_its_source() {
        let e = Config::from_file("/nonexistent/eventbus.toml").expect_err("missing");
        assert_eq!(e.kind(), ConfigErrorKind::Read);
        assert!(std::error::Error::source(&e).is_some());
    }
}
