//! Durable pull consumers: one per topic and group, read by one fetcher.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use async_nats::Subject;
use eventbus_core::{
    BrokerPosition, Delivery, ErrorDetail, Message, Subscription, SubscriptionSpec, TransportError,
};
use futures_util::{FutureExt, StreamExt};

use crate::naming::subject;
use crate::transport::{headers_from, NatsTransport};

/// At close, the pull stream is read for prefetched messages until it is quiet this long...
const CLOSE_QUIET: Duration = Duration::from_millis(50);
/// ...or this long in all...
const CLOSE_HAND_BACK_LIMIT: Duration = Duration::from_secs(2);
/// ...or until this many were collected (the rest of an open pull comes back after AckWait).
const CLOSE_HAND_BACK_MAX: usize = 10_000;

/// One member of a consumer group: a durable pull consumer named after the group.
pub struct NatsSubscription {
    /// Shared with every delivery, which acks through it.
    client: Arc<async_nats::Client>,
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    topic: Arc<str>,
    pull_expires: Duration,
}

impl NatsSubscription {
    pub(crate) async fn create(
        transport: &NatsTransport,
        spec: SubscriptionSpec,
    ) -> Result<Self, TransportError> {
        let stream_name = transport.stream_name(&spec.topic);
        let stream = transport
            .jetstream()?
            .get_stream(&stream_name)
            .await
            .map_err(|e| {
                TransportError::Provisioning(format!("stream {stream_name}: {e}").into())
            })?;
        let c = &transport.config.consumer;
        let filter = subject(&spec.topic).to_string();
        let wanted = pull::Config {
            durable_name: Some(spec.group.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            // Retries and dead letters are the dispatcher's job: the server never gives up.
            max_deliver: -1,
            filter_subject: filter.clone(),
            max_waiting: c.max_waiting,
            max_ack_pending: c.max_ack_pending,
            ..Default::default()
        };
        let consumer: PullConsumer = stream
            .get_or_create_consumer(&spec.group, wanted)
            .await
            .map_err(|e| {
                TransportError::Provisioning(
                    format!("consumer {} on stream {stream_name}: {e}", spec.group).into(),
                )
            })?;
        let have = &consumer.cached_info().config;
        if have.ack_policy != AckPolicy::Explicit {
            return Err(TransportError::Provisioning(format!(
                "consumer {} on {stream_name} exists with ack policy {:?}; eventbus needs explicit acks",
                spec.group, have.ack_policy
            ).into()));
        }
        if !have.filter_subject.is_empty() && have.filter_subject != filter {
            return Err(TransportError::Provisioning(
                format!(
                    "consumer {} on {stream_name} filters {:?}, not {filter:?}",
                    spec.group, have.filter_subject
                )
                .into(),
            ));
        }
        if have.ack_wait != c.ack_wait || have.max_ack_pending != c.max_ack_pending {
            tracing::warn!(consumer = %spec.group, stream = %stream_name,
                "existing consumer settings differ from the configuration; keeping the server's");
        }
        Ok(Self {
            client: Arc::new(transport.client.clone()),
            consumer,
            messages: None,
            topic: Arc::from(spec.topic.as_str()),
            pull_expires: transport.config.pull_expires,
        })
    }

    fn delivery(&self, mut m: jetstream::Message) -> NatsDelivery {
        let (position, delivered) = match m.info() {
            Ok(info) => (
                Some(BrokerPosition {
                    partition: None,
                    offset: info.stream_sequence,
                }),
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            ),
            Err(_) => (None, 1),
        };
        let message = Message::new(
            self.topic.clone(),
            m.message.payload.clone(),
            // Moved out, not copied: acking needs only the reply subject, and a queued
            // delivery then holds its headers once.
            Arc::new(headers_from(m.message.headers.take().as_ref())),
            None,
            position,
            delivered,
        );
        // The rest of the client's message (its context, subject and bookkeeping) is dropped
        // here: a queued delivery keeps the reply subject it acks to, and the message.
        NatsDelivery {
            reply: m.message.reply.take(),
            client: self.client.clone(),
            message,
        }
    }
}

impl Subscription for NatsSubscription {
    type Delivery = NatsDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<NatsDelivery>, TransportError> {
        if self.messages.is_none() {
            // A continuous pull: the client keeps up to `max` messages requested and hands
            // them over as they arrive, so a small batch never waits for a full one.
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(max)
                .expires(self.pull_expires)
                .messages()
                .await
                .map_err(|e| {
                    TransportError::Unavailable(ErrorDetail::with_source(format!("pull: {e}"), e))
                })?;
            self.messages = Some(stream);
        }
        let Some(stream) = self.messages.as_mut() else {
            return Ok(Vec::new());
        };
        let first = match tokio::time::timeout(max_wait, stream.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => {
                self.messages = None;
                return Err(TransportError::Unavailable("pull stream ended".into()));
            }
            Ok(Some(Err(e))) => {
                // The stream reports and recovers (missed heartbeats across a reconnect);
                // it is rebuilt only if it ends.
                return Err(TransportError::Unavailable(ErrorDetail::with_source(
                    format!("pull: {e}"),
                    e,
                )));
            }
            Ok(Some(Ok(m))) => m,
        };
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        while batch.len() < max {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                Some(Some(Err(e))) => {
                    tracing::debug!(error = %e, "pull stream error after a batch");
                    break;
                }
                Some(None) => {
                    self.messages = None;
                    break;
                }
                None => break,
            }
        }
        Ok(batch.into_iter().map(|m| self.delivery(m)).collect())
    }

    async fn release_prefetched(&mut self) {
        // What the client already pulled (and what the open pull request still brings) is
        // nak'ed, so another member gets it now rather than after AckWait. The naks go out
        // only after our pull subscription is gone from the server: a nak'ed message is
        // redelivered at once to a waiting pull request, and while ours were still open it
        // would come straight back to this closing member (and be lost to it until AckWait),
        // as would every message the dispatcher hands back after this.
        let Some(mut stream) = self.messages.take() else {
            return;
        };
        let mut prefetched = Vec::new();
        let limit = tokio::time::Instant::now() + CLOSE_HAND_BACK_LIMIT;
        while prefetched.len() < CLOSE_HAND_BACK_MAX {
            let quiet = (tokio::time::Instant::now() + CLOSE_QUIET).min(limit);
            match tokio::time::timeout_at(quiet, stream.next()).await {
                Ok(Some(Ok(m))) => prefetched.push(m),
                _ => break,
            }
        }
        // Dropping the stream unsubscribes its inbox; the flush puts the UNSUB on the wire
        // ahead of the naks, and the server skips pull requests nobody listens to.
        drop(stream);
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "flush before handing back prefetched messages");
        }
        let handed_back = prefetched.len();
        for m in prefetched {
            if let Err(e) = m.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(error = %e, "nak of a prefetched message failed");
            }
        }
        tracing::debug!(topic = %self.topic, handed_back, "prefetched messages handed back");
    }

    async fn close(self) -> Result<(), TransportError> {
        // The durable consumer stays on the server; dropping the stream ends the pulls.
        drop(self.messages);
        Ok(())
    }
}

/// One JetStream message. Unsettled, it is redelivered after the consumer's ack wait.
pub struct NatsDelivery {
    /// Where acks go (`$JS.ACK.…`); `None` for a message that did not come from JetStream.
    reply: Option<Subject>,
    client: Arc<async_nats::Client>,
    message: Message,
}

fn ack_error(e: async_nats::Error) -> TransportError {
    TransportError::Unavailable(ErrorDetail::with_boxed_source(format!("ack: {e}"), e))
}

impl NatsDelivery {
    /// Sends `kind` to the message's reply subject, as the client's own `ack_with` does.
    async fn send(&self, kind: AckKind) -> Result<(), TransportError> {
        let Some(reply) = &self.reply else {
            return Err(TransportError::Unavailable(
                "ack: no reply subject, not a JetStream message".into(),
            ));
        };
        self.client
            .publish(reply.clone(), kind.into())
            .await
            .map_err(|e| ack_error(Box::new(e)))
    }
}

impl Delivery for NatsDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    async fn ack(self) -> Result<(), TransportError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(self, delay: Duration) -> Result<(), TransportError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.send(AckKind::Nak(delay)).await
    }

    async fn term(self) -> Result<(), TransportError> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        self.send(AckKind::Progress).await
    }
}
