//! The User aggregate: a person or service account of one tenant, its roles, its password hash
//! and its login sessions (refresh-token families).
//!
//! Secrets never reach this aggregate: the caller hashes the password (argon2) and the refresh
//! tokens (SHA-256) and passes only the hashes, which are all that events keep.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::ids::{SessionId, TenantId, UserId};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in the tenant, users included.
    Admin,
    /// Devices, commands, firmware and rollouts.
    Operator,
    /// Reads only.
    Viewer,
}

impl Role {
    /// The role's name as used in tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of admin, operator, viewer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected admin, operator or viewer")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "admin" => Ok(Self::Admin),
            "operator" => Ok(Self::Operator),
            "viewer" => Ok(Self::Viewer),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// An open login session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// SHA-256 hex of the session's current refresh token.
    pub refresh_token_hash: String,
    /// When the refresh token stops working.
    pub expires_at: DateTime<Utc>,
    /// SHA-256 hex of the session's latest [`REMEMBERED_ROTATED_TOKENS`] refresh tokens that
    /// were exchanged already: presenting one of these again is reuse of a real, copied token
    /// (and revokes the session). Any other token is merely invalid, so nobody can end a
    /// victim's session by guessing the token's format.
    #[serde(default)]
    pub rotated_token_hashes: Vec<String>,
}

/// How many exchanged refresh tokens a session remembers, to recognise their reuse.
pub const REMEMBERED_ROTATED_TOKENS: usize = 64;

/// The User aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Its id.
    pub id: Option<UserId>,
    /// Its tenant.
    pub tenant: Option<TenantId>,
    /// Its login name.
    pub username: String,
    /// The password hash (PHC string).
    pub password_hash: String,
    /// Its roles, sorted.
    pub roles: Vec<Role>,
    /// Whether it was disabled.
    pub disabled: bool,
    /// Open sessions.
    pub sessions: BTreeMap<SessionId, Session>,
}

/// A request to the User aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserCommand {
    /// Create the user. The aggregate id must be `UserId::for_username(tenant, username)`.
    Register {
        /// Its tenant.
        tenant: TenantId,
        /// Its login name.
        username: String,
        /// The password hash computed by the caller.
        password_hash: String,
        /// Its roles (at least one).
        roles: Vec<Role>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Replace the password; every session is revoked.
    ChangePassword {
        /// The new hash.
        password_hash: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Add a role.
    GrantRole {
        /// The role.
        role: Role,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Remove a role; the last one cannot be removed.
    RevokeRole {
        /// The role.
        role: Role,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Let a disabled user log in again (a user already enabled: nothing happens).
    Enable {
        /// Now.
        at: DateTime<Utc>,
    },
    /// Lock the user out until enabled again; every session is revoked.
    Disable {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Open a session after a successful login.
    OpenSession {
        /// Its id.
        session_id: SessionId,
        /// SHA-256 hex of the refresh token handed out.
        refresh_token_hash: String,
        /// When the refresh token expires.
        expires_at: DateTime<Utc>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Exchange a session's refresh token for a new one.
    RotateSession {
        /// The session.
        session_id: SessionId,
        /// SHA-256 hex of the token presented.
        presented_token_hash: String,
        /// SHA-256 hex of the new token.
        new_refresh_token_hash: String,
        /// When the new token expires.
        expires_at: DateTime<Utc>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// End a session (logout, or a refresh token presented twice).
    RevokeSession {
        /// The session.
        session_id: SessionId,
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
}

/// A fact about a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    /// The user was created.
    UserRegistered {
        /// Its id.
        user_id: UserId,
        /// Its tenant.
        tenant: TenantId,
        /// Its login name.
        username: String,
        /// Its password hash.
        #[serde(default)]
        password_hash: String,
        /// Its roles.
        roles: Vec<Role>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The password changed and these sessions ended with it.
    PasswordChanged {
        /// The new hash.
        #[serde(default)]
        password_hash: String,
        /// Sessions revoked by the change.
        revoked_sessions: Vec<SessionId>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A role was added.
    RoleGranted {
        /// The role.
        role: Role,
        /// When.
        at: DateTime<Utc>,
    },
    /// A role was removed.
    RoleRevoked {
        /// The role.
        role: Role,
        /// When.
        at: DateTime<Utc>,
    },
    /// A disabled user may log in again.
    UserEnabled {
        /// When.
        at: DateTime<Utc>,
    },
    /// The user was locked out; these sessions ended with it.
    UserDisabled {
        /// Why.
        reason: String,
        /// Sessions revoked.
        revoked_sessions: Vec<SessionId>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A session began.
    SessionOpened {
        /// Its id.
        session_id: SessionId,
        /// SHA-256 hex of the refresh token.
        #[serde(default)]
        refresh_token_hash: String,
        /// When the token expires.
        expires_at: DateTime<Utc>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A session's refresh token was exchanged.
    SessionRotated {
        /// The session.
        session_id: SessionId,
        /// SHA-256 hex of the new token.
        #[serde(default)]
        refresh_token_hash: String,
        /// When the new token expires.
        expires_at: DateTime<Utc>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A session ended.
    SessionRevoked {
        /// The session.
        session_id: SessionId,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "UserRegistered",
            Self::PasswordChanged { .. } => "PasswordChanged",
            Self::RoleGranted { .. } => "RoleGranted",
            Self::RoleRevoked { .. } => "RoleRevoked",
            Self::UserDisabled { .. } => "UserDisabled",
            Self::UserEnabled { .. } => "UserEnabled",
            Self::SessionOpened { .. } => "SessionOpened",
            Self::SessionRotated { .. } => "SessionRotated",
            Self::SessionRevoked { .. } => "SessionRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

/// Why the User aggregate refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// The command needs a registered user.
    #[error("user does not exist")]
    NotRegistered,
    /// The username is taken in this tenant.
    #[error("username is already taken")]
    AlreadyRegistered,
    /// The user is disabled.
    #[error("user is disabled")]
    Disabled,
    /// A username outside `[A-Za-z0-9_.@-]{3,64}`.
    #[error("username must be 3 to 64 characters of letters, digits, '_', '.', '@' and '-'")]
    InvalidUsername,
    /// An empty or overlong password hash.
    #[error("password hash must be 1 to 512 characters")]
    InvalidPasswordHash,
    /// Registration without a role.
    #[error("a user needs at least one role")]
    NoRole,
    /// Removing a role the user does not hold.
    #[error("user does not hold role {0}")]
    RoleNotHeld(Role),
    /// Removing the last role.
    #[error("cannot remove the user's last role")]
    LastRole,
    /// An empty or overlong reason.
    #[error("reason must be 1 to 512 characters")]
    InvalidReason,
    /// A refresh-token hash that is not 64 hex digits.
    #[error("refresh-token hash must be a SHA-256 digest in 64 hex digits")]
    InvalidTokenHash,
    /// A session id in use.
    #[error("session {0} already exists")]
    DuplicateSession(SessionId),
    /// A session that does not exist or has ended.
    #[error("session {0} does not exist or has ended")]
    UnknownSession(SessionId),
    /// A session whose refresh token expired.
    #[error("session {0} has expired")]
    SessionExpired(SessionId),
    /// A refresh token that was never the session's.
    #[error("refresh token does not match session {0}")]
    RefreshTokenMismatch(SessionId),
    /// A refresh token of the session that was exchanged already: presented again, it was
    /// copied.
    #[error("refresh token of session {0} was already exchanged")]
    RefreshTokenReused(SessionId),
    /// A session that would expire before it opens.
    #[error("a session must expire after it opens")]
    ExpiryNotAfterOpen,
}

crate::aggregate!(User, "user", UserCommand, UserEvent, UserError);

impl User {
    /// Folds one event into the state.
    pub fn evolve(&mut self, event: <Self as cqrs_es::Aggregate>::Event) {
        match event {
            UserEvent::UserRegistered {
                user_id,
                tenant,
                username,
                password_hash,
                roles,
                ..
            } => {
                self.id = Some(user_id);
                self.tenant = Some(tenant);
                self.username = username;
                self.password_hash = password_hash;
                self.roles = roles;
            }
            UserEvent::PasswordChanged {
                password_hash,
                revoked_sessions,
                ..
            } => {
                self.password_hash = password_hash;
                for session in revoked_sessions {
                    self.sessions.remove(&session);
                }
            }
            UserEvent::RoleGranted { role, .. } => {
                self.roles.push(role);
                self.roles.sort();
            }
            UserEvent::RoleRevoked { role, .. } => self.roles.retain(|r| *r != role),
            UserEvent::UserEnabled { .. } => self.disabled = false,
            UserEvent::UserDisabled {
                revoked_sessions, ..
            } => {
                self.disabled = true;
                for session in revoked_sessions {
                    self.sessions.remove(&session);
                }
            }
            UserEvent::SessionOpened {
                session_id,
                refresh_token_hash,
                expires_at,
                at,
            } => {
                // Expired sessions can never be used again; forget them as new ones open.
                self.sessions.retain(|_, session| session.expires_at > at);
                self.sessions.insert(
                    session_id,
                    Session {
                        refresh_token_hash,
                        expires_at,
                        rotated_token_hashes: Vec::new(),
                    },
                );
            }
            UserEvent::SessionRotated {
                session_id,
                refresh_token_hash,
                expires_at,
                ..
            } => {
                let mut rotated = Vec::new();
                if let Some(previous) = self.sessions.remove(&session_id) {
                    rotated = previous.rotated_token_hashes;
                    rotated.push(previous.refresh_token_hash);
                    let excess = rotated.len().saturating_sub(REMEMBERED_ROTATED_TOKENS);
                    rotated.drain(..excess);
                }
                self.sessions.insert(
                    session_id,
                    Session {
                        refresh_token_hash,
                        expires_at,
                        rotated_token_hashes: rotated,
                    },
                );
            }
            UserEvent::SessionRevoked { session_id, .. } => {
                self.sessions.remove(&session_id);
            }
        }
    }

    /// Whether the user holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        if let UserCommand::Register {
            tenant,
            username,
            password_hash,
            roles,
            at,
        } = command
        {
            if self.id.is_some() {
                return Err(UserError::AlreadyRegistered);
            }
            validate_username(&username)?;
            validate_password_hash(&password_hash)?;
            let mut roles = roles;
            roles.sort();
            roles.dedup();
            if roles.is_empty() {
                return Err(UserError::NoRole);
            }
            return Ok(vec![UserEvent::UserRegistered {
                user_id: UserId::for_username(&tenant, &username),
                tenant,
                username,
                password_hash,
                roles,
                at,
            }]);
        }
        if self.id.is_none() {
            return Err(UserError::NotRegistered);
        }
        if let UserCommand::Enable { at } = command {
            return Ok(if self.disabled {
                vec![UserEvent::UserEnabled { at }]
            } else {
                vec![]
            });
        }
        if self.disabled {
            return Err(UserError::Disabled);
        }
        match command {
            UserCommand::Enable { .. } => unreachable!("handled above"),
            UserCommand::Register { .. } => unreachable!("handled above"),
            UserCommand::ChangePassword { password_hash, at } => {
                validate_password_hash(&password_hash)?;
                Ok(vec![UserEvent::PasswordChanged {
                    password_hash,
                    revoked_sessions: self.sessions.keys().cloned().collect(),
                    at,
                }])
            }
            UserCommand::GrantRole { role, at } => {
                if self.has_role(role) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::RoleGranted { role, at }])
            }
            UserCommand::RevokeRole { role, at } => {
                if !self.has_role(role) {
                    return Err(UserError::RoleNotHeld(role));
                }
                if self.roles.len() == 1 {
                    return Err(UserError::LastRole);
                }
                Ok(vec![UserEvent::RoleRevoked { role, at }])
            }
            UserCommand::Disable { reason, at } => {
                validate_reason(&reason)?;
                Ok(vec![UserEvent::UserDisabled {
                    reason,
                    revoked_sessions: self.sessions.keys().cloned().collect(),
                    at,
                }])
            }
            UserCommand::OpenSession {
                session_id,
                refresh_token_hash,
                expires_at,
                at,
            } => {
                validate_token_hash(&refresh_token_hash)?;
                if self.sessions.contains_key(&session_id) {
                    return Err(UserError::DuplicateSession(session_id));
                }
                if expires_at <= at {
                    return Err(UserError::ExpiryNotAfterOpen);
                }
                Ok(vec![UserEvent::SessionOpened {
                    session_id,
                    refresh_token_hash,
                    expires_at,
                    at,
                }])
            }
            UserCommand::RotateSession {
                session_id,
                presented_token_hash,
                new_refresh_token_hash,
                expires_at,
                at,
            } => {
                validate_token_hash(&new_refresh_token_hash)?;
                let session = self
                    .sessions
                    .get(&session_id)
                    .ok_or_else(|| UserError::UnknownSession(session_id.clone()))?;
                if session.expires_at <= at {
                    return Err(UserError::SessionExpired(session_id));
                }
                if session.refresh_token_hash != presented_token_hash {
                    if session.rotated_token_hashes.contains(&presented_token_hash) {
                        return Err(UserError::RefreshTokenReused(session_id));
                    }
                    return Err(UserError::RefreshTokenMismatch(session_id));
                }
                if expires_at <= at {
                    return Err(UserError::ExpiryNotAfterOpen);
                }
                Ok(vec![UserEvent::SessionRotated {
                    session_id,
                    refresh_token_hash: new_refresh_token_hash,
                    expires_at,
                    at,
                }])
            }
            UserCommand::RevokeSession {
                session_id,
                reason,
                at,
            } => {
                validate_reason(&reason)?;
                if !self.sessions.contains_key(&session_id) {
                    return Err(UserError::UnknownSession(session_id));
                }
                Ok(vec![UserEvent::SessionRevoked {
                    session_id,
                    reason,
                    at,
                }])
            }
        }
    }
}

/// Checks a username against `[A-Za-z0-9_.@-]{3,64}`.
pub fn validate_username(username: &str) -> Result<(), UserError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-');
    if (3..=64).contains(&username.len()) && username.chars().all(allowed) {
        Ok(())
    } else {
        Err(UserError::InvalidUsername)
    }
}

fn validate_password_hash(hash: &str) -> Result<(), UserError> {
    if hash.is_empty() || hash.len() > 512 {
        return Err(UserError::InvalidPasswordHash);
    }
    Ok(())
}

fn validate_token_hash(hash: &str) -> Result<(), UserError> {
    if hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(UserError::InvalidTokenHash)
    }
}

fn validate_reason(reason: &str) -> Result<(), UserError> {
    if crate::is_valid_reason(reason) {
        Ok(())
    } else {
        Err(UserError::InvalidReason)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    use super::*;

    type Given = TestFramework<User>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .into()
    }

    fn tenant() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    fn session() -> SessionId {
        SessionId::parse("s1").unwrap()
    }

    fn hash(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: UserId::for_username(&tenant(), "alice"),
            tenant: tenant(),
            username: "alice".into(),
            password_hash: "$argon2id$v=19$...".into(),
            roles: vec![Role::Admin, Role::Viewer],
            at: at(),
        }
    }

    fn opened() -> UserEvent {
        UserEvent::SessionOpened {
            session_id: session(),
            refresh_token_hash: hash('a'),
            expires_at: at() + Duration::days(30),
            at: at(),
        }
    }

    #[test]
    fn registers_with_sorted_unique_roles() {
        Given::with(())
            .given_no_previous_events()
            .when(UserCommand::Register {
                tenant: tenant(),
                username: "alice".into(),
                password_hash: "$argon2id$v=19$...".into(),
                roles: vec![Role::Viewer, Role::Admin, Role::Viewer],
                at: at(),
            })
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn refuses_bad_registrations() {
        let register = |username: &str, roles: Vec<Role>| UserCommand::Register {
            tenant: tenant(),
            username: username.into(),
            password_hash: "h".into(),
            roles,
            at: at(),
        };
        Given::with(())
            .given(vec![registered()])
            .when(register("alice", vec![Role::Admin]))
            .then_expect_error(UserError::AlreadyRegistered);
        Given::with(())
            .given_no_previous_events()
            .when(register("a b", vec![Role::Admin]))
            .then_expect_error(UserError::InvalidUsername);
        Given::with(())
            .given_no_previous_events()
            .when(register("alice", vec![]))
            .then_expect_error(UserError::NoRole);
        Given::with(())
            .given_no_previous_events()
            .when(UserCommand::GrantRole {
                role: Role::Admin,
                at: at(),
            })
            .then_expect_error(UserError::NotRegistered);
    }

    #[test]
    fn password_change_revokes_sessions() {
        Given::with(())
            .given(vec![registered(), opened()])
            .when(UserCommand::ChangePassword {
                password_hash: "new".into(),
                at: at(),
            })
            .then_expect_events(vec![UserEvent::PasswordChanged {
                password_hash: "new".into(),
                revoked_sessions: vec![session()],
                at: at(),
            }]);
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::ChangePassword {
                password_hash: "".into(),
                at: at(),
            })
            .then_expect_error(UserError::InvalidPasswordHash);
    }

    #[test]
    fn roles_are_granted_once_and_the_last_one_stays() {
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantRole {
                role: Role::Operator,
                at: at(),
            })
            .then_expect_events(vec![UserEvent::RoleGranted {
                role: Role::Operator,
                at: at(),
            }]);
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantRole {
                role: Role::Admin,
                at: at(),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeRole {
                role: Role::Viewer,
                at: at(),
            })
            .then_expect_events(vec![UserEvent::RoleRevoked {
                role: Role::Viewer,
                at: at(),
            }]);
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeRole {
                role: Role::Operator,
                at: at(),
            })
            .then_expect_error(UserError::RoleNotHeld(Role::Operator));
        Given::with(())
            .given(vec![
                registered(),
                UserEvent::RoleRevoked {
                    role: Role::Viewer,
                    at: at(),
                },
            ])
            .when(UserCommand::RevokeRole {
                role: Role::Admin,
                at: at(),
            })
            .then_expect_error(UserError::LastRole);
    }

    #[test]
    fn a_disabled_user_can_be_enabled_again_and_only_then() {
        let disabled = UserEvent::UserDisabled {
            reason: "left".into(),
            revoked_sessions: vec![],
            at: at(),
        };
        Given::with(())
            .given(vec![registered(), disabled.clone()])
            .when(UserCommand::Enable { at: at() })
            .then_expect_events(vec![UserEvent::UserEnabled { at: at() }]);
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::Enable { at: at() })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![
                registered(),
                disabled,
                UserEvent::UserEnabled { at: at() },
            ])
            .when(UserCommand::GrantRole {
                role: Role::Operator,
                at: at(),
            })
            .then_expect_events(vec![UserEvent::RoleGranted {
                role: Role::Operator,
                at: at(),
            }]);
        Given::with(())
            .given_no_previous_events()
            .when(UserCommand::Enable { at: at() })
            .then_expect_error(UserError::NotRegistered);
    }

    #[test]
    fn a_disabled_user_refuses_everything() {
        let disabled = UserEvent::UserDisabled {
            reason: "left".into(),
            revoked_sessions: vec![session()],
            at: at(),
        };
        Given::with(())
            .given(vec![registered(), opened()])
            .when(UserCommand::Disable {
                reason: "left".into(),
                at: at(),
            })
            .then_expect_events(vec![disabled.clone()]);
        Given::with(())
            .given(vec![registered(), disabled])
            .when(UserCommand::GrantRole {
                role: Role::Operator,
                at: at(),
            })
            .then_expect_error(UserError::Disabled);
    }

    #[test]
    fn sessions_open_rotate_and_revoke() {
        Given::with(())
            .given(vec![registered()])
            .when(UserCommand::OpenSession {
                session_id: session(),
                refresh_token_hash: hash('a'),
                expires_at: at() + Duration::days(30),
                at: at(),
            })
            .then_expect_events(vec![opened()]);
        Given::with(())
            .given(vec![registered(), opened()])
            .when(UserCommand::OpenSession {
                session_id: session(),
                refresh_token_hash: hash('b'),
                expires_at: at() + Duration::days(30),
                at: at(),
            })
            .then_expect_error(UserError::DuplicateSession(session()));
        let rotate = |presented: char, now: DateTime<Utc>| UserCommand::RotateSession {
            session_id: session(),
            presented_token_hash: hash(presented),
            new_refresh_token_hash: hash('c'),
            expires_at: now + Duration::days(30),
            at: now,
        };
        Given::with(())
            .given(vec![registered(), opened()])
            .when(rotate('a', at()))
            .then_expect_events(vec![UserEvent::SessionRotated {
                session_id: session(),
                refresh_token_hash: hash('c'),
                expires_at: at() + Duration::days(30),
                at: at(),
            }]);
        Given::with(())
            .given(vec![registered(), opened()])
            .when(rotate('b', at()))
            .then_expect_error(UserError::RefreshTokenMismatch(session()));
        // Once exchanged, the first token presented again is reuse; a made-up one is not.
        let rotated = UserEvent::SessionRotated {
            session_id: session(),
            refresh_token_hash: hash('c'),
            expires_at: at() + Duration::days(30),
            at: at(),
        };
        Given::with(())
            .given(vec![registered(), opened(), rotated.clone()])
            .when(rotate('a', at()))
            .then_expect_error(UserError::RefreshTokenReused(session()));
        Given::with(())
            .given(vec![registered(), opened(), rotated])
            .when(rotate('b', at()))
            .then_expect_error(UserError::RefreshTokenMismatch(session()));
        Given::with(())
            .given(vec![registered(), opened()])
            .when(rotate('a', at() + Duration::days(31)))
            .then_expect_error(UserError::SessionExpired(session()));
        let revoked = UserEvent::SessionRevoked {
            session_id: session(),
            reason: "logout".into(),
            at: at(),
        };
        Given::with(())
            .given(vec![registered(), opened()])
            .when(UserCommand::RevokeSession {
                session_id: session(),
                reason: "logout".into(),
                at: at(),
            })
            .then_expect_events(vec![revoked.clone()]);
        Given::with(())
            .given(vec![registered(), opened(), revoked])
            .when(rotate('a', at()))
            .then_expect_error(UserError::UnknownSession(session()));
    }

    #[test]
    fn roles_parse_from_their_names() {
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!("root".parse::<Role>().is_err());
    }
}
