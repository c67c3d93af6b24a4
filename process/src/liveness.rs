//! Liveness: marks a device offline when neither telemetry nor a heartbeat arrived within the
//! timeout.
//!
//! Every `interval` it reads the `devices` read model for online, active devices last seen
//! before `now - timeout` and sends each a `MarkOffline` carrying that last-seen instant. The
//! Device aggregate decides: it refuses if the device is offline already (so one silence fires
//! once, however often it is scanned and however many processes scan) and if it was heard from
//! after that instant (so a lagging read model never takes a live device offline). All state is
//! in Postgres: a restart simply scans again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::device::{DeviceCommand, DeviceError};
use tokio_util::sync::CancellationToken;

/// How many silent devices one scan handles at most; the next scan takes the rest.
const SCAN_LIMIT: i64 = 1_000;

/// Tuning of the liveness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessSettings {
    /// Silence after which a device counts as offline.
    pub timeout: Duration,
    /// How often to look.
    pub interval: Duration,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            interval: Duration::from_secs(15),
        }
    }
}

/// The liveness process manager.
pub struct Liveness {
    bus: CommandBus,
    settings: LivenessSettings,
}

impl Liveness {
    /// A liveness check that sends its commands through `bus`.
    pub fn new(bus: CommandBus, settings: LivenessSettings) -> Self {
        Self { bus, settings }
    }

    /// Scans every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.scan(Utc::now()).await {
                tracing::warn!(%error, "liveness scan failed; next scan retries");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.settings.interval) => {}
            }
        }
        tracing::info!("liveness stopped");
    }

    /// One scan as of `now`. Returns the devices it marked offline.
    pub async fn scan(&self, now: DateTime<Utc>) -> Result<Vec<String>, sqlx::Error> {
        let timeout = chrono::Duration::from_std(self.settings.timeout)
            .unwrap_or_else(|_| chrono::Duration::seconds(300));
        let silent: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT device_id, last_seen FROM devices
              WHERE online AND lifecycle = 'active' AND last_seen < $1
              ORDER BY last_seen LIMIT $2",
        )
        .bind(now - timeout)
        .bind(SCAN_LIMIT)
        .fetch_all(self.bus.pool())
        .await?;
        let reason = format!(
            "no telemetry or heartbeat for {}s",
            self.settings.timeout.as_secs()
        );
        let metadata = CommandMetadata::new("system:liveness");
        let mut marked = Vec::new();
        for (device_id, last_seen) in silent {
            let command = DeviceCommand::MarkOffline {
                reason: reason.clone(),
                silent_since: Some(last_seen),
                at: now,
            };
            match self
                .bus
                .devices()
                .execute(&device_id, command, &metadata)
                .await
            {
                Ok(_) => {
                    metrics::counter!("fleetlog_liveness_marked_offline_total").increment(1);
                    marked.push(device_id);
                }
                // Already offline, or heard from meanwhile: the read model lags; nothing to do.
                // Counted, so a check that never fires shows as refusals, not as silence.
                Err(CommandError::Refused(
                    refusal @ (DeviceError::AlreadyOffline | DeviceError::HeardFromSince(_)),
                )) => {
                    let reason = match refusal {
                        DeviceError::AlreadyOffline => "already_offline",
                        _ => "heard_from_since",
                    };
                    metrics::counter!("fleetlog_liveness_refused_total", "reason" => reason)
                        .increment(1);
                    tracing::debug!(device_id, %refusal, "not marked offline");
                }
                Err(error) => {
                    tracing::warn!(device_id, %error, "cannot mark device offline");
                }
            }
        }
        Ok(marked)
    }
}
