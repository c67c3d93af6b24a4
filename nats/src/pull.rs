//! [`Pull`]: the one pull loop every durable consumer of the event stream runs (projection
//! workers, the rollout manager, the dispatcher).
//!
//! It hands out the messages that have arrived together, in order, as one batch; applies the
//! heartbeat rule ([`crate::HeartbeatWatch`]); and reports a lost pull (an error of the
//! message stream, one missed heartbeat too many, or the stream's end) only after the
//! messages that arrived with it are handed out, so nothing received is thrown away. The
//! caller then returns the error, and [`crate::consume_until_shutdown`] sets the consumer up
//! again after the shared backoff.
//!
//! The ack discipline is the caller's, by one rule: a message is acked only once its effect
//! is committed (or it is dead-lettered); whatever is not acked comes back after the ack wait.

use async_nats::jetstream::consumer::pull::{MessagesError, Stream as Messages};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use futures::stream::ReadyChunks;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::HeartbeatWatch;

/// Why a pull ended: the consumer is to be set up again.
#[derive(Debug, thiserror::Error)]
pub enum PullLost {
    /// The message stream failed (or missed one heartbeat too many).
    #[error("the pull was lost: {0}")]
    Failed(#[from] MessagesError),
    /// The message stream ended.
    #[error("the consumer's message stream ended")]
    Ended,
}

/// A durable consumer's messages, a batch at a time. See the module documentation.
pub struct Pull {
    messages: ReadyChunks<Messages>,
    heartbeats: HeartbeatWatch,
    lost: Option<PullLost>,
}

impl Pull {
    /// Starts pulling from `consumer`, at most `max_batch` messages a batch (at least one).
    pub async fn start(
        consumer: &PullConsumer,
        max_batch: usize,
    ) -> Result<Self, async_nats::jetstream::consumer::StreamError> {
        Ok(Self {
            messages: consumer.messages().await?.ready_chunks(max_batch.max(1)),
            heartbeats: HeartbeatWatch::default(),
            lost: None,
        })
    }

    /// The next batch of messages, in order; `Ok(None)` once `shutdown` is cancelled (the
    /// messages in hand are the caller's to finish). Never an empty batch.
    pub async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Message>>, PullLost> {
        loop {
            if let Some(lost) = self.lost.take() {
                return Err(lost);
            }
            let received = tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                received = self.messages.next() => received,
            };
            let Some(received) = received else {
                return Err(PullLost::Ended);
            };
            let mut batch = Vec::with_capacity(received.len());
            for next in received {
                match self.heartbeats.check(next) {
                    Ok(Some(message)) => batch.push(message),
                    Ok(None) => {}
                    // The messages that came with it are handed out first.
                    Err(error) => {
                        self.lost.get_or_insert(error.into());
                    }
                }
            }
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
    }
}
