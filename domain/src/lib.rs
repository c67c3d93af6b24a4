//! The fleetlog domain: the Device, Firmware, Rollout and User aggregates, with their commands,
//! events and refusals.
//!
//! Everything here is a pure decision. An aggregate receives a command together with the outside
//! facts it needs (the time, hashes computed by the caller), checks it against its own state, and
//! answers with past-tense events or a refusal. No IO happens here: the write side (`commands`)
//! loads and stores aggregates, the edges (`api`, `ingest`) translate requests into commands.
//!
//! Aggregates decide in a synchronous `decide` step before any event is written, so a refused
//! command never leaves a half-changed aggregate behind.

pub mod device;
pub mod firmware;
pub mod ids;
pub mod rollout;
pub mod user;

pub use ids::{CommandId, DeviceId, IdError, RolloutId, SessionId, TenantId, UserId};

/// The version stamped on every event this crate defines today. A change to an event's shape
/// that old payloads cannot be read as gets a new version and an upcaster.
pub const EVENT_VERSION: &str = "1.0";

/// Write each decided event through the sink, which applies it to the aggregate once.
async fn write_all<A: cqrs_es::Aggregate>(
    aggregate: &mut A,
    sink: &cqrs_es::event_sink::EventSink<A>,
    events: Vec<A::Event>,
) {
    for event in events {
        sink.write(event, aggregate).await;
    }
}
