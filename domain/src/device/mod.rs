//! The Device aggregate: one physical device, from registration to decommissioning.
//!
//! It owns the registry facts (name, model, tags, tenant, owner), connectivity (online, offline,
//! last seen), what the device reported (telemetry, status, reported properties), what the fleet
//! wants of it (desired properties, commands, firmware updates) and the hash of its credentials.

mod command;
mod event;
mod telemetry;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use command::{Delivery, DeviceCommand, NewCredentials};
pub use event::{CommandOutcome, DeviceEvent};
pub use telemetry::{
    validate_location, validate_reading, validate_sensor_name, Location, Reading, TelemetryError,
    MAX_READINGS,
};

use crate::firmware::{FirmwareId, ImageSignature};
use crate::ids::{validate_token, CommandId, DeviceId, IdError, RolloutId, TenantId, UserId};

/// How many message digests a device remembers to recognise redelivered telemetry.
pub const REMEMBERED_DIGESTS: usize = 64;
/// How many closed command ids a device remembers so a repeated reply is ignored, not refused.
pub const REMEMBERED_CLOSED_COMMANDS: usize = 64;
/// The most tags a device may carry.
pub const MAX_TAGS: usize = 32;
/// The most keys one desired-properties change may touch.
pub const MAX_PROPERTY_KEYS: usize = 128;
/// The most keys a device's whole reported or desired document may hold, nested ones
/// included.
pub const MAX_DOCUMENT_KEYS: usize = 256;
/// The deepest a reported or desired document, or a command's parameters, may nest objects
/// and arrays below the top level.
pub const MAX_DOCUMENT_DEPTH: usize = 8;
/// The largest a device's whole reported or desired document, or a command's parameters, may
/// be as JSON: 64 KiB. What the platform sends a device (the desired document, a command) then
/// stays well below the 256 KiB the broker and the dispatcher carry.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Where a device is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    /// No `DeviceRegistered` yet.
    #[default]
    Unregistered,
    /// Registered and accepting commands.
    Active,
    /// Retired: refuses every change.
    Decommissioned,
}

/// Whether the platform believes the device is connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    /// Never heard from.
    #[default]
    Unknown,
    /// Heard from since it last went offline.
    Online,
    /// Marked offline and not heard from since.
    Offline,
}

/// A command sent to the device that has neither been answered nor expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenCommand {
    /// The command's name, e.g. `reboot`.
    pub name: String,
    /// When the command stops being valid.
    pub expires_at: DateTime<Utc>,
}

/// A firmware update the device has been asked to install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingFirmwareUpdate {
    /// The rollout that asked for it, if any.
    pub rollout_id: Option<RolloutId>,
    /// The firmware image.
    pub firmware_id: FirmwareId,
    /// The version the device should end up running.
    pub version: String,
    /// The last state the device reported (e.g. `downloading`).
    pub state: String,
    /// The last progress in percent the device reported.
    pub progress: u8,
    /// The furthest of the known states ([`PROGRESS_STATES`]) the update reached: reports
    /// of earlier ones are refused, whatever device-specific states came in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// What a device needs to fetch and check a firmware image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareImage {
    /// SHA-256 hex of the image.
    pub sha256: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The platform's signature of the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ImageSignature>,
}

/// How many rollouts a device remembers having been sent an update by.
pub const REMEMBERED_ROLLOUTS: usize = 16;

/// How a rollout's update of a device ended, as the device remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum UpdateEnding {
    /// The device reported the new version.
    Succeeded,
    /// The device reported a failure.
    Failed {
        /// What the device said went wrong.
        error: String,
    },
    /// The platform gave the update up (the device took too long).
    Abandoned,
}

/// A rollout whose update of the device ended, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedRolloutUpdate {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// How its update ended.
    pub ending: UpdateEnding,
}

/// The order of the firmware update states the platform knows, as devices report them on
/// `ota/progress`: an update only moves forward through them. Other states are the device's
/// own and are taken as they come.
pub const PROGRESS_STATES: &[&str] = &[
    "requested",
    "downloading",
    "downloaded",
    "verifying",
    "installing",
    "installed",
    "rebooting",
];

/// Where `state` lies in [`PROGRESS_STATES`], if it is one of them.
pub fn progress_rank(state: &str) -> Option<usize> {
    PROGRESS_STATES.iter().position(|known| *known == state)
}

/// The status field in which a device reports the firmware version it runs.
pub const FIRMWARE_VERSION_FIELD: &str = "firmware_version";

/// The Device aggregate's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The device's id (set by registration).
    pub id: Option<DeviceId>,
    /// The tenant the device belongs to.
    pub tenant: Option<TenantId>,
    /// The user who owns the device.
    pub owner: Option<UserId>,
    /// Human-readable name.
    pub name: String,
    /// Hardware model; firmware images name the models they fit.
    pub model: String,
    /// Free-form labels, sorted and unique.
    pub tags: Vec<String>,
    /// Registered, decommissioned or neither.
    pub lifecycle: Lifecycle,
    /// Online, offline or never heard from.
    pub connectivity: Connectivity,
    /// The last time anything arrived from the device.
    pub last_seen: Option<DateTime<Utc>>,
    /// Reported properties: the merged status the device reported.
    pub reported: Map<String, Value>,
    /// Desired properties: what the fleet wants the device to report.
    pub desired: Map<String, Value>,
    /// Incremented on every change of the desired properties.
    pub desired_version: u64,
    /// Commands awaiting a reply or expiry.
    pub open_commands: BTreeMap<CommandId, OpenCommand>,
    /// The latest closed commands, oldest first.
    pub closed_commands: VecDeque<CommandId>,
    /// Digests of the latest telemetry messages, oldest first.
    pub recent_digests: VecDeque<String>,
    /// The firmware version the device last confirmed running.
    pub firmware_version: Option<String>,
    /// A firmware update under way.
    pub firmware_update: Option<PendingFirmwareUpdate>,
    /// The latest rollouts that sent the device an update, oldest first: a rollout sends its
    /// update to a device once, however often it is asked to.
    #[serde(default)]
    pub recent_rollouts: VecDeque<RolloutId>,
    /// How the updates of the latest rollouts ended, oldest first: a rollout that asks again
    /// learns the outcome it may have missed.
    #[serde(default)]
    pub ended_rollout_updates: VecDeque<EndedRolloutUpdate>,
    /// SHA-256 hex of the device's current secret.
    pub credential_hash: Option<String>,
    /// Incremented at every credential rotation.
    pub credential_version: u32,
    /// The public salt the current secret derives from, when it was derived (see
    /// `DeviceCredentialsRotated`).
    #[serde(default)]
    pub credential_salt: Option<String>,
}

/// Why the Device aggregate refused a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// The command needs a registered device.
    #[error("device is not registered")]
    NotRegistered,
    /// Registration of an id that already exists.
    #[error("device is already registered")]
    AlreadyRegistered,
    /// The device has been decommissioned and accepts no change.
    #[error("device is decommissioned")]
    Decommissioned,
    /// An id in the command is malformed.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The name is empty or too long.
    #[error("name must be 1 to 128 characters without control characters")]
    InvalidName,
    /// A tag is empty, too long or has control characters.
    #[error("tag {0:?} must be 1 to 64 characters without control characters")]
    InvalidTag(String),
    /// More tags than [`MAX_TAGS`].
    #[error("a device carries at most {MAX_TAGS} tags")]
    TooManyTags,
    /// An update that names no field.
    #[error("the update names no field to change")]
    NothingToUpdate,
    /// Telemetry that fails validation.
    #[error(transparent)]
    InvalidTelemetry(#[from] TelemetryError),
    /// The device is already marked offline.
    #[error("device is already offline")]
    AlreadyOffline,
    /// A silence that ended: the device was heard from after the given instant.
    #[error("device was heard from at {0}, after the silence the command assumed")]
    HeardFromSince(DateTime<Utc>),
    /// A property name that is not `[A-Za-z_][A-Za-z0-9_]{0,63}`.
    #[error("property name {0:?} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")]
    InvalidPropertyName(String),
    /// A status or desired change with no key, or too many.
    #[error("a property change must touch 1 to {MAX_PROPERTY_KEYS} keys")]
    InvalidPropertyCount,
    /// A command id already used on this device.
    #[error("command {0} was already issued to this device")]
    DuplicateCommand(CommandId),
    /// A command name that is not `[a-z_][a-z0-9_]{0,49}`.
    #[error("command name {0:?} must match [a-z_][a-z0-9_]{{0,49}}")]
    InvalidCommandName(String),
    /// Command parameters that are not a JSON object.
    #[error("command parameters must be a JSON object")]
    InvalidCommandParams,
    /// A reported or desired document, or command parameters, past the caps.
    #[error("{what} would be {bytes} bytes with {keys} keys; at most {MAX_DOCUMENT_BYTES} bytes and {MAX_DOCUMENT_KEYS} keys are kept")]
    DocumentTooLarge {
        /// Which document.
        what: &'static str,
        /// Its size as JSON.
        bytes: usize,
        /// Its number of top-level keys.
        keys: usize,
    },
    /// A reported or desired document, or command parameters, nested too deep.
    #[error("{what} would nest {depth} levels deep; at most {MAX_DOCUMENT_DEPTH} are kept")]
    DocumentTooDeep {
        /// Which document.
        what: &'static str,
        /// How deep.
        depth: usize,
    },
    /// A command whose expiry is not after its issue time.
    #[error("a command must expire after it is issued")]
    ExpiryNotAfterIssue,
    /// A reply or expiry for a command this device never had.
    #[error("command {0} is unknown to this device")]
    UnknownCommand(CommandId),
    /// An expiry before the command's deadline.
    #[error("command {0} has not expired yet")]
    CommandNotExpired(CommandId),
    /// A firmware update while another one is under way.
    #[error("another firmware update ({0}) is under way")]
    UpdateInProgress(String),
    /// Firmware progress or outcome while no update is under way.
    #[error("no firmware update is under way")]
    NoUpdateInProgress,
    /// Firmware progress or outcome for another rollout than the pending one.
    #[error("the report names rollout {reported:?}, the pending update belongs to {pending:?}")]
    RolloutMismatch {
        /// The rollout in the report.
        reported: Option<RolloutId>,
        /// The rollout of the pending update.
        pending: Option<RolloutId>,
    },
    /// The device reported success with another version than requested.
    #[error("device reports version {reported}, the update asked for {expected}")]
    VersionMismatch {
        /// The version the device reported.
        reported: String,
        /// The version the update asked for.
        expected: String,
    },
    /// An update to the version the device already runs.
    #[error("device already runs firmware {0}")]
    AlreadyRunsVersion(String),
    /// A rollout asking again for an update of the device that already ended.
    #[error("the update of rollout {rollout_id} already ended: {ending:?}")]
    RolloutUpdateEnded {
        /// The rollout.
        rollout_id: RolloutId,
        /// How its update ended.
        ending: UpdateEnding,
    },
    /// A firmware progress report of a state the update is already past.
    #[error("firmware update state cannot move back from {from:?} to {to:?}")]
    ProgressBackwards {
        /// The state the update is in.
        from: String,
        /// The state reported.
        to: String,
    },
    /// A rollout's image does not support the device's model (it changed since planning).
    #[error("firmware {firmware_id} does not support the device's model {model:?}")]
    IncompatibleModel {
        /// The device's model.
        model: String,
        /// The image.
        firmware_id: String,
    },
    /// Progress above 100 %.
    #[error("progress must be 0 to 100, got {0}")]
    InvalidProgress(u8),
    /// A credential hash that is not 64 hex digits.
    #[error("credential hash must be a SHA-256 digest in 64 hex digits")]
    InvalidCredentialHash,
    /// A credential salt that is not 32 hex digits.
    #[error("credential salt must be 32 hex digits")]
    InvalidCredentialSalt,
    /// Revoking credentials the device does not have.
    #[error("the device has no credentials to revoke")]
    NoCredentials,
    /// The credential version would pass its largest value.
    #[error("the device's credentials were rotated too often")]
    TooManyRotations,
    /// A free-text field (reason, error, state) that is empty or too long.
    #[error("{0} must be 1 to 512 characters")]
    InvalidText(&'static str),
}

crate::aggregate!(Device, "device", DeviceCommand, DeviceEvent, DeviceError);

impl Device {
    /// Folds one event into the state.
    pub fn evolve(&mut self, event: <Self as cqrs_es::Aggregate>::Event) {
        event::apply(self, event);
    }

    /// The desired properties whose value differs from the reported one: what the device still
    /// has to do.
    pub fn delta(&self) -> Map<String, Value> {
        document_delta(&self.desired, &self.reported)
    }

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: DeviceCommand) -> Result<Vec<DeviceEvent>, DeviceError> {
        command::decide(self, command)
    }

    fn ensure_active(&self) -> Result<(), DeviceError> {
        match self.lifecycle {
            Lifecycle::Active => Ok(()),
            Lifecycle::Unregistered => Err(DeviceError::NotRegistered),
            Lifecycle::Decommissioned => Err(DeviceError::Decommissioned),
        }
    }

    /// The event that says the device is back, if it was not online.
    fn came_online(&self, at: DateTime<Utc>) -> Option<DeviceEvent> {
        (self.connectivity != Connectivity::Online).then_some(DeviceEvent::DeviceCameOnline { at })
    }

    /// What a firmware version the device reports (in its status or heartbeat) says: the
    /// pending update succeeded when it is the update's version (the only way an update
    /// succeeds: a device saying "done" proves nothing), else the device runs another version
    /// than known.
    fn version_reported(&self, version: &str, at: DateTime<Utc>) -> Option<DeviceEvent> {
        match &self.firmware_update {
            Some(pending) if pending.version == version => {
                Some(DeviceEvent::FirmwareUpdateSucceeded {
                    rollout_id: pending.rollout_id.clone(),
                    version: version.to_string(),
                    at,
                })
            }
            _ if self.firmware_version.as_deref() != Some(version) => {
                Some(DeviceEvent::FirmwareVersionReported {
                    version: version.to_string(),
                    at,
                })
            }
            _ => None,
        }
    }
}

/// Validates a free-text field: 1 to 512 characters.
fn validate_text(field: &'static str, value: &str) -> Result<(), DeviceError> {
    if crate::is_valid_reason(value) {
        Ok(())
    } else {
        Err(DeviceError::InvalidText(field))
    }
}

/// Validates a human-readable name.
fn validate_name(name: &str) -> Result<String, DeviceError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(DeviceError::InvalidName);
    }
    Ok(name.to_string())
}

/// Validates tags and returns them sorted and unique.
fn validate_tags(tags: Vec<String>) -> Result<Vec<String>, DeviceError> {
    let mut tags: Vec<String> = tags.into_iter().map(|t| t.trim().to_string()).collect();
    if let Some(bad) = tags
        .iter()
        .find(|t| t.is_empty() || t.chars().count() > 64 || t.chars().any(char::is_control))
    {
        return Err(DeviceError::InvalidTag(bad.clone()));
    }
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(DeviceError::TooManyTags);
    }
    Ok(tags)
}

/// Validates a model name: models appear in firmware ids, so they follow the id rule.
fn validate_model(model: &str) -> Result<String, DeviceError> {
    validate_token("model", model)?;
    Ok(model.to_string())
}

/// Validates the keys of a status or desired-properties change.
fn validate_properties(properties: &Map<String, Value>) -> Result<(), DeviceError> {
    if properties.is_empty() || properties.len() > MAX_PROPERTY_KEYS {
        return Err(DeviceError::InvalidPropertyCount);
    }
    for key in properties.keys() {
        let mut chars = key.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !rest_ok || key.len() > 64 {
            return Err(DeviceError::InvalidPropertyName(key.clone()));
        }
    }
    Ok(())
}

impl Device {
    /// `Ok` when merging `status` into `reported` keeps it within the document caps, as the
    /// aggregate will check: lets ingest keep a message's readings and drop only a status
    /// part the device's document has no room for.
    pub fn reported_room_for(
        reported: &Map<String, Value>,
        status: &Map<String, Value>,
    ) -> Result<(), DeviceError> {
        merged_within_caps("the reported properties", reported, status)
    }
}

/// Checks a whole document against [`MAX_DOCUMENT_BYTES`] and [`MAX_DOCUMENT_KEYS`].
fn check_document(what: &'static str, document: &Map<String, Value>) -> Result<(), DeviceError> {
    /// Keys at every depth, and how deep values nest below this one.
    fn shape(value: &Value) -> (usize, usize) {
        match value {
            Value::Object(map) => map.values().fold((map.len(), 1), |(keys, depth), inner| {
                let (k, d) = shape(inner);
                (keys + k, depth.max(d + 1))
            }),
            Value::Array(items) => items.iter().fold((0, 1), |(keys, depth), inner| {
                let (k, d) = shape(inner);
                (keys + k, depth.max(d + 1))
            }),
            _ => (0, 0),
        }
    }
    let (keys, depth) = document
        .values()
        .fold((document.len(), 0), |(keys, depth), inner| {
            let (k, d) = shape(inner);
            (keys + k, depth.max(d))
        });
    if depth > MAX_DOCUMENT_DEPTH {
        return Err(DeviceError::DocumentTooDeep { what, depth });
    }
    // Counting bytes by writing into a sink allocates nothing.
    let mut counter = ByteCounter(0);
    let _ = serde_json::to_writer(&mut counter, document);
    let bytes = counter.0;
    if keys > MAX_DOCUMENT_KEYS || bytes > MAX_DOCUMENT_BYTES {
        return Err(DeviceError::DocumentTooLarge { what, bytes, keys });
    }
    Ok(())
}

/// The reported or desired document `patch` would leave, checked against the caps.
fn merged_within_caps(
    what: &'static str,
    document: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), DeviceError> {
    let mut merged = document.clone();
    merge_properties(&mut merged, patch);
    check_document(what, &merged)
}

/// An `io::Write` that only counts.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Applies a JSON merge patch (RFC 7386), as AWS IoT Device Shadow does: an object merges
/// into an object key by key at any depth, `null` removes a key at any depth, anything else
/// (arrays included) replaces. The `fleetlog_merge` SQL function of the read models is the
/// same rule.
pub fn merge_properties(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => match target.get_mut(key) {
                Some(Value::Object(existing)) => merge_properties(existing, inner),
                _ => {
                    let mut fresh = Map::new();
                    merge_properties(&mut fresh, inner);
                    target.insert(key.clone(), Value::Object(fresh));
                }
            },
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// Composes merge patch `later` into `earlier`, so that applying the result equals applying
/// `earlier` then `later`; `false` (and `earlier` unchanged) when no single patch says that: a
/// key `earlier` sets to a value or `null` that `later` sets to an object (an object patch
/// merges into what it finds, so it cannot say "replace").
pub fn compose_patches(earlier: &mut Map<String, Value>, later: &Map<String, Value>) -> bool {
    fn composable(earlier: &Map<String, Value>, later: &Map<String, Value>) -> bool {
        later
            .iter()
            .all(|(key, value)| match (earlier.get(key), value) {
                (Some(Value::Object(before)), Value::Object(after)) => composable(before, after),
                (Some(_), Value::Object(_)) => false,
                _ => true,
            })
    }
    fn compose(earlier: &mut Map<String, Value>, later: &Map<String, Value>) {
        for (key, value) in later {
            match (earlier.get_mut(key), value) {
                (Some(Value::Object(before)), Value::Object(after)) => compose(before, after),
                _ => {
                    earlier.insert(key.clone(), value.clone());
                }
            }
        }
    }
    if !composable(earlier, later) {
        return false;
    }
    compose(earlier, later);
    true
}

/// The desired properties the reported ones do not match: the leaves that differ, at any
/// depth (an object holds only its differing leaves, and is left out when none differ).
/// Numbers compare by value: `1` equals `1.0`.
pub fn document_delta(
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
) -> Map<String, Value> {
    let mut delta = Map::new();
    for (key, wanted) in desired {
        let held = reported.get(key);
        match (wanted, held) {
            (Value::Object(wanted), held) => {
                let empty = Map::new();
                let held = match held {
                    Some(Value::Object(held)) => held,
                    _ => &empty,
                };
                let inner = document_delta(wanted, held);
                if !inner.is_empty() {
                    delta.insert(key.clone(), Value::Object(inner));
                }
            }
            (wanted, Some(held)) if same_value(wanted, held) => {}
            (wanted, _) => {
                delta.insert(key.clone(), wanted.clone());
            }
        }
    }
    delta
}

/// JSON equality with numbers compared by value (`1`, `1.0` and `1e0` are one number), as
/// Postgres compares `jsonb`.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => {
            // Integers compare exactly; an integer equals a float only if the float is that
            // very integer (not merely the nearest double to it).
            let integer = |n: &serde_json::Number| {
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            };
            let integral = |f: f64| (f.fract() == 0.0 && f.abs() < 1.0e38).then_some(f as i128);
            match (integer(a), integer(b)) {
                (Some(a), Some(b)) => a == b,
                (Some(i), None) => b.as_f64().and_then(integral) == Some(i),
                (None, Some(i)) => a.as_f64().and_then(integral) == Some(i),
                (None, None) => a.as_f64() == b.as_f64(),
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(key, a)| b.get(key).is_some_and(|b| same_value(a, b)))
        }
        _ => a == b,
    }
}

/// Pushes onto a bounded queue, dropping the oldest entry beyond `limit`.
fn remember<T>(queue: &mut VecDeque<T>, item: T, limit: usize) {
    queue.push_back(item);
    while queue.len() > limit {
        queue.pop_front();
    }
}
