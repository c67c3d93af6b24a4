//! The ProvisioningKey aggregate: a claim a tenant hands to devices it has not registered yet,
//! so that each registers itself once, with the id it wants, and receives its own credentials
//! (the model of cloud fleet provisioning: a claim, then a device identity of its own).
//!
//! A key belongs to one tenant and may be limited in uses, in time, and to one model; the
//! devices it registers get its tags. Each use is an event naming the device, so the log says
//! which key brought which device in, by whom the key was made, and when it was revoked. Only
//! the SHA-256 of the key's secret is kept.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

pub use crate::ids::ProvisioningKeyId;
use crate::ids::{validate_token, DeviceId, IdError, TenantId, UserId};

/// The most devices one key may ever register.
pub const MAX_USES: u32 = 1_000_000;
/// The most tags a key gives its devices.
pub const MAX_TAGS: usize = 32;

/// Where a key stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Not created yet.
    #[default]
    Unknown,
    /// Takes claims, within its limits.
    Active,
    /// Revoked: takes none, ever again.
    Revoked,
}

/// A provisioning key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProvisioningKey {
    /// Where it stands.
    pub state: KeyState,
    /// Its tenant.
    pub tenant: Option<TenantId>,
    /// Who made it: the owner of the devices it registers.
    pub created_by: Option<UserId>,
    /// Its name, for people.
    pub name: String,
    /// SHA-256 hex of its secret.
    pub secret_hash: String,
    /// The public salt its secret derives from with the platform's credential key, so the
    /// broker sync can give the key an account at the broker (MQTT provisioning).
    #[serde(default)]
    pub salt: Option<String>,
    /// The most devices it may register; `None`: no limit.
    pub max_uses: Option<u32>,
    /// Devices it registered so far.
    pub uses: u32,
    /// When it stops taking claims; `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// The only model its devices may have; `None`: any.
    pub model: Option<String>,
    /// The tags its devices get.
    pub tags: Vec<String>,
}

/// What can be asked of a provisioning key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum ProvisioningCommand {
    /// Make the key.
    Create {
        /// Its tenant.
        tenant: TenantId,
        /// Who makes it.
        created_by: UserId,
        /// A name for people: 1 to 128 characters.
        name: String,
        /// SHA-256 hex of its secret; the caller hashes it.
        secret_hash: String,
        /// The salt its secret derives from (32 hex digits), if it was derived.
        salt: Option<String>,
        /// The most devices it may register, 1 to [`MAX_USES`].
        max_uses: Option<u32>,
        /// When it stops taking claims; after `at`.
        expires_at: Option<DateTime<Utc>>,
        /// The only model its devices may have.
        model: Option<String>,
        /// Tags its devices get.
        tags: Vec<String>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Register `device_id` with this key: one use.
    Claim {
        /// The device that presents the key.
        device_id: DeviceId,
        /// The model the device says it is, if it says.
        model: Option<String>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Give a use back: the device it was claimed for could not be registered.
    ReleaseClaim {
        /// The device.
        device_id: DeviceId,
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Stop the key for good.
    Revoke {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
}

/// What happened to a provisioning key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProvisioningEvent {
    /// The key was made.
    ProvisioningKeyCreated {
        /// Its tenant.
        tenant: TenantId,
        /// Who made it.
        created_by: UserId,
        /// Its name.
        name: String,
        /// SHA-256 hex of its secret.
        #[serde(default)]
        secret_hash: String,
        /// The salt its secret derives from with the platform's credential key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        salt: Option<String>,
        /// The most devices it may register.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_uses: Option<u32>,
        /// When it stops taking claims.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<DateTime<Utc>>,
        /// The only model its devices may have.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// Tags its devices get.
        tags: Vec<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A device claimed the key: it is being registered with it.
    ProvisioningKeyClaimed {
        /// The device.
        device_id: DeviceId,
        /// Uses after this one.
        uses: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// A claim was given back.
    ProvisioningClaimReleased {
        /// The device.
        device_id: DeviceId,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The key was revoked.
    ProvisioningKeyRevoked {
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
}

/// Why a provisioning key refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisioningError {
    /// The key exists already.
    #[error("the provisioning key exists already")]
    AlreadyCreated,
    /// No such key.
    #[error("no such provisioning key")]
    Unknown,
    /// Revoked.
    #[error("the provisioning key was revoked")]
    Revoked,
    /// Past its expiry.
    #[error("the provisioning key expired at {0}")]
    Expired(DateTime<Utc>),
    /// Every use taken.
    #[error("the provisioning key has registered its {0} devices")]
    Exhausted(u32),
    /// The device names another model than the key allows.
    #[error("the provisioning key registers only devices of model {allowed:?}, not {asked:?}")]
    WrongModel {
        /// The key's model.
        allowed: String,
        /// The device's.
        asked: String,
    },
    /// No claim of that device to release.
    #[error("no claim of device {0} to release")]
    NoSuchClaim(String),
    /// A field out of bounds.
    #[error("{0}")]
    Invalid(String),
}

impl From<IdError> for ProvisioningError {
    fn from(error: IdError) -> Self {
        Self::Invalid(error.to_string())
    }
}

impl DomainEvent for ProvisioningEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ProvisioningKeyCreated { .. } => "ProvisioningKeyCreated",
            Self::ProvisioningKeyClaimed { .. } => "ProvisioningKeyClaimed",
            Self::ProvisioningClaimReleased { .. } => "ProvisioningClaimReleased",
            Self::ProvisioningKeyRevoked { .. } => "ProvisioningKeyRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

fn invalid(message: impl Into<String>) -> ProvisioningError {
    ProvisioningError::Invalid(message.into())
}

impl ProvisioningKey {
    /// Decides a command.
    pub fn decide(
        &self,
        command: ProvisioningCommand,
    ) -> Result<Vec<ProvisioningEvent>, ProvisioningError> {
        match command {
            ProvisioningCommand::Create {
                tenant,
                created_by,
                name,
                secret_hash,
                salt,
                max_uses,
                expires_at,
                model,
                tags,
                at,
            } => {
                if self.state != KeyState::Unknown {
                    return Err(ProvisioningError::AlreadyCreated);
                }
                let name = name.trim().to_string();
                if name.is_empty()
                    || name.chars().count() > 128
                    || name.chars().any(char::is_control)
                {
                    return Err(invalid(
                        "name must be 1 to 128 characters, no control characters",
                    ));
                }
                if secret_hash.len() != 64 || !secret_hash.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid("secret hash must be 64 hex digits"));
                }
                if salt.as_deref().is_some_and(|salt| {
                    salt.len() != 32 || !salt.chars().all(|c| c.is_ascii_hexdigit())
                }) {
                    return Err(invalid("salt must be 32 hex digits"));
                }
                if max_uses.is_some_and(|uses| !(1..=MAX_USES).contains(&uses)) {
                    return Err(invalid(format!("max_uses must be 1 to {MAX_USES}")));
                }
                if expires_at.is_some_and(|expires_at| expires_at <= at) {
                    return Err(invalid("expires_at must lie in the future"));
                }
                if let Some(model) = &model {
                    validate_token("model", model)?;
                }
                let mut tags = tags;
                tags.sort();
                tags.dedup();
                if tags.len() > MAX_TAGS
                    || tags.iter().any(|tag| {
                        tag.is_empty()
                            || tag.chars().count() > 64
                            || tag.chars().any(char::is_control)
                    })
                {
                    return Err(invalid(format!(
                        "at most {MAX_TAGS} tags of 1 to 64 characters, no control characters"
                    )));
                }
                Ok(vec![ProvisioningEvent::ProvisioningKeyCreated {
                    tenant,
                    created_by,
                    name,
                    secret_hash: secret_hash.to_ascii_lowercase(),
                    salt: salt.map(|salt| salt.to_ascii_lowercase()),
                    max_uses,
                    expires_at,
                    model,
                    tags,
                    at,
                }])
            }
            ProvisioningCommand::Claim {
                device_id,
                model,
                at,
            } => {
                self.ensure_takes_claims(at)?;
                if let (Some(allowed), Some(asked)) = (&self.model, &model) {
                    if allowed != asked {
                        return Err(ProvisioningError::WrongModel {
                            allowed: allowed.clone(),
                            asked: asked.clone(),
                        });
                    }
                }
                let uses = self
                    .uses
                    .checked_add(1)
                    .ok_or(ProvisioningError::Exhausted(u32::MAX))?;
                Ok(vec![ProvisioningEvent::ProvisioningKeyClaimed {
                    device_id,
                    uses,
                    at,
                }])
            }
            ProvisioningCommand::ReleaseClaim {
                device_id,
                reason,
                at,
            } => {
                if self.state == KeyState::Unknown {
                    return Err(ProvisioningError::Unknown);
                }
                if self.uses == 0 {
                    return Err(ProvisioningError::NoSuchClaim(device_id.to_string()));
                }
                if !crate::is_valid_reason(&reason) {
                    return Err(invalid("reason must be 1 to 512 characters"));
                }
                Ok(vec![ProvisioningEvent::ProvisioningClaimReleased {
                    device_id,
                    reason,
                    at,
                }])
            }
            ProvisioningCommand::Revoke { reason, at } => {
                match self.state {
                    KeyState::Unknown => return Err(ProvisioningError::Unknown),
                    KeyState::Revoked => return Err(ProvisioningError::Revoked),
                    KeyState::Active => {}
                }
                if !crate::is_valid_reason(&reason) {
                    return Err(invalid("reason must be 1 to 512 characters"));
                }
                Ok(vec![ProvisioningEvent::ProvisioningKeyRevoked {
                    reason,
                    at,
                }])
            }
        }
    }

    /// Whether a claim at `at` would be taken, and why not.
    pub fn ensure_takes_claims(&self, at: DateTime<Utc>) -> Result<(), ProvisioningError> {
        match self.state {
            KeyState::Unknown => return Err(ProvisioningError::Unknown),
            KeyState::Revoked => return Err(ProvisioningError::Revoked),
            KeyState::Active => {}
        }
        if let Some(expires_at) = self.expires_at {
            if at >= expires_at {
                return Err(ProvisioningError::Expired(expires_at));
            }
        }
        if let Some(max_uses) = self.max_uses {
            if self.uses >= max_uses {
                return Err(ProvisioningError::Exhausted(max_uses));
            }
        }
        Ok(())
    }

    /// Applies an event.
    pub fn evolve(&mut self, event: ProvisioningEvent) {
        match event {
            ProvisioningEvent::ProvisioningKeyCreated {
                tenant,
                created_by,
                name,
                secret_hash,
                salt,
                max_uses,
                expires_at,
                model,
                tags,
                ..
            } => {
                self.state = KeyState::Active;
                self.salt = salt;
                self.tenant = Some(tenant);
                self.created_by = Some(created_by);
                self.name = name;
                self.secret_hash = secret_hash;
                self.max_uses = max_uses;
                self.expires_at = expires_at;
                self.model = model;
                self.tags = tags;
            }
            ProvisioningEvent::ProvisioningKeyClaimed { uses, .. } => self.uses = uses,
            ProvisioningEvent::ProvisioningClaimReleased { .. } => {
                self.uses = self.uses.saturating_sub(1);
            }
            ProvisioningEvent::ProvisioningKeyRevoked { .. } => self.state = KeyState::Revoked,
        }
    }
}

crate::aggregate!(
    ProvisioningKey,
    "provisioning_key",
    ProvisioningCommand,
    ProvisioningEvent,
    ProvisioningError
);

impl crate::TenantScoped for ProvisioningKey {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<ProvisioningKey>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .into()
    }

    fn created(max_uses: Option<u32>, model: Option<&str>) -> ProvisioningEvent {
        ProvisioningEvent::ProvisioningKeyCreated {
            tenant: TenantId::parse("acme").unwrap(),
            created_by: UserId::parse("u-otto").unwrap(),
            name: "line 3".into(),
            secret_hash: "ab".repeat(32),
            salt: None,
            max_uses,
            expires_at: Some(at() + Duration::days(1)),
            model: model.map(str::to_string),
            tags: vec!["factory".into()],
            at: at(),
        }
    }

    fn claim(device: &str, model: Option<&str>, when: DateTime<Utc>) -> ProvisioningCommand {
        ProvisioningCommand::Claim {
            device_id: DeviceId::parse(device).unwrap(),
            model: model.map(str::to_string),
            at: when,
        }
    }

    fn claimed(device: &str, uses: u32) -> ProvisioningEvent {
        ProvisioningEvent::ProvisioningKeyClaimed {
            device_id: DeviceId::parse(device).unwrap(),
            uses,
            at: at(),
        }
    }

    #[test]
    fn a_key_registers_devices_within_its_uses_expiry_and_model() {
        Given::with(())
            .given(vec![created(Some(2), Some("thermo"))])
            .when(claim("d1", Some("thermo"), at()))
            .then_expect_events(vec![claimed("d1", 1)]);
        Given::with(())
            .given(vec![
                created(Some(2), Some("thermo")),
                claimed("d1", 1),
                claimed("d2", 2),
            ])
            .when(claim("d3", None, at()))
            .then_expect_error(ProvisioningError::Exhausted(2));
        Given::with(())
            .given(vec![created(None, None)])
            .when(claim("d1", None, at() + Duration::days(1)))
            .then_expect_error(ProvisioningError::Expired(at() + Duration::days(1)));
        Given::with(())
            .given(vec![created(None, Some("thermo"))])
            .when(claim("d1", Some("hygro"), at()))
            .then_expect_error(ProvisioningError::WrongModel {
                allowed: "thermo".into(),
                asked: "hygro".into(),
            });
        Given::with(())
            .given(vec![])
            .when(claim("d1", None, at()))
            .then_expect_error(ProvisioningError::Unknown);
    }

    #[test]
    fn a_revoked_key_takes_no_claim_and_a_released_claim_frees_a_use() {
        let revoked = ProvisioningEvent::ProvisioningKeyRevoked {
            reason: "leaked".into(),
            at: at(),
        };
        Given::with(())
            .given(vec![created(None, None), revoked.clone()])
            .when(claim("d1", None, at()))
            .then_expect_error(ProvisioningError::Revoked);
        Given::with(())
            .given(vec![created(None, None), revoked])
            .when(ProvisioningCommand::Revoke {
                reason: "again".into(),
                at: at(),
            })
            .then_expect_error(ProvisioningError::Revoked);
        let released = ProvisioningEvent::ProvisioningClaimReleased {
            device_id: DeviceId::parse("d1").unwrap(),
            reason: "id taken".into(),
            at: at(),
        };
        Given::with(())
            .given(vec![created(Some(1), None), claimed("d1", 1), released])
            .when(claim("d2", None, at()))
            .then_expect_events(vec![claimed("d2", 1)]);
    }

    #[test]
    fn keys_are_made_within_bounds() {
        let create = |max_uses: Option<u32>, expires_at: Option<DateTime<Utc>>, name: &str| {
            ProvisioningCommand::Create {
                tenant: TenantId::parse("acme").unwrap(),
                created_by: UserId::parse("u-otto").unwrap(),
                name: name.into(),
                secret_hash: "ab".repeat(32),
                salt: None,
                max_uses,
                expires_at,
                model: None,
                tags: vec![],
                at: at(),
            }
        };
        for (command, why) in [
            (create(Some(0), None, "k"), "max_uses"),
            (create(Some(MAX_USES + 1), None, "k"), "max_uses"),
            (create(None, Some(at()), "k"), "future"),
            (create(None, Some(at() - Duration::days(1)), "k"), "future"),
            (create(None, None, ""), "name"),
            (create(None, None, &"n".repeat(129)), "name"),
        ] {
            let error = ProvisioningKey::default().decide(command).unwrap_err();
            assert!(error.to_string().contains(why), "{error}");
        }
        assert!(ProvisioningKey::default()
            .decide(create(Some(MAX_USES), None, "line 3"))
            .is_ok());
    }
}
