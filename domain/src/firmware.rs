//! The Firmware aggregate: one uploaded firmware image, from registration through release to
//! deprecation. The bytes live in object storage; the aggregate keeps their digest, size and key.

use std::fmt;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::ids::{validate_token, IdError, TenantId};

/// A firmware image's id, `{model}@{semver}`, e.g. `thermo-v2@1.4.0-rc.1`.
///
/// Build metadata (`+...`) is refused: semver ignores it for precedence, so `1.0.0+a` and
/// `1.0.0+b` would be two images of the same version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FirmwareId {
    model: String,
    version: semver::Version,
}

/// Why a string is not a firmware id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirmwareIdError {
    /// No `@` between model and version.
    #[error("firmware id must look like {{model}}@{{semver}}")]
    MissingSeparator,
    /// The model part is not a valid token.
    #[error(transparent)]
    InvalidModel(#[from] IdError),
    /// The version part is not semver.
    #[error("firmware version {0:?} is not a semantic version")]
    InvalidVersion(String),
    /// The version carries build metadata.
    #[error("firmware version {0:?} must not carry build metadata (+...)")]
    BuildMetadata(String),
}

impl FirmwareId {
    /// Parses `{model}@{semver}`.
    pub fn parse(value: &str) -> Result<Self, FirmwareIdError> {
        let (model, version) = value
            .split_once('@')
            .ok_or(FirmwareIdError::MissingSeparator)?;
        Self::new(model, version)
    }

    /// Builds the id from its parts.
    pub fn new(model: &str, version: &str) -> Result<Self, FirmwareIdError> {
        validate_token("model", model)?;
        let parsed = semver::Version::parse(version)
            .map_err(|_| FirmwareIdError::InvalidVersion(version.to_string()))?;
        if !parsed.build.is_empty() {
            return Err(FirmwareIdError::BuildMetadata(version.to_string()));
        }
        Ok(Self {
            model: model.to_string(),
            version: parsed,
        })
    }

    /// The hardware model the image is built for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The image's version.
    pub fn version(&self) -> &semver::Version {
        &self.version
    }
}

impl fmt::Display for FirmwareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.model, self.version)
    }
}

impl TryFrom<String> for FirmwareId {
    type Error = FirmwareIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<FirmwareId> for String {
    fn from(id: FirmwareId) -> String {
        id.to_string()
    }
}

/// Where an image is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirmwareStatus {
    /// Not registered yet.
    #[default]
    Unregistered,
    /// Uploaded, not yet released for rollouts.
    Draft,
    /// Released: rollouts may install it.
    Released,
    /// Withdrawn: no new rollout may use it.
    Deprecated,
}

/// The platform's signature of an image's digest, made at release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSignature {
    /// `ed25519`.
    pub algorithm: String,
    /// Which of the platform's keys signed (the API serves the public key under this id).
    pub key_id: String,
    /// Base64 of the signature over the 32 raw bytes of the image's SHA-256.
    pub signature: String,
}

impl ImageSignature {
    fn is_well_formed(&self) -> bool {
        let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
        self.algorithm == "ed25519"
            && !self.key_id.is_empty()
            && self.key_id.len() <= 64
            && self.key_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            // 64 signature bytes are 88 base64 characters.
            && self.signature.len() == 88
            && self.signature.chars().all(base64)
    }
}

/// The Firmware aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Firmware {
    /// The image's id.
    pub id: Option<FirmwareId>,
    /// Its tenant.
    pub tenant: Option<TenantId>,
    /// Lower-case hex SHA-256 of the image.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Key of the image in object storage.
    pub storage_key: String,
    /// Models that may install it (always including its own model).
    pub compatible_models: Vec<String>,
    /// Release notes.
    pub notes: String,
    /// Draft, released or deprecated.
    pub status: FirmwareStatus,
    /// The platform's signature of the digest, from the release on.
    #[serde(default)]
    pub signature: Option<ImageSignature>,
    /// What deprecation does to the rollouts still using the image.
    #[serde(default)]
    pub on_deprecation: RolloutsOnDeprecation,
    /// Why the image was deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_reason: Option<String>,
}

/// What deprecating an image does to the rollouts that use it and have not ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutsOnDeprecation {
    /// Pause them: nothing more is sent; an operator aborts them (a paused rollout of a
    /// deprecated image cannot resume).
    #[default]
    Pause,
    /// Abort them: devices not sent are canceled, devices updating are told to give it up.
    Abort,
}

/// A request to the Firmware aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FirmwareCommand {
    /// Register an uploaded image.
    Register {
        /// `{model}@{semver}`.
        firmware_id: FirmwareId,
        /// Its tenant.
        tenant: TenantId,
        /// Hex SHA-256 of the bytes, computed by the uploader.
        sha256: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Key of the bytes in object storage.
        storage_key: String,
        /// Further models that may install it.
        compatible_models: Vec<String>,
        /// Release notes.
        notes: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Make the image available to rollouts.
    Release {
        /// The platform's signature of the image's digest.
        signature: ImageSignature,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Withdraw the image.
    Deprecate {
        /// Why.
        reason: String,
        /// What happens to the rollouts that use it.
        rollouts: RolloutsOnDeprecation,
        /// Now.
        at: DateTime<Utc>,
    },
}

/// A fact about a firmware image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FirmwareEvent {
    /// An image was uploaded and registered.
    FirmwareRegistered {
        /// Its id.
        firmware_id: FirmwareId,
        /// Its tenant.
        tenant: TenantId,
        /// Lower-case hex SHA-256.
        sha256: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Object-storage key.
        storage_key: String,
        /// Models that may install it.
        compatible_models: Vec<String>,
        /// Release notes.
        notes: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The image was released for rollouts.
    FirmwareReleased {
        /// The platform's signature of the image's digest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<ImageSignature>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The image was withdrawn.
    FirmwareDeprecated {
        /// Why.
        reason: String,
        /// What happens to the rollouts that use it (pause for events recorded before it was
        /// a choice, which is what the rollout manager then does).
        #[serde(default)]
        rollouts: RolloutsOnDeprecation,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for FirmwareEvent {
    fn event_type(&self) -> String {
        match self {
            Self::FirmwareRegistered { .. } => "FirmwareRegistered",
            Self::FirmwareReleased { .. } => "FirmwareReleased",
            Self::FirmwareDeprecated { .. } => "FirmwareDeprecated",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

/// Why the Firmware aggregate refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirmwareError {
    /// The command needs a registered image.
    #[error("firmware is not registered")]
    NotRegistered,
    /// The id is taken.
    #[error("firmware is already registered")]
    AlreadyRegistered,
    /// Not 64 hex digits.
    #[error("sha256 must be 64 hex digits")]
    InvalidSha256,
    /// A zero-byte image.
    #[error("a firmware image must not be empty")]
    EmptyImage,
    /// An empty or overlong storage key.
    #[error("storage key must be 1 to 1024 characters")]
    InvalidStorageKey,
    /// A compatible model that is not a valid token.
    #[error(transparent)]
    InvalidModel(#[from] IdError),
    /// Notes beyond 16 KiB.
    #[error("release notes must be at most 16384 bytes")]
    NotesTooLong,
    /// An empty or overlong reason.
    #[error("reason must be 1 to 512 characters")]
    InvalidReason,
    /// A signature that is not an ed25519 signature with a key id.
    #[error(
        "the release signature must be an ed25519 signature (88 base64 characters) with a key id"
    )]
    InvalidSignature,
    /// Release of an image released already.
    #[error("firmware is already released")]
    AlreadyReleased,
    /// Any change of a deprecated image.
    #[error("firmware is deprecated")]
    Deprecated,
}

crate::aggregate!(
    Firmware,
    "firmware",
    FirmwareCommand,
    FirmwareEvent,
    FirmwareError
);

impl Firmware {
    /// Folds one event into the state.
    pub fn evolve(&mut self, event: <Self as cqrs_es::Aggregate>::Event) {
        match event {
            FirmwareEvent::FirmwareRegistered {
                firmware_id,
                tenant,
                sha256,
                size_bytes,
                storage_key,
                compatible_models,
                notes,
                ..
            } => {
                self.id = Some(firmware_id);
                self.tenant = Some(tenant);
                self.sha256 = sha256;
                self.size_bytes = size_bytes;
                self.storage_key = storage_key;
                self.compatible_models = compatible_models;
                self.notes = notes;
                self.status = FirmwareStatus::Draft;
            }
            FirmwareEvent::FirmwareReleased { signature, .. } => {
                self.status = FirmwareStatus::Released;
                self.signature = signature;
            }
            FirmwareEvent::FirmwareDeprecated {
                reason, rollouts, ..
            } => {
                self.status = FirmwareStatus::Deprecated;
                self.on_deprecation = rollouts;
                self.deprecation_reason = Some(reason);
            }
        }
    }

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: FirmwareCommand) -> Result<Vec<FirmwareEvent>, FirmwareError> {
        match command {
            FirmwareCommand::Register {
                firmware_id,
                tenant,
                sha256,
                size_bytes,
                storage_key,
                compatible_models,
                notes,
                at,
            } => {
                if self.status != FirmwareStatus::Unregistered {
                    return Err(FirmwareError::AlreadyRegistered);
                }
                if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(FirmwareError::InvalidSha256);
                }
                if size_bytes == 0 {
                    return Err(FirmwareError::EmptyImage);
                }
                if storage_key.is_empty() || storage_key.len() > 1024 {
                    return Err(FirmwareError::InvalidStorageKey);
                }
                if notes.len() > 16 * 1024 {
                    return Err(FirmwareError::NotesTooLong);
                }
                let mut models = compatible_models;
                models.push(firmware_id.model().to_string());
                for model in &models {
                    validate_token("model", model)?;
                }
                models.sort();
                models.dedup();
                Ok(vec![FirmwareEvent::FirmwareRegistered {
                    firmware_id,
                    tenant,
                    sha256: sha256.to_ascii_lowercase(),
                    size_bytes,
                    storage_key,
                    compatible_models: models,
                    notes,
                    at,
                }])
            }
            FirmwareCommand::Release { signature, at } => match self.status {
                FirmwareStatus::Unregistered => Err(FirmwareError::NotRegistered),
                FirmwareStatus::Draft if !signature.is_well_formed() => {
                    Err(FirmwareError::InvalidSignature)
                }
                FirmwareStatus::Draft => Ok(vec![FirmwareEvent::FirmwareReleased {
                    signature: Some(signature),
                    at,
                }]),
                FirmwareStatus::Released => Err(FirmwareError::AlreadyReleased),
                FirmwareStatus::Deprecated => Err(FirmwareError::Deprecated),
            },
            FirmwareCommand::Deprecate {
                reason,
                rollouts,
                at,
            } => {
                if !crate::is_valid_reason(&reason) {
                    return Err(FirmwareError::InvalidReason);
                }
                match self.status {
                    FirmwareStatus::Unregistered => Err(FirmwareError::NotRegistered),
                    FirmwareStatus::Deprecated => Err(FirmwareError::Deprecated),
                    FirmwareStatus::Draft | FirmwareStatus::Released => {
                        Ok(vec![FirmwareEvent::FirmwareDeprecated {
                            reason,
                            rollouts,
                            at,
                        }])
                    }
                }
            }
        }
    }

    /// Whether a device of `model` may install this image.
    pub fn fits(&self, model: &str) -> bool {
        self.compatible_models.iter().any(|m| m == model)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<Firmware>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .into()
    }

    fn id() -> FirmwareId {
        FirmwareId::parse("thermo@1.2.0").unwrap()
    }

    fn register() -> FirmwareCommand {
        FirmwareCommand::Register {
            firmware_id: id(),
            tenant: TenantId::parse("acme").unwrap(),
            sha256: "AB".repeat(32),
            size_bytes: 1024,
            storage_key: "firmware/thermo@1.2.0".into(),
            compatible_models: vec!["thermo-v2".into(), "thermo".into()],
            notes: "fixes".into(),
            at: at(),
        }
    }

    fn signature() -> ImageSignature {
        ImageSignature {
            algorithm: "ed25519".into(),
            key_id: "0123456789abcdef".into(),
            signature: "A".repeat(86) + "==",
        }
    }

    fn release() -> FirmwareCommand {
        FirmwareCommand::Release {
            signature: signature(),
            at: at(),
        }
    }

    fn released() -> FirmwareEvent {
        FirmwareEvent::FirmwareReleased {
            signature: Some(signature()),
            at: at(),
        }
    }

    fn registered() -> FirmwareEvent {
        FirmwareEvent::FirmwareRegistered {
            firmware_id: id(),
            tenant: TenantId::parse("acme").unwrap(),
            sha256: "ab".repeat(32),
            size_bytes: 1024,
            storage_key: "firmware/thermo@1.2.0".into(),
            compatible_models: vec!["thermo".into(), "thermo-v2".into()],
            notes: "fixes".into(),
            at: at(),
        }
    }

    #[test]
    fn firmware_ids_are_model_at_semver() {
        let id = FirmwareId::parse("thermo-v2@1.4.0-rc.1").unwrap();
        assert_eq!(id.model(), "thermo-v2");
        assert_eq!(id.to_string(), "thermo-v2@1.4.0-rc.1");
        assert_eq!(
            FirmwareId::parse("thermo"),
            Err(FirmwareIdError::MissingSeparator)
        );
        assert!(matches!(
            FirmwareId::parse("thermo@1.2"),
            Err(FirmwareIdError::InvalidVersion(_))
        ));
        assert!(matches!(
            FirmwareId::parse("thermo@1.2.0+build5"),
            Err(FirmwareIdError::BuildMetadata(_))
        ));
        assert!(matches!(
            FirmwareId::parse("the rmo@1.2.0"),
            Err(FirmwareIdError::InvalidModel(_))
        ));
    }

    #[test]
    fn registers_an_image_with_its_own_model_compatible() {
        Given::with(())
            .given_no_previous_events()
            .when(register())
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn refuses_bad_digests_empty_images_and_second_registrations() {
        let mut bad = register();
        if let FirmwareCommand::Register { sha256, .. } = &mut bad {
            *sha256 = "xyz".into();
        }
        Given::with(())
            .given_no_previous_events()
            .when(bad)
            .then_expect_error(FirmwareError::InvalidSha256);
        let mut empty = register();
        if let FirmwareCommand::Register { size_bytes, .. } = &mut empty {
            *size_bytes = 0;
        }
        Given::with(())
            .given_no_previous_events()
            .when(empty)
            .then_expect_error(FirmwareError::EmptyImage);
        Given::with(())
            .given(vec![registered()])
            .when(register())
            .then_expect_error(FirmwareError::AlreadyRegistered);
    }

    #[test]
    fn releases_a_draft_once() {
        Given::with(())
            .given(vec![registered()])
            .when(release())
            .then_expect_events(vec![released()]);
        Given::with(())
            .given(vec![registered()])
            .when(FirmwareCommand::Release {
                signature: ImageSignature {
                    signature: "short".into(),
                    ..signature()
                },
                at: at(),
            })
            .then_expect_error(FirmwareError::InvalidSignature);
        Given::with(())
            .given(vec![registered(), released()])
            .when(release())
            .then_expect_error(FirmwareError::AlreadyReleased);
        Given::with(())
            .given_no_previous_events()
            .when(release())
            .then_expect_error(FirmwareError::NotRegistered);
    }

    #[test]
    fn deprecates_and_then_refuses_everything() {
        let deprecated = FirmwareEvent::FirmwareDeprecated {
            reason: "bricks devices".into(),
            rollouts: RolloutsOnDeprecation::Abort,
            at: at(),
        };
        Given::with(())
            .given(vec![registered(), released()])
            .when(FirmwareCommand::Deprecate {
                reason: "bricks devices".into(),
                rollouts: RolloutsOnDeprecation::Abort,
                at: at(),
            })
            .then_expect_events(vec![deprecated.clone()]);
        Given::with(())
            .given(vec![registered(), deprecated.clone()])
            .when(release())
            .then_expect_error(FirmwareError::Deprecated);
        Given::with(())
            .given(vec![registered(), deprecated])
            .when(FirmwareCommand::Deprecate {
                reason: "again".into(),
                rollouts: RolloutsOnDeprecation::Pause,
                at: at(),
            })
            .then_expect_error(FirmwareError::Deprecated);
        Given::with(())
            .given(vec![registered()])
            .when(FirmwareCommand::Deprecate {
                reason: " ".into(),
                rollouts: RolloutsOnDeprecation::Pause,
                at: at(),
            })
            .then_expect_error(FirmwareError::InvalidReason);
    }

    #[test]
    fn knows_which_models_it_fits() {
        let mut firmware = Firmware::default();
        firmware.evolve(registered());
        assert!(firmware.fits("thermo-v2"));
        assert!(!firmware.fits("camera"));
    }
}
