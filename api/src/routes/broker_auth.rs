//! `/api/v1/broker/authenticate` and `/api/v1/broker/authorize`: device identity for a broker
//! that asks over HTTP instead of holding accounts, such as a clustered EMQX (its HTTP
//! authenticator and HTTP authorizer), so a million connections need not live in Mosquitto's
//! dynamic-security plugin.
//!
//! The broker calls with the shared secret `FLEETLOG_BROKER_AUTH_TOKEN` as a bearer token, and
//! the answer is EMQX's: `{"result": "allow" | "deny" | "ignore"}`, always with status 200
//! once the caller is the broker.
//!
//! - A device connects with its id as user name and client id and its device token as password:
//!   `allow` when the token matches the credential the log holds and the device is active,
//!   `deny` otherwise (unknown devices, wrong tokens and decommissioned devices alike).
//! - A device may publish and subscribe only on its own topics (`fleetlog_broker::access`):
//!   `allow` or `deny`, judged again on every question, so a decommissioned or revoked device
//!   loses its rights as soon as the broker asks again (mind the broker's cache of answers).
//! - User names that cannot be device ids (the service accounts `fleetlog.ingest` and
//!   `fleetlog.dispatch`, provisioning accounts) get `ignore`: the broker's next authenticator
//!   or authorizer (its built-in database, its ACL file) decides for them.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use fleetlog_broker::access::{device_may, TopicAction};
use fleetlog_commands::credentials::{constant_time_eq, sha256_hex};
use fleetlog_domain::device::Lifecycle;
use fleetlog_domain::DeviceId;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::error::ApiError;
use crate::AppState;

/// The broker's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(authenticate))
        .routes(routes!(authorize))
}

/// A connection attempt, as the broker forwards it.
#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct Connecting {
    /// The MQTT client id.
    #[schema(max_length = 65535)]
    clientid: String,
    /// The MQTT user name.
    #[schema(max_length = 65535)]
    username: String,
    /// The MQTT password: a device's token.
    #[serde(default)]
    #[schema(max_length = 65535)]
    password: String,
}

/// A publish or a subscription, as the broker forwards it.
#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct Acting {
    /// The MQTT client id.
    clientid: String,
    /// The MQTT user name.
    username: String,
    /// The topic published to, or the filter subscribed to.
    topic: String,
    /// `publish` or `subscribe`.
    #[schema(value_type = String)]
    action: TopicAction,
}

/// The broker's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Verdict {
    /// `allow`, `deny`, or `ignore` (let the broker's next source decide).
    result: &'static str,
    /// Never a superuser: present on authentication answers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    is_superuser: Option<bool>,
}

impl Verdict {
    fn of(result: &'static str, authentication: bool) -> Json<Self> {
        Json(Self {
            result,
            is_superuser: authentication.then_some(false),
        })
    }
}

#[utoipa::path(
    post, path = "/authenticate", tag = "broker", security(("broker_token" = [])),
    summary = "A device connects to the broker (for the broker)",
    description = "EMQX's HTTP authentication: `allow` for a device connecting with its id as user name and client id and its current token as password, `deny` for other devices, `ignore` for user names that are not device ids (service accounts).",
    request_body = Connecting,
    responses((status = 200, description = "The verdict", body = Verdict))
)]
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(connecting): Json<Connecting>,
) -> Result<Json<Verdict>, ApiError> {
    check_broker(&state, &headers)?;
    let Ok(device) = DeviceId::parse(&connecting.username) else {
        return Ok(verdict("authenticate", "ignore", true));
    };
    if connecting.clientid != connecting.username || connecting.password.is_empty() {
        return Ok(verdict("authenticate", "deny", true));
    }
    let presented = sha256_hex(connecting.password.as_bytes());
    let admitted = state
        .bus
        .devices()
        .inspect(device.as_str(), |device, _| {
            device.lifecycle == Lifecycle::Active
                && device
                    .credential_hash
                    .as_deref()
                    .is_some_and(|stored| constant_time_eq(stored.as_bytes(), presented.as_bytes()))
        })
        .await?;
    Ok(verdict(
        "authenticate",
        if admitted { "allow" } else { "deny" },
        true,
    ))
}

#[utoipa::path(
    post, path = "/authorize", tag = "broker", security(("broker_token" = [])),
    summary = "A device publishes or subscribes (for the broker)",
    description = "EMQX's HTTP authorization: `allow` for an active device on its own topics (the device contract), `deny` for any other topic, `ignore` for user names that are not device ids.",
    request_body = Acting,
    responses((status = 200, description = "The verdict", body = Verdict))
)]
pub(crate) async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(acting): Json<Acting>,
) -> Result<Json<Verdict>, ApiError> {
    let root = check_broker(&state, &headers)?;
    let Ok(device) = DeviceId::parse(&acting.username) else {
        return Ok(verdict("authorize", "ignore", false));
    };
    if acting.clientid != acting.username
        || !device_may(&root, device.as_str(), acting.action, &acting.topic)
    {
        return Ok(verdict("authorize", "deny", false));
    }
    let active = state
        .bus
        .devices()
        .inspect(device.as_str(), |device, _| {
            device.lifecycle == Lifecycle::Active && device.credential_hash.is_some()
        })
        .await?;
    Ok(verdict(
        "authorize",
        if active { "allow" } else { "deny" },
        false,
    ))
}

/// The verdict, counted by question and result.
fn verdict(question: &'static str, result: &'static str, authentication: bool) -> Json<Verdict> {
    metrics::counter!("fleetlog_broker_auth_total", "question" => question, "result" => result)
        .increment(1);
    Verdict::of(result, authentication)
}

/// The caller is the broker: it presents the shared secret. Answers the topic root.
fn check_broker(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(broker) = &state.broker_auth else {
        return Err(ApiError::NotFound(
            "broker authentication is off: set FLEETLOG_BROKER_AUTH_TOKEN",
        ));
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(
        sha256_hex(presented.as_bytes()).as_bytes(),
        sha256_hex(broker.token.expose_secret().as_bytes()).as_bytes(),
    ) {
        return Err(ApiError::Unauthorized(
            "the broker's calls carry FLEETLOG_BROKER_AUTH_TOKEN as a bearer token".into(),
        ));
    }
    Ok(broker.topic_root.clone())
}
