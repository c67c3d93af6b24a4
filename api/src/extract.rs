//! Extractors whose rejections are problem+json like every other error.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use fleetlog_domain::limits::{json_has_nul, LimitError};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `axum::Json`, answering malformed bodies (bad JSON, unknown fields, wrong types, wrong
/// content type, too large) with a 4xx problem+json instead of plain text. A body holding a
/// NUL character in any string is refused too (422), for every route at once: Postgres can
/// store no NUL in text or jsonb, and an event holding one would poison the read models.
pub struct Json<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::Rejected(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::Rejected(rejection.status(), rejection.body_text()))?;
        if json_has_nul(&bytes) {
            return Err(ApiError::Unprocessable(format!(
                "invalid request body: {}",
                LimitError::Nul
            )));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(error)) => Err(ApiError::BadRequest(format!(
                "invalid request body: {}",
                error.body_text()
            ))),
            Err(rejection) => Err(ApiError::Rejected(
                rejection.status(),
                rejection.body_text(),
            )),
        }
    }
}

/// An optional body: a request without a body and without a content type has none; anything
/// else is read as [`Json`] would read it.
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, ApiError> {
        if request.headers().get(header::CONTENT_TYPE).is_none() {
            let bytes = Bytes::from_request(request, state)
                .await
                .map_err(|rejection| {
                    ApiError::Rejected(rejection.status(), rejection.body_text())
                })?;
            if bytes.is_empty() {
                return Ok(None);
            }
            return Err(ApiError::Rejected(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        <Self as FromRequest<S>>::from_request(request, state)
            .await
            .map(Some)
    }
}

/// `axum::extract::Query`, answering bad query strings with problem+json.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        // A NUL (`%00`) never gets here: the router refuses it for every route.
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// An instant a client names (`at`, `from`, `to`): RFC 3339 between 1970-01-01T00:00:00Z and
/// 9999-12-31T23:59:59Z, so that nothing derived from it can overflow chrono or Postgres.
/// Anything else is refused with a 400 naming the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInstant(pub chrono::DateTime<chrono::Utc>);

impl<'de> serde::Deserialize<'de> for ClientInstant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let instant = chrono::DateTime::<chrono::Utc>::deserialize(deserializer)?;
        fleetlog_domain::limits::check_instant(instant)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}
