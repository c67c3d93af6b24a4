//! Read side of fleetlog: projection workers that consume the event stream from JetStream and
//! keep Postgres read models (devices, telemetry, commands, firmware, rollouts, users), the
//! process managers that react to events with new commands (liveness, rollouts), and the replay
//! that rebuilds a read model from the events table.
//!
//! Empty so far: the fan-out (relay, projections, replay) is the next stage of the build.
