//! `/api/v1/rollouts`: planning a firmware rollout, following it, and pausing, resuming or
//! aborting it.
//!
//! Planning checks what the Rollout aggregate cannot see: the image is the tenant's and released
//! (a deprecated image starts nothing), and every target is a device of the tenant whose model
//! the image supports. Targets are explicit device ids or a filter over the devices read model.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandError, CommandMetadata, Committed};
use fleetlog_domain::firmware::FirmwareStatus;
use fleetlog_domain::rollout::{
    ErrorAction, Rollout, RolloutCommand, RolloutError, RolloutStatus, Waves, DEFAULT_WINDOW_SECS,
    MAX_TARGETS,
};
use fleetlog_domain::{DeviceId, RolloutId};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, QueryBuilder};

use super::firmware::{owned_firmware, parse_id as parse_firmware_id, READERS, WRITERS};
use crate::auth::Caller;
use crate::consistency::wait_for_position;
use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

const PROJECTION: &str = "rollouts";

/// The routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show))
        .routes(routes!(devices))
        .routes(routes!(start))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(abort))
}

/// Which devices a rollout targets.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TargetFilter {
    /// Devices of this model.
    model: Option<String>,
    /// Devices carrying this tag.
    tag: Option<String>,
    /// Devices currently running this version.
    firmware_version: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateRollout {
    /// Chosen by the client, or generated.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    rollout_id: Option<String>,
    /// `{model}@{semver}` of a released image.
    firmware_id: String,
    /// Explicit targets, in rollout order: 1 to 100,000 device ids.
    #[schema(min_items = 1, max_items = 100_000)]
    device_ids: Option<Vec<String>>,
    /// Or a filter over the tenant's active devices.
    filter: Option<TargetFilter>,
    /// Cumulative wave boundaries in percent, strictly rising to 100, e.g. `[10, 50, 100]`
    /// (the default); waves that would hold no device are left out. Give this or
    /// `wave_sizes`, not both.
    #[schema(min_items = 1, max_items = 100)]
    waves: Option<Vec<u8>>,
    /// Devices per wave, e.g. `[5, 50]`: the first 5 targets, then the next 50, then any
    /// left over in one last wave; sizes past the targets are clamped.
    #[schema(min_items = 1, max_items = 100)]
    wave_sizes: Option<Vec<usize>>,
    /// Percent of a wave that must succeed before the next starts.
    #[serde(default = "default_success_threshold")]
    #[schema(minimum = 1, maximum = 100)]
    success_threshold: u8,
    /// Percent of a wave that may fail before `on_error` applies.
    #[serde(default = "default_error_threshold")]
    #[schema(minimum = 0, maximum = 100)]
    error_threshold: u8,
    /// What exceeding the error threshold does: `pause` (default) or `abort`.
    #[serde(default)]
    on_error: OnError,
    /// Seconds a device has to finish once the update was sent to it.
    #[serde(default = "default_device_timeout")]
    #[schema(minimum = 1, maximum = 2_592_000)]
    device_timeout_secs: u64,
    /// Seconds after its wave started within which a device that is offline still gets the
    /// update when it comes back; after that it counts as timed out.
    #[serde(default = "default_window")]
    #[schema(minimum = 1, maximum = 31_536_000)]
    window_secs: u64,
}

/// What exceeding the error threshold does.
#[derive(Deserialize, Default, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum OnError {
    #[default]
    Pause,
    Abort,
}

impl From<OnError> for ErrorAction {
    fn from(action: OnError) -> Self {
        match action {
            OnError::Pause => ErrorAction::Pause,
            OnError::Abort => ErrorAction::Abort,
        }
    }
}

fn default_window() -> u64 {
    DEFAULT_WINDOW_SECS
}

fn default_waves() -> Waves {
    Waves::Percentages(vec![10, 50, 100])
}
fn default_success_threshold() -> u8 {
    90
}
fn default_error_threshold() -> u8 {
    10
}
fn default_device_timeout() -> u64 {
    3600
}

#[derive(Serialize, utoipa::ToSchema)]
struct RolloutWritten {
    rollout_id: String,
    version: u64,
    global_position: Option<i64>,
}

fn written(id: &RolloutId, committed: Committed) -> axum::Json<RolloutWritten> {
    axum::Json(RolloutWritten {
        rollout_id: id.to_string(),
        version: committed.version,
        global_position: committed.global_position,
    })
}

fn metadata(caller: &Caller) -> CommandMetadata {
    CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone())
}

#[utoipa::path(
    post, path = "/", tag = "rollouts", summary = "Plan a rollout (operator, admin)",
    description = "Targets are explicit device ids or a filter over the devices read model. The image must be released, every target an active device of the tenant whose model the image supports.",
    request_body = CreateRollout,
    responses((status = 201, description = "Planned", body = RolloutWritten))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(mut request): Json<CreateRollout>,
) -> Result<(StatusCode, axum::Json<RolloutWritten>), ApiError> {
    caller.require(WRITERS)?;
    let rollout_id = match &request.rollout_id {
        Some(id) => RolloutId::parse(id.as_str()),
        None => RolloutId::parse(format!("r-{}", uuid::Uuid::now_v7().simple())),
    }
    .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let waves = match (request.waves.take(), request.wave_sizes.take()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give the waves as percentages (`waves`) or as sizes (`wave_sizes`), not both"
                    .into(),
            ))
        }
        (Some(percentages), None) => Waves::Percentages(percentages),
        (None, Some(sizes)) => Waves::Sizes(sizes),
        (None, None) => default_waves(),
    };
    let firmware_id = parse_firmware_id(&request.firmware_id)?;
    let firmware = owned_firmware(&state, &caller, &firmware_id).await?;
    match firmware.status {
        FirmwareStatus::Released => {}
        FirmwareStatus::Deprecated => {
            return Err(ApiError::Unprocessable(format!(
                "firmware {firmware_id} is deprecated and cannot start a rollout"
            )))
        }
        _ => {
            return Err(ApiError::Unprocessable(format!(
                "firmware {firmware_id} is not released yet"
            )))
        }
    }
    let targets = resolve_targets(&state, &caller, &request).await?;
    let incompatible: Vec<&str> = targets
        .iter()
        .filter(|(_, model)| !firmware.compatible_models.contains(model))
        .map(|(id, _)| id.as_str())
        .take(20)
        .collect();
    if !incompatible.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "firmware {firmware_id} does not support the model of: {}",
            incompatible.join(", ")
        )));
    }
    refuse_overlapping_targets(&state, &caller, &targets).await?;
    let command = RolloutCommand::Create {
        rollout_id: rollout_id.clone(),
        tenant: caller.tenant.clone(),
        firmware_id,
        targets: targets.into_iter().map(|(id, _)| id).collect(),
        waves,
        success_threshold: request.success_threshold,
        error_threshold: request.error_threshold,
        on_error: request.on_error.into(),
        device_timeout_secs: request.device_timeout_secs,
        window_secs: request.window_secs,
        at: Utc::now(),
    };
    match state
        .bus
        .rollouts()
        .execute(rollout_id.as_str(), command, &metadata(&caller))
        .await
    {
        Err(CommandError::Refused(RolloutError::AlreadyCreated)) => Err(ApiError::Conflict(
            format!("rollout id {rollout_id} is taken"),
        )),
        other => Ok((StatusCode::CREATED, written(&rollout_id, other?))),
    }
}

/// A device is the target of one rollout at a time: while a rollout that has not ended waits
/// for a device's outcome, a second rollout of the device is refused (a busy device is not a
/// failure of the new image). Abort the first rollout, which frees its devices at once, to
/// push a fix. Two creations racing past this check meet at send time, where the device is
/// sent the second update only once the first one ended.
async fn refuse_overlapping_targets(
    state: &AppState,
    caller: &Caller,
    targets: &[(DeviceId, String)],
) -> Result<(), ApiError> {
    let ids: Vec<&str> = targets.iter().map(|(id, _)| id.as_str()).collect();
    let busy: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT rd.device_id, rd.rollout_id, r.status
           FROM rollout_devices rd JOIN rollouts r ON r.rollout_id = rd.rollout_id
          WHERE r.tenant = $1 AND rd.device_id = ANY($2)
            AND r.status IN ('created', 'running', 'paused') AND rd.status IN ('queued', 'sent')
          ORDER BY rd.device_id LIMIT 20",
    )
    .bind(caller.tenant.as_str())
    .bind(&ids)
    .fetch_all(state.bus.pool())
    .await?;
    if busy.is_empty() {
        return Ok(());
    }
    // The read model may lag an abort or an outcome that just happened: the rollouts it names
    // are asked, so a fix can follow an abort at once.
    let mut rollouts = std::collections::HashMap::new();
    for (_, rollout_id, _) in &busy {
        if !rollouts.contains_key(rollout_id) {
            let rollout = state.bus.rollouts().current(rollout_id).await?.aggregate;
            rollouts.insert(rollout_id.clone(), rollout);
        }
    }
    let listed: Vec<String> = busy
        .iter()
        .filter(|(device, rollout_id, _)| {
            let rollout = &rollouts[rollout_id];
            let live = matches!(
                rollout.status,
                RolloutStatus::Created | RolloutStatus::Running | RolloutStatus::Paused
            );
            let open = DeviceId::parse(device.as_str())
                .is_ok_and(|device| !rollout.outcomes.contains_key(&device));
            live && open
        })
        .map(|(device, rollout_id, _)| {
            let status = rollouts[rollout_id].status;
            format!("{device} (rollout {rollout_id}, {status})")
        })
        .collect();
    if listed.is_empty() {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "devices are targets of rollouts that have not ended: {}; abort those rollouts or wait for them to end",
        listed.join(", ")
    )))
}

/// The targets with their models, in the order given (explicit ids) or by device id (filter).
async fn resolve_targets(
    state: &AppState,
    caller: &Caller,
    request: &CreateRollout,
) -> Result<Vec<(DeviceId, String)>, ApiError> {
    let rows: Vec<(String, String)> = match (&request.device_ids, &request.filter) {
        (Some(ids), None) => {
            if ids.len() > MAX_TARGETS {
                return Err(ApiError::Unprocessable(format!(
                    "at most {MAX_TARGETS} devices per rollout"
                )));
            }
            for id in ids {
                DeviceId::parse(id.as_str())
                    .map_err(|error| ApiError::BadRequest(error.to_string()))?;
            }
            let found: Vec<(String, String)> = sqlx::query_as(
                "SELECT d.device_id, d.model
                   FROM unnest($2::text[]) WITH ORDINALITY AS wanted(device_id, position)
                   JOIN devices d ON d.device_id = wanted.device_id
                  WHERE d.tenant = $1 AND d.lifecycle = 'active'
                  ORDER BY wanted.position",
            )
            .bind(caller.tenant.as_str())
            .bind(ids)
            .fetch_all(state.bus.pool())
            .await?;
            if found.len() < ids.len() {
                let known: std::collections::HashSet<&str> =
                    found.iter().map(|(id, _)| id.as_str()).collect();
                let missing: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| !known.contains(id))
                    .take(20)
                    .collect();
                // Duplicates are the aggregate's to refuse; only unknown ids are reported here.
                if !missing.is_empty() {
                    return Err(ApiError::Unprocessable(format!(
                        "no active device of this tenant: {}",
                        missing.join(", ")
                    )));
                }
            }
            found
        }
        (None, Some(filter)) => {
            let mut sql = QueryBuilder::new(
                "SELECT device_id, model FROM devices WHERE lifecycle = 'active' AND tenant = ",
            );
            sql.push_bind(caller.tenant.as_str());
            if let Some(model) = &filter.model {
                sql.push(" AND model = ").push_bind(model);
            }
            if let Some(tag) = &filter.tag {
                sql.push(" AND ").push_bind(tag).push(" = ANY(tags)");
            }
            if let Some(version) = &filter.firmware_version {
                sql.push(" AND firmware_version = ").push_bind(version);
            }
            sql.push(" ORDER BY device_id LIMIT ")
                .push_bind(MAX_TARGETS as i64 + 1);
            let rows: Vec<(String, String)> =
                sql.build_query_as().fetch_all(state.bus.pool()).await?;
            if rows.len() > MAX_TARGETS {
                return Err(ApiError::Unprocessable(format!(
                    "the filter matches more than {MAX_TARGETS} devices"
                )));
            }
            rows
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of device_ids and filter".into(),
            ))
        }
    };
    rows.into_iter()
        .map(|(id, model)| {
            DeviceId::parse(id)
                .map(|id| (id, model))
                .map_err(|error| ApiError::Internal(Box::new(error)))
        })
        .collect()
}

#[derive(Serialize, FromRow, utoipa::ToSchema)]
struct RolloutView {
    rollout_id: String,
    firmware_id: String,
    status: String,
    /// Cumulative wave boundaries in percent, as planned; empty for a plan by sizes.
    waves: Vec<i16>,
    /// Devices in each wave, however the plan was given.
    wave_sizes: Vec<i32>,
    success_threshold: i16,
    error_threshold: i16,
    device_timeout_secs: i64,
    on_error: String,
    window_secs: i64,
    current_wave: Option<i32>,
    wave_started_at: Vec<DateTime<Utc>>,
    target_count: i32,
    sent: i32,
    succeeded: i32,
    failed: i32,
    timed_out: i32,
    canceled: i32,
    pause_reason: Option<String>,
    /// The latest decision (advance, pause, abort, complete) with the counts behind it.
    last_decision: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    #[serde(rename = "version")]
    last_sequence: i64,
}

const COLUMNS: &str =
    "rollout_id, firmware_id, status, waves, wave_sizes, success_threshold, error_threshold,
    device_timeout_secs, on_error, window_secs, current_wave, wave_started_at, target_count, sent,
    succeeded, failed, timed_out, canceled, pause_reason, last_decision, created_at, started_at,
    finished_at, updated_at, last_sequence";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    firmware_id: Option<String>,
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/", tag = "rollouts", summary = "The tenant's rollouts",
    params(ListQuery),
    responses((status = 200, description = "Rollouts", body = Vec<RolloutView>))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Vec<RolloutView>>, ApiError> {
    caller.require(READERS)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), PROJECTION, position, &caller.tenant).await?;
    }
    let mut sql = QueryBuilder::new(format!("SELECT {COLUMNS} FROM rollouts WHERE tenant = "));
    sql.push_bind(caller.tenant.as_str());
    if let Some(status) = &query.status {
        sql.push(" AND status = ").push_bind(status);
    }
    if let Some(firmware) = &query.firmware_id {
        sql.push(" AND firmware_id = ").push_bind(firmware);
    }
    sql.push(" ORDER BY created_at DESC LIMIT 500");
    Ok(axum::Json(
        sql.build_query_as().fetch_all(state.bus.pool()).await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct RolloutDetail {
    #[serde(flatten)]
    rollout: RolloutView,
    /// Devices per state.
    device_counts: serde_json::Map<String, serde_json::Value>,
}

#[utoipa::path(
    get, path = "/{id}", tag = "rollouts", summary = "A rollout with its counts per device state",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ShowQuery),
    responses((status = 200, description = "The rollout", body = RolloutDetail))
)]
async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<axum::Json<RolloutDetail>, ApiError> {
    caller.require(READERS)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), PROJECTION, position, &caller.tenant).await?;
    }
    let rollout: RolloutView = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM rollouts WHERE tenant = $1 AND rollout_id = $2"
    ))
    .bind(caller.tenant.as_str())
    .bind(&id)
    .fetch_optional(state.bus.pool())
    .await?
    .ok_or(ApiError::NotFound("rollout"))?;
    let counts: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT status, count(*) FROM ({DEVICE_STATES}$1) s GROUP BY status"
    ))
    .bind(&id)
    .fetch_all(state.bus.pool())
    .await?;
    Ok(axum::Json(RolloutDetail {
        rollout,
        device_counts: counts
            .into_iter()
            .map(|(status, count)| (status, count.into()))
            .collect(),
    }))
}

/// Each device of a rollout (the id follows) with its state: the rollout's own record (queued, sent,
/// succeeded, failed, timed_out, canceled), a sent update refined by what the device reports
/// about it (downloading, installing, rebooting) in the devices read model, and for a device
/// without an outcome what it waits for.
const DEVICE_STATES: &str = "
SELECT rd.device_id, rd.wave, rd.error, rd.sent_at, rd.updated_at,
       CASE WHEN rd.status = 'sent' AND d.firmware_update ->> 'rollout_id' = rd.rollout_id
                 AND COALESCE(d.firmware_update ->> 'stage', d.firmware_update ->> 'state')
                     IN ('downloading', 'installing', 'rebooting')
            THEN COALESCE(d.firmware_update ->> 'stage', d.firmware_update ->> 'state')
            ELSE rd.status END AS status,
       CASE WHEN rd.status = 'sent' AND d.firmware_update ->> 'rollout_id' = rd.rollout_id
            THEN (d.firmware_update ->> 'progress')::int END AS progress,
       CASE WHEN rd.status NOT IN ('queued', 'sent') OR r.status IN ('aborted', 'completed')
                 THEN NULL
            WHEN rd.status = 'sent'
                 THEN 'the device reports the new version'
                      || COALESCE(', or times out at ' || fleetlog_rfc3339(rd.sent_at
                           + make_interval(secs => LEAST(r.device_timeout_secs, 315360000))), '')
            WHEN r.status = 'created' THEN 'the rollout has not started'
            WHEN r.status = 'paused' THEN 'the rollout is paused: ' || COALESCE(r.pause_reason, '')
            WHEN r.current_wave IS NULL OR rd.wave > r.current_wave
                 THEN 'wave ' || rd.wave || ' has not started'
            WHEN d.device_id IS NULL OR d.lifecycle <> 'active'
                 THEN 'the device is decommissioned and is being canceled'
            WHEN d.firmware_update IS NOT NULL
                 AND d.firmware_update ->> 'rollout_id' IS DISTINCT FROM rd.rollout_id
                 THEN 'another firmware update ('
                      || COALESCE(d.firmware_update ->> 'firmware_id', 'unknown')
                      || ') is under way on the device; sent once it ends'
            WHEN NOT d.online
                 THEN CASE WHEN d.last_seen IS NULL THEN 'never seen online'
                           ELSE 'offline since ' || fleetlog_rfc3339(d.last_seen) END
                      || ': sent when it comes online'
                      || COALESCE(', or times out at ' || fleetlog_rfc3339(
                           r.wave_started_at[rd.wave + 1]
                           + make_interval(secs => LEAST(r.window_secs, 315360000))), '')
            ELSE 'online: sent at the next sweep' END AS waiting
  FROM rollout_devices rd
  JOIN rollouts r ON r.rollout_id = rd.rollout_id
  LEFT JOIN devices d ON d.device_id = rd.device_id
 WHERE rd.rollout_id = ";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    status: Option<String>,
    /// The last device id of the previous page.
    after: Option<String>,
    /// 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Serialize, FromRow, utoipa::ToSchema)]
struct RolloutDeviceView {
    device_id: String,
    wave: i32,
    /// queued, sent, downloading, installing, rebooting, succeeded, failed, timed_out or
    /// canceled.
    status: String,
    /// Percent done, as the device last reported, while the update runs.
    progress: Option<i32>,
    /// For a device without an outcome, what it waits for: the wave or the rollout to start
    /// or resume, the device to come online (updates are not queued for offline devices), an
    /// update of another rollout to end, or the device's report.
    waiting: Option<String>,
    error: Option<String>,
    sent_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct DevicePage {
    items: Vec<RolloutDeviceView>,
    next_after: Option<String>,
}

#[utoipa::path(
    get, path = "/{id}/devices", tag = "rollouts", summary = "The rollout's devices and their states, paged",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$"), DevicesQuery),
    responses((status = 200, description = "A page of devices", body = DevicePage))
)]
async fn devices(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<DevicesQuery>,
) -> Result<axum::Json<DevicePage>, ApiError> {
    caller.require(READERS)?;
    let owned: Option<String> =
        sqlx::query_scalar("SELECT rollout_id FROM rollouts WHERE tenant = $1 AND rollout_id = $2")
            .bind(caller.tenant.as_str())
            .bind(&id)
            .fetch_optional(state.bus.pool())
            .await?;
    if owned.is_none() {
        return Err(ApiError::NotFound("rollout"));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let mut sql = QueryBuilder::new(
        "SELECT device_id, wave, status, progress, waiting, error, sent_at, updated_at FROM (",
    );
    sql.push(DEVICE_STATES);
    sql.push_bind(&id);
    sql.push(") s WHERE true");
    if let Some(status) = &query.status {
        sql.push(" AND status = ").push_bind(status);
    }
    if let Some(after) = &query.after {
        sql.push(" AND device_id > ").push_bind(after);
    }
    sql.push(" ORDER BY device_id LIMIT ").push_bind(limit);
    let items: Vec<RolloutDeviceView> = sql.build_query_as().fetch_all(state.bus.pool()).await?;
    let next_after = (items.len() as i64 == limit)
        .then(|| items.last().map(|d| d.device_id.clone()))
        .flatten();
    Ok(axum::Json(DevicePage { items, next_after }))
}

/// Runs a command on a rollout of the caller's tenant.
async fn execute(
    state: &AppState,
    caller: &Caller,
    id: &str,
    command: RolloutCommand,
) -> Result<axum::Json<RolloutWritten>, ApiError> {
    caller.require(WRITERS)?;
    let id = RolloutId::parse(id).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let rollout: Rollout = state.bus.rollouts().current(id.as_str()).await?.aggregate;
    if rollout.status == RolloutStatus::Unplanned || rollout.tenant.as_ref() != Some(&caller.tenant)
    {
        return Err(ApiError::NotFound("rollout"));
    }
    let committed = state
        .bus
        .rollouts()
        .execute(id.as_str(), command, &metadata(caller))
        .await
        .map_err(|error| match error {
            CommandError::Refused(refusal @ RolloutError::InvalidTransition { .. }) => {
                ApiError::Conflict(refusal.to_string())
            }
            other => other.into(),
        })?;
    Ok(written(&id, committed))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

/// Pause and abort take an optional `{"reason": ...}`; an empty body is fine.
fn reason(body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<Reason>(body)
        .map(|reason| reason.reason)
        .map_err(|error| ApiError::BadRequest(format!("invalid JSON body: {error}")))
}

/// A rollout whose image was deprecated since it was planned neither starts nor resumes: it
/// can only be aborted.
async fn refuse_a_deprecated_image(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: &str,
) -> Result<(), ApiError> {
    let Ok(parsed) = RolloutId::parse(id) else {
        return Ok(());
    };
    let rollout = state
        .bus
        .rollouts()
        .current(parsed.as_str())
        .await?
        .aggregate;
    if rollout.tenant.as_ref() != Some(&caller.tenant) {
        return Ok(());
    }
    if let Some(firmware_id) = &rollout.firmware_id {
        let firmware = owned_firmware(state, caller, firmware_id).await?;
        if firmware.status == FirmwareStatus::Deprecated {
            return Err(ApiError::Unprocessable(format!(
                "firmware {firmware_id} is deprecated ({}): the rollout cannot {action}, only be aborted",
                firmware.deprecation_reason.as_deref().unwrap_or("no reason given")
            )));
        }
    }
    Ok(())
}

#[utoipa::path(
    post, path = "/{id}/start", tag = "rollouts", summary = "Start the first wave (operator, admin)",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 200, description = "Started", body = RolloutWritten))
)]
async fn start(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<RolloutWritten>, ApiError> {
    caller.require(WRITERS)?;
    refuse_a_deprecated_image(&state, &caller, &id, "start").await?;
    execute(
        &state,
        &caller,
        &id,
        RolloutCommand::Start { at: Utc::now() },
    )
    .await
}

#[utoipa::path(
    post, path = "/{id}/pause", tag = "rollouts", summary = "Pause (operator, admin)",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$")), request_body(content = Option<Reason>, description = "An optional reason"),
    responses((status = 200, description = "Paused", body = RolloutWritten))
)]
async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<RolloutWritten>, ApiError> {
    let reason = reason(&body)?.unwrap_or_else(|| format!("paused by {}", caller.actor()));
    let command = RolloutCommand::Pause {
        reason,
        at: Utc::now(),
    };
    execute(&state, &caller, &id, command).await
}

#[utoipa::path(
    post, path = "/{id}/resume", tag = "rollouts", summary = "Resume after a pause (operator, admin)",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 200, description = "Resumed", body = RolloutWritten))
)]
async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<RolloutWritten>, ApiError> {
    caller.require(WRITERS)?;
    refuse_a_deprecated_image(&state, &caller, &id, "resume").await?;
    execute(
        &state,
        &caller,
        &id,
        RolloutCommand::Resume { at: Utc::now() },
    )
    .await
}

#[utoipa::path(
    post, path = "/{id}/abort", tag = "rollouts", summary = "Abort: devices without an outcome are canceled, those updating are told to give the update up (operator, admin)",
    params(("id" = String, Path, description = "The rollout id", pattern = "^[A-Za-z0-9_-]{1,64}$")), request_body(content = Option<Reason>, description = "An optional reason"),
    responses((status = 200, description = "Aborted", body = RolloutWritten))
)]
async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<RolloutWritten>, ApiError> {
    let reason = reason(&body)?.unwrap_or_else(|| format!("aborted by {}", caller.actor()));
    let command = RolloutCommand::Abort {
        reason,
        at: Utc::now(),
    };
    execute(&state, &caller, &id, command).await
}
