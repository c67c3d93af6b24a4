//! fleetlog's process managers: each follows events (from JetStream) and read models (in
//! Postgres) and acts only through commands, so every decision it takes is an event of an
//! aggregate, recorded with the reason. They hold no state of their own: a restarted one, or
//! several at once, decide the same, because the aggregates refuse what no longer applies.
//!
//! - [`liveness`] marks devices offline after a silence;
//! - [`rollout_manager`] carries firmware rollouts out, wave by wave.
//!
//! [`broker_sync`] follows the same events but acts on the broker instead: it keeps the
//! broker's accounts in step with the device credentials the log holds.

pub mod broker_sync;
pub mod liveness;
pub mod rollout_manager;
