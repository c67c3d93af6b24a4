//! fleetlog's HTTP API (axum).
//!
//! Operations endpoints: `GET /health` (the process is up), `GET /ready` (its database answers)
//! and `GET /metrics` (Prometheus). Under `/api/v1`: authentication (`auth/login`,
//! `auth/refresh`, `auth/logout`, see [`auth`]) and `users/me`. Every error, unknown routes and
//! methods and malformed bodies included, is RFC 7807 problem+json ([`error`]).
//!
//! Handlers are thin: extract (the [`auth::Caller`] carries tenant and roles from the access
//! token), build a command or query, one call, map the result.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use fleetlog_commands::CommandBus;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod auth;
pub mod consistency;
pub mod error;
pub mod extract;
mod openapi;
mod routes;
pub mod throttle;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{header, HeaderValue};
use axum::middleware;
use axum::response::Response;
use tower::util::option_layer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::Auth;
use crate::error::problem;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Token keys and lifetimes.
    pub auth: Arc<Auth>,
    /// The NATS connection, when this process has one: readiness reports on it. Behind an
    /// `Arc` because every request clones the state, and a client's clone is not cheap.
    pub nats: Option<Arc<async_nats::Client>>,
    /// The MQTT broker, when this process should report on it in readiness.
    pub mqtt: Option<Arc<fleetlog_broker::BrokerUrl>>,
    /// Limits on login attempts.
    pub login_throttle: Arc<throttle::LoginThrottle>,
    /// The write side; its pool also answers readiness.
    pub bus: CommandBus,
    /// Renders the process's metrics for `GET /metrics`; `None` when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// Firmware image storage and the release signing key; `None`: firmware upload, download
    /// and release answer 503.
    pub firmware: Option<Arc<fleetlog_firmware::FirmwareStore>>,
    /// What a clustered broker's HTTP authentication needs; `None`: its routes answer 404.
    pub broker_auth: Option<Arc<BrokerAuth>>,
}

/// Device identity for a broker that asks over HTTP (see `routes::broker_auth`).
#[derive(Debug)]
pub struct BrokerAuth {
    /// The secret the broker presents as a bearer token.
    pub token: secrecy::SecretString,
    /// The device topics' root (`devices`).
    pub topic_root: String,
}

/// Limits and cross-origin rules of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The longest a request may take before it is answered with 408.
    pub request_timeout: Duration,
    /// Origins allowed to call the API from a browser; empty: no CORS headers at all.
    pub cors_origins: Vec<HeaderValue>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

/// The API's routes with default HTTP settings.
pub fn router(state: AppState) -> Router {
    router_with(state, &HttpSettings::default())
}

/// The API's routes: request ids (`x-request-id`, generated when absent, echoed back), a span
/// per request, timeout, CORS, body limit, and problem+json for every bare error response.
pub fn router_with(state: AppState, http: &HttpSettings) -> Router {
    let cors = (!http.cors_origins.is_empty()).then(|| {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(http.cors_origins.clone()))
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers([header::ETAG, HeaderName::from_static("x-request-id")])
    });
    routes(state)
        .layer(CatchPanicLayer::custom(answer_panic))
        .layer(middleware::from_fn(refuse_nul_in_uri))
        .layer(middleware::map_response(problem_for_bare_errors))
        .layer(middleware::from_fn(record_request))
        .layer(option_layer(cors))
        .layer(middleware::from_fn({
            let limit = http.request_timeout;
            move |request: Request, next: middleware::Next| bounded(limit, request, next)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(
                    |response: &Response, _latency: Duration, span: &tracing::Span| {
                        span.record("http.response.status_code", response.status().as_u16());
                        if response.status().is_server_error() {
                            span.record("otel.status_code", "ERROR");
                        }
                    },
                ),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The span of one request, named by OpenTelemetry's HTTP conventions (`POST
/// /api/v1/devices/{id}/commands`, the route template, not the raw path), continuing the
/// caller's trace when the request carries a W3C `traceparent`.
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {}", request.method(), route.unwrap_or("unmatched")),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %request.method(),
        http.route = route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        request_id,
    );
    if let Some(parent) = fleetlog_trace::from_http_headers(request.headers()) {
        fleetlog_trace::follow(&span, parent);
    }
    span
}

/// `%00` (the only way to write a NUL in a URI) anywhere in the path or the query answers 400
/// before any route sees it: path parameters and query values reach Postgres, which can
/// store no NUL, and would otherwise answer 5xx.
async fn refuse_nul_in_uri(request: Request, next: middleware::Next) -> Response {
    let holds_nul = request
        .uri()
        .path_and_query()
        .is_some_and(|uri| uri.as_str().contains("%00"));
    if holds_nul {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("invalid URI: {}", fleetlog_domain::limits::LimitError::Nul),
        );
    }
    next.run(request).await
}

/// A handler that panicked (a bug: no input is meant to reach one) answers 500 problem+json,
/// is logged with the panic message and counted in `fleetlog_http_panics_total`; the server
/// and every other request go on.
fn answer_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    metrics::counter!("fleetlog_http_panics_total").increment(1);
    tracing::error!(panic = message, "a request handler panicked");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "an internal error occurred".into(),
    )
}

/// Answers 408 when a request takes longer than `limit`. Firmware uploads are exempt: they
/// stream as long as the image takes to arrive (downloads stream after the response started,
/// which no timeout here covers).
async fn bounded(limit: Duration, request: Request, next: middleware::Next) -> Response {
    let upload = request.method() == axum::http::Method::POST
        && request.uri().path().trim_end_matches('/') == "/api/v1/firmware";
    if upload {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => problem(StatusCode::REQUEST_TIMEOUT, "request timeout".into()),
    }
}

/// Counts each request and times it, labelled by method, route template (not the raw path, so
/// ids do not explode the label space) and status.
async fn record_request(request: Request, next: middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let response = next.run(request).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("fleetlog_http_requests_total", &labels).increment(1);
    metrics::histogram!("fleetlog_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Errors produced outside the handlers (timeouts, path rejections) come without a body;
/// give them the same problem+json as everything else.
async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let bare = response.headers().get(header::CONTENT_TYPE).is_none();
    if (status.is_client_error() || status.is_server_error()) && bare {
        let detail = status.canonical_reason().unwrap_or("error").to_lowercase();
        let mut replaced = problem(status, detail);
        for (name, value) in response.headers() {
            replaced.headers_mut().entry(name).or_insert(value.clone());
        }
        return replaced;
    }
    response
}

fn routes(state: AppState) -> Router {
    let (api, document) = split_api();
    let document = Arc::new(document);
    api.route(
        "/openapi.json",
        get({
            let document = document.clone();
            move || async move { Json(document.as_ref().clone()) }
        }),
    )
    .merge(
        utoipa_swagger_ui::SwaggerUi::new("/docs")
            .config(utoipa_swagger_ui::Config::from("/openapi.json")),
    )
    .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such route".into()) })
    .method_not_allowed_fallback(|| async {
        problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route".into(),
        )
    })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

/// Every API route with its OpenAPI operation: the document is built from the same
/// registrations that route requests, so it cannot leave a route out.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .nest("/api/v1/auth", routes::auth::router())
        .nest("/api/v1/users", routes::users::router())
        .nest("/api/v1/devices", routes::devices::router())
        .nest("/api/v1/firmware", routes::firmware::router())
        .nest("/api/v1/rollouts", routes::rollouts::router())
        .nest("/api/v1/stream", routes::stream::router())
        .nest("/api/v1/broker", routes::broker_auth::router())
        .nest(
            "/api/v1/provisioning-keys",
            routes::provisioning::keys_router(),
        )
        .nest(
            "/api/v1/provision",
            routes::provisioning::provision_router(),
        )
        .merge(routes::device_ingest::compatibility_router())
}

/// The OpenAPI document of this API, as `GET /openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    split_api().1
}

/// The API's routes and their finished OpenAPI document.
fn split_api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (api, mut document) = api_router().split_for_parts();
    openapi::add_problem_responses(&mut document);
    (api, document)
}

/// Serves the API on `listener` until `shutdown` completes, then lets requests in flight finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    http: &HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "api listening");
    axum::serve(
        listener,
        router_with(state, http).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Prometheus text format: every metric the roles of this process record (projection lag and
/// outcomes, liveness, ...).
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 404, description = "No metrics recorder in this process", content_type = "text/plain", body = String)))]
async fn metrics(
    State(state): State<AppState>,
) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    metrics_page(state.metrics.as_ref())
}

/// The `GET /metrics` answer of a process whose recorder is `handle`: what the API serves, and
/// what a role run alone serves on its own port.
pub fn metrics_page(
    handle: Option<&PrometheusHandle>,
) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    let content_type = (CONTENT_TYPE, "text/plain; version=0.0.4");
    match handle {
        Some(handle) => (StatusCode::OK, [content_type], handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            [content_type],
            "metrics are not recorded in this process\n".into(),
        ),
    }
}

/// Liveness: the process answers. Also what a role run alone answers on its metrics port.
#[utoipa::path(get, path = "/health", tag = "operations", security(()),
    summary = "The process is up",
    responses((status = 200, description = "Up", body = Object)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the dependencies answer.
#[utoipa::path(get, path = "/ready", tag = "operations", security(()),
    summary = "Postgres, NATS and MQTT are reachable",
    responses((status = 200, description = "Ready, with each check", body = Object),
        (status = 503, description = "Not ready, with the failing checks", body = Object)))]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(state.bus.pool());
    let database = match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => "ok",
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: database unreachable");
            "unreachable"
        }
        Err(_) => "timeout",
    };
    let mut checks = json!({"database": database});
    if let Some(nats) = &state.nats {
        let connected = nats.connection_state() == async_nats::connection::State::Connected;
        checks["nats"] = json!(if connected { "ok" } else { "unreachable" });
    }
    if let Some(broker) = &state.mqtt {
        checks["mqtt"] = json!(match broker.probe(Duration::from_secs(2)).await {
            Ok(()) => "ok",
            Err(error) => {
                tracing::warn!(%error, broker = %broker, "readiness: MQTT broker unreachable");
                "unreachable"
            }
        });
    }
    let ready = checks
        .as_object()
        .is_some_and(|c| c.values().all(|v| v == "ok"));
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (status, Json(json!({"status": word, "checks": checks})))
}
