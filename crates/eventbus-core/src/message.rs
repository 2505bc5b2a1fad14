//! Messages as handlers see them, and as publishers hand them to a transport.

use std::sync::Arc;

use bytes::Bytes;

use crate::cloudevents::{self, CloudEvent, CloudEventError};
use crate::envelope::{Envelope, EnvelopeError};
use crate::headers::{self, Headers};

/// Where a broker stored a message: a NATS stream sequence (`partition: None`) or a Kafka or
/// memory partition and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerPosition {
    /// Partition, for partitioned logs.
    pub partition: Option<u32>,
    /// Stream sequence or partition offset.
    pub offset: u64,
}

/// A received message. Cheap to clone: the payload and headers are shared.
#[derive(Debug, Clone)]
pub struct Message {
    topic: Arc<str>,
    payload: Bytes,
    headers: Arc<Headers>,
    key: Option<Bytes>,
    position: Option<BrokerPosition>,
    delivery_count: u32,
}

impl Message {
    /// Builds a message; used by transports.
    pub fn new(
        topic: Arc<str>,
        payload: Bytes,
        headers: Arc<Headers>,
        key: Option<Bytes>,
        position: Option<BrokerPosition>,
        delivery_count: u32,
    ) -> Self {
        Self {
            topic,
            payload,
            headers,
            key,
            position,
            delivery_count,
        }
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The payload, already decompressed when it reaches a handler.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The broker key (Kafka key; the aggregate id for messages published by eventbus).
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// Where the broker stored it, when the broker says.
    pub fn position(&self) -> Option<BrokerPosition> {
        self.position
    }

    /// How many times the broker has delivered it (1 on first delivery).
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// The `X-Event-ID` header.
    pub fn event_id(&self) -> Option<&str> {
        self.headers.get(headers::EVENT_ID)
    }

    /// The aggregate id from the `X-Aggregate-ID` header.
    pub fn aggregate_id(&self) -> Option<&str> {
        self.headers
            .get(headers::AGGREGATE_ID)
            .filter(|s| !s.is_empty())
    }

    /// Parses the payload as an [`Envelope`]. A CloudEvent (binary mode, or structured
    /// JSON) is read as the envelope it maps to ([`crate::cloudevents`]).
    pub fn envelope(&self) -> Result<Envelope, EnvelopeError> {
        let from_cloud_event = |ce: Result<CloudEvent, CloudEventError>| {
            ce.and_then(|ce| ce.to_envelope())
                .map_err(|e| EnvelopeError::Malformed(e.to_string()))
        };
        // The bus's own envelopes carry X-Event-Type: no CloudEvent to look for.
        if self.headers.get(headers::EVENT_TYPE).is_none()
            && cloudevents::is_cloud_event(&self.headers)
        {
            return from_cloud_event(CloudEvent::from_message(&self.headers, &self.payload));
        }
        match Envelope::from_json(&self.payload) {
            Ok(env) => Ok(env),
            // A structured CloudEvent sent without its content type.
            Err(e) if mentions_specversion(&self.payload) => {
                from_cloud_event(CloudEvent::from_json(&self.payload)).map_err(|ce| match ce {
                    EnvelopeError::Malformed(m) => {
                        EnvelopeError::Malformed(format!("{e}; as a CloudEvent: {m}"))
                    }
                    other => other,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The CloudEvent this message carries (binary or structured mode).
    pub fn cloud_event(&self) -> Result<CloudEvent, CloudEventError> {
        CloudEvent::from_message(&self.headers, &self.payload)
    }

    /// Parses the payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    pub(crate) fn with_decoded(&self, payload: Bytes) -> Self {
        let mut headers = (*self.headers).clone();
        headers.remove(headers::CONTENT_ENCODING);
        Self {
            payload,
            headers: Arc::new(headers),
            ..self.clone()
        }
    }
}

/// A message as a publisher hands it to a transport: already encoded, with its event id and
/// headers set.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Destination topic (validated).
    pub topic: String,
    /// Idempotency key (also in `headers` as `X-Event-ID`).
    pub event_id: String,
    /// Partitioning key: the aggregate id when there is one.
    pub key: Option<String>,
    /// Headers, including `X-Event-ID` and the envelope headers.
    pub headers: Headers,
    /// Encoded payload.
    pub payload: Bytes,
}

/// The payload mentions `"specversion"`: worth trying as a structured CloudEvent.
fn mentions_specversion(payload: &[u8]) -> bool {
    payload.windows(13).any(|w| w == b"\"specversion\"")
}
