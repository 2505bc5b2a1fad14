//! Outbox errors: a public kind, the source kept.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboxErrorKind {
    /// The database refused or failed a statement (connection, constraint, schema).
    Database,
    /// The envelope cannot be stored (it does not validate or does not encode).
    InvalidEnvelope,
    /// The topic name is not valid for every backend.
    InvalidTopic,
    /// A setting is out of range.
    Config,
    /// The relay was stopped.
    Stopped,
}

/// An outbox error.
#[derive(Debug, thiserror::Error)]
pub struct OutboxError {
    kind: OutboxErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl OutboxError {
    pub(crate) fn new(kind: OutboxErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn database(what: &str, e: sqlx::Error) -> Self {
        Self {
            kind: OutboxErrorKind::Database,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> OutboxErrorKind {
        self.kind
    }
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
