//! The API's one error type, answered as RFC 7807 `application/problem+json`.
//!
//! Client mistakes map to 4xx with a detail that says what to fix; failures of the platform
//! map to 503 (dependency down) or 500, logged with their cause chain and answered with an
//! opaque body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fleetlog_commands::{CommandError, StoreError};
use serde::Serialize;

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, unknown fields, wrong types, invalid parameters.
    #[error("{0}")]
    BadRequest(String),
    /// A body the extractor refused, with the status it chose (400, 413, 415, 422).
    #[error("{1}")]
    Rejected(StatusCode, String),
    /// No or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the role does not allow it.
    #[error("your role does not allow this")]
    Forbidden,
    /// Nothing there for this caller (including things of other tenants).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with the current state (e.g. it exists already).
    #[error("{0}")]
    Conflict(String),
    /// What was asked for was withdrawn for good (a deprecated image).
    #[error("{0}")]
    Gone(String),
    /// The request is well-formed but the domain refuses it.
    #[error("{0}")]
    Unprocessable(String),
    /// A conditional write (`If-Match`) found another version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The read model has not yet reached the position the client asked to see.
    #[error("the read model has not caught up with position {0} yet; retry shortly")]
    NotCaughtUp(i64),
    /// Too many attempts; retry later.
    #[error("too many attempts; retry in {retry_after} s")]
    TooManyRequests {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// A dependency (Postgres, NATS) is unavailable.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A bug or an unexpected failure.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An RFC 7807 problem: every error the API answers, as `application/problem+json`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem<'a> {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    kind: &'a str,
    /// The status's reason phrase.
    title: &'a str,
    /// The HTTP status.
    status: u16,
    /// What went wrong and, for client errors, what to change.
    detail: String,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Rejected(status, _) => *status,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::NotCaughtUp(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Builds a problem+json response.
pub fn problem(status: StatusCode, detail: String) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = Problem {
        kind: "about:blank",
        title,
        status: status.as_u16(),
        detail,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Unavailable(cause) => {
                tracing::warn!(error = %cause, "dependency unavailable");
                "a dependency is unavailable; retry shortly".to_string()
            }
            Self::Internal(cause) => {
                let mut chain = cause.to_string();
                let mut source = cause.source();
                while let Some(next) = source {
                    chain.push_str(": ");
                    chain.push_str(&next.to_string());
                    source = next.source();
                }
                tracing::error!(error = chain, "internal error");
                "an internal error occurred".to_string()
            }
            other => other.to_string(),
        };
        let mut response = problem(status, detail);
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fleetlog\""),
                );
            }
            Self::TooManyRequests { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            Self::Unavailable(_) | Self::NotCaughtUp(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Database(error) => Self::Unavailable(Box::new(error)),
            other => Self::Internal(Box::new(other)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::from(StoreError::Database(error))
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<CommandError<E>> for ApiError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Refused(refusal) => Self::Unprocessable(refusal.to_string()),
            unstorable @ CommandError::Unstorable { .. } => {
                Self::Unprocessable(unstorable.to_string())
            }
            conflict @ CommandError::Conflict { .. } => Self::Conflict(conflict.to_string()),
            mismatch @ CommandError::VersionMismatch { .. } => {
                Self::PreconditionFailed(mismatch.to_string())
            }
            CommandError::Store(error) => error.into(),
        }
    }
}
