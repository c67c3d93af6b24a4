//! Claim-based provisioning: `/api/v1/provisioning-keys` (operators make, look at and revoke a
//! tenant's keys) and `POST /api/v1/provision` (a new device presents a key once, with the id
//! it wants, and receives its own credentials).
//!
//! A key is shown once, as `{key_id}.{secret}`; only the secret's SHA-256 is kept. Each
//! provisioning is a claim of the key (one use, naming the device), the device's registration
//! and the issue of its credentials: three events, each with the key as actor. A key that is
//! revoked, expired or used up is refused with that reason (403).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fleetlog_commands::provisioning::{self, ProvisionError, ProvisionRequest};
use fleetlog_commands::{CommandError, CommandMetadata};
use fleetlog_domain::provisioning::{
    KeyState, ProvisioningCommand, ProvisioningError, ProvisioningKey,
};
use fleetlog_domain::user::Role;
use fleetlog_domain::ProvisioningKeyId;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Json;
use crate::AppState;

const WRITERS: &[Role] = &[Role::Admin, Role::Operator];
const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer];

/// `/api/v1/provisioning-keys`.
pub fn keys_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key))
        .routes(routes!(show_key))
        .routes(routes!(revoke_key))
}

/// `/api/v1/provision`.
pub fn provision_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(provision))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    /// A name for people: 1 to 128 characters.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// The most devices it may register: 1 to 1,000,000; none: no limit.
    #[schema(minimum = 1, maximum = 1_000_000)]
    max_uses: Option<u32>,
    /// When it stops taking claims (RFC 3339, in the future); none: never.
    expires_at: Option<DateTime<Utc>>,
    /// The only model its devices may have; they get it when they name none.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    model: Option<String>,
    /// Tags its devices get: at most 32 of 1 to 64 characters.
    #[serde(default)]
    #[schema(max_items = 32)]
    tags: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct CreatedKey {
    key_id: String,
    /// The key to hand to devices, shown this once: `{key_id}.{secret}`.
    provisioning_key: String,
    #[serde(flatten)]
    key: KeyView,
}

/// A provisioning key as the API shows it: never its secret.
#[derive(Serialize, utoipa::ToSchema)]
struct KeyView {
    key_id: String,
    name: String,
    /// `active` or `revoked`.
    state: String,
    /// Devices it registered.
    uses: u32,
    max_uses: Option<u32>,
    expires_at: Option<DateTime<Utc>>,
    model: Option<String>,
    tags: Vec<String>,
    created_by: Option<String>,
    version: u64,
}

fn view(key_id: &str, key: &ProvisioningKey, version: u64) -> KeyView {
    KeyView {
        key_id: key_id.to_string(),
        name: key.name.clone(),
        state: match key.state {
            KeyState::Revoked => "revoked",
            _ => "active",
        }
        .to_string(),
        uses: key.uses,
        max_uses: key.max_uses,
        expires_at: key.expires_at,
        model: key.model.clone(),
        tags: key.tags.clone(),
        created_by: key.created_by.as_ref().map(ToString::to_string),
        version,
    }
}

fn parse_key_id(id: &str) -> Result<ProvisioningKeyId, ApiError> {
    ProvisioningKeyId::parse(id).map_err(|_| ApiError::NotFound("provisioning key"))
}

#[utoipa::path(
    post, path = "/", tag = "provisioning", summary = "Make a provisioning key (operator, admin)",
    description = "Answers the key once, as `{key_id}.{secret}`; only the secret's hash is kept. Devices present it to `POST /api/v1/provision`.",
    request_body = CreateKey,
    responses((status = 201, description = "Made", body = CreatedKey))
)]
async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<CreateKey>,
) -> Result<(StatusCode, axum::Json<CreatedKey>), ApiError> {
    caller.require(WRITERS)?;
    let key_id = ProvisioningKeyId::parse(uuid::Uuid::now_v7().simple().to_string())
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    let issued = state
        .auth
        .device_key
        .issue_provisioning_secret(key_id.as_str());
    let secret = issued.secret;
    let command = ProvisioningCommand::Create {
        tenant: caller.tenant.clone(),
        created_by: caller.user_id.clone(),
        name: request.name,
        secret_hash: issued.hash,
        salt: Some(issued.salt),
        max_uses: request.max_uses,
        expires_at: request.expires_at,
        model: request.model,
        tags: request.tags,
        at: Utc::now(),
    };
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    let keys = state.bus.provisioning_keys();
    keys.execute(key_id.as_str(), command, &metadata).await?;
    let (key, version) = keys
        .inspect(key_id.as_str(), |key, version| (key.clone(), version))
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedKey {
            key_id: key_id.to_string(),
            provisioning_key: format!("{key_id}.{}", secret.expose_secret()),
            key: view(key_id.as_str(), &key, version),
        }),
    ))
}

/// The key of the caller's tenant, or 404 (another tenant's key is not told apart from none).
async fn owned_key(
    state: &AppState,
    caller: &Caller,
    key_id: &ProvisioningKeyId,
) -> Result<(ProvisioningKey, u64), ApiError> {
    let (key, version) = state
        .bus
        .provisioning_keys()
        .inspect(key_id.as_str(), |key, version| (key.clone(), version))
        .await?;
    if key.state == KeyState::Unknown || key.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("provisioning key"));
    }
    Ok((key, version))
}

#[utoipa::path(
    get, path = "/{id}", tag = "provisioning", summary = "A provisioning key",
    params(("id" = String, Path, description = "The key id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 200, description = "The key, without its secret", body = KeyView))
)]
async fn show_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    caller.require(READERS)?;
    let key_id = parse_key_id(&id)?;
    let (key, version) = owned_key(&state, &caller, &key_id).await?;
    Ok(axum::Json(view(key_id.as_str(), &key, version)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RevokeKey {
    /// Why: 1 to 512 characters.
    reason: Option<String>,
}

#[utoipa::path(
    post, path = "/{id}/revoke", tag = "provisioning",
    summary = "Revoke a provisioning key (operator, admin)",
    description = "The key takes no claim again; devices it registered keep their credentials.",
    params(("id" = String, Path, description = "The key id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body(content = RevokeKey, description = "Optional reason"),
    responses((status = 200, description = "Revoked", body = KeyView))
)]
async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    request: Option<Json<RevokeKey>>,
) -> Result<axum::Json<KeyView>, ApiError> {
    caller.require(WRITERS)?;
    let key_id = parse_key_id(&id)?;
    owned_key(&state, &caller, &key_id).await?;
    let reason = request
        .and_then(|Json(revoke)| revoke.reason)
        .unwrap_or_else(|| format!("revoked by {}", caller.actor()));
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    let keys = state.bus.provisioning_keys();
    match keys
        .execute(
            key_id.as_str(),
            ProvisioningCommand::Revoke {
                reason,
                at: Utc::now(),
            },
            &metadata,
        )
        .await
    {
        Err(CommandError::Refused(ProvisioningError::Revoked)) => {
            return Err(ApiError::Conflict(
                "the provisioning key is revoked already".into(),
            ))
        }
        other => other?,
    };
    let (key, version) = owned_key(&state, &caller, &key_id).await?;
    Ok(axum::Json(view(key_id.as_str(), &key, version)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Provision {
    /// The key, as it was shown: `{key_id}.{secret}`.
    provisioning_key: String,
    /// The id the device wants.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    device_id: String,
    /// Its name: 1 to 128 characters; default: its id.
    name: Option<String>,
    /// Its model; default (and the only one allowed, if the key names one): the key's.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    model: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct Provisioned {
    device_id: String,
    /// The device's own secret, shown this once: its MQTT password and HTTP token.
    device_token: String,
    /// The MQTT user name and client id to connect with: the device id.
    mqtt_username: String,
    mqtt_client_id: String,
    version: u64,
    global_position: Option<i64>,
}

#[utoipa::path(
    post, path = "/", tag = "provisioning", security(()),
    summary = "A new device provisions itself with a provisioning key",
    description = "Registers the device in the key's tenant, with the key's tags and model, and answers its own credentials once. 401 for an unknown or wrong key; 403 for a revoked, expired or used-up key, with the reason; 409 if the id is taken; 422 for a model the key does not allow.",
    request_body = Provision,
    responses((status = 201, description = "Provisioned", body = Provisioned))
)]
async fn provision(
    State(state): State<AppState>,
    Json(request): Json<Provision>,
) -> Result<(StatusCode, axum::Json<Provisioned>), ApiError> {
    let request = ProvisionRequest {
        provisioning_key: request.provisioning_key,
        device_id: request.device_id,
        name: request.name,
        model: request.model,
    };
    let provisioned = match provisioning::provision(
        &state.bus,
        &state.auth.device_key,
        request,
        Utc::now(),
    )
    .await
    {
        Ok(provisioned) => provisioned,
        Err(error) => {
            count(match error {
                ProvisionError::UnknownKey => "unknown_key",
                ProvisionError::Failed(_) => "failed",
                _ => "refused",
            });
            return Err(match error {
                ProvisionError::UnknownKey => ApiError::Unauthorized(error.to_string()),
                ProvisionError::KeyRefused(_) => {
                    ApiError::Rejected(StatusCode::FORBIDDEN, error.to_string())
                }
                ProvisionError::Invalid(reason) => ApiError::Unprocessable(reason),
                ProvisionError::Taken(_) => ApiError::Conflict(error.to_string()),
                ProvisionError::Failed(reason) => ApiError::Unavailable(reason.into()),
            });
        }
    };
    count("provisioned");
    let device_id = provisioned.device_id.to_string();
    Ok((
        StatusCode::CREATED,
        axum::Json(Provisioned {
            device_token: provisioned.secret.expose_secret().to_string(),
            mqtt_username: device_id.clone(),
            mqtt_client_id: device_id.clone(),
            device_id,
            version: provisioned.committed.version,
            global_position: provisioned.committed.global_position,
        }),
    ))
}

fn count(outcome: &'static str) {
    metrics::counter!("fleetlog_provisioning_total", "outcome" => outcome).increment(1);
}
