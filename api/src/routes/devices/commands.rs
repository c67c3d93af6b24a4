//! The device writes: register, update, decommission, desired properties, commands.

use super::*;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateDevice {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    device_id: String,
    /// 1 to 128 characters, no control characters.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    model: String,
    /// At most 32 tags of 1 to 64 characters each, no control characters.
    #[serde(default)]
    #[schema(max_items = 32)]
    tags: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Created {
    #[serde(flatten)]
    write: WriteResult,
    /// The device's secret, shown this once: its MQTT password (with the device id as user
    /// name and client id) and its HTTP ingest token. Only its hash is stored.
    device_token: String,
}

#[utoipa::path(
    post, path = "/", tag = "devices", summary = "Register a device (operator, admin)",
    description = "Answers the device token once; only its hash is stored. The broker accepts the device (user name and client id: its id; password: the token) within seconds.",
    request_body = CreateDevice,
    responses((status = 201, description = "Registered", body = Created))
)]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<CreateDevice>,
) -> Result<(StatusCode, axum::Json<Created>), ApiError> {
    caller.require(WRITERS)?;
    let id = parse_id(&request.device_id)?;
    let now = Utc::now();
    let issued = state.auth.device_key.issue(id.as_str());
    let register = DeviceCommand::Register {
        device_id: id.clone(),
        tenant: caller.tenant.clone(),
        owner: caller.user_id.clone(),
        name: request.name,
        model: request.model,
        tags: request.tags,
        at: now,
        credentials: Some(fleetlog_domain::device::NewCredentials {
            secret_hash: issued.hash,
            salt: Some(issued.salt),
            reason: "issued at registration".into(),
        }),
    };
    let committed = match state
        .bus
        .devices()
        .execute(id.as_str(), register, &metadata(&caller))
        .await
    {
        Err(fleetlog_commands::CommandError::Refused(DeviceError::AlreadyRegistered)) => {
            return Err(ApiError::Conflict(format!("device id {id} is taken")));
        }
        other => other?,
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(Created {
            write: written(id.as_str(), committed).0,
            device_token: issued.secret.expose_secret().to_string(),
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialChange {
    /// Why, for the device's history: 1 to 512 characters.
    #[schema(min_length = 1, max_length = 512)]
    reason: Option<String>,
}

#[utoipa::path(
    post, path = "/{id}/credentials/rotate", tag = "devices",
    summary = "Give the device a new token (operator, admin)",
    description = "Answers the new token once. The old one stops working at once over HTTP and, within seconds, at the broker, which also disconnects the device's sessions.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")),
    request_body(content = CredentialChange, description = "Optional reason"),
    responses((status = 200, description = "Rotated", body = Created))
)]
pub(super) async fn rotate_credentials(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Option<Json<CredentialChange>>,
) -> Result<axum::Json<Created>, ApiError> {
    let id = parse_id(&id)?;
    let reason = request
        .and_then(|Json(change)| change.reason)
        .unwrap_or_else(|| format!("rotated by {}", caller.actor()));
    let issued = state.auth.device_key.issue(id.as_str());
    let command = DeviceCommand::RotateCredentials {
        secret_hash: issued.hash,
        salt: Some(issued.salt),
        reason,
        at: Utc::now(),
    };
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok(axum::Json(Created {
        write: written(id.as_str(), committed).0,
        device_token: issued.secret.expose_secret().to_string(),
    }))
}

#[utoipa::path(
    post, path = "/{id}/credentials/revoke", tag = "devices",
    summary = "Take the device's token away (operator, admin)",
    description = "The device can no longer post over HTTP, and within seconds the broker refuses and disconnects it, until its credentials are rotated. A device without credentials answers 422.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")),
    request_body(content = CredentialChange, description = "Optional reason"),
    responses((status = 200, description = "Revoked", body = WriteResult))
)]
pub(super) async fn revoke_credentials(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: Option<Json<CredentialChange>>,
) -> Result<axum::Json<WriteResult>, ApiError> {
    let id = parse_id(&id)?;
    let reason = request
        .and_then(|Json(change)| change.reason)
        .unwrap_or_else(|| format!("revoked by {}", caller.actor()));
    let command = DeviceCommand::RevokeCredentials {
        reason,
        at: Utc::now(),
    };
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok(written(id.as_str(), committed))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateDevice {
    /// 1 to 128 characters, no control characters.
    #[schema(min_length = 1, max_length = 128)]
    name: Option<String>,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    model: Option<String>,
    /// At most 32 tags of 1 to 64 characters each.
    #[schema(max_items = 32)]
    tags: Option<Vec<String>>,
}

#[utoipa::path(
    patch, path = "/{id}", tag = "devices", summary = "Change name, model or tags",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")), request_body = UpdateDevice,
    responses((status = 200, description = "Changed", body = WriteResult))
)]
pub(super) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<UpdateDevice>,
) -> Result<axum::Json<WriteResult>, ApiError> {
    let id = parse_id(&id)?;
    let command = DeviceCommand::UpdateMetadata {
        name: request.name,
        model: request.model,
        tags: request.tags,
        at: Utc::now(),
    };
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok(written(id.as_str(), committed))
}

#[utoipa::path(
    delete, path = "/{id}", tag = "devices", summary = "Decommission a device",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")),
    responses((status = 200, description = "Decommissioned", body = WriteResult))
)]
pub(super) async fn decommission(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<WriteResult>, ApiError> {
    let id = parse_id(&id)?;
    let command = DeviceCommand::Decommission {
        reason: format!("decommissioned by {}", caller.actor()),
        at: Utc::now(),
    };
    // A DELETE repeated (a retry after a lost answer) finds what the first one did: 200 with
    // the version, nothing written.
    caller.require(WRITERS)?;
    owned_device(&state, &caller, &id).await?;
    let (lifecycle, version) = state
        .bus
        .devices()
        .inspect(id.as_str(), |device, version| (device.lifecycle, version))
        .await?;
    if lifecycle == Lifecycle::Decommissioned {
        return Ok(axum::Json(WriteResult {
            device_id: id.to_string(),
            version,
            global_position: None,
        }));
    }
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok(written(id.as_str(), committed))
}

#[utoipa::path(
    put, path = "/{id}/desired", tag = "devices", summary = "Set desired properties",
    description = "A one-level merge patch: `null` removes a property. The device receives them retained on `devices/{id}/desired`.",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")), request_body(content = Object, description = "Properties to set: 1 to 128 keys matching `^[A-Za-z_][A-Za-z0-9_]{0,63}$`; the whole desired document stays within 64 KiB and 256 keys"),
    responses((status = 200, description = "Set", body = WriteResult))
)]
pub(super) async fn set_desired(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(properties): Json<Map<String, Value>>,
) -> Result<axum::Json<WriteResult>, ApiError> {
    let id = parse_id(&id)?;
    let command = DeviceCommand::SetDesired {
        properties,
        at: Utc::now(),
    };
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok(written(id.as_str(), committed))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IssueCommand {
    #[schema(pattern = "^[a-z_][a-z0-9_]{0,49}$")]
    name: String,
    /// A JSON object of at most 64 KiB and 256 keys.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    params: Value,
    /// Seconds the device has to answer; 1 to 86,400 (default 300).
    #[schema(minimum = 1, maximum = 86_400)]
    ttl_secs: Option<i64>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CommandAccepted {
    command_id: String,
    #[serde(flatten)]
    write: WriteResult,
}

#[utoipa::path(
    post, path = "/{id}/commands", tag = "devices", summary = "Send a command to the device",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("If-Match" = Option<String>, Header, description = "Write only if the device is at this version (the ETag of a read); 412 otherwise")), request_body = IssueCommand,
    responses((status = 202, description = "Accepted; follow it with the command status route", body = CommandAccepted))
)]
pub(super) async fn issue_command(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<IssueCommand>,
) -> Result<(StatusCode, axum::Json<CommandAccepted>), ApiError> {
    let id = parse_id(&id)?;
    let ttl = request.ttl_secs.unwrap_or(300);
    if !(1..=86_400).contains(&ttl) {
        return Err(ApiError::BadRequest("ttl_secs must be 1 to 86400".into()));
    }
    let command_id = CommandId::parse(uuid::Uuid::now_v7().simple().to_string())
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    let now = Utc::now();
    let command = DeviceCommand::IssueCommand {
        command_id: command_id.clone(),
        name: request.name,
        params: request.params,
        issued_at: now,
        expires_at: now + chrono::Duration::seconds(ttl),
    };
    let committed = execute(&state, &caller, &headers, &id, command).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(CommandAccepted {
            command_id: command_id.to_string(),
            write: written(id.as_str(), committed).0,
        }),
    ))
}
