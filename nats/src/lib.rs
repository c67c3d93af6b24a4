//! NATS JetStream for fleetlog.
//!
//! The Postgres `events` table is the source of truth; JetStream is the transport that carries
//! every committed event to whoever reads it (projections, process managers, users' own
//! consumers). This crate owns
//!
//! - the topology: the `FLEETLOG_EVENTS` stream and its subjects
//!   `fleetlog.events.{aggregate_type}.{aggregate_id}.{plane}` ([`topology`]), and the durable
//!   consumers' set-up ([`durable_consumer`]);
//! - the message body: a recorded event, `fleetlog_eventlog::EventEnvelope`, in JSON;
//! - the `Nats-Msg-Id` every event is published under, `{aggregate_type}:{aggregate_id}:{sequence}`,
//!   so a republished event is dropped by the stream's duplicate window (the relay that
//!   publishes them is `fleetlog-relay`);
//! - the one consumer loop: [`Pull`] (batches, the heartbeat rule, a lost pull reported after
//!   the messages before it), run under [`consume_until_shutdown`] (set up again after
//!   [`Backoff`]);
//! - [`supervise`], the restart policy every role's long-running loops run under;
//! - [`accounts`]: the NATS user each role connects as.

pub mod accounts;
pub mod backoff;
pub mod pull;
pub mod supervise;
pub mod topology;

pub use backoff::{sleep_unless_shut_down, Backoff};
pub use pull::{Pull, PullLost};
pub use supervise::supervise;
pub use topology::{ensure_stream, StreamSettings, STREAM_NAME};

/// Connects to NATS with the URL's own credentials, if any. The client reconnects by itself
/// after the connection drops.
pub async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    accounts::connect_as(url, None).await
}

/// The durable pull consumer `config` names, created if missing. One that exists with another
/// subject filter (an upgrade moved the subjects it reads) takes the new filter in place and
/// keeps its position: deleting and recreating it would deliver the stream again from the start.
pub async fn durable_consumer(
    stream: &async_nats::jetstream::stream::Stream,
    config: async_nats::jetstream::consumer::pull::Config,
) -> Result<async_nats::jetstream::consumer::PullConsumer, async_nats::Error> {
    let name = config
        .durable_name
        .clone()
        .ok_or("a durable consumer needs a name")?;
    let mut consumer = stream.get_or_create_consumer(&name, config.clone()).await?;
    let current = consumer.cached_info().config.filter_subject.clone();
    if current != config.filter_subject {
        let filter = config.filter_subject.clone();
        consumer = stream.create_consumer(config).await?;
        tracing::info!(
            consumer = name,
            from = current,
            to = filter,
            "moved the consumer to new subjects"
        );
    }
    Ok(consumer)
}

/// Whether a pull consumer's message stream only reports a missed idle heartbeat. The stream
/// goes on working (it pulls again by itself), so consumers carry on: ending the stream would
/// drop the messages it already holds, and the server would redeliver them only after the
/// ack wait. Under heavy load a busy consumer can poll late enough to see this.
pub fn is_missed_heartbeat(error: &async_nats::jetstream::consumer::pull::MessagesError) -> bool {
    error.kind() == async_nats::jetstream::consumer::pull::MessagesErrorKind::MissingHeartbeat
}

/// How many missed idle heartbeats in a row a consumer goes on through before it takes the
/// pull as lost and sets the consumer up again.
pub const MISSED_HEARTBEATS_TOLERATED: u32 = 3;

/// The one rule every consumer loop applies to what its message stream yields: a message
/// passes and resets the count; a missed idle heartbeat is let by, up to
/// [`MISSED_HEARTBEATS_TOLERATED`] in a row (see [`is_missed_heartbeat`]); any other error, or
/// one heartbeat too many, is the caller's to act on.
#[derive(Debug, Default)]
pub struct HeartbeatWatch {
    missed: u32,
}

impl HeartbeatWatch {
    /// `Some(message)` to handle, `None` to go on with the next, or the error.
    pub fn check(
        &mut self,
        next: Result<
            async_nats::jetstream::Message,
            async_nats::jetstream::consumer::pull::MessagesError,
        >,
    ) -> Result<
        Option<async_nats::jetstream::Message>,
        async_nats::jetstream::consumer::pull::MessagesError,
    > {
        match next {
            Ok(message) => {
                self.missed = 0;
                Ok(Some(message))
            }
            Err(error)
                if is_missed_heartbeat(&error) && self.missed < MISSED_HEARTBEATS_TOLERATED =>
            {
                self.missed += 1;
                tracing::debug!("missed an idle heartbeat; going on");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// Runs `consume` until it returns `Ok` or `shutdown` fires. A consumer that fails (server gone,
/// stream not created yet, pull lost) is set up again after a backoff from 200 ms doubling to
/// 10 s; `name` says whose in the log.
pub async fn consume_until_shutdown<F, Fut, E>(
    name: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    mut consume: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    );
    while !shutdown.is_cancelled() {
        match consume().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(consumer = name, %error, "consumer interrupted; setting it up again");
                if !backoff.wait(shutdown).await {
                    break;
                }
            }
        }
    }
}
