//! The NATS transport: connection, stream provisioning, publishing with ACK futures.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{
    CreateKeyValueError, CreateKeyValueErrorKind, CreateStreamError, CreateStreamErrorKind,
    GetStreamError, GetStreamErrorKind,
};
use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use eventbus_core::partitioner::partition_for;
use eventbus_core::{
    Capabilities, ConnectionState, ErrorDetail, Headers, Health, Lag, OutgoingMessage,
    SubscriptionSpec, Transport, TransportError,
};

use crate::ack::{publish_error, NatsAck, Republish};
use crate::config::{Auth, NatsConfig, Storage};
use crate::group::GroupBucket;
use crate::line::{lines, Lines, Ticket};
use crate::naming::{
    group_bucket, partition_subject, stream_name, stream_subjects, PARTITIONS_METADATA,
};
use crate::provision::until_deadline;
use crate::subscription::NatsSubscription;
use crate::url::{redact_url, split_credentials};

/// How long `close` waits for the client to report its connection ended.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// A client connection to a NATS server with JetStream. One per bus.
pub struct NatsTransport {
    pub(crate) client: async_nats::Client,
    /// Shared by every pending ACK future (for republishing): one `Arc` clone per message
    /// instead of a `Context` clone. Taken at close: the context owns the client's ACK task,
    /// which must not outlive the bus.
    context: RwLock<Option<Arc<jetstream::Context>>>,
    pub(crate) config: NatsConfig,
    /// Topics whose stream exists, with their partition count.
    provisioned: RwLock<HashMap<String, u16>>,
    /// Each topic's per-partition send order (bounded like `provisioned`: one per topic).
    lines: RwLock<HashMap<String, Lines>>,
    /// Spreads messages without an aggregate over the partitions.
    round_robin: AtomicU32,
    closed: AtomicBool,
    /// Becomes true when the client reports its connection closed for good.
    disconnected: tokio::sync::watch::Receiver<bool>,
}

/// Checks the settings no server can fix.
fn validate(config: &NatsConfig) -> Result<(), TransportError> {
    let bad = |text: String| {
        Err(TransportError::Other(
            format!("configuration: {text}").into(),
        ))
    };
    if config.stream.partitions == 0 {
        return bad("stream.partitions must be at least 1".into());
    }
    let g = &config.group;
    if g.heartbeat.is_zero() || g.heartbeat * 3 > g.lease_ttl {
        return bad(format!(
            "group.heartbeat ({:?}) must be above zero and at most a third of group.lease_ttl ({:?})",
            g.heartbeat, g.lease_ttl
        ));
    }
    if let Some(id) = &g.instance_id {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !ok {
            return bad(format!(
                "group.instance_id {id:?} must be 1-64 characters of A-Z a-z 0-9 _ -"
            ));
        }
    }
    Ok(())
}

impl NatsTransport {
    /// Connects (one connection) and sets up the JetStream context. Fails at once, with the
    /// address, if the server cannot be reached.
    pub async fn connect(config: NatsConfig) -> Result<Self, TransportError> {
        validate(&config)?;
        let (disconnected_tx, disconnected) = tokio::sync::watch::channel(false);
        let disconnected_tx = Arc::new(disconnected_tx);
        let mut opts = async_nats::ConnectOptions::new()
            .name(&config.name)
            .connection_timeout(config.connect_timeout)
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Closed) {
                    disconnected_tx.send_replace(true);
                }
                async move {
                    tracing::info!(%event, "nats connection event");
                }
            });
        // Credentials written into the URLs become options: async-nats logs the URLs.
        let (urls, url_auth) = split_credentials(&config.url)
            .map_err(|e| TransportError::Other(format!("configuration: {e}").into()))?;
        let auth = match (&config.auth, &url_auth) {
            (Auth::None, _) => &url_auth,
            (given, Auth::None) => given,
            _ => return Err(TransportError::Other(
                "configuration: credentials both in the server URL and in `auth`; give them once"
                    .into(),
            )),
        };
        opts = match auth {
            Auth::None => opts,
            Auth::Token(t) => opts.token(t.expose().to_string()),
            Auth::UserPassword { user, password } => {
                opts.user_and_password(user.clone(), password.expose().to_string())
            }
            Auth::NKey(seed) => opts.nkey(seed.expose().to_string()),
            Auth::CredentialsFile(path) => opts.credentials_file(path).await.map_err(|e| {
                TransportError::Unavailable(
                    format!("cannot read credentials file {}: {e}", path.display()).into(),
                )
            })?,
        };
        if config.tls.required {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = &config.tls.root_certificates {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.tls.client_certificate {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let client = opts.connect(urls.as_slice()).await.map_err(|e| {
            let text = format!("cannot connect to NATS at {}: {e}", redact_url(&config.url));
            TransportError::Unavailable(ErrorDetail::with_source(text, e))
        })?;
        let context = jetstream::ContextBuilder::new()
            .max_ack_inflight(config.max_ack_inflight.max(1))
            .backpressure_on_inflight(true)
            // `timeout` bounds awaited ACKs (and the JetStream API requests of provisioning);
            // `ack_timeout` only the ACKs of dropped publish futures.
            .timeout(config.publish_ack_timeout)
            .ack_timeout(config.publish_ack_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            context: RwLock::new(Some(Arc::new(context))),
            config,
            provisioned: RwLock::new(HashMap::new()),
            lines: RwLock::new(HashMap::new()),
            round_robin: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            disconnected,
        })
    }

    /// The JetStream context (for inspection: stream and consumer info); `Closed` after
    /// `close()`.
    pub fn jetstream(&self) -> Result<Arc<jetstream::Context>, TransportError> {
        self.context
            .read()
            .ok()
            .and_then(|c| c.clone())
            .ok_or(TransportError::Closed)
    }

    /// The stream name used for `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        stream_name(&self.config.stream.name_prefix, topic)
    }

    /// The send-order lines of `topic`'s `partitions` partitions.
    fn lines_of(&self, topic: &str, partitions: u16) -> Lines {
        if let Some(l) = self.lines.read().ok().and_then(|m| m.get(topic).cloned()) {
            if l.len() == usize::from(partitions) {
                return l;
            }
        }
        let mut map = self.lines.write().unwrap_or_else(|p| p.into_inner());
        map.entry(topic.to_string())
            .and_modify(|l| {
                if l.len() != usize::from(partitions) {
                    *l = lines(partitions);
                }
            })
            .or_insert_with(|| lines(partitions))
            .clone()
    }

    /// The partition count of `topic`, once its stream is provisioned.
    fn partitions_of(&self, topic: &str) -> Option<u16> {
        self.provisioned
            .read()
            .ok()
            .and_then(|p| p.get(topic).copied())
    }

    /// Creates the topic's stream, or checks that the existing one captures the topic's
    /// partition subjects with our storage; limits that differ are logged, not changed.
    /// Returns the topic's partition count: the stream's, recorded in its metadata.
    pub async fn provision_topic(&self, topic: &str) -> Result<u16, TransportError> {
        if let Some(p) = self.partitions_of(topic) {
            return Ok(p);
        }
        let s = &self.config.stream;
        let name = self.stream_name(topic);
        let subj = stream_subjects(topic);
        let storage = match s.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        };
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![subj.clone()],
            storage,
            max_bytes: s.max_bytes,
            max_messages: s.max_messages,
            max_age: s.max_age,
            duplicate_window: s.duplicate_window,
            num_replicas: s.replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            metadata: HashMap::from([(PARTITIONS_METADATA.to_string(), s.partitions.to_string())]),
            ..Default::default()
        };
        let js = self.jetstream()?;
        let stream = until_deadline(
            &name,
            self.config.provision_timeout,
            |e: &CreateStreamError| {
                matches!(
                    e.kind(),
                    CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable
                )
            },
            || js.get_or_create_stream(wanted.clone()),
        )
        .await
        .map_err(|e| {
            TransportError::Provisioning(format!("stream {name} for topic {topic:?}: {e}").into())
        })?;
        let have = &stream.cached_info().config;
        if !have.subjects.iter().any(|x| x == &subj) {
            return Err(TransportError::Provisioning(format!(
                "stream {name} exists with subjects {:?}, not {subj:?} (made by another topic with the same stream name, or by eventbus before partitions: see docs/nats.md)",
                have.subjects
            ).into()));
        }
        if have.storage != wanted.storage {
            return Err(TransportError::Provisioning(
                format!(
                    "stream {name} exists with {:?} storage, configured {:?}",
                    have.storage, wanted.storage
                )
                .into(),
            ));
        }
        if have.retention != wanted.retention {
            return Err(TransportError::Provisioning(
                format!(
                    "stream {name} exists with retention {:?}; eventbus needs limits retention",
                    have.retention
                )
                .into(),
            ));
        }
        let partitions = match have.metadata.get(PARTITIONS_METADATA) {
            None => s.partitions,
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(TransportError::Provisioning(
                        format!("stream {name} records {v:?} partitions, not a number from 1")
                            .into(),
                    ))
                }
            },
        };
        if partitions != s.partitions {
            tracing::warn!(stream = %name, partitions, configured = s.partitions,
                "the stream has another partition count than configured; keeping the stream's");
        }
        if have.max_bytes != wanted.max_bytes
            || have.max_messages != wanted.max_messages
            || have.duplicate_window != wanted.duplicate_window
        {
            tracing::warn!(stream = %name, "existing stream limits differ from the configuration; keeping the server's");
        }
        if let Ok(mut p) = self.provisioned.write() {
            p.insert(topic.to_string(), partitions);
        }
        Ok(partitions)
    }

    /// The key-value bucket where the groups of `topic` keep membership and leases, created
    /// with the configured lease time as its age limit if it does not exist. The lease time in
    /// force is the bucket's.
    pub(crate) async fn group_bucket(&self, topic: &str) -> Result<GroupBucket, TransportError> {
        let js = self.jetstream()?;
        let bucket = group_bucket(&self.stream_name(topic));
        let failed =
            |e: String| TransportError::Provisioning(format!("group bucket {bucket}: {e}").into());
        let get_or_create = || async {
            match js.get_key_value(&bucket).await {
                Ok(store) => Ok(store),
                Err(_) => {
                    js.create_key_value(kv::Config {
                        bucket: bucket.clone(),
                        history: 1,
                        max_age: self.config.group.lease_ttl,
                        storage: stream::StorageType::File,
                        num_replicas: self.config.stream.replicas,
                        ..Default::default()
                    })
                    .await
                }
            }
        };
        let deadline = self.config.provision_timeout;
        let store = until_deadline(
            &bucket,
            deadline,
            |e: &CreateKeyValueError| e.kind() == CreateKeyValueErrorKind::TimedOut,
            get_or_create,
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        let stream = until_deadline(
            &bucket,
            deadline,
            |e: &GetStreamError| e.kind() == GetStreamErrorKind::Request,
            || js.get_stream(format!("KV_{bucket}")),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        let ttl = stream.cached_info().config.max_age;
        if ttl.is_zero() {
            return Err(failed(
                "exists without an age limit, so leases would never lapse".into(),
            ));
        }
        if ttl != self.config.group.lease_ttl {
            tracing::warn!(%bucket, lease_ttl = ?ttl, configured = ?self.config.group.lease_ttl,
                "the group bucket has another lease time than configured; keeping the bucket's");
        }
        Ok(GroupBucket {
            name: bucket,
            store,
            stream,
            lease_ttl: ttl,
        })
    }
}

pub(crate) fn header_map(headers: &Headers) -> Result<HeaderMap, TransportError> {
    let mut map = HeaderMap::new();
    for (known, name, value) in headers.iter_known() {
        let invalid = |reason: &str| TransportError::InvalidHeader {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        // Our own header names are valid constants: no parsing, no allocation.
        let n = match known {
            Some(k) => HeaderName::from_static(k),
            None => {
                HeaderName::from_str(name).map_err(|_| invalid("not a valid NATS header name"))?
            }
        };
        let v = HeaderValue::from_str(value).map_err(|_| invalid("contains CR or LF"))?;
        map.insert(n, v);
    }
    Ok(map)
}

pub(crate) fn nats_message(
    headers: &Headers,
    payload: &bytes::Bytes,
    event_id: &str,
) -> Result<jetstream::message::PublishMessage, TransportError> {
    Ok(jetstream::message::PublishMessage::build()
        .payload(payload.clone())
        .headers(header_map(headers)?)
        .message_id(event_id))
}

pub(crate) fn headers_from(map: Option<&HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Headers::new();
    };
    // Every value in one buffer: two allocations whatever the number of headers.
    let bytes = map
        .iter()
        .filter_map(|(_, values)| values.first())
        .map(|v| v.as_str().len())
        .sum();
    let mut h = Headers::with_capacity_for(map.len(), bytes);
    for (name, values) in map.iter() {
        if let Some(v) = values.first() {
            h.insert(name.as_ref() as &str, v.as_str());
        }
    }
    h
}

impl Transport for NatsTransport {
    type Ack = NatsAck;
    type Subscription = NatsSubscription;

    fn backend(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Partitions of a topic are leased to one instance of a group at a time.
            partitioned_groups: true,
            native_compression: false,
            publish_dedup: true,
        }
    }

    async fn send(&self, message: OutgoingMessage) -> Result<NatsAck, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let partitions = self.provision_topic(&message.topic).await?;
        let OutgoingMessage {
            topic,
            event_id,
            key,
            headers,
            payload,
        } = message;
        let partition = match &key {
            Some(k) => partition_for(k.as_bytes(), u32::from(partitions)),
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % u32::from(partitions),
        };
        // Below `partitions`, which is a u16.
        let partition = u16::try_from(partition).unwrap_or(0);
        let context = self.jetstream()?;
        let ticket = Ticket::take(&self.lines_of(&topic, partitions), partition).await;
        let first = context
            .send_publish(
                partition_subject(&topic, partition),
                nats_message(&headers, &payload, &event_id)?,
            )
            .await
            .map_err(publish_error)?;
        Ok(NatsAck::new(
            first.into_future(),
            Republish {
                context,
                topic,
                partition,
                event_id,
                headers,
                payload,
                retries: self.config.publish_retries,
                ticket,
            },
        ))
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<NatsSubscription, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let created = match self.provision_topic(&spec.topic).await {
            Ok(partitions) => NatsSubscription::create(self, spec, partitions).await,
            Err(e) => Err(e),
        };
        // A close() during the round trips fails them with a connection error: say Closed.
        match created {
            Err(_) if self.closed.load(Ordering::Acquire) => Err(TransportError::Closed),
            other => other,
        }
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        self.group_lag(topic, group).await.map(Some)
    }

    fn health(&self) -> Health {
        let state = if self.closed.load(Ordering::Acquire) {
            ConnectionState::Closed
        } else {
            match self.client.connection_state() {
                State::Connected => ConnectionState::Connected,
                State::Pending | State::Disconnected => ConnectionState::Reconnecting,
            }
        };
        Health::new("nats", state)
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.closed.store(true, Ordering::Release);
        // Acks are fire-and-forget publishes: flush them out before the connection goes.
        let flushed = self
            .client
            .flush()
            .await
            .map_err(|e| TransportError::Unavailable(format!("flush on close: {e}").into()));
        // Ends the client's ACK task (it lives as long as a context does).
        if let Ok(mut c) = self.context.write() {
            c.take();
        }
        match self.client.drain().await {
            // The client's event task owns the callback holding the sender: the sender is
            // dropped when the connection handler has drained, disconnected and ended, and the
            // event task after it.
            Ok(()) => {
                let mut d = self.disconnected.clone();
                let ended = async { while d.changed().await.is_ok() {} };
                if tokio::time::timeout(DISCONNECT_WAIT, ended).await.is_err() {
                    tracing::warn!("the NATS connection did not close within {DISCONNECT_WAIT:?}");
                }
            }
            Err(e) => tracing::debug!(error = %e, "drain on close"),
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_headers_are_errors_not_panics() {
        let h: Headers = [("a:b", "v")].into_iter().collect();
        assert!(matches!(
            header_map(&h),
            Err(TransportError::InvalidHeader { .. })
        ));
        let h: Headers = [("X-A", "x\r\ny")].into_iter().collect();
        assert!(header_map(&h).is_err());
        let h: Headers = [("X-A", "fine")].into_iter().collect();
        assert_eq!(headers_from(Some(&header_map(&h).unwrap())), h);
    }
}
