//! The read side of fleetlog: projections that consume the event stream from JetStream and keep
//! Postgres read models for the API's queries.
//!
//! Each projection ([`Projection`]) reads the events of one aggregate type through a durable
//! JetStream pull consumer named after it; the [`Worker`] applies each event and the
//! projection's per-aggregate position in one transaction and acks only after the commit, so an
//! event takes effect exactly once however often it is delivered (invariant 2 of the
//! architecture).
//!
//! [`replay`] rebuilds a read model from the events table into shadow tables and swaps them in
//! atomically (invariant 3), or compares them with the live model.
//!
//! Read models so far: `devices` and `device_commands` ([`DevicesProjection`]), `telemetry`
//! ([`TelemetryProjection`]).

pub mod devices;
pub mod replay;
pub mod telemetry;
pub mod worker;

pub use devices::DevicesProjection;
pub use telemetry::TelemetryProjection;
pub use worker::{Outcome, Projection, ProjectionError, Worker, WorkerSettings};

/// The names of every projection, as `fleetlog replay` and the consumers know them.
pub const PROJECTIONS: &[&str] = &[DevicesProjection::NAME, TelemetryProjection::NAME];
