//! `/api/v1/firmware`: the tenant's firmware catalogue, release and deprecation.
//!
//! Reads come from the `firmware` read model; release and deprecation are Firmware commands,
//! checked against the aggregate's tenant first (another tenant's image is a 404).

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandMetadata, Committed};
use fleetlog_domain::firmware::{Firmware, FirmwareCommand, FirmwareId, FirmwareStatus};
use fleetlog_domain::user::Role;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, QueryBuilder};

use crate::auth::Caller;
use crate::consistency::wait_for_position;
use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub(crate) const WRITERS: &[Role] = &[Role::Admin, Role::Operator];
pub(crate) const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer];

/// The routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(release))
        .routes(routes!(deprecate))
}

#[derive(Serialize, FromRow, utoipa::ToSchema)]
struct FirmwareView {
    firmware_id: String,
    model: String,
    version: String,
    sha256: String,
    size_bytes: i64,
    compatible_models: Vec<String>,
    notes: String,
    status: String,
    registered_at: DateTime<Utc>,
    released_at: Option<DateTime<Utc>>,
    deprecated_at: Option<DateTime<Utc>>,
    deprecation_reason: Option<String>,
    #[serde(rename = "aggregate_version")]
    last_sequence: i64,
}

const COLUMNS: &str = "firmware_id, model, version, sha256, size_bytes, compatible_models, notes,
    status, registered_at, released_at, deprecated_at, deprecation_reason, last_sequence";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    model: Option<String>,
    status: Option<String>,
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/", tag = "firmware", summary = "The tenant's firmware images",
    params(ListQuery),
    responses((status = 200, description = "Images", body = Vec<FirmwareView>))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Vec<FirmwareView>>, ApiError> {
    caller.require(READERS)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), "firmware", position).await?;
    }
    let mut sql = QueryBuilder::new(format!("SELECT {COLUMNS} FROM firmware WHERE tenant = "));
    sql.push_bind(caller.tenant.as_str());
    if let Some(model) = &query.model {
        sql.push(" AND model = ").push_bind(model);
    }
    if let Some(status) = &query.status {
        if !["draft", "released", "deprecated"].contains(&status.as_str()) {
            return Err(ApiError::BadRequest(
                "status must be draft, released or deprecated".into(),
            ));
        }
        sql.push(" AND status = ").push_bind(status);
    }
    sql.push(" ORDER BY model, registered_at DESC LIMIT 1000");
    let rows = sql.build_query_as().fetch_all(state.bus.pool()).await?;
    Ok(axum::Json(rows))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/{id}", tag = "firmware", summary = "One firmware image",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`"), ShowQuery),
    responses((status = 200, description = "The image", body = FirmwareView))
)]
async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<axum::Json<FirmwareView>, ApiError> {
    caller.require(READERS)?;
    let id = parse_id(&id)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), "firmware", position).await?;
    }
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM firmware WHERE tenant = $1 AND firmware_id = $2"
    ))
    .bind(caller.tenant.as_str())
    .bind(id.to_string())
    .fetch_optional(state.bus.pool())
    .await?;
    row.map(axum::Json).ok_or(ApiError::NotFound("firmware"))
}

pub(crate) fn parse_id(id: &str) -> Result<FirmwareId, ApiError> {
    FirmwareId::parse(id).map_err(|error| ApiError::BadRequest(error.to_string()))
}

/// The image's aggregate, if it exists in the caller's tenant.
pub(crate) async fn owned_firmware(
    state: &AppState,
    caller: &Caller,
    id: &FirmwareId,
) -> Result<Firmware, ApiError> {
    let firmware = state
        .bus
        .firmware()
        .current(&id.to_string())
        .await?
        .aggregate;
    if firmware.status == FirmwareStatus::Unregistered
        || firmware.tenant.as_ref() != Some(&caller.tenant)
    {
        return Err(ApiError::NotFound("firmware"));
    }
    Ok(firmware)
}

#[derive(Serialize, utoipa::ToSchema)]
struct Written {
    firmware_id: String,
    version: u64,
    global_position: Option<i64>,
}

async fn execute(
    state: &AppState,
    caller: &Caller,
    id: &str,
    command: FirmwareCommand,
) -> Result<axum::Json<Written>, ApiError> {
    caller.require(WRITERS)?;
    let id = parse_id(id)?;
    owned_firmware(state, caller, &id).await?;
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    let Committed {
        version,
        global_position,
        ..
    } = state
        .bus
        .firmware()
        .execute(&id.to_string(), command, &metadata)
        .await?;
    Ok(axum::Json(Written {
        firmware_id: id.to_string(),
        version,
        global_position,
    }))
}

#[utoipa::path(
    post, path = "/{id}/release", tag = "firmware", summary = "Release an image for rollouts (operator, admin)",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`")),
    responses((status = 200, description = "Released", body = Written))
)]
async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Written>, ApiError> {
    execute(
        &state,
        &caller,
        &id,
        FirmwareCommand::Release { at: Utc::now() },
    )
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Deprecate {
    reason: String,
}

#[utoipa::path(
    post, path = "/{id}/deprecate", tag = "firmware", summary = "Deprecate an image: no new rollout may use it (operator, admin)",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`")), request_body = Deprecate,
    responses((status = 200, description = "Deprecated", body = Written))
)]
async fn deprecate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<Deprecate>,
) -> Result<axum::Json<Written>, ApiError> {
    let command = FirmwareCommand::Deprecate {
        reason: request.reason,
        at: Utc::now(),
    };
    execute(&state, &caller, &id, command).await
}
