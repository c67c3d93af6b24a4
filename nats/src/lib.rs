//! NATS JetStream for fleetlog: the `FLEETLOG_EVENTS` stream and its subjects
//! (`fleetlog.events.{aggregate_type}.{aggregate_id}`), consumer configurations, and the relay
//! that tails the events table gap-safely and publishes every committed event exactly once.
//!
//! Empty so far: the relay arrives with the fan-out stage of the build.
