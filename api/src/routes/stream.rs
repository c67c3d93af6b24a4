//! Live event streams as Server-Sent Events: `GET /api/v1/devices/{id}/stream` (one device) and
//! `GET /api/v1/stream` (every device, firmware and rollout event of the caller's tenant).
//!
//! Each connection reads `FLEETLOG_EVENTS` through its own ordered, ephemeral JetStream
//! consumer, so a slow client slows only itself and the server forgets it once it leaves. The SSE
//! `id` of an event is its JetStream stream sequence: a client that reconnects with
//! `Last-Event-ID` (header or `last_event_id` query parameter) gets every event after the last
//! one it saw, in order, none twice. Without it, the stream starts with the next new event.
//!
//! Scoping: the device stream subscribes to that device's subject after checking the device is
//! the caller's; the tenant stream keeps events whose metadata names the caller's tenant (the
//! write side stamps every event with its aggregate's tenant). User events never appear on a
//! stream, and secrets (a device's credential hash) are removed from payloads.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use fleetlog_domain::user::Role;
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::{
    subject_filter_for_aggregate, subject_filter_for_type, SUBJECT_PREFIX,
};
use fleetlog_nats::STREAM_NAME;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Query;
use crate::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer];

/// Aggregate types a stream may carry. Users are left out: their events are account security.
const STREAMED_TYPES: &[&str] = &["device", "firmware", "rollout"];

/// The tenant-wide stream (mounted at `/api/v1/stream`).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tenant_stream))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    /// Resume after this event id, as `Last-Event-ID` does (for clients that cannot set headers).
    last_event_id: Option<u64>,
    /// Only events of this aggregate type: `device`, `firmware` or `rollout`.
    #[serde(rename = "type")]
    aggregate_type: Option<String>,
}

type EventStream = Sse<
    axum::response::sse::KeepAliveStream<
        std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>,
    >,
>;

/// `GET /api/v1/devices/{id}/stream`, routed beside the other device routes.
#[utoipa::path(
    get, path = "/{id}/stream", tag = "live", summary = "The device's events as Server-Sent Events",
    description = "Each SSE `id` is a stream position: reconnect with `Last-Event-ID` (or `last_event_id`) to continue after it without gaps or repeats.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"), StreamQuery),
    responses((status = 200, description = "An event stream; each event's data is the event envelope", content_type = "text/event-stream", body = String))
)]
pub(crate) async fn device_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Result<EventStream, ApiError> {
    caller.require(READERS)?;
    let id = fleetlog_domain::DeviceId::parse(id)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let device = state.bus.devices().current(id.as_str()).await?.aggregate;
    if device.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("device"));
    }
    if query.aggregate_type.is_some() {
        return Err(ApiError::BadRequest(
            "a device stream carries device events only".into(),
        ));
    }
    let resume = resume_after(&headers, query.last_event_id)?;
    open(
        &state,
        subject_filter_for_aggregate("device", id.as_str()),
        caller,
        resume,
    )
    .await
}

#[utoipa::path(
    get, path = "/", tag = "live", summary = "Every device, firmware and rollout event of the tenant as Server-Sent Events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"), StreamQuery),
    responses((status = 200, description = "An event stream; each event's data is the event envelope", content_type = "text/event-stream", body = String))
)]
async fn tenant_stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Result<EventStream, ApiError> {
    caller.require(READERS)?;
    let subject = match query.aggregate_type.as_deref() {
        None => format!("{}.>", SUBJECT_PREFIX),
        Some(kind) if STREAMED_TYPES.contains(&kind) => subject_filter_for_type(kind),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "type {other:?} is not one of device, firmware, rollout"
            )))
        }
    };
    let resume = resume_after(&headers, query.last_event_id)?;
    open(&state, subject, caller, resume).await
}

/// The id to resume after: the `Last-Event-ID` header wins over the query parameter.
fn resume_after(headers: &HeaderMap, from_query: Option<u64>) -> Result<Option<u64>, ApiError> {
    match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest("Last-Event-ID must be an event id from this stream".into())
            }),
        None => Ok(from_query),
    }
}

async fn open(
    state: &AppState,
    filter_subject: String,
    caller: Caller,
    resume_after: Option<u64>,
) -> Result<EventStream, ApiError> {
    let client = state.nats.as_deref().cloned().ok_or_else(|| {
        ApiError::Unavailable("live streams need NATS, and this process has no connection".into())
    })?;
    let jetstream = async_nats::jetstream::new(client);
    let unavailable = |error: String| ApiError::Unavailable(error.into());
    let stream = jetstream
        .get_stream(STREAM_NAME)
        .await
        .map_err(|error| unavailable(error.to_string()))?;
    let deliver_policy = match resume_after {
        Some(last) => DeliverPolicy::ByStartSequence {
            start_sequence: last.saturating_add(1),
        },
        None => DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject,
            deliver_policy,
            // Short pulls: a client that left is noticed (and its consumer dropped) quickly.
            max_expires: Duration::from_secs(5),
            ..OrderedConfig::default()
        })
        .await
        .map_err(|error| unavailable(error.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|error| unavailable(error.to_string()))?;
    let tenant = caller.tenant.to_string();
    // The stream ends when the access token does: a caller logged out or disabled since keeps
    // nothing past that. Clients reconnect with a fresh token and `Last-Event-ID`.
    let token_left = caller.expires_at.map(|expires_at| {
        (expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
    });
    let expired = async move {
        match token_left {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    let events = messages
        .take_until(expired)
        .take_while(|message| {
            let keep_going = message.is_ok();
            if let Err(error) = message {
                tracing::warn!(%error, "live stream ended by JetStream");
            }
            std::future::ready(keep_going)
        })
        .filter_map(move |message| {
            let event = message.ok().and_then(|message| {
                let sequence = message.info().ok()?.stream_sequence;
                let envelope: EventEnvelope = serde_json::from_slice(&message.payload).ok()?;
                to_sse(envelope, sequence, &tenant)
            });
            std::future::ready(event.map(Ok))
        });
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The SSE frame for an event the caller may see, or `None`.
fn to_sse(mut envelope: EventEnvelope, sequence: u64, tenant: &str) -> Option<Event> {
    if !STREAMED_TYPES.contains(&envelope.aggregate_type.as_str())
        || envelope.metadata.get("tenant").and_then(Value::as_str) != Some(tenant)
    {
        return None;
    }
    envelope.redact_secrets();
    Event::default()
        .id(sequence.to_string())
        .event(envelope.event_type.clone())
        .json_data(&envelope)
        .ok()
}
