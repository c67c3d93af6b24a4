//! What can be asked of a device, and the decision for each request.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::telemetry::{validate_location, validate_readings, TelemetryError};
use super::{
    check_document, merged_within_caps, validate_model, validate_name, validate_properties,
    validate_tags, validate_text, CommandOutcome, Connectivity, Device, DeviceError, DeviceEvent,
    FirmwareImage, Lifecycle, Location, Reading,
};
use crate::firmware::FirmwareId;
use crate::ids::{CommandId, DeviceId, RolloutId, TenantId, UserId};

/// How a device message can be recognised if the transport delivers it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Digest identifying the message; recorded with its event.
    pub digest: String,
    /// The transport says the message may have been delivered before: a digest among the recent
    /// ones means it was, and it changes nothing.
    pub redelivery: bool,
}

impl Delivery {
    fn is_repeat(&self, device: &Device) -> bool {
        self.redelivery && device.recent_digests.contains(&self.digest)
    }
}

/// A request to the Device aggregate. Times are passed in: the domain reads no clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceCommand {
    /// Add a device to the registry.
    Register {
        /// The id chosen for it.
        device_id: DeviceId,
        /// Its tenant.
        tenant: TenantId,
        /// Its owner.
        owner: UserId,
        /// Human-readable name.
        name: String,
        /// Hardware model.
        model: String,
        /// Labels.
        tags: Vec<String>,
        /// Now.
        at: DateTime<Utc>,
        /// Its first credentials, issued with the registration in the same write, so a device
        /// is never registered without the secret it was shown.
        credentials: Option<NewCredentials>,
    },
    /// Change registry fields; `None` leaves a field as it is.
    UpdateMetadata {
        /// New name.
        name: Option<String>,
        /// New model.
        model: Option<String>,
        /// New tags (replacing the old ones).
        tags: Option<Vec<String>>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Retire the device for good.
    Decommission {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Record a telemetry message.
    RecordTelemetry {
        /// Digest identifying the message; recorded so a redelivery can be recognised.
        digest: String,
        /// The message may have been delivered before (an MQTT redelivery, a client retry with
        /// an idempotency key, a payload carrying its own timestamp): if its digest is among
        /// the recent ones it is a duplicate and changes nothing. A first delivery is recorded
        /// unchecked, so a device that sends the same reading twice keeps both.
        redelivery: bool,
        /// Sensor readings.
        readings: Vec<Reading>,
        /// The message's own timestamp.
        device_time: Option<DateTime<Utc>>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// Position.
        location: Option<Location>,
        /// Status fields sent with the telemetry.
        status: Map<String, Value>,
    },
    /// Record a status report.
    ReportStatus {
        /// Fields to merge into the reported properties (`null` removes one).
        status: Map<String, Value>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// How the message can be recognised if it arrives again, when the transport says.
        delivery: Option<Delivery>,
    },
    /// Record a heartbeat.
    Heartbeat {
        /// The device's own timestamp.
        device_time: Option<DateTime<Utc>>,
        /// The firmware version the device says it runs.
        firmware_version: Option<String>,
        /// When the platform received it.
        received_at: DateTime<Utc>,
        /// How the message can be recognised if it arrives again, when the transport says.
        delivery: Option<Delivery>,
    },
    /// Mark the device offline.
    MarkOffline {
        /// Why.
        reason: String,
        /// The last contact the caller knows of. If the device was heard from after it, the
        /// caller's view is stale and the command is refused: a silence detector acting on a
        /// lagging read model never marks a live device offline.
        silent_since: Option<DateTime<Utc>>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Change desired properties (a one-level merge patch: `null` removes a property).
    SetDesired {
        /// The change.
        properties: Map<String, Value>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Send a command to the device.
    IssueCommand {
        /// Its id, unique per device.
        command_id: CommandId,
        /// Its name, `[a-z_][a-z0-9_]{0,49}`.
        name: String,
        /// Its parameters, a JSON object.
        params: Value,
        /// Now.
        issued_at: DateTime<Utc>,
        /// When it stops being valid.
        expires_at: DateTime<Utc>,
    },
    /// Record the device's reply to a command.
    RecordCommandReply {
        /// The command.
        command_id: CommandId,
        /// How it ended.
        outcome: CommandOutcome,
        /// What the device returned.
        result: Value,
        /// When the reply arrived.
        received_at: DateTime<Utc>,
    },
    /// Record that a command passed its deadline.
    ExpireCommand {
        /// The command.
        command_id: CommandId,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Ask the device to install firmware. A rollout asks a device once: a repeated request of
    /// the same rollout changes nothing, even after the update ended.
    RequestFirmwareUpdate {
        /// The rollout behind the request, if any.
        rollout_id: Option<RolloutId>,
        /// The image.
        firmware_id: FirmwareId,
        /// Digest, size and signature of the image.
        image: FirmwareImage,
        /// The models the image supports: a device whose model changed since the rollout was
        /// planned is refused. Empty: not checked.
        compatible_models: Vec<String>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Record the device's progress on a firmware update. A known state (see
    /// [`super::progress_rank`]) never moves back: a late report of an earlier one is refused.
    RecordFirmwareProgress {
        /// The rollout the device names.
        rollout_id: Option<RolloutId>,
        /// The device's state, e.g. `downloading`.
        state: String,
        /// Percent done, 0 to 100.
        progress: u8,
        /// When it arrived.
        at: DateTime<Utc>,
    },
    /// Record that the device runs the new firmware.
    RecordFirmwareSucceeded {
        /// The rollout the device names.
        rollout_id: Option<RolloutId>,
        /// The version it reports running.
        version: String,
        /// When it arrived.
        at: DateTime<Utc>,
    },
    /// Record that the firmware update failed.
    RecordFirmwareFailed {
        /// The rollout the device names.
        rollout_id: Option<RolloutId>,
        /// What went wrong.
        error: String,
        /// When it arrived.
        at: DateTime<Utc>,
    },
    /// Give up an update the device did not finish in time. Nothing happens when no update of
    /// that rollout is under way.
    AbandonFirmwareUpdate {
        /// The rollout behind the update.
        rollout_id: Option<RolloutId>,
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Replace the device's secret; the caller hashes it.
    RotateCredentials {
        /// SHA-256 hex of the new secret.
        secret_hash: String,
        /// The public salt the secret was derived from with the platform's credential key
        /// (32 hex digits), so the broker sync can set the same secret at the broker; `None`
        /// for a secret that was not derived (then the device can use HTTP only).
        salt: Option<String>,
        /// Why: `registered`, `rotated by an operator`, `provisioned with key …`.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Take the device's secret away: it can no longer connect or post until a rotation.
    RevokeCredentials {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
}

/// A device's new secret, as the caller hashed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCredentials {
    /// SHA-256 hex of the secret.
    pub secret_hash: String,
    /// The public salt it derives from (32 hex digits), if it was derived.
    pub salt: Option<String>,
    /// Why.
    pub reason: String,
}

fn credentials_rotated(
    device: &Device,
    credentials: NewCredentials,
    at: DateTime<Utc>,
) -> Result<DeviceEvent, DeviceError> {
    let NewCredentials {
        secret_hash,
        salt,
        reason,
    } = credentials;
    let is_hex = |value: &str, digits: usize| {
        value.len() == digits && value.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !is_hex(&secret_hash, 64) {
        return Err(DeviceError::InvalidCredentialHash);
    }
    if salt.as_deref().is_some_and(|salt| !is_hex(salt, 32)) {
        return Err(DeviceError::InvalidCredentialSalt);
    }
    validate_text("reason", &reason)?;
    let credential_version = device
        .credential_version
        .checked_add(1)
        .ok_or(DeviceError::TooManyRotations)?;
    Ok(DeviceEvent::DeviceCredentialsRotated {
        secret_hash: secret_hash.to_ascii_lowercase(),
        credential_version,
        salt: salt.map(|salt| salt.to_ascii_lowercase()),
        reason: Some(reason),
        at,
    })
}

pub(super) fn decide(
    device: &Device,
    command: DeviceCommand,
) -> Result<Vec<DeviceEvent>, DeviceError> {
    if let DeviceCommand::Register {
        device_id,
        tenant,
        owner,
        name,
        model,
        tags,
        at,
        credentials,
    } = command
    {
        if device.lifecycle != Lifecycle::Unregistered {
            return Err(DeviceError::AlreadyRegistered);
        }
        let mut events = vec![DeviceEvent::DeviceRegistered {
            device_id,
            tenant,
            owner,
            name: validate_name(&name)?,
            model: validate_model(&model)?,
            tags: validate_tags(tags)?,
            at,
        }];
        if let Some(credentials) = credentials {
            events.push(credentials_rotated(device, credentials, at)?);
        }
        return Ok(events);
    }
    device.ensure_active()?;
    match command {
        DeviceCommand::Register { .. } => unreachable!("handled above"),
        DeviceCommand::UpdateMetadata {
            name,
            model,
            tags,
            at,
        } => {
            if name.is_none() && model.is_none() && tags.is_none() {
                return Err(DeviceError::NothingToUpdate);
            }
            let name = name.map(|n| validate_name(&n)).transpose()?;
            let model = model.map(|m| validate_model(&m)).transpose()?;
            let tags = tags.map(validate_tags).transpose()?;
            // Only what really changes becomes part of the fact; an update that changes
            // nothing is accepted and records nothing.
            let name = name.filter(|n| *n != device.name);
            let model = model.filter(|m| *m != device.model);
            let tags = tags.filter(|t| *t != device.tags);
            if name.is_none() && model.is_none() && tags.is_none() {
                return Ok(vec![]);
            }
            Ok(vec![DeviceEvent::DeviceMetadataUpdated {
                name,
                model,
                tags,
                at,
            }])
        }
        DeviceCommand::Decommission { reason, at } => {
            validate_text("reason", &reason)?;
            // Its open commands can never be answered or expired any more: they close now,
            // with the reason, instead of staying pending for good.
            let mut events: Vec<DeviceEvent> = device
                .open_commands
                .keys()
                .map(|command_id| DeviceEvent::CommandCanceled {
                    command_id: command_id.clone(),
                    reason: format!("device decommissioned: {reason}"),
                    at,
                })
                .collect();
            // So does an update under way: the device is told to give it up, and its rollout
            // cancels it rather than waiting for it to time out.
            if let Some(pending) = &device.firmware_update {
                events.push(DeviceEvent::FirmwareUpdateAbandoned {
                    rollout_id: pending.rollout_id.clone(),
                    firmware_id: Some(pending.firmware_id.clone()),
                    reason: format!("device decommissioned: {reason}"),
                    at,
                });
            }
            events.push(DeviceEvent::DeviceDecommissioned { reason, at });
            Ok(events)
        }
        DeviceCommand::RecordTelemetry {
            digest,
            redelivery,
            readings,
            device_time,
            received_at,
            location,
            status,
        } => {
            if digest.is_empty() || digest.len() > 128 {
                return Err(TelemetryError::InvalidDigest.into());
            }
            if redelivery && device.recent_digests.contains(&digest) {
                return Ok(vec![]);
            }
            if readings.is_empty() && location.is_none() && status.is_empty() {
                return Err(TelemetryError::Empty.into());
            }
            validate_readings(&readings)?;
            if let Some(location) = &location {
                validate_location(location)?;
            }
            if !status.is_empty() {
                validate_properties(&status)?;
                merged_within_caps("the reported properties", &device.reported, &status)?;
            }
            let mut events: Vec<DeviceEvent> =
                device.came_online(received_at).into_iter().collect();
            events.push(DeviceEvent::TelemetryRecorded {
                digest,
                readings,
                device_time,
                received_at,
                location,
                status,
            });
            Ok(events)
        }
        DeviceCommand::ReportStatus {
            status,
            received_at,
            delivery,
        } => {
            if delivery.as_ref().is_some_and(|d| d.is_repeat(device)) {
                return Ok(vec![]);
            }
            validate_properties(&status)?;
            merged_within_caps("the reported properties", &device.reported, &status)?;
            let version = match status.get(super::FIRMWARE_VERSION_FIELD) {
                Some(Value::String(version)) => Some(version.clone()),
                _ => None,
            };
            let mut events: Vec<DeviceEvent> =
                device.came_online(received_at).into_iter().collect();
            events.push(DeviceEvent::StatusReported {
                status,
                received_at,
                digest: delivery.map(|d| d.digest),
            });
            events.extend(version.and_then(|v| device.version_reported(&v, received_at)));
            Ok(events)
        }
        DeviceCommand::Heartbeat {
            device_time,
            firmware_version,
            received_at,
            delivery,
        } => {
            if delivery.as_ref().is_some_and(|d| d.is_repeat(device)) {
                return Ok(vec![]);
            }
            if let Some(version) = &firmware_version {
                validate_text("firmware_version", version)?;
            }
            let mut events: Vec<DeviceEvent> =
                device.came_online(received_at).into_iter().collect();
            events.push(DeviceEvent::HeartbeatReceived {
                device_time,
                received_at,
                digest: delivery.map(|d| d.digest),
            });
            events.extend(firmware_version.and_then(|v| device.version_reported(&v, received_at)));
            Ok(events)
        }
        DeviceCommand::MarkOffline {
            reason,
            silent_since,
            at,
        } => {
            validate_text("reason", &reason)?;
            if device.connectivity == Connectivity::Offline {
                return Err(DeviceError::AlreadyOffline);
            }
            if let (Some(silent_since), Some(last_seen)) = (silent_since, device.last_seen) {
                // `silent_since` comes from the read model, which keeps microseconds (as
                // Postgres does); the event keeps what the clock gave, nanoseconds. Compared at
                // the read model's precision, the same contact is never "since" itself.
                if crate::limits::to_microseconds(last_seen) > silent_since {
                    return Err(DeviceError::HeardFromSince(last_seen));
                }
            }
            Ok(vec![DeviceEvent::DeviceWentOffline { reason, at }])
        }
        DeviceCommand::SetDesired { properties, at } => {
            validate_properties(&properties)?;
            let changes = properties
                .iter()
                .any(|(key, value)| device.desired.get(key).unwrap_or(&Value::Null) != value);
            if !changes {
                return Ok(vec![]);
            }
            merged_within_caps("the desired properties", &device.desired, &properties)?;
            Ok(vec![DeviceEvent::DesiredPropertiesSet {
                properties,
                version: device.desired_version + 1,
                at,
            }])
        }
        DeviceCommand::IssueCommand {
            command_id,
            name,
            params,
            issued_at,
            expires_at,
        } => {
            if device.open_commands.contains_key(&command_id)
                || device.closed_commands.contains(&command_id)
            {
                return Err(DeviceError::DuplicateCommand(command_id));
            }
            if super::telemetry::validate_sensor_name(&name).is_err() {
                return Err(DeviceError::InvalidCommandName(name));
            }
            let Some(fields) = params.as_object() else {
                return Err(DeviceError::InvalidCommandParams);
            };
            check_document("the command parameters", fields)?;
            if expires_at <= issued_at {
                return Err(DeviceError::ExpiryNotAfterIssue);
            }
            Ok(vec![DeviceEvent::CommandIssued {
                command_id,
                name,
                params,
                issued_at,
                expires_at,
            }])
        }
        DeviceCommand::RecordCommandReply {
            command_id,
            outcome,
            result,
            received_at,
        } => {
            if device.closed_commands.contains(&command_id) {
                // A redelivered or late reply: the command is settled already.
                return Ok(vec![]);
            }
            if !device.open_commands.contains_key(&command_id) {
                return Err(DeviceError::UnknownCommand(command_id));
            }
            Ok(vec![DeviceEvent::CommandReplied {
                command_id,
                outcome,
                result,
                received_at,
            }])
        }
        DeviceCommand::ExpireCommand { command_id, at } => {
            if device.closed_commands.contains(&command_id) {
                return Ok(vec![]);
            }
            let Some(open) = device.open_commands.get(&command_id) else {
                return Err(DeviceError::UnknownCommand(command_id));
            };
            if at < open.expires_at {
                return Err(DeviceError::CommandNotExpired(command_id));
            }
            Ok(vec![DeviceEvent::CommandExpired { command_id, at }])
        }
        DeviceCommand::RequestFirmwareUpdate {
            rollout_id,
            firmware_id,
            image,
            compatible_models,
            at,
        } => {
            if let Some(rollout) = rollout_id
                .as_ref()
                .filter(|r| device.recent_rollouts.contains(r))
            {
                // A rollout sends its update once; asking again after the update ended tells
                // the rollout how it ended, in case it missed that.
                let ended = device
                    .ended_rollout_updates
                    .iter()
                    .rfind(|ended| &ended.rollout_id == rollout);
                return match ended {
                    Some(ended) => Err(DeviceError::RolloutUpdateEnded {
                        rollout_id: rollout.clone(),
                        ending: ended.ending.clone(),
                    }),
                    None => Ok(vec![]),
                };
            }
            if let Some(pending) = &device.firmware_update {
                if pending.firmware_id == firmware_id && pending.rollout_id == rollout_id {
                    return Ok(vec![]);
                }
                return Err(DeviceError::UpdateInProgress(
                    pending.firmware_id.to_string(),
                ));
            }
            if !compatible_models.is_empty() && !compatible_models.contains(&device.model) {
                return Err(DeviceError::IncompatibleModel {
                    model: device.model.clone(),
                    firmware_id: firmware_id.to_string(),
                });
            }
            let version = firmware_id.version().to_string();
            if device.firmware_version.as_deref() == Some(version.as_str()) {
                return Err(DeviceError::AlreadyRunsVersion(version));
            }
            Ok(vec![DeviceEvent::FirmwareUpdateRequested {
                rollout_id,
                firmware_id,
                version,
                image: Some(image),
                at,
            }])
        }
        DeviceCommand::RecordFirmwareProgress {
            rollout_id,
            state,
            progress,
            at,
        } => {
            validate_text("state", &state)?;
            if progress > 100 {
                return Err(DeviceError::InvalidProgress(progress));
            }
            let pending = device.pending_update_for(&rollout_id)?;
            let furthest = pending.stage.as_deref().unwrap_or(&pending.state);
            if let (Some(from), Some(to)) =
                (super::progress_rank(furthest), super::progress_rank(&state))
            {
                if to < from {
                    return Err(DeviceError::ProgressBackwards {
                        from: furthest.to_string(),
                        to: state,
                    });
                }
            }
            Ok(vec![DeviceEvent::FirmwareUpdateProgressed {
                rollout_id,
                state,
                progress,
                at,
            }])
        }
        DeviceCommand::RecordFirmwareSucceeded {
            rollout_id,
            version,
            at,
        } => {
            if device.firmware_update.is_none()
                && device.firmware_version.as_deref() == Some(version.as_str())
            {
                // A repeated success report: already recorded.
                return Ok(vec![]);
            }
            let pending = device.pending_update_for(&rollout_id)?;
            if pending.version != version {
                return Err(DeviceError::VersionMismatch {
                    reported: version,
                    expected: pending.version.clone(),
                });
            }
            Ok(vec![DeviceEvent::FirmwareUpdateSucceeded {
                rollout_id,
                version,
                at,
            }])
        }
        DeviceCommand::RecordFirmwareFailed {
            rollout_id,
            error,
            at,
        } => {
            validate_text("error", &error)?;
            device.pending_update_for(&rollout_id)?;
            Ok(vec![DeviceEvent::FirmwareUpdateFailed {
                rollout_id,
                error,
                at,
            }])
        }
        DeviceCommand::AbandonFirmwareUpdate {
            rollout_id,
            reason,
            at,
        } => {
            validate_text("reason", &reason)?;
            let Some(pending) = device
                .firmware_update
                .as_ref()
                .filter(|p| p.rollout_id == rollout_id)
            else {
                return Ok(vec![]);
            };
            Ok(vec![DeviceEvent::FirmwareUpdateAbandoned {
                rollout_id,
                firmware_id: Some(pending.firmware_id.clone()),
                reason,
                at,
            }])
        }
        DeviceCommand::RotateCredentials {
            secret_hash,
            salt,
            reason,
            at,
        } => Ok(vec![credentials_rotated(
            device,
            NewCredentials {
                secret_hash,
                salt,
                reason,
            },
            at,
        )?]),
        DeviceCommand::RevokeCredentials { reason, at } => {
            validate_text("reason", &reason)?;
            if device.credential_hash.is_none() {
                return Err(DeviceError::NoCredentials);
            }
            Ok(vec![DeviceEvent::DeviceCredentialsRevoked { reason, at }])
        }
    }
}

impl Device {
    /// The pending update, if the report names its rollout.
    fn pending_update_for(
        &self,
        rollout_id: &Option<RolloutId>,
    ) -> Result<&super::PendingFirmwareUpdate, DeviceError> {
        let pending = self
            .firmware_update
            .as_ref()
            .ok_or(DeviceError::NoUpdateInProgress)?;
        if pending.rollout_id != *rollout_id {
            return Err(DeviceError::RolloutMismatch {
                reported: rollout_id.clone(),
                pending: pending.rollout_id.clone(),
            });
        }
        Ok(pending)
    }
}
