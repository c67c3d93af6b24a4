//! The rollout manager: the process manager that carries firmware rollouts out.
//!
//! It is fed by JetStream (a durable consumer of rollout events and one of device events) and
//! by a periodic sweep over the read models, and acts only through commands, so every decision
//! is an event of the Rollout or Device aggregate:
//!
//! - a wave started, the rollout resumed, or a queued device came online: the devices of
//!   started waves that are online are recorded as sent (`SendToDevices`, which leaves out
//!   devices already sent), then each is asked to update (`RequestFirmwareUpdate`, carrying
//!   digest, size and signature for the OTA message);
//! - a device reported the new version (`FirmwareUpdateSucceeded`) or a failure: its outcome is
//!   recorded; the Rollout aggregate then advances, pauses, aborts or completes by itself;
//! - the sweep times out sent devices past the per-device timeout (and gives their update up on
//!   the device) and queued devices that stayed offline for the whole window;
//! - a rollout aborted: every device it sent the update to and that has no outcome is told to
//!   give the update up (`AbandonFirmwareUpdate`, which the dispatcher sends as an OTA cancel),
//!   so the device is free for a fixed image at once;
//! - an image deprecated: its rollouts that have not ended pause or abort, as the deprecation
//!   says; and nothing of a deprecated image is sent, whatever the read models show yet;
//! - a target decommissioned, or whose model the image no longer supports when it is sent: it
//!   is canceled in the rollout (neither success nor failure); a target busy with another
//!   update when it is sent goes back to the queue and is sent once it is free.
//!
//! Restart-safe: a rollout records a device as sent before the device is asked, and a device
//! takes a rollout's request once (a repeat changes nothing; after the update ended it answers
//! how the update ended), so the sweep may ask every sent device without a pending update of
//! the rollout again: killed at any point, a restarted manager neither sends an update twice
//! nor skips a device, nor misses an outcome. Messages are acked after handling and handling
//! twice is harmless. Acks are cumulative, so a restarted manager's first ack may also ack
//! what its killed predecessor received but had not handled; everything such a message would
//! have done, the sweep does: send to the due devices, ask the sent ones, learn the outcomes.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::{Context, Message};
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::device::{
    DeviceCommand, DeviceError, DeviceEvent, FirmwareImage, UpdateEnding,
};
use fleetlog_domain::firmware::{Firmware, FirmwareEvent, FirmwareStatus, RolloutsOnDeprecation};
use fleetlog_domain::rollout::{DeviceOutcome, RolloutCommand, RolloutError, RolloutEvent};
use fleetlog_domain::{DeviceId, RolloutId};
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::{control_subject_filter_for_type, EVENT_TYPE_HEADER, SUBJECT_PREFIX};
use fleetlog_nats::STREAM_NAME;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The durable consumer of rollout events.
pub const ROLLOUT_CONSUMER: &str = "rollout-manager";
/// The durable consumer of device events.
pub const DEVICE_CONSUMER: &str = "rollout-manager-devices";
/// The durable consumer of firmware events.
pub const FIRMWARE_CONSUMER: &str = "rollout-manager-firmware";

/// Device events the manager acts on; the others are acked unread.
const DEVICE_EVENTS: &[&str] = &[
    "FirmwareUpdateSucceeded",
    "FirmwareUpdateFailed",
    "DeviceCameOnline",
    "DeviceDecommissioned",
];

/// Rollouts that have not ended, as the read model names their status.
const LIVE_STATUSES: &str = "('created', 'running', 'paused')";

/// Devices recorded as sent by one command.
const SEND_BATCH: usize = 500;

/// Concurrent device commands when a batch is sent.
const CONCURRENT_REQUESTS: usize = 16;

const ACTOR: &str = "system:rollout-manager";
/// The longest interval the sweep adds in SQL: 10 years. Timeouts and windows are bounded far
/// below it now; rollouts stored before the bounds may hold any number, which would overflow
/// Postgres's interval (and stop the sweep for every tenant).
const LONGEST_INTERVAL_SECS: i64 = 10 * 365 * 86_400;

/// Tuning of the rollout manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutManagerSettings {
    /// How often the sweep runs (timeouts, devices to send, requests to repeat).
    pub sweep_interval: Duration,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
}

impl Default for RolloutManagerSettings {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// The rollout manager.
pub struct RolloutManager {
    bus: CommandBus,
    jetstream: Context,
    settings: RolloutManagerSettings,
}

/// Why the manager could not act on an event (or sweep) this time. It never drops what it
/// could not do: the event is left unacked and comes back, the sweep runs again, so every
/// case is a reason to retry; refusals of the domain are decided where they happen and are
/// not failures.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// NATS failed: the stream, the consumer, a pull or an ack.
    #[error("nats: {0}")]
    Nats(async_nats::Error),
    /// The pull was lost; the consumer is set up again.
    #[error(transparent)]
    PullLost(#[from] fleetlog_nats::PullLost),
    /// The read models the sweep looks at could not be read.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// An aggregate could not be read.
    #[error(transparent)]
    Store(#[from] fleetlog_commands::StoreError),
    /// A rollout command failed for another reason than a refusal handled in place.
    #[error(transparent)]
    Rollout(#[from] CommandError<RolloutError>),
    /// A device command failed likewise.
    #[error(transparent)]
    Device(#[from] CommandError<DeviceError>),
    /// An id read from an event or a read model is not valid.
    #[error("invalid id: {0}")]
    Id(#[from] fleetlog_domain::IdError),
    /// The sweep's interval does not fit a calendar duration.
    #[error("sweep interval out of range: {0}")]
    Interval(#[from] chrono::OutOfRangeError),
}

/// Every error of async-nats is a NATS failure.
macro_rules! nats_failures {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for ManagerError {
            fn from(error: $error) -> Self {
                Self::Nats(error.into())
            }
        })*
    };
}

nats_failures!(
    async_nats::Error,
    async_nats::jetstream::context::GetStreamError,
    async_nats::jetstream::consumer::StreamError,
);

/// Runs device commands [`CONCURRENT_REQUESTS`] at a time; the first failure, if any.
async fn all_of(
    commands: Vec<impl std::future::Future<Output = Result<(), ManagerError>>>,
) -> Result<(), ManagerError> {
    let results: Vec<Result<(), ManagerError>> = futures::stream::iter(commands)
        .buffer_unordered(CONCURRENT_REQUESTS)
        .collect()
        .await;
    results.into_iter().collect()
}

impl RolloutManager {
    /// A manager acting through `bus` on events from `jetstream`.
    pub fn new(bus: CommandBus, jetstream: Context, settings: RolloutManagerSettings) -> Self {
        Self {
            bus,
            jetstream,
            settings,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(
            self.follow(ROLLOUT_CONSUMER, "rollout", &shutdown),
            self.follow(DEVICE_CONSUMER, "device", &shutdown),
            self.follow(FIRMWARE_CONSUMER, "firmware", &shutdown),
            self.sweep_periodically(&shutdown),
        );
        tracing::info!("rollout manager stopped");
    }

    async fn follow(&self, consumer: &str, aggregate_type: &str, shutdown: &CancellationToken) {
        fleetlog_nats::consume_until_shutdown(consumer, shutdown, || {
            self.consume(consumer, aggregate_type, shutdown)
        })
        .await;
    }

    /// Handles the messages of one durable consumer in order. Acks are cumulative: acking the
    /// last message of what arrived together acks all of it, one ack for a burst.
    /// A failure stops before acking, so the failed message and those after it come back.
    async fn consume(
        &self,
        name: &str,
        aggregate_type: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), ManagerError> {
        let stream = self.jetstream.get_stream(STREAM_NAME).await?;
        // Control events only: the manager acts on firmware outcomes and devices coming online,
        // never on telemetry, status or heartbeats.
        let consumer = fleetlog_nats::durable_consumer(
            &stream,
            PullConfig {
                durable_name: Some(name.to_string()),
                filter_subject: control_subject_filter_for_type(aggregate_type),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::All,
                ack_wait: self.settings.ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
        let mut pull = fleetlog_nats::Pull::start(&consumer, 500).await?;
        tracing::info!(consumer = name, "rollout manager consuming");
        while let Some(batch) = pull.next(shutdown).await? {
            for message in &batch {
                let span = fleetlog_trace::span_for_message(message, || {
                    tracing::info_span!("rollout manager", otel.kind = "consumer")
                });
                self.handle(message).instrument(span).await?;
            }
            if let Some(message) = batch.last() {
                message.ack().await?;
            }
        }
        Ok(())
    }

    async fn handle(&self, message: &Message) -> Result<(), ManagerError> {
        let kind = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(EVENT_TYPE_HEADER))
            .map(|kind| kind.as_str());
        // Most device control events (commands, metadata) ask nothing of the manager: they are
        // skipped by the event-type header, before their body is read.
        let device_subject = message
            .subject
            .strip_prefix(SUBJECT_PREFIX)
            .is_some_and(|rest| rest.starts_with(".device."));
        if device_subject && kind.is_some_and(|kind| !DEVICE_EVENTS.contains(&kind)) {
            return Ok(());
        }
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(%error, "skipping a message that is not an event envelope");
                return Ok(());
            }
        };
        match envelope.aggregate_type.as_str() {
            "device" => match envelope.payload.decode::<DeviceEvent>() {
                Ok(event) => self.on_device_event(&envelope.aggregate_id, event).await,
                Err(error) => {
                    tracing::error!(%error, "skipping an unreadable device event");
                    Ok(())
                }
            },
            "rollout" => match envelope.payload.decode::<RolloutEvent>() {
                Ok(event) => self.on_rollout_event(&envelope.aggregate_id, event).await,
                Err(error) => {
                    tracing::error!(%error, "skipping an unreadable rollout event");
                    Ok(())
                }
            },
            "firmware" => match envelope.payload.decode::<FirmwareEvent>() {
                Ok(FirmwareEvent::FirmwareDeprecated { .. }) => {
                    self.on_deprecated(&envelope.aggregate_id).await
                }
                Ok(_) => Ok(()),
                Err(error) => {
                    tracing::error!(%error, "skipping an unreadable firmware event");
                    Ok(())
                }
            },
            _ => Ok(()),
        }
    }

    async fn on_rollout_event(
        &self,
        rollout_id: &str,
        event: RolloutEvent,
    ) -> Result<(), ManagerError> {
        match event {
            RolloutEvent::WaveStarted { .. } | RolloutEvent::RolloutResumed { .. } => {
                // The read model may not show the wave yet: ask the aggregate.
                let rollout = self.bus.rollouts().current(rollout_id).await?.aggregate;
                let due: Vec<String> = rollout
                    .targets
                    .iter()
                    .filter(|d| rollout.is_due(d) && !rollout.sent.contains_key(*d))
                    .filter(|d| !rollout.outcomes.contains_key(*d))
                    .map(ToString::to_string)
                    .collect();
                let online: Vec<String> = sqlx::query_scalar(
                    "SELECT device_id FROM devices WHERE device_id = ANY($1) AND online",
                )
                .bind(&due)
                .fetch_all(self.bus.pool())
                .await?;
                for chunk in online.chunks(SEND_BATCH) {
                    self.send(rollout_id, chunk).await?;
                }
                Ok(())
            }
            RolloutEvent::DevicesSent { devices, .. } => {
                self.request_updates(rollout_id, &devices).await
            }
            RolloutEvent::RolloutAborted { reason, .. } => {
                let rollout = self.bus.rollouts().current(rollout_id).await?.aggregate;
                let in_flight: Vec<DeviceId> = rollout.in_flight().cloned().collect();
                let reason = format!("rollout {rollout_id} aborted: {reason}");
                self.abandon_updates(rollout_id, &in_flight, &reason).await
            }
            _ => Ok(()),
        }
    }

    /// Tells `devices` to give up the update of `rollout_id` (a device without it changes
    /// nothing), concurrently.
    async fn abandon_updates(
        &self,
        rollout_id: &str,
        devices: &[DeviceId],
        reason: &str,
    ) -> Result<(), ManagerError> {
        let rollout_ref = RolloutId::parse(rollout_id)?;
        let reason: String = reason.chars().take(512).collect();
        let abandons: Vec<_> = devices
            .iter()
            .map(|device| {
                let command = DeviceCommand::AbandonFirmwareUpdate {
                    rollout_id: Some(rollout_ref.clone()),
                    reason: reason.clone(),
                    at: Utc::now(),
                };
                self.abandon_update(rollout_id, device.as_str(), command)
            })
            .collect();
        all_of(abandons).await
    }

    async fn abandon_update(
        &self,
        rollout_id: &str,
        device_id: &str,
        command: DeviceCommand,
    ) -> Result<(), ManagerError> {
        let metadata = CommandMetadata::new(ACTOR).with_causation_id(rollout_id);
        match self
            .bus
            .devices()
            .execute(device_id, command, &metadata)
            .await
        {
            Ok(_) | Err(CommandError::Refused(_) | CommandError::Unstorable { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// An image was deprecated: its rollouts that have not ended pause or abort, as the
    /// deprecation says. Rollouts the read model does not show running yet are caught when
    /// they try to send.
    async fn on_deprecated(&self, firmware_id: &str) -> Result<(), ManagerError> {
        let rollouts: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT rollout_id FROM rollouts WHERE firmware_id = $1 AND status IN {LIVE_STATUSES}"
        ))
        .bind(firmware_id)
        .fetch_all(self.bus.pool())
        .await?;
        let firmware = self.bus.firmware().current(firmware_id).await?.aggregate;
        for rollout_id in rollouts {
            self.stop_for_deprecation(&rollout_id, &firmware).await?;
        }
        Ok(())
    }

    /// Pauses or aborts `rollout_id` because its image `firmware` is deprecated. A rollout
    /// that cannot (paused already, ended) is left as it is.
    async fn stop_for_deprecation(
        &self,
        rollout_id: &str,
        firmware: &Firmware,
    ) -> Result<(), ManagerError> {
        let why = firmware
            .deprecation_reason
            .as_deref()
            .unwrap_or("no reason given");
        let firmware_id = firmware
            .id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let reason: String = format!("firmware {firmware_id} was deprecated: {why}")
            .chars()
            .take(512)
            .collect();
        let command = match firmware.on_deprecation {
            RolloutsOnDeprecation::Pause => RolloutCommand::Pause {
                reason,
                at: Utc::now(),
            },
            RolloutsOnDeprecation::Abort => RolloutCommand::Abort {
                reason,
                at: Utc::now(),
            },
        };
        // Paused already, or ended: left as it is.
        self.steer(rollout_id, command).await?;
        Ok(())
    }

    async fn on_device_event(
        &self,
        device_id: &str,
        event: DeviceEvent,
    ) -> Result<(), ManagerError> {
        // When the device reported the outcome: one reported before an abort counts.
        let (rollout_id, outcome, reported_at) = match event {
            DeviceEvent::FirmwareUpdateSucceeded {
                rollout_id: Some(rollout_id),
                at,
                ..
            } => (rollout_id, DeviceOutcome::Succeeded, at),
            DeviceEvent::FirmwareUpdateFailed {
                rollout_id: Some(rollout_id),
                error,
                at,
            } => (rollout_id, DeviceOutcome::Failed { error }, at),
            DeviceEvent::DeviceDecommissioned { .. } => {
                let rollouts: Vec<String> = sqlx::query_scalar(&format!(
                    "SELECT rd.rollout_id FROM rollout_devices rd
                       JOIN rollouts r ON r.rollout_id = rd.rollout_id
                      WHERE rd.device_id = $1 AND rd.status IN ('queued', 'sent')
                        AND r.status IN {LIVE_STATUSES}"
                ))
                .bind(device_id)
                .fetch_all(self.bus.pool())
                .await?;
                for rollout_id in rollouts {
                    let outcome = DeviceOutcome::Canceled {
                        reason: "device decommissioned".into(),
                    };
                    self.record(&rollout_id, device_id, outcome, Utc::now(), None)
                        .await?;
                }
                return Ok(());
            }
            DeviceEvent::DeviceCameOnline { .. } => {
                let waiting: Vec<String> = sqlx::query_scalar(
                    "SELECT rd.rollout_id FROM rollout_devices rd
                       JOIN rollouts r ON r.rollout_id = rd.rollout_id
                       JOIN devices d ON d.device_id = rd.device_id
                      WHERE rd.device_id = $1 AND rd.status = 'queued' AND r.status = 'running'
                        AND rd.wave <= r.current_wave AND d.lifecycle = 'active'
                        AND (d.firmware_update IS NULL
                             OR d.firmware_update ->> 'rollout_id' = rd.rollout_id)",
                )
                .bind(device_id)
                .fetch_all(self.bus.pool())
                .await?;
                for rollout_id in waiting {
                    self.send(&rollout_id, &[device_id.to_string()]).await?;
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        self.record(
            rollout_id.as_str(),
            device_id,
            outcome,
            Utc::now(),
            Some(reported_at),
        )
        .await
        .map(|_| ())
    }

    /// Records `devices` as sent in the rollout, then asks those it recorded. Nothing of a
    /// deprecated image is sent: the rollout pauses or aborts instead.
    async fn send(&self, rollout_id: &str, devices: &[String]) -> Result<(), ManagerError> {
        let rollout = self.bus.rollouts().current(rollout_id).await?.aggregate;
        if let Some(firmware_id) = &rollout.firmware_id {
            let firmware = self
                .bus
                .firmware()
                .current(&firmware_id.to_string())
                .await?
                .aggregate;
            if firmware.status == FirmwareStatus::Deprecated {
                return self.stop_for_deprecation(rollout_id, &firmware).await;
            }
        }
        let devices: Vec<DeviceId> = devices
            .iter()
            .filter_map(|d| DeviceId::parse(d.as_str()).ok())
            .collect();
        let command = RolloutCommand::SendToDevices {
            devices,
            at: Utc::now(),
        };
        // The `DevicesSent` event reaches `on_rollout_event`, which asks the devices; a
        // rollout paused or ended meanwhile has nothing due.
        self.steer(rollout_id, command).await?;
        Ok(())
    }

    /// Asks each device the rollout recorded as sent to update. A device that cannot take the
    /// update gets its outcome at once.
    async fn request_updates(
        &self,
        rollout_id: &str,
        devices: &[DeviceId],
    ) -> Result<(), ManagerError> {
        let rollout = self.bus.rollouts().current(rollout_id).await?.aggregate;
        let Some(firmware_id) = rollout.firmware_id.clone() else {
            return Ok(());
        };
        let firmware = self
            .bus
            .firmware()
            .current(&firmware_id.to_string())
            .await?
            .aggregate;
        if firmware.status == FirmwareStatus::Deprecated {
            // Deprecated after these devices were recorded as sent, before they were asked:
            // they are not asked, and wait in the queue of a rollout that pauses or aborts.
            let reason = format!("firmware {firmware_id} was deprecated before it was sent");
            for device in devices {
                self.return_to_queue(rollout_id, device, &reason).await?;
            }
            return self.stop_for_deprecation(rollout_id, &firmware).await;
        }
        let image = FirmwareImage {
            sha256: firmware.sha256,
            size_bytes: firmware.size_bytes,
            signature: firmware.signature,
        };
        let rollout_ref = RolloutId::parse(rollout_id)?;
        let requests: Vec<_> = devices
            .iter()
            .map(|device| {
                let command = DeviceCommand::RequestFirmwareUpdate {
                    rollout_id: Some(rollout_ref.clone()),
                    firmware_id: firmware_id.clone(),
                    image: image.clone(),
                    compatible_models: firmware.compatible_models.clone(),
                    at: Utc::now(),
                };
                self.request_update(rollout_id, device.as_str(), command)
            })
            .collect();
        all_of(requests).await
    }

    async fn request_update(
        &self,
        rollout_id: &str,
        device_id: &str,
        command: DeviceCommand,
    ) -> Result<(), ManagerError> {
        let metadata = CommandMetadata::new(ACTOR).with_causation_id(rollout_id);
        let outcome = match self
            .bus
            .devices()
            .execute(device_id, command, &metadata)
            .await
        {
            Ok(_) => return Ok(()),
            Err(CommandError::Refused(DeviceError::AlreadyRunsVersion(_))) => {
                DeviceOutcome::Succeeded
            }
            // Asked again (by the sweep) after the update ended: the outcome's event may never
            // have reached this manager, so record it from what the device remembers.
            Err(CommandError::Refused(DeviceError::RolloutUpdateEnded { ending, .. })) => {
                match ending {
                    UpdateEnding::Succeeded => DeviceOutcome::Succeeded,
                    UpdateEnding::Failed { error } => DeviceOutcome::Failed { error },
                    // Given up by the sweep, which recorded the timeout first.
                    UpdateEnding::Abandoned => return Ok(()),
                }
            }
            // The target left the rollout since it was planned: neither success nor failure.
            Err(CommandError::Refused(
                refusal @ (DeviceError::Decommissioned | DeviceError::IncompatibleModel { .. }),
            )) => DeviceOutcome::Canceled {
                reason: refusal.to_string(),
            },
            // Busy with another update (one the read model did not show yet): not a failure
            // of this image; the device waits in the queue until it is free.
            Err(CommandError::Refused(refusal @ DeviceError::UpdateInProgress(_))) => {
                let device_id = DeviceId::parse(device_id)?;
                return self
                    .return_to_queue(rollout_id, &device_id, &refusal.to_string())
                    .await;
            }
            Err(CommandError::Refused(refusal)) => DeviceOutcome::Failed {
                error: format!("the device cannot take the update: {refusal}"),
            },
            Err(error) => return Err(error.into()),
        };
        self.record(rollout_id, device_id, outcome, Utc::now(), None)
            .await
            .map(|_| ())
    }

    /// Puts a device recorded as sent but not asked back in the rollout's queue.
    async fn return_to_queue(
        &self,
        rollout_id: &str,
        device_id: &DeviceId,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let command = RolloutCommand::ReturnToQueue {
            device_id: device_id.clone(),
            reason: reason.chars().take(512).collect(),
            at: Utc::now(),
        };
        self.steer(rollout_id, command).await?;
        Ok(())
    }

    /// Runs `command` on the rollout: `true` if it was taken, `false` if the rollout refused it
    /// (it moved on meanwhile: paused, ended, the device done already), which is never worth
    /// retrying. Other failures are returned.
    async fn steer(
        &self,
        rollout_id: &str,
        command: RolloutCommand,
    ) -> Result<bool, CommandError<RolloutError>> {
        match self
            .bus
            .rollouts()
            .execute(rollout_id, command, &CommandMetadata::new(ACTOR))
            .await
        {
            Ok(_) => Ok(true),
            Err(CommandError::Refused(refusal)) => {
                tracing::debug!(rollout_id, %refusal, "rollout command refused");
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Records `outcome` at `at`; `reported_at` is when the device reported it, if it did.
    async fn record(
        &self,
        rollout_id: &str,
        device_id: &str,
        outcome: DeviceOutcome,
        at: DateTime<Utc>,
        reported_at: Option<DateTime<Utc>>,
    ) -> Result<bool, ManagerError> {
        let command = RolloutCommand::RecordDeviceOutcome {
            device_id: DeviceId::parse(device_id)?,
            outcome,
            reported_at,
            at,
        };
        // Refused: not this rollout's device, not sent, canceled, or not timed out yet (a
        // lagging read model), so nothing to record.
        match self.steer(rollout_id, command).await {
            Ok(recorded) => Ok(recorded),
            // Final too: trying again would hold up the rollout's other devices.
            Err(error @ CommandError::Unstorable { .. }) => {
                tracing::warn!(rollout_id, device_id, %error, "outcome not recorded");
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn sweep_periodically(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.settings.sweep_interval) => {}
            }
            if let Err(error) = self.sweep(Utc::now()).await {
                tracing::warn!(%error, "rollout sweep failed; the next one retries");
            }
        }
    }

    /// One sweep as of `now`: sends to online devices still queued in started waves, asks
    /// again sent devices that show no pending update of the rollout, and records timeouts.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<(), ManagerError> {
        let pool = self.bus.pool();
        let online_queued: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT rd.rollout_id, array_agg(rd.device_id ORDER BY rd.device_id)
               FROM rollout_devices rd
               JOIN rollouts r ON r.rollout_id = rd.rollout_id
               JOIN devices d ON d.device_id = rd.device_id
              WHERE r.status = 'running' AND rd.status = 'queued' AND rd.wave <= r.current_wave
                AND d.online AND d.lifecycle = 'active'
                AND (d.firmware_update IS NULL
                     OR d.firmware_update ->> 'rollout_id' = rd.rollout_id)
              GROUP BY rd.rollout_id",
        )
        .fetch_all(pool)
        .await?;
        for (rollout_id, devices) in online_queued {
            for chunk in devices.chunks(SEND_BATCH) {
                self.send(&rollout_id, chunk).await?;
            }
        }
        // Sent, but the device shows no update of this rollout and no outcome was recorded:
        // the manager stopped between recording and asking, or the outcome's event was acked
        // unhandled. Asking again is harmless (a device takes a rollout's request once) and
        // brings a missed outcome back; a grace period leaves the usual path its time.
        let unasked: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT rd.rollout_id, array_agg(rd.device_id ORDER BY rd.device_id)
               FROM rollout_devices rd
               JOIN rollouts r ON r.rollout_id = rd.rollout_id
               JOIN devices d ON d.device_id = rd.device_id
              WHERE rd.status = 'sent' AND rd.sent_at < $1 AND r.status IN ('running', 'paused')
                AND (d.firmware_update ->> 'rollout_id') IS DISTINCT FROM rd.rollout_id
              GROUP BY rd.rollout_id",
        )
        .bind(now - chrono::Duration::from_std(self.settings.sweep_interval * 2)?)
        .fetch_all(pool)
        .await?;
        for (rollout_id, devices) in unasked {
            let devices: Vec<DeviceId> = devices
                .iter()
                .filter_map(|d| DeviceId::parse(d.as_str()).ok())
                .collect();
            self.request_updates(&rollout_id, &devices).await?;
        }
        // Sent devices past the per-device timeout.
        let stuck: Vec<(String, String)> = sqlx::query_as(
            "SELECT rd.rollout_id, rd.device_id FROM rollout_devices rd
               JOIN rollouts r ON r.rollout_id = rd.rollout_id
              WHERE rd.status = 'sent' AND r.status IN ('running', 'paused')
                AND rd.sent_at + make_interval(secs => LEAST(r.device_timeout_secs, $2)) <= $1
              LIMIT 1000",
        )
        .bind(now)
        .bind(LONGEST_INTERVAL_SECS)
        .fetch_all(pool)
        .await?;
        for (rollout_id, device_id) in stuck {
            let rollout = self.bus.rollouts().current(&rollout_id).await?.aggregate;
            // The rollout decides whether the time is really up (a rollout from before the
            // bounds may never time out): the device's update is given up only if it was.
            if !self
                .record(&rollout_id, &device_id, DeviceOutcome::TimedOut, now, None)
                .await?
            {
                continue;
            }
            let command = DeviceCommand::AbandonFirmwareUpdate {
                rollout_id: Some(RolloutId::parse(rollout_id.as_str())?),
                reason: format!(
                    "no new version reported within {} s",
                    rollout.device_timeout_secs
                ),
                at: now,
            };
            match self
                .bus
                .devices()
                .execute(&device_id, command, &CommandMetadata::new(ACTOR))
                .await
            {
                Ok(_) | Err(CommandError::Refused(_) | CommandError::Unstorable { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        // Devices offline for the whole window of their wave.
        let unreachable: Vec<(String, String)> = sqlx::query_as(
            "SELECT rd.rollout_id, rd.device_id FROM rollout_devices rd
               JOIN rollouts r ON r.rollout_id = rd.rollout_id
               JOIN devices d ON d.device_id = rd.device_id
              WHERE rd.status = 'queued' AND r.status = 'running' AND rd.wave <= r.current_wave
                AND r.wave_started_at[rd.wave + 1] + make_interval(secs => LEAST(r.window_secs, $2)) <= $1
                AND (d.firmware_update IS NULL
                     OR d.firmware_update ->> 'rollout_id' = rd.rollout_id)
              LIMIT 1000",
        )
        .bind(now)
        .bind(LONGEST_INTERVAL_SECS)
        .fetch_all(pool)
        .await?;
        for (rollout_id, device_id) in unreachable {
            self.record(&rollout_id, &device_id, DeviceOutcome::TimedOut, now, None)
                .await?;
        }
        // Targets decommissioned whose cancelation this manager missed.
        let decommissioned: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT rd.rollout_id, rd.device_id FROM rollout_devices rd
               JOIN rollouts r ON r.rollout_id = rd.rollout_id
               JOIN devices d ON d.device_id = rd.device_id
              WHERE rd.status IN ('queued', 'sent') AND r.status IN {LIVE_STATUSES}
                AND d.lifecycle = 'decommissioned'
              LIMIT 1000"
        ))
        .fetch_all(pool)
        .await?;
        for (rollout_id, device_id) in decommissioned {
            let outcome = DeviceOutcome::Canceled {
                reason: "device decommissioned".into(),
            };
            self.record(&rollout_id, &device_id, outcome, now, None)
                .await?;
        }
        // Devices of aborted rollouts that still show the rollout's update: the manager
        // stopped before telling them, or the rollout was aborted before aborts did.
        let not_told: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT r.rollout_id, array_agg(d.device_id ORDER BY d.device_id)
               FROM devices d
               JOIN rollouts r ON r.rollout_id = d.firmware_update ->> 'rollout_id'
              WHERE d.firmware_update IS NOT NULL AND r.status = 'aborted'
              GROUP BY r.rollout_id",
        )
        .fetch_all(pool)
        .await?;
        for (rollout_id, devices) in not_told {
            let devices: Vec<DeviceId> = devices
                .iter()
                .filter_map(|d| DeviceId::parse(d.as_str()).ok())
                .collect();
            let reason = format!("rollout {rollout_id} aborted");
            self.abandon_updates(&rollout_id, &devices, &reason).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fleetlog_domain::Plane;

    use super::DEVICE_EVENTS;

    #[test]
    fn every_device_event_the_manager_acts_on_travels_on_the_control_plane() {
        // The manager's consumers filter on the control plane: an outcome that moved to the
        // data plane would never reach it, and its rollout would wait forever.
        for event_type in DEVICE_EVENTS {
            assert_eq!(
                Plane::of("device", event_type),
                Plane::Control,
                "{event_type}"
            );
        }
    }
}
