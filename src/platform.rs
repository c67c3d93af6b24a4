//! [`Platform`]: the one way fleetlog's roles are started, by `main` (each subcommand, and
//! `fleetlog up` with all of them) and by the end-to-end tests.
//!
//! A platform holds a Postgres pool, the NATS server (one client for all roles, or a
//! connection per role as `fleetlog up` has it, so the relay's publishing and the consumers do
//! not share one socket), the write side's tuning and a shutdown token. Each role added to it
//! runs supervised (a panic restarts it; see `fleetlog_nats::supervise`) with a command bus of
//! its own, new at every restart, as it would have in a process of its own. [`Platform::run`] waits for the first role to stop (by an error, or
//! after the shutdown) and stops the others.
//!
//! Two platforms on the same database and NATS server behave as two processes of one
//! deployment: tests stop and restart one role that way without touching the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fleetlog_api::auth::Auth;
use fleetlog_api::throttle::LoginThrottle;
use fleetlog_api::{AppState, HttpSettings};
use fleetlog_broker::BrokerUrl;
use fleetlog_commands::credentials::DeviceCredentialKey;
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_dispatch::{DispatchSettings, Dispatcher};
use fleetlog_firmware::FirmwareStore;
use fleetlog_ingest::bridge::{Ingest, IngestSettings};
use fleetlog_nats::accounts::{self, NatsUsers};
use fleetlog_nats::{supervise, StreamSettings};
use fleetlog_process::broker_sync::{BrokerSync, BrokerSyncSettings};
use fleetlog_process::liveness::{Liveness, LivenessSettings};
use fleetlog_process::rollout_manager::{RolloutManager, RolloutManagerSettings};
use fleetlog_projections::retention::{RetentionSettings, TelemetryRetention};
use fleetlog_projections::DeviceModels;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::{Relay, RelaySettings};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the API serves besides the write side.
#[derive(Clone)]
pub struct ApiParts {
    /// Token keys.
    pub auth: Arc<Auth>,
    /// Firmware images; `None` answers the firmware routes with 503.
    pub firmware: Option<Arc<FirmwareStore>>,
    /// The broker `/ready` probes; `None` leaves it out.
    pub mqtt: Option<BrokerUrl>,
    /// This process's metrics for `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Request limits and CORS.
    pub http: HttpSettings,
    /// Device identity for a clustered broker; `None`: its routes answer 404.
    pub broker_auth: Option<Arc<fleetlog_api::BrokerAuth>>,
}

/// How the roles reach NATS.
#[derive(Clone)]
enum Nats {
    /// One client for every role.
    Shared(async_nats::Client),
    /// A connection of its own for each role, to the server at this URL, each as the role's
    /// own user.
    PerRole(String, NatsUsers),
}

/// The NATS user a role connects as.
fn nats_user_of(role: &str) -> &'static str {
    match role {
        "relay" => accounts::RELAY,
        "ingest" => accounts::INGEST,
        "dispatch" => accounts::DISPATCH,
        "broker-sync" => accounts::SYNC,
        "api" => accounts::API,
        // The projections and the rollout manager.
        _ => accounts::PROJECT,
    }
}

impl Nats {
    async fn client_for(&self, role: &str) -> anyhow::Result<async_nats::Client> {
        match self {
            Self::Shared(client) => Ok(client.clone()),
            // The client retries in the background: a server that is down only delays.
            Self::PerRole(url, users) => accounts::connect_as(url, users.get(nats_user_of(role)))
                .await
                .with_context(|| {
                    format!("cannot connect to NATS at {url} (FLEETLOG_NATS_URL) for the {role}")
                }),
        }
    }
}

/// The roles of one process, on shared connections. See the module documentation.
pub struct Platform {
    pool: PgPool,
    nats: Nats,
    store: StoreSettings,
    shutdown: CancellationToken,
    roles: JoinSet<anyhow::Result<()>>,
}

impl Platform {
    /// A platform without roles yet, whose roles share the client `nats`. Roles stop when
    /// `shutdown` is cancelled (or when the platform is dropped, which aborts them).
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        store: StoreSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self::with_nats(pool, Nats::Shared(nats), store, shutdown)
    }

    /// A platform whose roles each connect to the NATS server at `nats_url` on their own, as
    /// their own user from `users` (the relay as `fleetlog.relay`, and so on).
    pub fn with_connection_per_role(
        pool: PgPool,
        nats_url: String,
        users: NatsUsers,
        store: StoreSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self::with_nats(pool, Nats::PerRole(nats_url, users), store, shutdown)
    }

    fn with_nats(
        pool: PgPool,
        nats: Nats,
        store: StoreSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pool,
            nats,
            store,
            shutdown,
            roles: JoinSet::new(),
        }
    }

    /// A command bus of its own on the platform's pool, as a role gets one.
    pub fn bus(&self) -> CommandBus {
        CommandBus::new(self.pool.clone(), self.store, DeviceModels::inline())
    }

    /// The platform's Postgres pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The token that stops the platform's roles.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Sets up the event stream before the roles start, so the consumers of the other roles
    /// find it rather than warn and retry. Best effort, and brief: with NATS away, every role
    /// waits for it on its own.
    pub async fn prepare_stream(&self, stream: &StreamSettings) -> anyhow::Result<()> {
        let jetstream = async_nats::jetstream::new(self.nats.client_for("relay").await?);
        let ensure = fleetlog_nats::ensure_stream(&jetstream, stream);
        match tokio::time::timeout(Duration::from_secs(5), ensure).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot set up the event stream yet"),
            Err(_) => tracing::warn!("NATS does not answer yet; the roles wait for it"),
        }
        Ok(())
    }

    /// The relay: committed events to JetStream. NATS being down is not an error: the relay
    /// retries until it is back.
    pub fn relay(&mut self, settings: RelaySettings) -> &mut Self {
        let pool = self.pool.clone();
        self.spawn("relay", move |client, _, shutdown| {
            let relay = Relay::new(pool.clone(), client, settings);
            async move {
                relay.run(shutdown).await;
                Ok(())
            }
        })
    }

    /// A worker for every read model (each supervised on its own).
    pub fn projections(&mut self, settings: WorkerSettings) -> &mut Self {
        let (pool, nats, shutdown) = (self.pool.clone(), self.nats.clone(), self.shutdown.clone());
        self.roles.spawn(async move {
            let jetstream = async_nats::jetstream::new(nats.client_for("projections").await?);
            fleetlog_projections::run_all(pool, jetstream, settings, shutdown).await;
            Ok(())
        });
        self
    }

    /// The liveness check: devices gone silent are marked offline. It reads Postgres only, so
    /// it opens no NATS connection.
    pub fn liveness(&mut self, settings: LivenessSettings) -> &mut Self {
        let (pool, store, shutdown) = (self.pool.clone(), self.store, self.shutdown.clone());
        self.roles
            .spawn(supervise("liveness", self.shutdown.clone(), move || {
                let liveness = Liveness::new(
                    CommandBus::new(pool.clone(), store, DeviceModels::inline()),
                    settings,
                );
                let shutdown = shutdown.clone();
                async move {
                    liveness.run(shutdown).await;
                    Ok(())
                }
            }));
        self
    }

    /// The telemetry retention sweep: readings older than `settings.keep` leave the telemetry
    /// read model. Postgres only; any number of processes may run it (one sweeps at a time).
    pub fn telemetry_retention(&mut self, settings: RetentionSettings) -> &mut Self {
        let (pool, shutdown) = (self.pool.clone(), self.shutdown.clone());
        self.roles.spawn(supervise(
            "telemetry retention",
            self.shutdown.clone(),
            move || {
                let sweep = TelemetryRetention::new(pool.clone(), settings);
                let shutdown = shutdown.clone();
                async move {
                    sweep.run(shutdown).await;
                    Ok(())
                }
            },
        ));
        self
    }

    /// The rollout manager: rollouts advance, pause and finish by their outcomes.
    pub fn rollout_manager(&mut self, settings: RolloutManagerSettings) -> &mut Self {
        self.spawn("rollout-manager", move |client, bus, shutdown| {
            let manager = RolloutManager::new(bus, async_nats::jetstream::new(client), settings);
            async move {
                manager.run(shutdown).await;
                Ok(())
            }
        })
    }

    /// The broker sync: the broker's accounts follow the device credentials in the log. An
    /// unreachable broker is not an error: the sync retries, and reconciles when it is back.
    pub fn broker_sync(
        &mut self,
        settings: BrokerSyncSettings,
        key: DeviceCredentialKey,
    ) -> &mut Self {
        let pool = self.pool.clone();
        self.spawn("broker-sync", move |client, _, shutdown| {
            let sync = BrokerSync::new(
                pool.clone(),
                async_nats::jetstream::new(client),
                key.clone(),
                settings.clone(),
            );
            async move {
                sync.run(shutdown).await;
                Ok(())
            }
        })
    }

    /// The MQTT ingest bridge. An unreachable broker is not an error: the bridge retries.
    pub fn ingest(&mut self, settings: IngestSettings) -> &mut Self {
        self.spawn("ingest", move |client, bus, shutdown| {
            let bridge = Ingest::new(bus, async_nats::jetstream::new(client), settings.clone());
            async move {
                bridge.run(shutdown).await;
                Ok(())
            }
        })
    }

    /// The dispatcher: device events out to the devices, and expiry of unanswered commands.
    pub fn dispatch(&mut self, settings: DispatchSettings) -> &mut Self {
        self.spawn("dispatch", move |client, bus, shutdown| {
            let dispatcher =
                Dispatcher::new(bus, async_nats::jetstream::new(client), settings.clone());
            async move {
                dispatcher.run(shutdown).await;
                Ok(())
            }
        })
    }

    /// The API's state on this platform's connections.
    pub async fn api_state(&self, parts: &ApiParts) -> anyhow::Result<AppState> {
        let throttle = Arc::new(LoginThrottle::default());
        Ok(state_of(
            parts,
            throttle,
            self.nats.client_for("api").await?,
            self.bus(),
        ))
    }

    /// The HTTP API on `address`. The listener is bound again after a restart (it went with
    /// the unit that panicked).
    pub fn api(&mut self, address: SocketAddr, parts: ApiParts) -> &mut Self {
        // Failed logins are counted across restarts.
        let throttle = Arc::new(LoginThrottle::default());
        self.spawn("api", move |client, bus, shutdown| {
            let state = state_of(&parts, throttle.clone(), client, bus);
            let http = parts.http.clone();
            async move {
                let listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address}"))?;
                fleetlog_api::run(listener, state, &http, shutdown.cancelled_owned())
                    .await
                    .context("api failed")
            }
        })
    }

    /// Serves `/metrics` (from `handle`) and `/health` on `address` for as long as the roles
    /// run, and samples the pool into the metrics: how a role without an API is watched. A
    /// port that cannot be bound stops the process, like any role that fails.
    pub fn metrics_endpoint(
        &mut self,
        address: SocketAddr,
        handle: metrics_exporter_prometheus::PrometheusHandle,
    ) -> &mut Self {
        let shutdown = self.shutdown.clone();
        self.roles
            .spawn(async move { crate::metrics::serve(address, handle, shutdown).await });
        self
    }

    /// Runs the unit `start` makes, supervised as `name`: it gets the role's NATS client, a
    /// new command bus at every (re)start, and the shutdown token.
    fn spawn<F, Fut>(&mut self, name: &'static str, mut start: F) -> &mut Self
    where
        F: FnMut(async_nats::Client, CommandBus, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (pool, store, nats) = (self.pool.clone(), self.store, self.nats.clone());
        let shutdown = self.shutdown.clone();
        self.roles.spawn(async move {
            let client = nats.client_for(name).await?;
            supervise(name, shutdown.clone(), move || {
                start(
                    client.clone(),
                    CommandBus::new(pool.clone(), store, DeviceModels::inline()),
                    shutdown.clone(),
                )
            })
            .await
        });
        self
    }

    /// Runs until the first role stops (by failure or after the shutdown), then stops the
    /// others and gives them `grace` to finish. Roles run supervised (a panic restarts the
    /// role), so only an error ends one early, and that error is returned.
    pub async fn run(mut self, grace: Duration) -> anyhow::Result<()> {
        let first = self.roles.join_next().await;
        self.shutdown.cancel();
        let rest = tokio::time::timeout(grace, async {
            let mut results = Vec::new();
            while let Some(result) = self.roles.join_next().await {
                results.push(result);
            }
            results
        })
        .await
        .context("roles did not stop within the shutdown timeout")?;
        for result in first.into_iter().chain(rest) {
            result.context("a role was cancelled")??;
        }
        self.pool.close().await;
        Ok(())
    }
}

/// The API's state: the parts, and the role's connections.
fn state_of(
    parts: &ApiParts,
    login_throttle: Arc<LoginThrottle>,
    nats: async_nats::Client,
    bus: CommandBus,
) -> AppState {
    AppState {
        auth: parts.auth.clone(),
        nats: Some(Arc::new(nats)),
        mqtt: parts.mqtt.clone().map(Arc::new),
        login_throttle,
        bus,
        metrics: parts.metrics.clone(),
        firmware: parts.firmware.clone(),
        broker_auth: parts.broker_auth.clone(),
    }
}
