//! Read-your-writes and conditional writes.
//!
//! Every write answers with the aggregate's `version` and the `global_position` of its last
//! event. A query may pass `min_position`: it then waits, up to [`MAX_WAIT`], until the read
//! model it reads has applied the event at that position, else answers 503 with Retry-After.
//! A write may pass `If-Match: "<version>"` (the `ETag` of a read): it is refused with 412 if
//! the aggregate moved on.

use std::time::{Duration, Instant};

use axum::http::header::IF_MATCH;
use axum::http::HeaderMap;
use fleetlog_domain::TenantId;
use fleetlog_projections::{Projection, ProjectionError};
use sqlx::PgPool;

use crate::error::ApiError;

/// The longest a query waits for its read model.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// The aggregate type a projection reads.
fn aggregate_type_of<P: Projection>(_: &P) -> &'static str {
    P::AGGREGATE_TYPE
}

/// Waits until `projection` has applied the event at `position`: read-your-writes. Only an
/// event the read model will apply is waited for, one of its own aggregate type and of the
/// caller's `tenant`; for any other (a user event given to a device query, another tenant's
/// event) there is nothing to wait for and the query answers at once, so the answer tells
/// nothing about another tenant's events.
pub async fn wait_for_position(
    pool: &PgPool,
    projection: &str,
    position: i64,
    tenant: &TenantId,
) -> Result<(), ApiError> {
    let Some(event) = fleetlog_eventlog::at_position(pool, position).await? else {
        return Err(ApiError::BadRequest(format!(
            "min_position {position} names no event"
        )));
    };
    let reads = fleetlog_projections::with_projection!(projection, |read_model| {
        aggregate_type_of(&read_model)
    })
    .ok_or_else(|| ApiError::Internal(format!("no projection named {projection}").into()))?;
    let of_tenant = event.metadata.get("tenant").and_then(|t| t.as_str()) == Some(tenant.as_str());
    if event.aggregate_type != reads || !of_tenant {
        return Ok(());
    }
    let deadline = Instant::now() + MAX_WAIT;
    loop {
        let applied = fleetlog_projections::with_projection!(projection, |read_model| {
            fleetlog_projections::has_applied(&read_model, pool, &event).await
        })
        .ok_or_else(|| ApiError::Internal(format!("no projection named {projection}").into()))?
        .map_err(|error| match error {
            ProjectionError::Database(error) => ApiError::from(error),
            other => ApiError::Internal(Box::new(other)),
        })?;
        if applied {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NotCaughtUp(position));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version named by `If-Match: "<version>"`, if the header is there.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim().trim_matches('"'))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest("If-Match must be an entity tag like \"7\" (a version)".into())
        })
}
