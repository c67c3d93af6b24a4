//! The read side of fleetlog: projections that consume the event stream from JetStream and keep
//! Postgres read models for the API's queries.
//!
//! Each projection ([`Projection`]) reads the events of one aggregate type through a durable
//! JetStream pull consumer named after it (`telemetry` rides with the `devices` worker on its
//! consumer, see [`Worker::alongside`]); the [`Worker`] applies each event and moves the
//! projection's per-aggregate position in one transaction (or, for a projection keyed by the
//! event, writes rows that a second application leaves alone) and acks only after the commit,
//! so an event takes effect exactly once however often it is delivered (invariant 2 of the
//! architecture).
//!
//! [`as_of`] shows a read model as it stood at an instant, for one aggregate.
//!
//! [`replay`] rebuilds a read model from the events table into shadow tables and swaps them in
//! atomically (invariant 3), or compares them with the live model.
//!
//! Read models: `devices` and `device_commands` ([`DevicesProjection`]), `telemetry`
//! ([`TelemetryProjection`]), `firmware` ([`FirmwareProjection`]), `rollouts` and
//! `rollout_devices` ([`RolloutsProjection`]), `users` ([`UsersProjection`]).
//!
//! Nothing here issues commands: the process managers that act on what the read models show
//! live in `fleetlog-process`.

pub mod as_of;
pub mod devices;
pub mod firmware;
pub mod replay;
pub mod rollouts;
pub mod telemetry;
pub mod users;
pub mod worker;

pub use devices::DevicesProjection;
pub use firmware::FirmwareProjection;
pub use rollouts::RolloutsProjection;
pub use telemetry::TelemetryProjection;
pub use users::UsersProjection;
pub use worker::{
    has_applied, Alone, Alongside, Companion, Outcome, OwnPositions, Positions, Projection,
    ProjectionError, Worker, WorkerSettings,
};

use async_nats::jetstream::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The names of every projection, as `fleetlog replay` and the consumers know them.
pub const PROJECTIONS: &[&str] = &[
    DevicesProjection::NAME,
    TelemetryProjection::NAME,
    FirmwareProjection::NAME,
    RolloutsProjection::NAME,
    UsersProjection::NAME,
];

/// Runs `$body` with `$projection` bound to the projection named `$name`; evaluates to
/// `Some(body)`, or `None` for an unknown name. The one place that maps names to types.
#[macro_export]
macro_rules! with_projection {
    ($name:expr, |$projection:ident| $body:expr) => {
        match $name {
            n if n == <$crate::DevicesProjection as $crate::Projection>::NAME => {
                let $projection = $crate::DevicesProjection;
                Some($body)
            }
            n if n == <$crate::TelemetryProjection as $crate::Projection>::NAME => {
                let $projection = $crate::TelemetryProjection;
                Some($body)
            }
            n if n == <$crate::FirmwareProjection as $crate::Projection>::NAME => {
                let $projection = $crate::FirmwareProjection;
                Some($body)
            }
            n if n == <$crate::RolloutsProjection as $crate::Projection>::NAME => {
                let $projection = $crate::RolloutsProjection;
                Some($body)
            }
            n if n == <$crate::UsersProjection as $crate::Projection>::NAME => {
                let $projection = $crate::UsersProjection;
                Some($body)
            }
            _ => None,
        }
    };
}

/// Runs a worker for every projection until `shutdown`; `telemetry` rides with `devices`
/// (see [`Worker::alongside`]).
pub async fn run_all(
    pool: PgPool,
    jetstream: Context,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    let mut workers = tokio::task::JoinSet::new();
    for name in PROJECTIONS {
        let (pool, jetstream, shutdown) = (pool.clone(), jetstream.clone(), shutdown.clone());
        match *name {
            // Telemetry rides with the devices worker: the same events, one consumer.
            TelemetryProjection::NAME => {}
            DevicesProjection::NAME => {
                workers.spawn(fleetlog_nats::supervise(
                    name,
                    shutdown.clone(),
                    move || {
                        let worker = Worker::new(
                            DevicesProjection,
                            pool.clone(),
                            jetstream.clone(),
                            settings,
                        )
                        .alongside(TelemetryProjection);
                        let shutdown = shutdown.clone();
                        async move {
                            worker.run(shutdown).await;
                            Ok::<(), std::convert::Infallible>(())
                        }
                    },
                ));
            }
            _ => {
                with_projection!(*name, |projection| workers.spawn(fleetlog_nats::supervise(
                    name,
                    shutdown.clone(),
                    move || {
                        let worker =
                            Worker::new(projection, pool.clone(), jetstream.clone(), settings);
                        let shutdown = shutdown.clone();
                        async move {
                            worker.run(shutdown).await;
                            Ok::<(), std::convert::Infallible>(())
                        }
                    }
                )));
            }
        }
    }
    while workers.join_next().await.is_some() {}
}
