//! The device reads: one device (now or as of an instant), the registry page by page, a
//! command's status and the telemetry.

use super::*;
use fleetlog_projections::retention::WITHIN_RETENTION;

/// A device as the read model holds it.
#[derive(Serialize, FromRow, utoipa::ToSchema)]
pub(super) struct DeviceView {
    device_id: String,
    tenant: String,
    owner: String,
    name: String,
    model: String,
    tags: Vec<String>,
    lifecycle: String,
    online: bool,
    offline_reason: Option<String>,
    last_seen: Option<DateTime<Utc>>,
    last_heartbeat: Option<DateTime<Utc>>,
    last_telemetry_at: Option<DateTime<Utc>>,
    sensors: Value,
    location: Option<Value>,
    reported: Value,
    desired: Value,
    delta: Value,
    desired_version: i64,
    firmware_version: Option<String>,
    firmware_update: Option<Value>,
    open_commands: i32,
    registered_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(rename = "version")]
    last_sequence: i64,
}

const DEVICE_COLUMNS: &str = "device_id, tenant, owner, name, model, tags, lifecycle, online,
    offline_reason, last_seen, last_heartbeat, last_telemetry_at, sensors, location, reported,
    desired, delta, desired_version, firmware_version, firmware_update, open_commands,
    registered_at, updated_at, last_sequence";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ShowQuery {
    /// Fold the device's events up to this instant instead of reading the live model
    /// (1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z).
    #[param(value_type = Option<String>, format = DateTime)]
    at: Option<ClientInstant>,
    /// Wait until the read model has applied the event at this position (read-your-writes).
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/{id}", tag = "devices", summary = "A device: registry, live state, desired, reported and delta",
    description = "With `at`, the device as it stood at that instant, folded from its events. The ETag is the device's version.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ShowQuery),
    responses((status = 200, description = "The device", body = DeviceView, headers(("ETag" = String, description = "The device's version"))))
)]
pub(super) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<Response, ApiError> {
    caller.require(READERS)?;
    let id = parse_id(&id)?;
    if let Some(at) = query.at {
        let device = as_of(&state, &caller, &id, at.0).await?;
        let etag = format!("\"{}\"", device.last_sequence);
        return Ok(([(ETAG, etag)], axum::Json(device)).into_response());
    }
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), PROJECTION, position, &caller.tenant).await?;
    }
    let device: Option<DeviceView> = sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1 AND tenant = $2"
    ))
    .bind(id.as_str())
    .bind(caller.tenant.as_str())
    .fetch_optional(state.bus.pool())
    .await?;
    let device = device.ok_or(ApiError::NotFound("device"))?;
    // The version as entity tag: send it back in If-Match to write only if nothing changed.
    let etag = format!("\"{}\"", device.last_sequence);
    Ok(([(ETAG, etag)], axum::Json(device)).into_response())
}

/// Past views folded at once by this process: each holds a transaction (and with it the
/// relay's view of what is committed) for as long as it folds.
static PAST_VIEW_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The device as it stood at `at`: its events recorded until then, applied by the devices
/// projection to private copies of its tables, so it is the same view as the live one.
pub(super) async fn as_of(
    state: &AppState,
    caller: &Caller,
    id: &DeviceId,
    at: DateTime<Utc>,
) -> Result<DeviceView, ApiError> {
    // A device never changes tenant: another tenant's id is a 404 before anything is folded
    // (asked of the aggregate, a snapshot and its tail, not of a read model that may lag).
    let device = state.bus.devices().current(id.as_str()).await?.aggregate;
    if device.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("device"));
    }
    let _slot = PAST_VIEW_SLOTS
        .acquire()
        .await
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    let mut past = fleetlog_projections::as_of::as_of(
        state.bus.pool(),
        &fleetlog_projections::DevicesProjection,
        id.as_str(),
        at,
    )
    .await
    .map_err(|error| match error {
        too_long @ AsOfError::TooLong { .. } => ApiError::Unprocessable(too_long.to_string()),
        AsOfError::Projection(fleetlog_projections::ProjectionError::Database(error)) => {
            ApiError::from(error)
        }
        other => ApiError::Internal(Box::new(other)),
    })?;
    let device: Option<DeviceView> = sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1 AND tenant = $2"
    ))
    .bind(id.as_str())
    .bind(caller.tenant.as_str())
    .fetch_optional(past.connection())
    .await?;
    device.ok_or(ApiError::NotFound("device"))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// `active` (default), `decommissioned` or `all`.
    #[param(pattern = "^(active|decommissioned|all)$")]
    lifecycle: Option<String>,
    online: Option<bool>,
    model: Option<String>,
    tag: Option<String>,
    firmware_version: Option<String>,
    /// Case-insensitive substring of the name.
    q: Option<String>,
    /// `device_id` (default), `name` or `last_seen`.
    sort: Option<String>,
    /// From the `next_cursor` of the previous page.
    cursor: Option<String>,
    /// 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// Wait until the read model has applied the event at this position (read-your-writes).
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Page {
    items: Vec<DeviceView>,
    next_cursor: Option<String>,
}

/// Keyset pagination: the cursor is the sort key and id of the last row, so rows inserted
/// meanwhile never shift a page (no OFFSET).
#[utoipa::path(
    get, path = "/", tag = "devices", summary = "The tenant's devices",
    description = "Filters, a sort and keyset pagination that stays stable under concurrent inserts.",
    params(ListQuery),
    responses((status = 200, description = "A page of devices", body = Page))
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Page>, ApiError> {
    caller.require(READERS)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), PROJECTION, position, &caller.tenant).await?;
    }
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let sort = match query.sort.as_deref().unwrap_or("device_id") {
        "device_id" => "device_id",
        "name" => "name",
        "last_seen" => "last_seen",
        other => {
            return Err(ApiError::BadRequest(format!(
                "sort must be device_id, name or last_seen, not {other:?}"
            )))
        }
    };
    let mut sql = QueryBuilder::new(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE tenant = "
    ));
    sql.push_bind(caller.tenant.as_str());
    match query.lifecycle.as_deref().unwrap_or("active") {
        "all" => {}
        lifecycle @ ("active" | "decommissioned") => {
            sql.push(" AND lifecycle = ")
                .push_bind(lifecycle.to_string());
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "lifecycle must be active, decommissioned or all, not {other:?}"
            )))
        }
    }
    if let Some(online) = query.online {
        sql.push(" AND online = ").push_bind(online);
    }
    if let Some(model) = query.model {
        sql.push(" AND model = ").push_bind(model);
    }
    if let Some(tag) = query.tag {
        sql.push(" AND tags @> ARRAY[").push_bind(tag).push("]");
    }
    if let Some(version) = query.firmware_version {
        sql.push(" AND firmware_version = ").push_bind(version);
    }
    if let Some(q) = query.q {
        let pattern = format!(
            "%{}%",
            q.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        sql.push(" AND name ILIKE ").push_bind(pattern);
    }
    // The sort key as text, never null, so one keyset comparison serves every sort.
    let key = match sort {
        "last_seen" => {
            "COALESCE(to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '')"
        }
        "name" => "name",
        _ => "device_id",
    };
    if let Some(cursor) = &query.cursor {
        let (after_key, after_id) = decode_cursor(cursor)?;
        sql.push(format!(" AND ({key} COLLATE \"C\", device_id) > ("))
            .push_bind(after_key)
            .push(" COLLATE \"C\", ")
            .push_bind(after_id)
            .push(")");
    }
    sql.push(format!(" ORDER BY {key} COLLATE \"C\", device_id LIMIT "))
        .push_bind(limit + 1);
    let mut items: Vec<DeviceView> = sql.build_query_as().fetch_all(state.bus.pool()).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| {
            let key = match sort {
                "last_seen" => last
                    .last_seen
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
                    .unwrap_or_default(),
                "name" => last.name.clone(),
                _ => last.device_id.clone(),
            };
            encode_cursor(&key, &last.device_id)
        })
    } else {
        None
    };
    Ok(axum::Json(Page { items, next_cursor }))
}

/// Cursors are opaque to clients: hex of `key \0 id`.
fn encode_cursor(key: &str, id: &str) -> String {
    hex::encode(format!("{key}\0{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(String, String), ApiError> {
    let invalid = || ApiError::BadRequest("invalid cursor".into());
    if cursor.len() > 1024 {
        return Err(invalid());
    }
    let bytes = hex::decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (key, id) = text.split_once('\0').ok_or_else(invalid)?;
    // The key and the id are a sort value and a device id: neither holds a NUL, and Postgres
    // could not take one.
    if id.contains('\0') {
        return Err(invalid());
    }
    Ok((key.to_string(), id.to_string()))
}

#[derive(Serialize, FromRow, utoipa::ToSchema)]
pub(super) struct CommandView {
    device_id: String,
    command_id: String,
    name: String,
    params: Value,
    status: String,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    result: Option<Value>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsistentQuery {
    /// Wait until the read model has applied the event at this position (read-your-writes).
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/{id}/commands/{command_id}", tag = "devices", summary = "A command's status and result",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("command_id" = String, Path, description = "The command id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ConsistentQuery),
    responses((status = 200, description = "The command", body = CommandView))
)]
pub(super) async fn command_status(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, command_id)): Path<(String, String)>,
    Query(query): Query<ConsistentQuery>,
) -> Result<axum::Json<CommandView>, ApiError> {
    caller.require(READERS)?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), PROJECTION, position, &caller.tenant).await?;
    }
    let command: Option<CommandView> = sqlx::query_as(
        "SELECT c.device_id, c.command_id, c.name, c.params, c.status, c.issued_at, c.expires_at,
                c.finished_at, c.result
           FROM device_commands c JOIN devices d ON d.device_id = c.device_id
          WHERE c.device_id = $1 AND c.command_id = $2 AND d.tenant = $3",
    )
    .bind(&id)
    .bind(&command_id)
    .bind(caller.tenant.as_str())
    .fetch_optional(state.bus.pool())
    .await?;
    command.map(axum::Json).ok_or(ApiError::NotFound("command"))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryQuery {
    /// Only this sensor.
    sensor: Option<String>,
    /// From this instant (inclusive; default: 24 hours before `to`; 1970 to 9999).
    #[param(value_type = Option<String>, format = DateTime)]
    from: Option<ClientInstant>,
    /// Up to this instant (exclusive; default: now; 1970 to 9999).
    #[param(value_type = Option<String>, format = DateTime)]
    to: Option<ClientInstant>,
    /// Aggregate into buckets of this many seconds (min, max, avg, count per bucket).
    #[param(minimum = 1, maximum = 2_678_400)]
    bucket_secs: Option<i64>,
    /// 1 to 10,000 (default 1,000).
    #[param(minimum = 1, maximum = 10_000)]
    limit: Option<i64>,
    /// Wait until the telemetry model has applied the event at this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

/// One reading.
#[derive(Serialize, FromRow, utoipa::ToSchema)]
pub(super) struct Sample {
    sensor: String,
    time: DateTime<Utc>,
    value: f64,
    unit: Option<String>,
}

/// Readings of one sensor in one bucket.
#[derive(Serialize, FromRow, utoipa::ToSchema)]
pub(super) struct Bucket {
    sensor: String,
    bucket: DateTime<Utc>,
    min: f64,
    max: f64,
    avg: f64,
    count: i64,
}

/// What a telemetry query answers: the readings (without `bucket_secs`) or the buckets (with
/// it), each ordered by sensor and time.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(super) enum TelemetryAnswer {
    /// Raw readings.
    Samples(Vec<Sample>),
    /// Min, max, avg and count per sensor and bucket.
    Buckets(Vec<Bucket>),
}

/// A device's readings in a time range, within the retention.
static SELECT_SAMPLES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT sensor, time, value, unit FROM telemetry
          WHERE device_id = $1 AND ($2::text IS NULL OR sensor = $2)
            AND time >= $3 AND time < $4 AND {WITHIN_RETENTION}
          ORDER BY sensor, time, sequence LIMIT $5"
    )
});

/// A device's readings in a time range, within the retention, in buckets.
static SELECT_BUCKETS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT sensor, date_bin(make_interval(secs => $5), time, $3) AS bucket,
                min(value) AS min, max(value) AS max, avg(value) AS avg, count(*) AS count
           FROM telemetry
          WHERE device_id = $1 AND ($2::text IS NULL OR sensor = $2)
            AND time >= $3 AND time < $4 AND {WITHIN_RETENTION}
          GROUP BY sensor, bucket ORDER BY sensor, bucket LIMIT $6"
    )
});

/// Readings of the device over a time range, raw or bucketed; only those within the telemetry
/// retention (`fleetlog_projections::retention`), as a replay of the model would hold them.
#[utoipa::path(
    get, path = "/{id}/telemetry", tag = "devices", summary = "Telemetry over a time range, raw or bucketed",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), TelemetryQuery),
    responses((status = 200, description = "An array of readings (raw), or with `bucket_secs` an array of buckets (min, max, avg, count)", body = TelemetryAnswer))
)]
pub(super) async fn telemetry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<TelemetryQuery>,
) -> Result<axum::Json<TelemetryAnswer>, ApiError> {
    caller.require(READERS)?;
    let id = parse_id(&id)?;
    owned_device(&state, &caller, &id).await?;
    if let Some(position) = query.min_position {
        wait_for_position(state.bus.pool(), "telemetry", position, &caller.tenant).await?;
    }
    let to = query.to.map_or_else(Utc::now, |to| to.0);
    let from = query.from.map_or_else(
        || {
            to.checked_sub_signed(chrono::Duration::hours(24))
                .unwrap_or(to)
        },
        |from| from.0,
    );
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".into()));
    }
    let limit = query.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 10000".into()));
    }
    let pool = state.bus.pool();
    let body = match query.bucket_secs {
        None => {
            let samples: Vec<Sample> = sqlx::query_as(&SELECT_SAMPLES)
                .bind(id.as_str())
                .bind(&query.sensor)
                .bind(from)
                .bind(to)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            TelemetryAnswer::Samples(samples)
        }
        Some(seconds) if (1..=31 * 86_400).contains(&seconds) => {
            let buckets: Vec<Bucket> = sqlx::query_as(&SELECT_BUCKETS)
                .bind(id.as_str())
                .bind(&query.sensor)
                .bind(from)
                .bind(to)
                .bind(seconds as f64)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            TelemetryAnswer::Buckets(buckets)
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "bucket_secs must be 1 to 2678400 (31 days)".into(),
            ))
        }
    };
    Ok(axum::Json(body))
}
