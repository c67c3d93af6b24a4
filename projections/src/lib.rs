//! The read side of fleetlog: the Postgres read models the API queries, and how they follow
//! the event log.
//!
//! Each projection ([`Projection`]) reads the events of one aggregate type. The device models
//! (`devices`, `device_commands`, `telemetry`) follow the busiest events and are kept inline:
//! the write side applies them in the transaction that appends the events ([`inline`],
//! [`DeviceModels`]). The others (`firmware`, `rollouts`, `users`) are fed by a [`Worker`] from
//! a durable JetStream pull consumer named after the projection, which applies each event and
//! moves the projection's per-aggregate position in one transaction and acks only after the
//! commit. Either way an event takes effect exactly once (invariant 2 of the architecture).
//!
//! [`as_of`] shows a read model as it stood at an instant, for one aggregate.
//!
//! [`retention`] lets the telemetry model drop readings older than the operator keeps.
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
pub mod inline;
pub mod replay;
pub mod retention;
pub mod rollouts;
pub mod telemetry;
pub mod users;
pub mod worker;

pub use devices::DevicesProjection;
pub use firmware::FirmwareProjection;
pub use inline::DeviceModels;
pub use rollouts::RolloutsProjection;
pub use telemetry::TelemetryProjection;
pub use users::UsersProjection;
pub use worker::{
    has_applied, Outcome, OwnPositions, Positions, Projection, ProjectionError, Worker,
    WorkerSettings,
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

/// Whether the projection named `name` is kept inline by the write side (and so has no
/// worker).
pub fn kept_inline(name: &str) -> bool {
    fn of<P: Projection>(_: &P) -> bool {
        P::KEPT_INLINE
    }
    with_projection!(name, |projection| of(&projection)).unwrap_or(false)
}

/// Runs a worker for every projection that is not kept inline (`firmware`, `rollouts`,
/// `users`), each supervised on its own, until `shutdown`.
pub async fn run_all(
    pool: PgPool,
    jetstream: Context,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    let mut workers = tokio::task::JoinSet::new();
    let parts = || (pool.clone(), jetstream.clone(), settings, shutdown.clone());
    workers.spawn(supervised_worker(FirmwareProjection, parts()));
    workers.spawn(supervised_worker(RolloutsProjection, parts()));
    workers.spawn(supervised_worker(UsersProjection, parts()));
    while workers.join_next().await.is_some() {}
}

/// A worker of `projection`, restarted by the supervisor should it panic.
async fn supervised_worker<P: Projection + Copy>(
    projection: P,
    (pool, jetstream, settings, shutdown): (PgPool, Context, WorkerSettings, CancellationToken),
) -> Result<(), std::convert::Infallible> {
    fleetlog_nats::supervise(P::NAME, shutdown.clone(), move || {
        let worker = Worker::new(projection, pool.clone(), jetstream.clone(), settings);
        let shutdown = shutdown.clone();
        async move {
            worker.run(shutdown).await;
            Ok(())
        }
    })
    .await
}
