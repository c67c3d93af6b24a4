//! `/api/v1/users`: the caller (`me`) and, for admins, the users of their tenant.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fleetlog_commands::credentials::hash_password;
use fleetlog_commands::{CommandError, CommandMetadata, Committed};
use fleetlog_domain::user::{Role, User, UserCommand, UserError};
use fleetlog_domain::UserId;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::auth::Caller;
use crate::consistency::wait_for_position;
use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

const ADMIN: &[Role] = &[Role::Admin];

/// The routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(list, create))
        .routes(routes!(grant_role))
        .routes(routes!(revoke_role))
        .routes(routes!(disable))
        .routes(routes!(enable))
}

/// The caller as the API shows it: never a secret. Roles are checked against the access
/// token, so `roles` is what this token grants; `account_roles` is what the account holds
/// now. They differ after a role was granted or revoked, until the token is refreshed (at
/// most `FLEETLOG_ACCESS_TOKEN_TTL_SECS`).
#[derive(Serialize, utoipa::ToSchema)]
struct UserView {
    user_id: String,
    tenant: String,
    username: String,
    /// The roles this access token grants.
    #[schema(value_type = Vec<String>)]
    roles: Vec<Role>,
    /// The roles the account holds now; the next token carries these.
    #[schema(value_type = Vec<String>)]
    account_roles: Vec<Role>,
    /// When this access token expires.
    token_expires_at: Option<DateTime<Utc>>,
    disabled: bool,
}

#[utoipa::path(
    get, path = "/me", tag = "users", summary = "The caller",
    responses((status = 200, description = "The caller's account", body = UserView))
)]
async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<UserView>, ApiError> {
    let user = state
        .bus
        .users()
        .current(caller.user_id.as_str())
        .await?
        .aggregate;
    if user.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("user"));
    }
    Ok(axum::Json(UserView {
        user_id: caller.user_id.to_string(),
        tenant: caller.tenant.to_string(),
        username: user.username,
        roles: caller.roles,
        account_roles: user.roles,
        token_expires_at: caller.expires_at,
        disabled: user.disabled,
    }))
}

#[derive(Serialize, FromRow, utoipa::ToSchema)]
struct UserRow {
    user_id: String,
    username: String,
    roles: Vec<String>,
    disabled: bool,
    last_login_at: Option<DateTime<Utc>>,
    registered_at: DateTime<Utc>,
    #[serde(rename = "version")]
    last_sequence: i64,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Wait until the users model has applied the event at this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/", tag = "users", summary = "The tenant's users (admin)",
    params(ListQuery),
    responses((status = 200, description = "Users", body = Vec<UserRow>))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Vec<UserRow>>, ApiError> {
    caller.require(ADMIN)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), "users", position, &caller.tenant).await?;
    }
    let users = sqlx::query_as(
        "SELECT user_id, username, roles, disabled, last_login_at, registered_at, last_sequence
           FROM users WHERE tenant = $1 ORDER BY username",
    )
    .bind(caller.tenant.as_str())
    .fetch_all(state.bus.pool())
    .await?;
    Ok(axum::Json(users))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{3,64}$")]
    username: String,
    /// At least 8 characters, at most 1,024 bytes.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    #[schema(value_type = Vec<String>)]
    roles: Vec<Role>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct UserWritten {
    user_id: String,
    version: u64,
    global_position: Option<i64>,
}

fn written(user_id: &UserId, committed: Committed) -> axum::Json<UserWritten> {
    axum::Json(UserWritten {
        user_id: user_id.to_string(),
        version: committed.version,
        global_position: committed.global_position,
    })
}

#[utoipa::path(
    post, path = "/", tag = "users", summary = "Create a user (admin)",
    request_body = CreateUser,
    responses((status = 201, description = "Created", body = UserWritten))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<CreateUser>,
) -> Result<(StatusCode, axum::Json<UserWritten>), ApiError> {
    caller.require(ADMIN)?;
    let password = SecretString::from(request.password);
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|error| ApiError::Internal(Box::new(error)))?
        .map_err(|error| ApiError::Unprocessable(error.to_string()))?;
    let user_id = UserId::for_username(&caller.tenant, &request.username);
    let register = UserCommand::Register {
        tenant: caller.tenant.clone(),
        username: request.username,
        password_hash,
        roles: request.roles,
        at: Utc::now(),
    };
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    match state
        .bus
        .users()
        .execute(user_id.as_str(), register, &metadata)
        .await
    {
        Ok(committed) => Ok((StatusCode::CREATED, written(&user_id, committed))),
        Err(CommandError::Refused(UserError::AlreadyRegistered)) => {
            Err(ApiError::Conflict("username is taken".into()))
        }
        Err(other) => Err(other.into()),
    }
}

/// Runs an admin command on a user of the caller's tenant.
async fn administer(
    state: &AppState,
    caller: &Caller,
    id: &str,
    command: UserCommand,
) -> Result<axum::Json<UserWritten>, ApiError> {
    caller.require(ADMIN)?;
    let user_id = UserId::parse(id).map_err(|_| ApiError::NotFound("user"))?;
    let user: User = state.bus.users().current(user_id.as_str()).await?.aggregate;
    if user.id.is_none() || user.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("user"));
    }
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    let committed = state
        .bus
        .users()
        .execute(user_id.as_str(), command, &metadata)
        .await?;
    Ok(written(&user_id, committed))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct GrantRole {
    #[schema(value_type = String)]
    role: Role,
}

#[utoipa::path(
    post, path = "/{id}/roles", tag = "users", summary = "Grant a role (admin)",
    params(("id" = String, Path, description = "The user id", pattern = "^[A-Za-z0-9_-]{1,64}$")), request_body = GrantRole,
    responses((status = 200, description = "Granted", body = UserWritten))
)]
async fn grant_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<GrantRole>,
) -> Result<axum::Json<UserWritten>, ApiError> {
    let command = UserCommand::GrantRole {
        role: request.role,
        at: Utc::now(),
    };
    administer(&state, &caller, &id, command).await
}

#[utoipa::path(
    delete, path = "/{id}/roles/{role}", tag = "users", summary = "Revoke a role (admin)",
    params(("id" = String, Path, description = "The user id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("role" = String, Path, description = "admin, operator or viewer", pattern = "^(admin|operator|viewer)$")),
    responses((status = 200, description = "Revoked", body = UserWritten))
)]
async fn revoke_role(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, role)): Path<(String, String)>,
) -> Result<axum::Json<UserWritten>, ApiError> {
    let role: Role = role
        .parse()
        .map_err(|error: fleetlog_domain::user::UnknownRole| {
            ApiError::BadRequest(error.to_string())
        })?;
    if role == Role::Admin {
        keep_an_admin(&state, &caller, &id).await?;
    }
    let command = UserCommand::RevokeRole {
        role,
        at: Utc::now(),
    };
    administer(&state, &caller, &id, command).await
}

/// Refuses (409) to take the admin role or the account away from the tenant's last active
/// admin: the tenant would be left with nobody to manage its users. Judged on the users read
/// model, so two admins demoting each other at the very same moment could still both pass.
async fn keep_an_admin(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    caller.require(ADMIN)?;
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM users
          WHERE tenant = $1 AND user_id <> $2 AND NOT disabled AND 'admin' = ANY(roles)",
    )
    .bind(caller.tenant.as_str())
    .bind(id)
    .fetch_one(state.bus.pool())
    .await?;
    if others > 0 {
        return Ok(());
    }
    let user_id = UserId::parse(id).map_err(|_| ApiError::NotFound("user"))?;
    let target: User = state.bus.users().current(user_id.as_str()).await?.aggregate;
    if target.tenant.as_ref() == Some(&caller.tenant)
        && !target.disabled
        && target.roles.contains(&Role::Admin)
    {
        return Err(ApiError::Conflict(
            "this is the tenant's last active admin: make another user admin first".into(),
        ));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Disable {
    /// 1 to 512 characters, not only blanks.
    #[schema(min_length = 1, max_length = 512)]
    reason: String,
}

#[utoipa::path(
    post, path = "/{id}/disable", tag = "users", summary = "Disable a user (admin)",
    description = "The user can no longer log in or refresh; access tokens already issued expire within their lifetime.",
    params(("id" = String, Path, description = "The user id", pattern = "^[A-Za-z0-9_-]{1,64}$")), request_body = Disable,
    responses((status = 200, description = "Disabled", body = UserWritten))
)]
async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<Disable>,
) -> Result<axum::Json<UserWritten>, ApiError> {
    keep_an_admin(&state, &caller, &id).await?;
    let command = UserCommand::Disable {
        reason: request.reason,
        at: Utc::now(),
    };
    administer(&state, &caller, &id, command).await
}

#[utoipa::path(
    post, path = "/{id}/enable", tag = "users", summary = "Enable a disabled user again (admin)",
    description = "The user can log in again; sessions that disabling ended stay ended.",
    params(("id" = String, Path, description = "The user id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 200, description = "Enabled", body = UserWritten))
)]
async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<UserWritten>, ApiError> {
    let command = UserCommand::Enable { at: Utc::now() };
    administer(&state, &caller, &id, command).await
}
