//! Identifiers. Every id that names an aggregate or travels in an MQTT topic or a NATS subject is
//! restricted to `[A-Za-z0-9_-]{1,64}`, so it is a valid subject token and needs no escaping.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id was expected.
        kind: &'static str,
    },
    /// The string is longer than 64 characters.
    #[error("{kind} must be at most 64 characters, got {len}")]
    TooLong {
        /// Which kind of id was expected.
        kind: &'static str,
        /// The length that was given.
        len: usize,
    },
    /// The string holds a character outside `[A-Za-z0-9_-]`.
    #[error("{kind} may only contain letters, digits, '_' and '-', found {found:?}")]
    InvalidCharacter {
        /// Which kind of id was expected.
        kind: &'static str,
        /// The first offending character.
        found: char,
    },
}

/// Checks `value` against `[A-Za-z0-9_-]{1,64}`.
pub fn validate_token(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > 64 {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
        });
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(found) => Err(IdError::InvalidCharacter { kind, found }),
        None => Ok(()),
    }
}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an id.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_token($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::parse(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

token_id!(
    /// A device's id, chosen by its owner at registration.
    DeviceId,
    "device id"
);
token_id!(
    /// A tenant: every aggregate and every read belongs to exactly one.
    TenantId,
    "tenant id"
);
token_id!(
    /// A rollout's id.
    RolloutId,
    "rollout id"
);
token_id!(
    /// A provisioning key's id.
    ProvisioningKeyId,
    "provisioning key id"
);
token_id!(
    /// A command sent to a device; the device echoes it in its reply topic.
    CommandId,
    "command id"
);
token_id!(
    /// A login session of a user (one refresh-token family).
    SessionId,
    "session id"
);
token_id!(
    /// A user's id. Derived from tenant and username by [`UserId::for_username`], so two
    /// registrations of one username meet on the same aggregate and the second is refused.
    UserId,
    "user id"
);

impl UserId {
    /// The id of the user `username` in `tenant`. Usernames compare case-insensitively.
    pub fn for_username(tenant: &TenantId, username: &str) -> Self {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(tenant.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(username.to_lowercase().as_bytes());
        let digest = hasher.finalize();
        Self(format!("u-{}", &hex::encode(digest)[..40]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_tokens() {
        assert!(DeviceId::parse("sensor-01_A").is_ok());
        assert!(DeviceId::parse("a".repeat(64)).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(
            DeviceId::parse(""),
            Err(IdError::Empty { kind: "device id" })
        );
        assert_eq!(
            DeviceId::parse("a".repeat(65)),
            Err(IdError::TooLong {
                kind: "device id",
                len: 65
            })
        );
        assert_eq!(
            DeviceId::parse("dev.1"),
            Err(IdError::InvalidCharacter {
                kind: "device id",
                found: '.'
            })
        );
        assert!(DeviceId::parse("dev 1").is_err());
        assert!(DeviceId::parse("dév").is_err());
    }

    #[test]
    fn ids_refuse_invalid_values_when_deserialized() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"not ok\"").is_err());
    }

    #[test]
    fn user_ids_are_stable_per_tenant_and_case_insensitive() {
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("other").unwrap();
        let id = UserId::for_username(&acme, "Alice");
        assert_eq!(id, UserId::for_username(&acme, "alice"));
        assert_ne!(id, UserId::for_username(&other, "alice"));
        assert!(UserId::parse(id.as_str()).is_ok());
    }
}
