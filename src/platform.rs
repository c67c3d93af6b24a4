//! [`Platform`]: the one way fleetlog's roles are started, by `main` (each subcommand, and
//! `fleetlog up` with all of them) and by the end-to-end tests.
//!
//! A platform holds the connections every role shares (a Postgres pool, a NATS client), the
//! write side's tuning and a shutdown token. Each role added to it runs supervised (a panic
//! restarts it; see `fleetlog_nats::supervise`) with a command bus of its own, as it would in
//! a process of its own. [`Platform::run`] waits for the first role to stop (by an error, or
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
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_dispatch::{DispatchSettings, Dispatcher};
use fleetlog_firmware::FirmwareStore;
use fleetlog_ingest::bridge::{Ingest, IngestSettings};
use fleetlog_nats::{supervise, StreamSettings};
use fleetlog_process::liveness::{Liveness, LivenessSettings};
use fleetlog_process::rollout_manager::{RolloutManager, RolloutManagerSettings};
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
}

/// The roles of one process, on shared connections. See the module documentation.
pub struct Platform {
    pool: PgPool,
    nats: async_nats::Client,
    store: StoreSettings,
    shutdown: CancellationToken,
    roles: JoinSet<anyhow::Result<()>>,
}

impl Platform {
    /// A platform without roles yet. Roles stop when `shutdown` is cancelled (or when the
    /// platform is dropped, which aborts them).
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
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
        CommandBus::new(self.pool.clone(), self.store)
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
    pub async fn prepare_stream(&self, stream: &StreamSettings) {
        let jetstream = async_nats::jetstream::new(self.nats.clone());
        let ensure = fleetlog_nats::ensure_stream(&jetstream, stream);
        match tokio::time::timeout(Duration::from_secs(5), ensure).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot set up the event stream yet"),
            Err(_) => tracing::warn!("NATS does not answer yet; the roles wait for it"),
        }
    }

    /// The relay: committed events to JetStream. NATS being down is not an error: the relay
    /// retries until it is back.
    pub fn relay(&mut self, settings: RelaySettings) -> &mut Self {
        let (pool, client, shutdown) =
            (self.pool.clone(), self.nats.clone(), self.shutdown.clone());
        self.roles
            .spawn(supervise("relay", self.shutdown.clone(), move || {
                let relay = Relay::new(pool.clone(), client.clone(), settings);
                let shutdown = shutdown.clone();
                async move {
                    relay.run(shutdown).await;
                    Ok(())
                }
            }));
        self
    }

    /// A worker for every read model.
    pub fn projections(&mut self, settings: WorkerSettings) -> &mut Self {
        let run = fleetlog_projections::run_all(
            self.pool.clone(),
            self.jetstream(),
            settings,
            self.shutdown.clone(),
        );
        self.roles.spawn(async move {
            run.await;
            Ok(())
        });
        self
    }

    /// The liveness check: devices gone silent are marked offline.
    pub fn liveness(&mut self, settings: LivenessSettings) -> &mut Self {
        let (bus, shutdown) = (self.bus(), self.shutdown.clone());
        self.roles
            .spawn(supervise("liveness", self.shutdown.clone(), move || {
                let liveness = Liveness::new(bus.clone(), settings);
                let shutdown = shutdown.clone();
                async move {
                    liveness.run(shutdown).await;
                    Ok(())
                }
            }));
        self
    }

    /// The rollout manager: rollouts advance, pause and finish by their outcomes.
    pub fn rollout_manager(&mut self, settings: RolloutManagerSettings) -> &mut Self {
        let (bus, jetstream, shutdown) = (self.bus(), self.jetstream(), self.shutdown.clone());
        self.roles.spawn(supervise(
            "rollout-manager",
            self.shutdown.clone(),
            move || {
                let manager = RolloutManager::new(bus.clone(), jetstream.clone(), settings);
                let shutdown = shutdown.clone();
                async move {
                    manager.run(shutdown).await;
                    Ok(())
                }
            },
        ));
        self
    }

    /// The MQTT ingest bridge. An unreachable broker is not an error: the bridge retries.
    pub fn ingest(&mut self, settings: IngestSettings) -> &mut Self {
        let (bus, jetstream, shutdown) = (self.bus(), self.jetstream(), self.shutdown.clone());
        self.roles
            .spawn(supervise("ingest", self.shutdown.clone(), move || {
                let bridge = Ingest::new(bus.clone(), jetstream.clone(), settings.clone());
                let shutdown = shutdown.clone();
                async move {
                    bridge.run(shutdown).await;
                    Ok(())
                }
            }));
        self
    }

    /// The dispatcher: device events out to the devices, and expiry of unanswered commands.
    pub fn dispatch(&mut self, settings: DispatchSettings) -> &mut Self {
        let (bus, jetstream, shutdown) = (self.bus(), self.jetstream(), self.shutdown.clone());
        self.roles
            .spawn(supervise("dispatch", self.shutdown.clone(), move || {
                let dispatcher = Dispatcher::new(bus.clone(), jetstream.clone(), settings.clone());
                let shutdown = shutdown.clone();
                async move {
                    dispatcher.run(shutdown).await;
                    Ok(())
                }
            }));
        self
    }

    /// The API's state on this platform's connections.
    pub fn api_state(&self, parts: &ApiParts) -> AppState {
        AppState {
            auth: parts.auth.clone(),
            nats: Some(self.nats.clone()),
            mqtt: parts.mqtt.clone(),
            login_throttle: Arc::new(LoginThrottle::default()),
            bus: self.bus(),
            metrics: parts.metrics.clone(),
            firmware: parts.firmware.clone(),
        }
    }

    /// The HTTP API on `address`. The listener is bound again after a restart (it went with
    /// the unit that panicked).
    pub fn api(&mut self, address: SocketAddr, parts: ApiParts) -> &mut Self {
        let state = self.api_state(&parts);
        let shutdown = self.shutdown.clone();
        self.roles
            .spawn(supervise("api", self.shutdown.clone(), move || {
                let (state, http, shutdown) = (state.clone(), parts.http.clone(), shutdown.clone());
                async move {
                    let listener = TcpListener::bind(address)
                        .await
                        .with_context(|| format!("cannot listen on {address}"))?;
                    fleetlog_api::run(listener, state, &http, shutdown.cancelled_owned())
                        .await
                        .context("api failed")
                }
            }));
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

    fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.nats.clone())
    }
}
