//! Handlers: what a subscription runs for each message. Async closures work as handlers.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::HandlerError;
use crate::message::Message;

/// Handles raw messages.
///
/// ```
/// use eventbus_core::{Handler, HandlerError, Message};
/// struct Count;
/// #[async_trait::async_trait]
/// impl Handler for Count {
///     async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
///         if msg.payload().is_empty() { return Err(HandlerError::permanent("empty")); }
///         Ok(())
///     }
/// }
/// // Closures work too:
/// fn takes(_: impl Handler) {}
/// takes(|_msg: Message| async move { Ok(()) });
/// takes(Count);
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message. `Err` is retried with backoff, then dead-lettered.
    async fn handle(&self, msg: Message) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        (self)(msg).await
    }
}

/// Handles decoded [`Envelope`]s. Malformed envelopes never reach it: they are dead-lettered.
#[async_trait]
pub trait EnvelopeHandler: Send + Sync + 'static {
    /// Handles one envelope.
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> EnvelopeHandler for F
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        (self)(envelope).await
    }
}

/// Adapts an [`EnvelopeHandler`] to a [`Handler`]: parse, then handle.
pub(crate) struct EnvelopeAdapter<H>(pub(crate) H);

#[async_trait]
impl<H: EnvelopeHandler> Handler for EnvelopeAdapter<H> {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let envelope = msg.envelope().map_err(HandlerError::malformed)?;
        self.0.handle(envelope).await
    }
}

pub(crate) type SharedHandler = Arc<dyn Handler>;
