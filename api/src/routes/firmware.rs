//! `/api/v1/firmware`: the tenant's firmware catalogue: upload, download, release (signed),
//! deprecation, and the public key that checks release signatures.
//!
//! Reads come from the `firmware` read model; upload, release and deprecation are Firmware
//! commands, checked against the aggregate's tenant first (another tenant's image is a 404).
//! Image bytes go through [`FirmwareStore`](fleetlog_firmware::FirmwareStore), streamed
//! both ways.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandMetadata, Committed};
use fleetlog_domain::firmware::{
    Firmware, FirmwareCommand, FirmwareId, FirmwareStatus, ImageSignature, RolloutsOnDeprecation,
};
use fleetlog_domain::user::Role;
use fleetlog_domain::DeviceId;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, QueryBuilder};

use crate::auth::Caller;
use crate::consistency::wait_for_position;
use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::AppState;
use fleetlog_firmware::{FirmwareStore, UploadError, SIGNATURE_ALGORITHM};
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
        .routes(routes!(download))
        .routes(routes!(signing_key))
        // The upload streams and enforces the image size limit itself.
        .merge(
            OpenApiRouter::new()
                .routes(routes!(upload))
                .layer(DefaultBodyLimit::disable()),
        )
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
    /// Base64 ed25519 signature over the raw SHA-256, from the release on.
    signature: Option<String>,
    /// The key that made `signature`.
    signing_key_id: Option<String>,
    #[serde(rename = "aggregate_version")]
    last_sequence: i64,
}

const COLUMNS: &str = "firmware_id, model, version, sha256, size_bytes, compatible_models, notes,
    status, registered_at, released_at, deprecated_at, deprecation_reason, signature,
    signing_key_id, last_sequence";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    model: Option<String>,
    status: Option<String>,
    #[param(minimum = 1)]
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
        wait_for_position(state.bus.pool(), "firmware", position, &caller.tenant).await?;
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
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[utoipa::path(
    get, path = "/{id}", tag = "firmware", summary = "One firmware image",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`", pattern = "^[A-Za-z0-9_-]{1,64}@(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$"), ShowQuery),
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
        wait_for_position(state.bus.pool(), "firmware", position, &caller.tenant).await?;
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
struct FirmwareWritten {
    firmware_id: String,
    version: u64,
    global_position: Option<i64>,
}

async fn execute(
    state: &AppState,
    caller: &Caller,
    id: &str,
    command: FirmwareCommand,
) -> Result<axum::Json<FirmwareWritten>, ApiError> {
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
    Ok(axum::Json(FirmwareWritten {
        firmware_id: id.to_string(),
        version,
        global_position,
    }))
}

#[utoipa::path(
    post, path = "/{id}/release", tag = "firmware", summary = "Release an image for rollouts (operator, admin)",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`", pattern = "^[A-Za-z0-9_-]{1,64}@(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$")),
    responses((status = 200, description = "Released", body = FirmwareWritten))
)]
async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<FirmwareWritten>, ApiError> {
    caller.require(WRITERS)?;
    let store = firmware_store(&state)?;
    let firmware = owned_firmware(&state, &caller, &parse_id(&id)?).await?;
    let signed = store
        .signer()
        .sign_digest(&firmware.sha256)
        .map_err(|e| ApiError::Internal(Box::new(e)))?;
    let signature = ImageSignature {
        algorithm: SIGNATURE_ALGORITHM.into(),
        key_id: signed.key_id,
        signature: signed.signature,
    };
    let command = FirmwareCommand::Release {
        signature,
        at: Utc::now(),
    };
    execute(&state, &caller, &id, command).await
}

fn firmware_store(state: &AppState) -> Result<&FirmwareStore, ApiError> {
    state.firmware.as_deref().ok_or_else(|| {
        ApiError::Unavailable("firmware storage is not configured in this process".into())
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    /// The hardware model the image is built for.
    model: String,
    /// Its semantic version.
    version: String,
    /// Further models that may install it, comma-separated.
    compatible_models: Option<String>,
    /// Release notes.
    notes: Option<String>,
    /// The image's SHA-256 (hex) as the client knows it; also accepted as the
    /// `X-Checksum-Sha256` header. The upload is refused if the bytes differ.
    sha256: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct Uploaded {
    firmware_id: String,
    sha256: String,
    size_bytes: u64,
    version: u64,
    global_position: Option<i64>,
}

#[utoipa::path(
    post, path = "/", tag = "firmware",
    summary = "Upload an image as the raw request body, streamed; registered as a draft (operator, admin)",
    params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored and registered", body = Uploaded),
        (status = 409, description = "This model and version exist already"),
        (status = 413, description = "Larger than the configured limit"),
        (status = 422, description = "The bytes do not have the sha256 the request named, or the body is empty")
    )
)]
async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<Uploaded>), ApiError> {
    caller.require(WRITERS)?;
    let store = firmware_store(&state)?;
    let id = FirmwareId::new(&query.model, &query.version)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let expected = match (&query.sha256, headers.get("x-checksum-sha256")) {
        (Some(digest), _) => Some(digest.clone()),
        (None, Some(value)) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("X-Checksum-Sha256 must be hex".into()))?
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(digest) = &expected {
        if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::BadRequest("sha256 must be 64 hex digits".into()));
        }
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > store.max_image_bytes()) {
        return Err(too_large(store.max_image_bytes()));
    }
    // Refuse a taken id before the bytes travel.
    let taken = state
        .bus
        .firmware()
        .inspect(&id.to_string(), |firmware, _| {
            firmware.status != FirmwareStatus::Unregistered
        })
        .await?;
    if taken {
        return Err(ApiError::Conflict(format!("firmware {id} exists already")));
    }
    let stored = store
        .store(body.into_data_stream(), expected.as_deref())
        .await
        .map_err(|error| match error {
            UploadError::TooLarge(limit) => too_large(limit),
            UploadError::Empty | UploadError::DigestMismatch { .. } => {
                ApiError::Unprocessable(error.to_string())
            }
            UploadError::Body(reason) => ApiError::BadRequest(reason),
            UploadError::Storage(error) => ApiError::Unavailable(Box::new(error)),
        })?;
    let compatible_models = query
        .compatible_models
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    let command = FirmwareCommand::Register {
        firmware_id: id.clone(),
        tenant: caller.tenant.clone(),
        sha256: stored.sha256.clone(),
        size_bytes: stored.size_bytes,
        storage_key: stored.storage_key,
        compatible_models,
        notes: query.notes.unwrap_or_default(),
        at: Utc::now(),
    };
    let metadata = CommandMetadata::new(caller.actor()).with_tenant(caller.tenant.clone());
    // The bytes stay stored if registration fails: content-addressed, another image may share them.
    let Committed {
        version,
        global_position,
        ..
    } = state
        .bus
        .firmware()
        .execute(&id.to_string(), command, &metadata)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(Uploaded {
            firmware_id: id.to_string(),
            sha256: stored.sha256,
            size_bytes: stored.size_bytes,
            version,
            global_position,
        }),
    ))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::Rejected(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the image is larger than the limit of {limit} bytes"),
    )
}

#[utoipa::path(
    get, path = "/{id}/download", tag = "firmware",
    summary = "Download an image; `Range` resumes, `ETag` is the quoted sha256. A user's token, or a device's token with `X-Device-Id` (the device's tenant must own the image)",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`", pattern = "^[A-Za-z0-9_-]{1,64}@(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$")),
    responses(
        (status = 200, description = "The image", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 304, description = "The client's copy (If-None-Match) is current"),
        (status = 416, description = "The range lies beyond the image")
    ),
    security(("bearer" = []), ("device_token" = []))
)]
async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    let store = firmware_store(&state)?;
    let id = parse_id(&id)?;
    let mut downloading_device = None;
    let tenant = match parts.headers.get("x-device-id") {
        Some(device) => {
            let device = device
                .to_str()
                .ok()
                .and_then(|d| DeviceId::parse(d).ok())
                .ok_or_else(|| ApiError::BadRequest("X-Device-Id is not a device id".into()))?;
            let tenant =
                crate::routes::device_ingest::authenticate(&state, &device, &parts.headers).await?;
            downloading_device = Some(device);
            tenant
        }
        None => {
            let caller = <Caller as axum::extract::FromRequestParts<AppState>>::from_request_parts(
                &mut parts, &state,
            )
            .await?;
            caller.require(READERS)?;
            caller.tenant
        }
    };
    let headers = &parts.headers;
    let firmware = state
        .bus
        .firmware()
        .current(&id.to_string())
        .await?
        .aggregate;
    if firmware.status == FirmwareStatus::Unregistered || firmware.tenant.as_ref() != Some(&tenant)
    {
        return Err(ApiError::NotFound("firmware"));
    }
    // A deprecated image goes only to devices already updating to it (to finish a cut
    // download); users may still fetch it to look at it.
    if let (FirmwareStatus::Deprecated, Some(device)) = (firmware.status, &downloading_device) {
        let pending = state
            .bus
            .devices()
            .current(device.as_str())
            .await?
            .aggregate
            .firmware_update
            .map(|update| update.firmware_id);
        if pending.as_ref() != Some(&id) {
            return Err(ApiError::Gone(format!(
                "firmware {id} is deprecated ({}) and no update to it is under way on this device",
                firmware
                    .deprecation_reason
                    .as_deref()
                    .unwrap_or("no reason given")
            )));
        }
    }
    let etag = format!("\"{}\"", firmware.sha256);
    let size = firmware.size_bytes;
    let matches_etag = |value: &HeaderValue| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    };
    if headers.get(header::IF_NONE_MATCH).is_some_and(matches_etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    // A Range applies only if the client's copy is this image (If-Range), or it did not say.
    let range_applies = headers
        .get(header::IF_RANGE)
        .is_none_or(|value| value.to_str().is_ok_and(|v| v.trim() == etag));
    let range = match headers.get(header::RANGE) {
        Some(value) if range_applies => match parse_range(value, size) {
            RangeRequest::Satisfiable(range) => Some(range),
            RangeRequest::Ignored => None,
            RangeRequest::Unsatisfiable => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response());
            }
        },
        _ => None,
    };
    let bytes = store
        .read(&firmware.storage_key, range.clone())
        .await
        .map_err(|error| ApiError::Unavailable(Box::new(error)))?;
    let (status, length) = match &range {
        Some(range) => (StatusCode::PARTIAL_CONTENT, range.end - range.start),
        None => (StatusCode::OK, size),
    };
    let mut response = Response::new(Body::from_stream(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, HeaderValue::try_from(etag).map_err(internal)?);
    headers.insert(
        "x-checksum-sha256",
        HeaderValue::try_from(firmware.sha256.as_str()).map_err(internal)?,
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::try_from(format!(
            "attachment; filename=\"{}.bin\"",
            id.to_string().replace('@', "-")
        ))
        .map_err(internal)?,
    );
    if let Some(range) = range {
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::try_from(format!("bytes {}-{}/{size}", range.start, range.end - 1))
                .map_err(internal)?,
        );
    }
    Ok(response)
}

fn internal(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Internal(Box::new(error))
}

/// What to make of a `Range` header.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// One range within the image: answer 206 with it.
    Satisfiable(std::ops::Range<u64>),
    /// Not a single byte range (several ranges, another unit, malformed): answer the whole
    /// image, as RFC 9110 allows.
    Ignored,
    /// A range that starts beyond the image: 416.
    Unsatisfiable,
}

fn parse_range(value: &HeaderValue, size: u64) -> RangeRequest {
    let Some(spec) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (start.trim().is_empty(), end.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(end) {
            Some(0) => return RangeRequest::Unsatisfiable,
            Some(n) => size.saturating_sub(n)..size,
            None => return RangeRequest::Ignored,
        },
        // bytes=N-: from N to the end.
        (false, true) => match number(start) {
            Some(n) => n..size,
            None => return RangeRequest::Ignored,
        },
        (false, false) => match (number(start), number(end)) {
            (Some(first), Some(last)) if first <= last => first..last.saturating_add(1).min(size),
            _ => return RangeRequest::Ignored,
        },
        (true, true) => return RangeRequest::Ignored,
    };
    if range.start >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Satisfiable(range)
    }
}

#[derive(Serialize, utoipa::ToSchema)]
struct SigningKey {
    /// `ed25519`.
    algorithm: &'static str,
    /// The id OTA messages and released images name.
    key_id: String,
    /// Base64 of the 32-byte public key.
    public_key: String,
    /// The same key as SubjectPublicKeyInfo PEM.
    public_key_pem: String,
}

#[utoipa::path(
    get, path = "/signing-key", tag = "firmware",
    summary = "The public key that checks release signatures: ed25519 over the 32 raw bytes of the image's SHA-256",
    responses((status = 200, description = "The key", body = SigningKey)),
    security(())
)]
async fn signing_key(State(state): State<AppState>) -> Result<axum::Json<SigningKey>, ApiError> {
    let signer = firmware_store(&state)?.signer();
    Ok(axum::Json(SigningKey {
        algorithm: SIGNATURE_ALGORITHM,
        key_id: signer.key_id().to_string(),
        public_key: signer.public_key_base64(),
        public_key_pem: signer.public_key_pem(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |v: &str| parse_range(&HeaderValue::from_str(v).unwrap(), 100);
        assert_eq!(r("bytes=0-9"), RangeRequest::Satisfiable(0..10));
        assert_eq!(r("bytes=90-"), RangeRequest::Satisfiable(90..100));
        assert_eq!(r("bytes=-10"), RangeRequest::Satisfiable(90..100));
        assert_eq!(r("bytes=-500"), RangeRequest::Satisfiable(0..100));
        assert_eq!(r("bytes=50-500"), RangeRequest::Satisfiable(50..100));
        assert_eq!(r("bytes=100-"), RangeRequest::Unsatisfiable);
        assert_eq!(r("bytes=-0"), RangeRequest::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), RangeRequest::Ignored);
        assert_eq!(r("bytes=9-1"), RangeRequest::Ignored);
        assert_eq!(r("items=0-1"), RangeRequest::Ignored);
        assert_eq!(r("bytes=x-"), RangeRequest::Ignored);
        // The largest numbers a client can write.
        assert_eq!(
            r("bytes=0-18446744073709551615"),
            RangeRequest::Satisfiable(0..100)
        );
        assert_eq!(
            r("bytes=18446744073709551615-18446744073709551615"),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            r("bytes=-18446744073709551615"),
            RangeRequest::Satisfiable(0..100)
        );
        assert_eq!(r("bytes=0-18446744073709551616"), RangeRequest::Ignored);
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Deprecate {
    /// 1 to 512 characters, not only blanks.
    #[schema(min_length = 1, max_length = 512)]
    reason: String,
    /// What happens to the rollouts of the image that have not ended: `pause` (the default;
    /// they cannot resume, only be aborted) or `abort` (devices updating are told to give the
    /// update up).
    #[serde(default)]
    rollouts: OnDeprecation,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum OnDeprecation {
    #[default]
    Pause,
    Abort,
}

#[utoipa::path(
    post, path = "/{id}/deprecate", tag = "firmware", summary = "Deprecate an image: no rollout may use it; running ones pause or abort (operator, admin)",
    description = "Rollouts of the image that have not ended are paused (`rollouts: pause`, the default) or aborted (`abort`) by the rollout manager; devices not already updating to the image can no longer download it.",
    params(("id" = String, Path, description = "The firmware id, `{model}@{semver}`", pattern = "^[A-Za-z0-9_-]{1,64}@(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$")), request_body = Deprecate,
    responses((status = 200, description = "Deprecated", body = FirmwareWritten))
)]
async fn deprecate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<Deprecate>,
) -> Result<axum::Json<FirmwareWritten>, ApiError> {
    let command = FirmwareCommand::Deprecate {
        reason: request.reason,
        rollouts: match request.rollouts {
            OnDeprecation::Pause => RolloutsOnDeprecation::Pause,
            OnDeprecation::Abort => RolloutsOnDeprecation::Abort,
        },
        at: Utc::now(),
    };
    execute(&state, &caller, &id, command).await
}
