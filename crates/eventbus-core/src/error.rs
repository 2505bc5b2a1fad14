//! Error types of the core crate.

use std::sync::Arc;
use std::time::Duration;

use crate::codec::CodecError;
use crate::envelope::EnvelopeError;

/// The text of a [`TransportError`], with the broker client's own error kept as its source
/// (reachable through [`std::error::Error::source`] on the `TransportError`). Compares by
/// text; derefs to `str`.
#[derive(Clone)]
pub struct ErrorDetail {
    text: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ErrorDetail {
    /// Text only.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            source: None,
        }
    }

    /// Text and the client error behind it.
    pub fn with_source(
        text: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            text: text.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// Text and an already boxed client error (clients such as async-nats return these).
    pub fn with_boxed_source(
        text: impl Into<String>,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    ) -> Self {
        Self {
            text: text.into(),
            source: Some(Arc::from(source)),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The client error behind it, if kept.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl std::ops::Deref for ErrorDetail {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::fmt::Debug for ErrorDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            None => write!(f, "{:?}", self.text),
            Some(s) => write!(f, "{:?} (source: {s:?})", self.text),
        }
    }
}

impl PartialEq for ErrorDetail {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for ErrorDetail {}

impl From<String> for ErrorDetail {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<&str> for ErrorDetail {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

/// What a transport (a broker client) reports. `Clone` because one publish outcome goes to the
/// callback, the results stream and an awaiting caller. Where a broker client's error caused
/// it, that error is kept as the [`std::error::Error::source`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The broker cannot be reached.
    Unavailable(ErrorDetail),
    /// The broker did not answer in time.
    Timeout(ErrorDetail),
    /// The topic name is not allowed.
    InvalidTopic {
        /// The rejected name.
        topic: String,
        /// Why.
        reason: String,
    },
    /// A header name or value cannot be carried by every broker.
    InvalidHeader {
        /// The header name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The message is larger than the limit.
    PayloadTooLarge {
        /// Size in bytes.
        actual: usize,
        /// Limit in bytes.
        limit: usize,
    },
    /// The broker refused the message or request.
    Rejected(ErrorDetail),
    /// A stream, topic or consumer could not be created or does not match the configuration.
    Provisioning(ErrorDetail),
    /// The transport or subscription is closed.
    Closed,
    /// The backend cannot work in this environment (for example on a current-thread runtime).
    Unsupported(ErrorDetail),
    /// Anything else the client reported.
    Other(ErrorDetail),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(d) => write!(f, "broker unavailable: {d}"),
            Self::Timeout(d) => write!(f, "timed out: {d}"),
            Self::InvalidTopic { topic, reason } => write!(f, "invalid topic {topic:?}: {reason}"),
            Self::InvalidHeader { name, reason } => write!(f, "invalid header {name:?}: {reason}"),
            Self::PayloadTooLarge { actual, limit } => write!(
                f,
                "message of {actual} bytes exceeds the limit of {limit} bytes"
            ),
            Self::Rejected(d) => write!(f, "rejected by the broker: {d}"),
            Self::Provisioning(d) => write!(f, "provisioning failed: {d}"),
            Self::Closed => f.write_str("closed"),
            Self::Unsupported(d) => write!(f, "unsupported: {d}"),
            Self::Other(d) => write!(f, "{d}"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.detail()
            .and_then(|d| d.source.as_deref())
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// What kind of [`TransportError`] occurred, without its details: for matching and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// [`TransportError::Unavailable`].
    Unavailable,
    /// [`TransportError::Timeout`].
    Timeout,
    /// [`TransportError::InvalidTopic`].
    InvalidTopic,
    /// [`TransportError::InvalidHeader`].
    InvalidHeader,
    /// [`TransportError::PayloadTooLarge`].
    PayloadTooLarge,
    /// [`TransportError::Rejected`].
    Rejected,
    /// [`TransportError::Provisioning`].
    Provisioning,
    /// [`TransportError::Closed`].
    Closed,
    /// [`TransportError::Unsupported`].
    Unsupported,
    /// [`TransportError::Other`].
    Other,
}

impl TransportError {
    /// The error's kind.
    ///
    /// ```
    /// use eventbus_core::{TransportError, TransportErrorKind};
    /// let e = TransportError::Timeout("publish".into());
    /// assert_eq!(e.kind(), TransportErrorKind::Timeout);
    /// assert!(e.is_transient());
    /// ```
    pub fn kind(&self) -> TransportErrorKind {
        match self {
            Self::Unavailable(_) => TransportErrorKind::Unavailable,
            Self::Timeout(_) => TransportErrorKind::Timeout,
            Self::InvalidTopic { .. } => TransportErrorKind::InvalidTopic,
            Self::InvalidHeader { .. } => TransportErrorKind::InvalidHeader,
            Self::PayloadTooLarge { .. } => TransportErrorKind::PayloadTooLarge,
            Self::Rejected(_) => TransportErrorKind::Rejected,
            Self::Provisioning(_) => TransportErrorKind::Provisioning,
            Self::Closed => TransportErrorKind::Closed,
            Self::Unsupported(_) => TransportErrorKind::Unsupported,
            Self::Other(_) => TransportErrorKind::Other,
        }
    }

    /// The text and kept source of the variants that carry one.
    pub fn detail(&self) -> Option<&ErrorDetail> {
        match self {
            Self::Unavailable(d)
            | Self::Timeout(d)
            | Self::Rejected(d)
            | Self::Provisioning(d)
            | Self::Unsupported(d)
            | Self::Other(d) => Some(d),
            _ => None,
        }
    }

    /// True when trying again later may succeed (the broker was unreachable or slow).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            TransportErrorKind::Unavailable | TransportErrorKind::Timeout
        )
    }
}

/// Errors of the bus API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The envelope is invalid.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The payload could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The bus is closing or closed; nothing new is accepted.
    #[error("the bus is closed")]
    Closed,
    /// The results stream was already taken.
    #[error("the publish results stream was already taken")]
    ResultsAlreadyTaken,
    /// `flush` or `close` ran out of time with ACKs still pending.
    #[error("{pending} publishes still unacknowledged after {waited:?}")]
    FlushTimeout {
        /// Publishes without an outcome yet.
        pending: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The bus was used outside a Tokio runtime.
    #[error("eventbus needs a Tokio runtime (call it from within one)")]
    NoRuntime,
}

/// What kind of [`BusError`] occurred, without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusErrorKind {
    /// [`BusError::Envelope`].
    Envelope,
    /// [`BusError::Transport`]; [`BusError::transport_kind`] says which.
    Transport,
    /// [`BusError::Codec`].
    Codec,
    /// [`BusError::Closed`].
    Closed,
    /// [`BusError::ResultsAlreadyTaken`].
    ResultsAlreadyTaken,
    /// [`BusError::FlushTimeout`].
    FlushTimeout,
    /// [`BusError::Config`].
    Config,
    /// [`BusError::NoRuntime`].
    NoRuntime,
}

impl BusError {
    /// The error's kind.
    ///
    /// ```
    /// use eventbus_core::{BusError, BusErrorKind, TransportError, TransportErrorKind};
    /// let e = BusError::from(TransportError::Closed);
    /// assert_eq!(e.kind(), BusErrorKind::Transport);
    /// assert_eq!(e.transport_kind(), Some(TransportErrorKind::Closed));
    /// assert_eq!(BusError::Closed.kind(), BusErrorKind::Closed);
    /// ```
    pub fn kind(&self) -> BusErrorKind {
        match self {
            Self::Envelope(_) => BusErrorKind::Envelope,
            Self::Transport(_) => BusErrorKind::Transport,
            Self::Codec(_) => BusErrorKind::Codec,
            Self::Closed => BusErrorKind::Closed,
            Self::ResultsAlreadyTaken => BusErrorKind::ResultsAlreadyTaken,
            Self::FlushTimeout { .. } => BusErrorKind::FlushTimeout,
            Self::Config(_) => BusErrorKind::Config,
            Self::NoRuntime => BusErrorKind::NoRuntime,
        }
    }

    /// The transport error's kind when the broker client failed.
    pub fn transport_kind(&self) -> Option<TransportErrorKind> {
        match self {
            Self::Transport(t) => Some(t.kind()),
            _ => None,
        }
    }
}

/// A handler's failure. `permanent` errors skip the remaining retries and go straight to the
/// dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    kind: FailureKind,
}

/// Why a message failed; written to the `X-DLQ-Reason` header of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    Retryable,
    Permanent,
    Panic,
    Malformed,
    Codec,
}

impl FailureKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable | FailureKind::Permanent => "handler",
            FailureKind::Panic => "panic",
            FailureKind::Malformed => "malformed",
            FailureKind::Codec => "codec",
        }
    }
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: FailureKind::Retryable,
        }
    }

    /// A failure that retrying cannot fix (bad input): dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: FailureKind::Permanent,
        }
    }

    pub(crate) fn malformed(e: EnvelopeError) -> Self {
        Self {
            message: e.to_string(),
            kind: FailureKind::Malformed,
        }
    }

    pub(crate) fn codec(e: CodecError) -> Self {
        Self {
            message: e.to_string(),
            kind: FailureKind::Codec,
        }
    }

    pub(crate) fn panic(message: String) -> Self {
        Self {
            message: format!("handler panicked: {message}"),
            kind: FailureKind::Panic,
        }
    }

    pub(crate) fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when retries are skipped (the error says retrying cannot help).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Permanent | FailureKind::Malformed | FailureKind::Codec
        )
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<String> for HandlerError {
    fn from(s: String) -> Self {
        Self::retryable(s)
    }
}

impl From<&str> for HandlerError {
    fn from(s: &str) -> Self {
        Self::retryable(s)
    }
}

impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        Self::retryable(e.to_string())
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::permanent(e.to_string())
    }
}

impl From<EnvelopeError> for HandlerError {
    fn from(e: EnvelopeError) -> Self {
        Self::permanent(e.to_string())
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for HandlerError {
    fn from(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Self::retryable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn the_client_error_is_kept_as_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = TransportError::Unavailable(ErrorDetail::with_source("cannot connect", io));
        assert_eq!(e.to_string(), "broker unavailable: cannot connect");
        let source = e.source().expect("source kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the original type");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        // Through the bus error too.
        let b = BusError::from(e.clone());
        assert!(b.source().is_some());
        // Equality is by text: a result compared in tests need not carry the source.
        assert_eq!(e, TransportError::Unavailable("cannot connect".into()));
        assert!(TransportError::Closed.source().is_none());
    }
}
