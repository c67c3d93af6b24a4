//! `/api/v1/devices`: the registry, live state, desired properties and commands.
//!
//! Reads come from the `devices` and `device_commands` read models, always filtered by the
//! caller's tenant; a device of another tenant is answered like a missing one (404). Writes are
//! Device commands, checked against the aggregate's tenant first.
//!
//! By concern: `commands.rs` (writes), `queries.rs` (reads of the read models), `history.rs`
//! (the event log); this file holds the router and what they share.

mod commands;
mod history;
mod queries;

use axum::extract::{Path, State};
use axum::http::header::ETAG;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandMetadata, Committed};
use fleetlog_domain::device::{Device, DeviceCommand, DeviceError, Lifecycle};
use fleetlog_domain::user::Role;
use fleetlog_domain::{CommandId, DeviceId};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::{FromRow, QueryBuilder};

use crate::auth::Caller;
use crate::consistency::{if_match, wait_for_position};
use crate::error::ApiError;
use crate::extract::{ClientInstant, Json, Query};
use crate::AppState;
use fleetlog_projections::as_of::AsOfError;
use utoipa_axum::{router::OpenApiRouter, routes};

const WRITERS: &[Role] = &[Role::Admin, Role::Operator];

const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer];

const MAX_PAGE: i64 = 200;

/// The projection behind every read here.
const PROJECTION: &str = "devices";

/// The routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(commands::create, queries::list))
        .routes(routes!(
            queries::show,
            commands::update,
            commands::decommission
        ))
        .routes(routes!(commands::set_desired))
        .routes(routes!(commands::rotate_credentials))
        .routes(routes!(commands::revoke_credentials))
        .routes(routes!(commands::issue_command))
        .routes(routes!(queries::command_status))
        .routes(routes!(history::events))
        .routes(routes!(super::stream::device_stream))
        .routes(routes!(
            queries::telemetry,
            super::device_ingest::upload_for_device
        ))
}

/// What a write returns: where the aggregate and the event log stand afterwards, so a client
/// can read its own write (`min_position`) or write conditionally (`If-Match`).
#[derive(Serialize, utoipa::ToSchema)]
struct WriteResult {
    device_id: String,
    version: u64,
    global_position: Option<i64>,
}

fn written(device_id: &str, committed: Committed) -> axum::Json<WriteResult> {
    axum::Json(WriteResult {
        device_id: device_id.to_string(),
        version: committed.version,
        global_position: committed.global_position,
    })
}

fn metadata(caller: &Caller) -> CommandMetadata {
    CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone())
}

fn parse_id(id: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(id).map_err(|error| ApiError::BadRequest(error.to_string()))
}

/// The device's aggregate, if it exists in the caller's tenant.
async fn owned_device(
    state: &AppState,
    caller: &Caller,
    id: &DeviceId,
) -> Result<Device, ApiError> {
    let device = state.bus.devices().current(id.as_str()).await?.aggregate;
    if device.lifecycle == Lifecycle::Unregistered || device.tenant.as_ref() != Some(&caller.tenant)
    {
        return Err(ApiError::NotFound("device"));
    }
    Ok(device)
}

/// Runs a command on a device of the caller's tenant, conditionally if the request carries
/// `If-Match`.
async fn execute(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    id: &DeviceId,
    command: DeviceCommand,
) -> Result<Committed, ApiError> {
    caller.require(WRITERS)?;
    let expected = if_match(headers)?;
    owned_device(state, caller, id).await?;
    Ok(state
        .bus
        .devices()
        .execute_if(id.as_str(), command, &metadata(caller), expected)
        .await?)
}
