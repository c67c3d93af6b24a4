//! `/api/v1/auth`: login, refresh, logout.

use std::sync::OnceLock;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Extension;
use chrono::Utc;
use fleetlog_commands::credentials::{hash_password, verify_password};
use fleetlog_commands::{CommandError, CommandMetadata};
use fleetlog_domain::user::{UserCommand, UserError};
use fleetlog_domain::{SessionId, TenantId, UserId};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, RefreshToken};
use crate::error::ApiError;
use crate::extract::Json;
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

/// The routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: String,
    #[schema(max_length = 64)]
    username: String,
    #[schema(max_length = 1024)]
    password: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

/// Tokens handed out by login and refresh.
#[derive(Serialize, utoipa::ToSchema)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    refresh_token: String,
    refresh_expires_in: u64,
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized("invalid tenant, username or password".into())
}

/// A hash to check passwords of unknown users against, so both cases take as long.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password(&SecretString::from("decoy password for timing")).unwrap_or_default()
    })
}

#[utoipa::path(
    post, path = "/login", tag = "auth", security(()),
    summary = "Log in with tenant, username and password",
    description = "Answers an access token (JWT) and a refresh token. Throttled per username and per client address (429 with Retry-After).",
    request_body = LoginRequest,
    responses((status = 200, description = "Tokens", body = TokenResponse))
)]
async fn login(
    State(state): State<AppState>,
    connection: Option<Extension<ConnectInfo<SocketAddr>>>,
    Json(request): Json<LoginRequest>,
) -> Result<axum::Json<TokenResponse>, ApiError> {
    let address = connection.map(|Extension(ConnectInfo(address))| address.ip());
    state
        .login_throttle
        .attempt(&format!("{}/{}", request.tenant, request.username), address)?;
    let tenant = TenantId::parse(request.tenant).map_err(|_| invalid_credentials())?;
    let user_id = UserId::for_username(&tenant, &request.username);
    let user = state.bus.users().current(user_id.as_str()).await?.aggregate;
    let known = user.id.is_some() && user.tenant.as_ref() == Some(&tenant);
    let hash = known.then(|| user.password_hash.clone());
    let password = SecretString::from(request.password);
    // argon2 takes tens of milliseconds of CPU (and building the decoy once, as much again):
    // keep both off the async workers.
    let matches = tokio::task::spawn_blocking(move || {
        verify_password(hash.as_deref().unwrap_or_else(|| decoy_hash()), &password)
    })
    .await
    .map_err(|error| ApiError::Internal(Box::new(error)))?;
    if !known || !matches || user.disabled {
        return Err(invalid_credentials());
    }

    let now = Utc::now();
    let session_id = SessionId::parse(uuid::Uuid::new_v4().simple().to_string())
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    let refresh = RefreshToken::issue(user_id.clone(), session_id.clone());
    let expires_at = now + chrono::Duration::from_std(state.auth.refresh_ttl).unwrap_or_default();
    let open = UserCommand::OpenSession {
        session_id: session_id.clone(),
        refresh_token_hash: refresh.hash(),
        expires_at,
        at: now,
    };
    let metadata = CommandMetadata::new(format!("user:{user_id}")).with_tenant(tenant.clone());
    state
        .bus
        .users()
        .execute(user_id.as_str(), open, &metadata)
        .await?;
    let caller = Caller {
        user_id,
        tenant,
        session_id,
        roles: user.roles,
        expires_at: None,
    };
    tokens(&state, &caller, &refresh, now)
}

#[utoipa::path(
    post, path = "/refresh", tag = "auth", security(()),
    summary = "Trade a refresh token for new tokens",
    description = "The refresh token rotates: the one presented stops working. Presenting a rotated token again revokes the whole session.",
    request_body = RefreshRequest,
    responses((status = 200, description = "Tokens", body = TokenResponse))
)]
async fn refresh(
    State(state): State<AppState>,
    Json(request): Json<RefreshRequest>,
) -> Result<axum::Json<TokenResponse>, ApiError> {
    let presented = RefreshToken::parse(&request.refresh_token)?;
    let now = Utc::now();
    let next = RefreshToken::issue(presented.user_id.clone(), presented.session_id.clone());
    let rotate = UserCommand::RotateSession {
        session_id: presented.session_id.clone(),
        presented_token_hash: presented.hash(),
        new_refresh_token_hash: next.hash(),
        expires_at: now + chrono::Duration::from_std(state.auth.refresh_ttl).unwrap_or_default(),
        at: now,
    };
    let users = state.bus.users();
    let metadata = CommandMetadata::new(format!("user:{}", presented.user_id));
    match users
        .execute(presented.user_id.as_str(), rotate, &metadata)
        .await
    {
        Ok(_) => {}
        Err(CommandError::Refused(UserError::RefreshTokenReused(session_id))) => {
            // A token that was really issued and already exchanged is presented again: it
            // was copied. End the session, so neither copy works any more. A token that was
            // never issued (forged from the user and session ids) is merely invalid below.
            let revoke = UserCommand::RevokeSession {
                session_id,
                reason: "refresh token reused".into(),
                at: now,
            };
            users
                .execute(presented.user_id.as_str(), revoke, &metadata)
                .await?;
            return Err(ApiError::Unauthorized(
                "refresh token already used: the session is revoked".into(),
            ));
        }
        Err(CommandError::Refused(_)) => {
            return Err(ApiError::Unauthorized("invalid refresh token".into()))
        }
        Err(other) => return Err(other.into()),
    }
    let user = users.current(presented.user_id.as_str()).await?.aggregate;
    let tenant = user
        .tenant
        .ok_or_else(|| ApiError::Unauthorized("invalid refresh token".into()))?;
    let caller = Caller {
        user_id: presented.user_id,
        tenant,
        session_id: presented.session_id,
        roles: user.roles,
        expires_at: None,
    };
    tokens(&state, &caller, &next, now)
}

#[utoipa::path(
    post, path = "/logout", tag = "auth",
    summary = "Revoke the caller's session",
    responses((status = 204, description = "Logged out"))
)]
async fn logout(State(state): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    let revoke = UserCommand::RevokeSession {
        session_id: caller.session_id.clone(),
        reason: "logout".into(),
        at: Utc::now(),
    };
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    match state
        .bus
        .users()
        .execute(caller.user_id.as_str(), revoke, &metadata)
        .await
    {
        // Logging out twice is not an error.
        Ok(_) | Err(CommandError::Refused(UserError::UnknownSession(_))) => {
            Ok(StatusCode::NO_CONTENT)
        }
        Err(other) => Err(other.into()),
    }
}

fn tokens(
    state: &AppState,
    caller: &Caller,
    refresh: &RefreshToken,
    now: chrono::DateTime<Utc>,
) -> Result<axum::Json<TokenResponse>, ApiError> {
    Ok(axum::Json(TokenResponse {
        access_token: state.auth.access_token(caller, now)?,
        token_type: "Bearer",
        expires_in: state.auth.access_ttl.as_secs(),
        refresh_token: refresh.reveal(),
        refresh_expires_in: state.auth.refresh_ttl.as_secs(),
    }))
}
