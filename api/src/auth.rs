//! Authentication: access tokens (JWT, HS256), refresh tokens, and the `Caller` extractor.
//!
//! Access tokens are short-lived and checked by signature and expiry alone, so a disabled user
//! or a revoked session keeps access for at most the access-token lifetime (default 5 minutes).
//! Refresh tokens are opaque: `{user_id}.{session_id}.{secret}`; the User aggregate keeps only
//! the SHA-256 of the secret and rotates it at every refresh. Presenting a rotated (old) token
//! again revokes the whole session.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use fleetlog_commands::credentials::DeviceCredentialKey;
use fleetlog_domain::user::Role;
use fleetlog_domain::{SessionId, TenantId, UserId};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::AppState;

/// Token settings and keys. Built once at start-up.
pub struct Auth {
    /// Derives the secrets devices are issued (`FLEETLOG_DEVICE_CREDENTIAL_KEY`).
    pub device_key: DeviceCredentialKey,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// How long an access token is valid.
    pub access_ttl: Duration,
    /// How long a refresh token is valid.
    pub refresh_ttl: Duration,
}

impl Auth {
    /// Keys from the shared secret (`FLEETLOG_JWT_SECRET`) and the device credential key.
    pub fn new(
        secret: &SecretString,
        device_key: DeviceCredentialKey,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Arc<Self> {
        let secret = secret.expose_secret().as_bytes();
        // Only HS256: a token naming any other algorithm, `none` included, is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        Arc::new(Self {
            device_key,
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl,
            refresh_ttl,
        })
    }

    /// Signs an access token for `caller`.
    pub fn access_token(&self, caller: &Caller, now: DateTime<Utc>) -> Result<String, ApiError> {
        let claims = Claims {
            sub: caller.user_id.to_string(),
            tenant: caller.tenant.to_string(),
            roles: caller.roles.clone(),
            sid: caller.session_id.to_string(),
            iat: now.timestamp(),
            exp: now.timestamp() + self.access_ttl.as_secs() as i64,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|error| ApiError::Internal(Box::new(error)))
    }

    /// Checks an access token's signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|error| ApiError::Unauthorized(format!("invalid access token: {error}")))?;
        let claims = data.claims;
        let invalid = |_| ApiError::Unauthorized("invalid access token: malformed claims".into());
        Ok(Caller {
            user_id: UserId::parse(claims.sub).map_err(invalid)?,
            tenant: TenantId::parse(claims.tenant).map_err(invalid)?,
            session_id: SessionId::parse(claims.sid).map_err(invalid)?,
            roles: claims.roles,
            expires_at: DateTime::from_timestamp(claims.exp, 0),
        })
    }
}

/// The JWT claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    tenant: String,
    roles: Vec<Role>,
    sid: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// Who is calling: from a verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user_id: UserId,
    /// The user's tenant: every read and write of the request is confined to it.
    pub tenant: TenantId,
    /// The login session the token belongs to.
    pub session_id: SessionId,
    /// The user's roles when the token was issued.
    pub roles: Vec<Role>,
    /// When the access token the caller presented expires; `None` for a caller made in the
    /// process (to mint a token). Live streams end then.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Caller {
    /// Fails with 403 unless the caller holds one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| roles.contains(r)) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// The actor recorded on the events this caller causes.
    pub fn actor(&self) -> String {
        format!("user:{}", self.user_id)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("Authorization must be `Bearer <token>`".into())
            })?;
        state.auth.verify(token.trim())
    }
}

/// An opaque refresh token: `{user_id}.{session_id}.{secret}`.
pub struct RefreshToken {
    /// The user.
    pub user_id: UserId,
    /// The session.
    pub session_id: SessionId,
    /// The secret part; only its hash is stored.
    pub secret: SecretString,
}

impl RefreshToken {
    /// A new token for a session.
    pub fn issue(user_id: UserId, session_id: SessionId) -> Self {
        Self {
            user_id,
            session_id,
            secret: fleetlog_commands::credentials::random_token(),
        }
    }

    /// Reads a token a client presents.
    pub fn parse(token: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::Unauthorized("invalid refresh token".into());
        let mut parts = token.splitn(3, '.');
        let (Some(user), Some(session), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        Ok(Self {
            user_id: UserId::parse(user).map_err(|_| invalid())?,
            session_id: SessionId::parse(session).map_err(|_| invalid())?,
            secret: SecretString::from(secret),
        })
    }

    /// The SHA-256 of the secret: what the User aggregate keeps.
    pub fn hash(&self) -> String {
        fleetlog_commands::credentials::sha256_hex(self.secret.expose_secret().as_bytes())
    }

    /// The token as handed to the client.
    pub fn reveal(&self) -> String {
        format!(
            "{}.{}.{}",
            self.user_id,
            self.session_id,
            self.secret.expose_secret()
        )
    }
}
