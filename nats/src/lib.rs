//! NATS JetStream for fleetlog.
//!
//! The Postgres `events` table is the source of truth; JetStream is the transport that carries
//! every committed event to whoever reads it (projections, process managers, users' own
//! consumers). This crate owns
//!
//! - the topology: the `FLEETLOG_EVENTS` stream and its subjects
//!   `fleetlog.events.{aggregate_type}.{aggregate_id}` ([`topology`]);
//! - the message body, an [`EventEnvelope`] in JSON ([`envelope`]);
//! - the [`relay`], which tails the events table gap-safely and publishes each event with
//!   `Nats-Msg-Id = {aggregate_type}:{aggregate_id}:{sequence}`, so a republished event is
//!   dropped by the stream's duplicate window.

pub mod envelope;
pub mod relay;
pub mod topology;

pub use envelope::EventEnvelope;
pub use relay::{Relay, RelaySettings};
pub use topology::{ensure_stream, StreamSettings, STREAM_NAME};

/// Connects to NATS. The client reconnects by itself after the connection drops.
pub async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name("fleetlog")
        .retry_on_initial_connect()
        .connect(url)
        .await
}

/// Whether a pull consumer's message stream only reports a missed idle heartbeat. The stream
/// goes on working (it pulls again by itself), so consumers carry on: ending the stream would
/// drop the messages it already holds, and the server would redeliver them only after the
/// ack wait. Under heavy load a busy consumer can poll late enough to see this.
pub fn is_missed_heartbeat(error: &async_nats::jetstream::consumer::pull::MessagesError) -> bool {
    error.kind() == async_nats::jetstream::consumer::pull::MessagesErrorKind::MissingHeartbeat
}
