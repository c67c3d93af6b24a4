//! What happened to a device, and how each fact changes its state.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    merge_properties, remember, Connectivity, Device, EndedRolloutUpdate, FirmwareImage, Lifecycle,
    Location, OpenCommand, PendingFirmwareUpdate, Reading, UpdateEnding,
    REMEMBERED_CLOSED_COMMANDS, REMEMBERED_DIGESTS, REMEMBERED_ROLLOUTS,
};
use crate::firmware::FirmwareId;
use crate::ids::{CommandId, DeviceId, RolloutId, TenantId, UserId};

/// How a command to a device ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// The device carried it out.
    Succeeded,
    /// The device tried and failed, or refused.
    Failed,
}

/// A fact about a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceEvent {
    /// The device joined the registry.
    DeviceRegistered {
        /// The device's id.
        device_id: DeviceId,
        /// Its tenant.
        tenant: TenantId,
        /// Its owner.
        owner: UserId,
        /// Its name.
        name: String,
        /// Its hardware model.
        model: String,
        /// Its tags, sorted and unique.
        tags: Vec<String>,
        /// When it was registered.
        at: DateTime<Utc>,
    },
    /// Registry fields changed; fields left out did not change.
    DeviceMetadataUpdated {
        /// The new name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The new model.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// The new tags.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<Vec<String>>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device was retired.
    DeviceDecommissioned {
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device sent telemetry.
    TelemetryRecorded {
        /// Digest of the message, to recognise a redelivery.
        digest: String,
        /// Sensor readings.
        readings: Vec<Reading>,
        /// The message's own timestamp, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_time: Option<DateTime<Utc>>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// Position, if sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        location: Option<Location>,
        /// Status fields sent with the telemetry; merged into the reported properties.
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        status: Map<String, Value>,
    },
    /// The device reported status fields; merged into the reported properties.
    StatusReported {
        /// The fields reported (`null` removes one).
        status: Map<String, Value>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// Digest of the message, when the transport gave one (for recognising redeliveries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The device said it is alive.
    HeartbeatReceived {
        /// The device's own timestamp, if sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_time: Option<DateTime<Utc>>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// Digest of the message, when the transport gave one (for recognising redeliveries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The device was heard from after being offline or never seen.
    DeviceCameOnline {
        /// When.
        at: DateTime<Utc>,
    },
    /// The device was marked offline.
    DeviceWentOffline {
        /// Why, e.g. `no heartbeat for 300s`.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Desired properties changed.
    DesiredPropertiesSet {
        /// The change (`null` removes a property).
        properties: Map<String, Value>,
        /// The desired version after the change.
        version: u64,
        /// When.
        at: DateTime<Utc>,
    },
    /// A command was issued to the device.
    CommandIssued {
        /// Its id.
        command_id: CommandId,
        /// Its name.
        name: String,
        /// Its parameters (a JSON object).
        params: Value,
        /// When it was issued.
        issued_at: DateTime<Utc>,
        /// When it expires.
        expires_at: DateTime<Utc>,
    },
    /// The device answered a command.
    CommandReplied {
        /// The command.
        command_id: CommandId,
        /// How it ended.
        outcome: CommandOutcome,
        /// What the device returned.
        result: Value,
        /// When the platform received the reply.
        received_at: DateTime<Utc>,
    },
    /// A command passed its deadline without a reply.
    CommandExpired {
        /// The command.
        command_id: CommandId,
        /// When the expiry was recorded.
        at: DateTime<Utc>,
    },
    /// An open command was closed without a reply because the device was decommissioned.
    CommandCanceled {
        /// The command.
        command_id: CommandId,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device was asked to install firmware.
    FirmwareUpdateRequested {
        /// The rollout behind the request, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout_id: Option<RolloutId>,
        /// The image.
        firmware_id: FirmwareId,
        /// The version to install.
        version: String,
        /// Digest, size and signature of the image (absent in events recorded before images
        /// were stored by the platform).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<FirmwareImage>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device reported progress on a firmware update.
    FirmwareUpdateProgressed {
        /// The rollout behind the update, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout_id: Option<RolloutId>,
        /// The device's state, e.g. `downloading`.
        state: String,
        /// Percent done.
        progress: u8,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device runs the new firmware.
    FirmwareUpdateSucceeded {
        /// The rollout behind the update, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout_id: Option<RolloutId>,
        /// The version now running.
        version: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The firmware update failed; the device runs what it ran before.
    FirmwareUpdateFailed {
        /// The rollout behind the update, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout_id: Option<RolloutId>,
        /// What went wrong.
        error: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The firmware update was given up without an answer from the device (it timed out).
    FirmwareUpdateAbandoned {
        /// The rollout behind the update, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout_id: Option<RolloutId>,
        /// The image given up (recorded since the device is told).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        firmware_id: Option<FirmwareId>,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device reported running a firmware version other than the known one, outside an
    /// update.
    FirmwareVersionReported {
        /// The version it runs.
        version: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device got a new secret; only its hash is kept.
    DeviceCredentialsRotated {
        /// SHA-256 hex of the new secret.
        #[serde(default)]
        secret_hash: String,
        /// The credential version after the rotation.
        credential_version: u32,
        /// The public salt the secret derives from with the platform's credential key; absent
        /// for secrets issued before the broker kept device credentials (HTTP only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        salt: Option<String>,
        /// Why (absent in events recorded before reasons were kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The device's secret was taken away; it can no longer connect or post.
    DeviceCredentialsRevoked {
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for DeviceEvent {
    fn event_type(&self) -> String {
        match self {
            Self::DeviceRegistered { .. } => "DeviceRegistered",
            Self::DeviceMetadataUpdated { .. } => "DeviceMetadataUpdated",
            Self::DeviceDecommissioned { .. } => "DeviceDecommissioned",
            Self::TelemetryRecorded { .. } => "TelemetryRecorded",
            Self::StatusReported { .. } => "StatusReported",
            Self::HeartbeatReceived { .. } => "HeartbeatReceived",
            Self::DeviceCameOnline { .. } => "DeviceCameOnline",
            Self::DeviceWentOffline { .. } => "DeviceWentOffline",
            Self::DesiredPropertiesSet { .. } => "DesiredPropertiesSet",
            Self::CommandIssued { .. } => "CommandIssued",
            Self::CommandReplied { .. } => "CommandReplied",
            Self::CommandExpired { .. } => "CommandExpired",
            Self::CommandCanceled { .. } => "CommandCanceled",
            Self::FirmwareUpdateRequested { .. } => "FirmwareUpdateRequested",
            Self::FirmwareUpdateAbandoned { .. } => "FirmwareUpdateAbandoned",
            Self::FirmwareVersionReported { .. } => "FirmwareVersionReported",
            Self::FirmwareUpdateProgressed { .. } => "FirmwareUpdateProgressed",
            Self::FirmwareUpdateSucceeded { .. } => "FirmwareUpdateSucceeded",
            Self::FirmwareUpdateFailed { .. } => "FirmwareUpdateFailed",
            Self::DeviceCredentialsRotated { .. } => "DeviceCredentialsRotated",
            Self::DeviceCredentialsRevoked { .. } => "DeviceCredentialsRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

impl DeviceEvent {
    /// The event types devices report at their own rate ([`crate::Plane::Data`]); every other
    /// device event is [`crate::Plane::Control`].
    pub const DATA_PLANE: &'static [&'static str] =
        &["TelemetryRecorded", "StatusReported", "HeartbeatReceived"];
}

/// Folds one event into the state.
pub(super) fn apply(device: &mut Device, event: DeviceEvent) {
    match event {
        DeviceEvent::DeviceRegistered {
            device_id,
            tenant,
            owner,
            name,
            model,
            tags,
            ..
        } => {
            device.id = Some(device_id);
            device.tenant = Some(tenant);
            device.owner = Some(owner);
            device.name = name;
            device.model = model;
            device.tags = tags;
            device.lifecycle = Lifecycle::Active;
        }
        DeviceEvent::DeviceMetadataUpdated {
            name, model, tags, ..
        } => {
            if let Some(name) = name {
                device.name = name;
            }
            if let Some(model) = model {
                device.model = model;
            }
            if let Some(tags) = tags {
                device.tags = tags;
            }
        }
        DeviceEvent::DeviceDecommissioned { .. } => device.lifecycle = Lifecycle::Decommissioned,
        DeviceEvent::TelemetryRecorded {
            digest,
            received_at,
            status,
            ..
        } => {
            remember(&mut device.recent_digests, digest, REMEMBERED_DIGESTS);
            merge_properties(&mut device.reported, &status);
            device.last_seen = Some(received_at);
        }
        DeviceEvent::StatusReported {
            status,
            received_at,
            digest,
        } => {
            if let Some(digest) = digest {
                remember(&mut device.recent_digests, digest, REMEMBERED_DIGESTS);
            }
            merge_properties(&mut device.reported, &status);
            device.last_seen = Some(received_at);
        }
        DeviceEvent::HeartbeatReceived {
            received_at,
            digest,
            ..
        } => {
            if let Some(digest) = digest {
                remember(&mut device.recent_digests, digest, REMEMBERED_DIGESTS);
            }
            device.last_seen = Some(received_at);
        }
        DeviceEvent::DeviceCameOnline { .. } => device.connectivity = Connectivity::Online,
        DeviceEvent::DeviceWentOffline { .. } => device.connectivity = Connectivity::Offline,
        DeviceEvent::DesiredPropertiesSet {
            properties,
            version,
            ..
        } => {
            merge_properties(&mut device.desired, &properties);
            device.desired_version = version;
        }
        DeviceEvent::CommandIssued {
            command_id,
            name,
            expires_at,
            ..
        } => {
            device
                .open_commands
                .insert(command_id, OpenCommand { name, expires_at });
        }
        DeviceEvent::CommandReplied { command_id, .. }
        | DeviceEvent::CommandExpired { command_id, .. }
        | DeviceEvent::CommandCanceled { command_id, .. } => {
            device.open_commands.remove(&command_id);
            remember(
                &mut device.closed_commands,
                command_id,
                REMEMBERED_CLOSED_COMMANDS,
            );
        }
        DeviceEvent::FirmwareUpdateRequested {
            rollout_id,
            firmware_id,
            version,
            ..
        } => {
            if let Some(rollout) = &rollout_id {
                remember(
                    &mut device.recent_rollouts,
                    rollout.clone(),
                    REMEMBERED_ROLLOUTS,
                );
            }
            device.firmware_update = Some(PendingFirmwareUpdate {
                rollout_id,
                firmware_id,
                version,
                state: "requested".to_string(),
                progress: 0,
                stage: Some("requested".to_string()),
            });
        }
        DeviceEvent::FirmwareUpdateProgressed {
            state, progress, ..
        } => {
            if let Some(update) = device.firmware_update.as_mut() {
                let furthest = update.stage.as_deref().and_then(super::progress_rank);
                if super::progress_rank(&state)
                    .is_some_and(|rank| furthest.is_none_or(|f| rank >= f))
                {
                    update.stage = Some(state.clone());
                }
                update.state = state;
                update.progress = progress;
            }
        }
        DeviceEvent::FirmwareUpdateSucceeded {
            rollout_id,
            version,
            ..
        } => {
            device.firmware_version = Some(version);
            device.firmware_update = None;
            update_ended(device, rollout_id, UpdateEnding::Succeeded);
        }
        DeviceEvent::FirmwareUpdateFailed {
            rollout_id, error, ..
        } => {
            device.firmware_update = None;
            update_ended(device, rollout_id, UpdateEnding::Failed { error });
        }
        DeviceEvent::FirmwareUpdateAbandoned { rollout_id, .. } => {
            device.firmware_update = None;
            update_ended(device, rollout_id, UpdateEnding::Abandoned);
        }
        DeviceEvent::FirmwareVersionReported { version, .. } => {
            device.firmware_version = Some(version);
        }
        DeviceEvent::DeviceCredentialsRotated {
            secret_hash,
            credential_version,
            salt,
            ..
        } => {
            device.credential_hash = Some(secret_hash);
            device.credential_version = credential_version;
            device.credential_salt = salt;
        }
        DeviceEvent::DeviceCredentialsRevoked { .. } => {
            device.credential_hash = None;
            device.credential_salt = None;
        }
    }
}

/// Remembers how a rollout's update ended (updates outside a rollout are not asked again).
fn update_ended(device: &mut Device, rollout_id: Option<RolloutId>, ending: UpdateEnding) {
    if let Some(rollout_id) = rollout_id {
        remember(
            &mut device.ended_rollout_updates,
            EndedRolloutUpdate { rollout_id, ending },
            REMEMBERED_ROLLOUTS,
        );
    }
}
