//! HTTP ingest for devices that cannot speak MQTT: `POST /api/v1/devices/{id}/telemetry` and the
//! compatibility path `POST /api/devices/data/upload`.
//!
//! Devices authenticate with the device token they were given at registration
//! (`Authorization: Bearer <token>` or `X-Device-Token`), never with a user's JWT. Payloads go
//! through the same parser as MQTT messages (`fleetlog_protocol::message`), so the formats, the
//! validation rules and the reasons are the same; a retry carrying an `Idempotency-Key` header
//! is recorded once.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use fleetlog_commands::credentials::sha256_hex;
use fleetlog_commands::CommandMetadata;
use fleetlog_domain::device::Lifecycle;
use fleetlog_domain::DeviceId;
use fleetlog_protocol::message::{parse_payload, Dropped, Identity, Rejection, TopicKind};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

/// `/api/devices/data/upload`, for devices built against the older upload path.
pub fn compatibility_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upload_compatible))
}

/// A part of a message left out, and why (the schema of `fleetlog_protocol::message::Dropped`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct DroppedPart {
    /// A sensor name, `sensors[3]`, `location`, `timestamp`.
    field: String,
    /// Why it was left out.
    reason: String,
}

/// What happened to an uploaded message.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Accepted {
    device_id: String,
    /// `accepted`, or `partially_accepted` when some parts were dropped.
    outcome: &'static str,
    readings: usize,
    #[schema(value_type = Vec<DroppedPart>)]
    dropped: Vec<Dropped>,
    version: u64,
    global_position: Option<i64>,
}

/// `POST /api/v1/devices/{id}/telemetry`, routed beside the telemetry query.
#[utoipa::path(
    post, path = "/{id}/telemetry", tag = "device ingest", security(("device_token" = [])),
    summary = "A device posts telemetry (device token)",
    description = "The full or the simple telemetry format, judged by the same rules as MQTT. Invalid readings are dropped with a reason and the rest kept. An `Idempotency-Key` header makes retries record once; the same key with another body is a 422.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("Idempotency-Key" = Option<String>, Header, description = "Names the upload so a retry is recorded once")),
    request_body(content = Object, description = "Telemetry, full or simple format"),
    responses((status = 200, description = "Accepted, perhaps partially", body = Accepted))
)]
pub(crate) async fn upload_for_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let device_id = DeviceId::parse(id).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    record(&state, &device_id, &headers, &body).await
}

/// The device is named by `X-Device-Id` or by a `device_id` member of the body.
#[utoipa::path(
    post, path = "/api/devices/data/upload", tag = "device ingest", security(("device_token" = [])),
    summary = "Compatibility upload path (device token)",
    description = "The full telemetry format; the device is named by `X-Device-Id` or a `device_id` member of the body.",
    params(("X-Device-Id" = Option<String>, Header, description = "The device id, unless the body names it")),
    request_body(content = Object, description = "Telemetry in the full format"),
    responses((status = 200, description = "Accepted, perhaps partially", body = Accepted))
)]
async fn upload_compatible(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let from_header = headers
        .get("x-device-id")
        .map(|value| {
            value
                .to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::BadRequest("X-Device-Id is not text".into()))
        })
        .transpose()?;
    let (device_id, body) = match from_header {
        Some(id) => (id, body),
        None => {
            let mut object: serde_json::Map<String, Value> = serde_json::from_slice(&body)
                .map_err(|error| {
                    ApiError::BadRequest(format!("payload is not a JSON object: {error}"))
                })?;
            let Some(Value::String(id)) = object.remove("device_id") else {
                return Err(ApiError::BadRequest(
                    "name the device with an X-Device-Id header or a device_id member".into(),
                ));
            };
            let rest =
                serde_json::to_vec(&object).map_err(|error| ApiError::Internal(Box::new(error)))?;
            (id, Bytes::from(rest))
        }
    };
    let device_id =
        DeviceId::parse(device_id).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    record(&state, &device_id, &headers, &body).await
}

async fn record(
    state: &AppState,
    device_id: &DeviceId,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let tenant = authenticate(state, device_id, headers).await?;
    let message = parse_payload(&TopicKind::Data, body).map_err(|rejection| {
        count("rejected");
        match rejection {
            Rejection::TooLarge(_) => {
                ApiError::Rejected(StatusCode::PAYLOAD_TOO_LARGE, rejection.to_string())
            }
            Rejection::NotJson(_) => ApiError::BadRequest(rejection.to_string()),
            other => ApiError::Unprocessable(other.to_string()),
        }
    })?;
    let received_at = Utc::now();
    let fleetlog_protocol::message::DeviceMessage::Telemetry(telemetry) = &message else {
        unreachable!("a data payload parses into telemetry");
    };
    let identity = match idempotency_key(headers)? {
        Some(key) => {
            let identity = Identity::of_idempotency_key(device_id, key, body);
            // The key was used for another body: a client bug, not a retry. Refused, as the
            // HTTP Idempotency-Key draft asks, instead of answering "accepted" for nothing.
            let prefix = Identity::idempotency_key_prefix(device_id, key);
            let reused = state
                .bus
                .devices()
                .inspect(device_id.as_str(), |device, _| {
                    device
                        .recent_digests
                        .iter()
                        .any(|seen| seen.starts_with(&prefix) && *seen != identity.digest)
                })
                .await?;
            if reused {
                count("rejected");
                return Err(ApiError::Unprocessable(format!(
                    "Idempotency-Key {key:?} was already used for another body"
                )));
            }
            identity
        }
        None if telemetry.is_timestamped() => Identity::of_timestamped(device_id, body),
        None => Identity::unique(device_id, body, received_at),
    };
    let readings = telemetry.readings.len();
    let dropped = telemetry.dropped.clone();
    let metadata = CommandMetadata::new(format!("device:{device_id}")).with_tenant(tenant);
    let committed = state
        .bus
        .devices()
        .execute(
            device_id.as_str(),
            message.into_command(identity, received_at),
            &metadata,
        )
        .await
        .inspect_err(|_| count("rejected"))?;
    let outcome = if dropped.is_empty() {
        "accepted"
    } else {
        "partially_accepted"
    };
    count(outcome);
    Ok((
        StatusCode::OK,
        axum::Json(Accepted {
            device_id: device_id.to_string(),
            outcome,
            readings,
            dropped,
            version: committed.version,
            global_position: committed.global_position,
        }),
    ))
}

fn count(outcome: &'static str) {
    metrics::counter!(
        "fleetlog_ingest_messages_total",
        "transport" => "http",
        "outcome" => outcome
    )
    .increment(1);
}

/// Checks the device token against the hash the device aggregate keeps and answers the
/// device's tenant. Unknown devices, decommissioned ones and wrong tokens get the same answer.
pub(crate) async fn authenticate(
    state: &AppState,
    device_id: &DeviceId,
    headers: &HeaderMap,
) -> Result<fleetlog_domain::TenantId, ApiError> {
    let token = device_token(headers)?;
    let presented = sha256_hex(token.as_bytes());
    let (active, matches, tenant) = state
        .bus
        .devices()
        .inspect(device_id.as_str(), |device, _| {
            let matches = device.credential_hash.as_deref().is_some_and(|stored| {
                fleetlog_commands::credentials::constant_time_eq(
                    stored.as_bytes(),
                    presented.as_bytes(),
                )
            });
            (
                device.lifecycle == Lifecycle::Active,
                matches,
                device.tenant.clone(),
            )
        })
        .await?;
    match tenant {
        Some(tenant) if matches && active => Ok(tenant),
        _ => Err(ApiError::Unauthorized(
            "unknown device or wrong device token".into(),
        )),
    }
}

fn device_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::Unauthorized(
            "send the device token as Authorization: Bearer <token> or X-Device-Token".into(),
        )
    };
    if let Some(value) = headers.get("x-device-token") {
        return value.to_str().map_err(|_| missing());
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(missing)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|value| match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= 255 => Ok(key),
            _ => Err(ApiError::BadRequest(
                "Idempotency-Key must be 1 to 255 visible characters".into(),
            )),
        })
        .transpose()
}
