//! A device provisions itself with a provisioning key: one flow for both edges, HTTP
//! (`POST /api/v1/provision`) and MQTT (`provisioning/{key_id}/{request_id}/request`).
//!
//! The key is presented as `{key_id}.{secret}` and checked against the hash the key keeps. Then
//! three commands, each with the key as actor: the key's claim (one use, naming the device), the
//! device's registration in the key's tenant, and the issue of its credentials. A claim whose
//! registration fails is given back, so a use is only spent on a registered device.

use chrono::{DateTime, Utc};
use fleetlog_domain::device::{DeviceCommand, DeviceError, Lifecycle, NewCredentials};
use fleetlog_domain::provisioning::{KeyState, ProvisioningCommand, ProvisioningError};
use fleetlog_domain::{DeviceId, ProvisioningKeyId};
use secrecy::SecretString;

use crate::credentials::{constant_time_eq, sha256_hex, DeviceCredentialKey};
use crate::{CommandBus, CommandError, CommandMetadata, Committed, StoreError};

/// What a device asks for.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The key as it was shown: `{key_id}.{secret}`.
    pub provisioning_key: String,
    /// The id the device wants.
    pub device_id: String,
    /// Its name; default: its id.
    pub name: Option<String>,
    /// Its model; default (and the only one allowed, if the key names one): the key's.
    pub model: Option<String>,
}

/// A device registered with its own credentials.
pub struct Provisioned {
    /// Its id.
    pub device_id: DeviceId,
    /// Its secret, to show it this once.
    pub secret: SecretString,
    /// Where the device aggregate stands after the issue.
    pub committed: Committed,
}

/// Why a device was not provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The key is malformed, unknown, or its secret is wrong (told apart to nobody).
    #[error("unknown or wrong provisioning key")]
    UnknownKey,
    /// The key is revoked, expired or used up.
    #[error("{0}")]
    KeyRefused(ProvisioningError),
    /// The request is wrong: a model the key does not allow, no model at all, a bad id or name.
    #[error("{0}")]
    Invalid(String),
    /// The id is taken.
    #[error("device id {0} is taken")]
    Taken(DeviceId),
    /// The write side failed; the request may be tried again.
    #[error("provisioning failed: {0}")]
    Failed(String),
}

impl From<StoreError> for ProvisionError {
    fn from(error: StoreError) -> Self {
        Self::Failed(error.to_string())
    }
}

/// The key id a presented key names, if it is shaped like one.
pub fn key_id_of(presented: &str) -> Option<ProvisioningKeyId> {
    let (key_id, _) = presented.split_once('.')?;
    ProvisioningKeyId::parse(key_id).ok()
}

/// Provisions the device `request` names; see the module documentation.
pub async fn provision(
    bus: &CommandBus,
    device_key: &DeviceCredentialKey,
    request: ProvisionRequest,
    now: DateTime<Utc>,
) -> Result<Provisioned, ProvisionError> {
    let key_id = key_id_of(&request.provisioning_key).ok_or(ProvisionError::UnknownKey)?;
    let secret = request
        .provisioning_key
        .split_once('.')
        .map(|(_, secret)| secret)
        .unwrap_or_default();
    let device_id = DeviceId::parse(request.device_id.as_str())
        .map_err(|error| ProvisionError::Invalid(error.to_string()))?;
    let presented = sha256_hex(secret.as_bytes());
    let keys = bus.provisioning_keys();
    let key = keys.inspect(key_id.as_str(), |key, _| key.clone()).await?;
    let matches = key.state != KeyState::Unknown
        && constant_time_eq(key.secret_hash.as_bytes(), presented.as_bytes());
    let (Some(tenant), Some(owner), true) = (key.tenant.clone(), key.created_by.clone(), matches)
    else {
        return Err(ProvisionError::UnknownKey);
    };
    key.ensure_takes_claims(now)
        .map_err(ProvisionError::KeyRefused)?;
    let model = match (&key.model, request.model) {
        (Some(allowed), Some(asked)) if *allowed != asked => {
            return Err(ProvisionError::Invalid(
                ProvisioningError::WrongModel {
                    allowed: allowed.clone(),
                    asked,
                }
                .to_string(),
            ))
        }
        (_, Some(asked)) => asked,
        (Some(allowed), None) => allowed.clone(),
        (None, None) => {
            return Err(ProvisionError::Invalid(
                "name the device's model: the provisioning key names none".into(),
            ))
        }
    };
    let devices = bus.devices();
    let taken = devices
        .inspect(device_id.as_str(), |device, _| {
            device.lifecycle != Lifecycle::Unregistered
        })
        .await?;
    if taken {
        return Err(ProvisionError::Taken(device_id));
    }
    let metadata =
        CommandMetadata::new(format!("provisioning-key:{key_id}")).with_tenant(tenant.clone());
    // The claim first: it takes a use, so a key of N uses registers N devices however many
    // present it at once.
    let claim = ProvisioningCommand::Claim {
        device_id: device_id.clone(),
        model: Some(model.clone()),
        at: now,
    };
    match keys.execute(key_id.as_str(), claim, &metadata).await {
        Ok(_) => {}
        Err(CommandError::Refused(refusal @ ProvisioningError::WrongModel { .. })) => {
            return Err(ProvisionError::Invalid(refusal.to_string()))
        }
        Err(CommandError::Refused(refusal)) => return Err(ProvisionError::KeyRefused(refusal)),
        Err(other) => return Err(ProvisionError::Failed(other.to_string())),
    }
    // Registered with its credentials in one write: never one without the other.
    let issued = device_key.issue(device_id.as_str());
    let register = DeviceCommand::Register {
        device_id: device_id.clone(),
        tenant,
        owner,
        name: request.name.unwrap_or_else(|| device_id.to_string()),
        model,
        tags: key.tags.clone(),
        at: now,
        credentials: Some(NewCredentials {
            secret_hash: issued.hash,
            salt: Some(issued.salt),
            reason: format!("provisioned with key {key_id}"),
        }),
    };
    let committed = match devices
        .execute(device_id.as_str(), register, &metadata)
        .await
    {
        Ok(committed) => committed,
        Err(error) => {
            // The use goes back: the device was not registered with it.
            let release = ProvisioningCommand::ReleaseClaim {
                device_id: device_id.clone(),
                reason: format!("not registered: {error}"),
                at: Utc::now(),
            };
            if let Err(release_error) = keys.execute(key_id.as_str(), release, &metadata).await {
                tracing::warn!(key = %key_id, device = %device_id, error = %release_error, "could not give a provisioning claim back");
            }
            return Err(match error {
                CommandError::Refused(DeviceError::AlreadyRegistered) => {
                    ProvisionError::Taken(device_id)
                }
                CommandError::Refused(refusal) => ProvisionError::Invalid(refusal.to_string()),
                unstorable @ CommandError::Unstorable { .. } => {
                    ProvisionError::Invalid(unstorable.to_string())
                }
                other => ProvisionError::Failed(other.to_string()),
            });
        }
    };
    tracing::info!(key = %key_id, device = %device_id, "device provisioned");
    Ok(Provisioned {
        device_id,
        secret: issued.secret,
        committed,
    })
}
