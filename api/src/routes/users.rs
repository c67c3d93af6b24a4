//! `/api/v1/users`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use fleetlog_domain::user::Role;
use serde::Serialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/me", get(me))
}

/// A user as the API shows it: never a secret.
#[derive(Serialize)]
struct UserView {
    user_id: String,
    tenant: String,
    username: String,
    roles: Vec<Role>,
    disabled: bool,
}

async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<UserView>, ApiError> {
    let user = state
        .bus
        .users()
        .current(caller.user_id.as_str())
        .await?
        .aggregate;
    if user.tenant.as_ref() != Some(&caller.tenant) {
        return Err(ApiError::NotFound("user"));
    }
    Ok(Json(UserView {
        user_id: caller.user_id.to_string(),
        tenant: caller.tenant.to_string(),
        username: user.username,
        roles: user.roles,
        disabled: user.disabled,
    }))
}
