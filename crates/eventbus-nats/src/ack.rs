//! The ACK of one JetStream publish, with the republish that recovers a lost one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use eventbus_core::{BrokerPosition, ErrorDetail, Headers, Receipt, TransportError};

use crate::line::Ticket;
use crate::naming::partition_subject;
use crate::transport::nats_message;

/// Wait before republishing after a lost ACK; doubles up to `MAX_REPUBLISH_BACKOFF`.
const FIRST_REPUBLISH_BACKOFF: Duration = Duration::from_millis(100);
const MAX_REPUBLISH_BACKOFF: Duration = Duration::from_secs(2);

type BoxedAck<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub(crate) fn publish_error(e: jetstream::context::PublishError) -> TransportError {
    let kind = e.kind();
    let text = match kind {
        PublishErrorKind::TimedOut => format!("no JetStream ACK: {e}"),
        PublishErrorKind::StreamNotFound => {
            format!("no stream captures the subject (deleted?): {e}")
        }
        _ => e.to_string(),
    };
    // The client's error stays reachable as the source.
    let detail = ErrorDetail::with_source(text, e);
    match kind {
        PublishErrorKind::TimedOut => TransportError::Timeout(detail),
        PublishErrorKind::BrokenPipe => TransportError::Unavailable(detail),
        _ => TransportError::Rejected(detail),
    }
}

fn retryable(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
    )
}

fn receipt(ack: &jetstream::publish::PublishAck) -> Receipt {
    Receipt {
        position: Some(BrokerPosition {
            partition: None,
            offset: ack.sequence,
        }),
        duplicate: ack.duplicate,
    }
}

/// What republishing a message needs: its parts, moved out of the publish (nothing copied).
pub(crate) struct Republish {
    pub(crate) context: Arc<jetstream::Context>,
    pub(crate) topic: String,
    /// The partition it went to; its subject is built again only if it is republished.
    pub(crate) partition: u16,
    pub(crate) event_id: String,
    pub(crate) headers: Headers,
    pub(crate) payload: Bytes,
    /// Republishes allowed.
    pub(crate) retries: u32,
    /// Its place in the partition's send order: republishes keep it.
    pub(crate) ticket: Ticket,
}

impl Republish {
    /// Republishes with the same `Nats-Msg-Id` (the stream drops the copy if the first one was
    /// stored) until an ACK comes or the attempts run out.
    ///
    /// Republishes go in the partition's send order, one at a time, and hold new publishes
    /// to the partition meanwhile ([`crate::line`]).
    async fn run(
        mut self,
        first_error: jetstream::context::PublishError,
    ) -> Result<Receipt, TransportError> {
        let mut err = first_error;
        let mut attempt = 0;
        let mut backoff = FIRST_REPUBLISH_BACKOFF;
        if retryable(err.kind()) && self.retries > 0 {
            self.ticket.start_recovery();
            self.ticket.turn().await;
        }
        loop {
            if !retryable(err.kind()) || attempt >= self.retries {
                return Err(publish_error(err));
            }
            attempt += 1;
            tracing::debug!(topic = %self.topic, partition = self.partition, attempt, error = %err, "publish ACK lost; republishing with the same Nats-Msg-Id");
            // The first republish goes at once (the ACK timeout already passed, and the
            // partition's later republishes wait behind it); repeated ones back off.
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_REPUBLISH_BACKOFF);
            }
            let again = nats_message(&self.headers, &self.payload, &self.event_id)?;
            err = match self
                .context
                .send_publish(partition_subject(&self.topic, self.partition), again)
                .await
            {
                Ok(pending) => match pending.await {
                    Ok(ack) => return Ok(receipt(&ack)),
                    Err(e) => e,
                },
                Err(e) => e,
            };
        }
    }
}

enum State {
    /// Waiting for the first ACK. The republish parts wait beside it, unboxed: a pending
    /// publish holds the client's future and the message, nothing more.
    First {
        pending: BoxedAck<Result<jetstream::publish::PublishAck, jetstream::context::PublishError>>,
        republish: Option<Republish>,
    },
    /// The first ACK was lost: the republish loop (rare, so boxed only now).
    Republishing(BoxedAck<Result<Receipt, TransportError>>),
    Done,
}

/// Resolves with the JetStream ACK of one message. An ACK lost to a disconnect or timeout is
/// retried by republishing with the same `Nats-Msg-Id` (the stream drops the copy if the first
/// one was stored), up to `publish_retries` times; then it resolves with the error.
pub struct NatsAck(State);

impl NatsAck {
    pub(crate) fn new(
        pending: BoxedAck<Result<jetstream::publish::PublishAck, jetstream::context::PublishError>>,
        republish: Republish,
    ) -> Self {
        Self(State::First {
            pending,
            republish: Some(republish),
        })
    }
}

impl Future for NatsAck {
    type Output = Result<Receipt, TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.0 {
                State::First { pending, republish } => {
                    let outcome = std::task::ready!(pending.as_mut().poll(cx));
                    let republish = republish.take();
                    match (outcome, republish) {
                        (Ok(ack), _) => {
                            this.0 = State::Done;
                            return Poll::Ready(Ok(receipt(&ack)));
                        }
                        (Err(e), Some(r)) => this.0 = State::Republishing(Box::pin(r.run(e))),
                        (Err(e), None) => {
                            this.0 = State::Done;
                            return Poll::Ready(Err(publish_error(e)));
                        }
                    }
                }
                State::Republishing(run) => {
                    let outcome = std::task::ready!(run.as_mut().poll(cx));
                    this.0 = State::Done;
                    return Poll::Ready(outcome);
                }
                // Polled after completion: FuturesUnordered never does this.
                State::Done => return Poll::Pending,
            }
        }
    }
}
