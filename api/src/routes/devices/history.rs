//! A device's event history, a page at a time, from the event log.

use super::*;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Only events after this sequence (the `next_after` of the previous page).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Only events of this type.
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventView {
    sequence: i64,
    global_position: i64,
    event_type: String,
    event_version: String,
    recorded_at: DateTime<Utc>,
    actor: Option<String>,
    correlation_id: Option<String>,
    /// The event, tagged with its type: `{"<event_type>": {fields}}`.
    #[schema(value_type = Value)]
    payload: fleetlog_eventlog::Payload,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventPage {
    items: Vec<EventView>,
    next_after: Option<i64>,
}

/// The device's history, oldest first, a page at a time.
#[utoipa::path(
    get, path = "/{id}/events", tag = "devices", summary = "The device's event history, paged",
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_-]{1,64}$"), EventsQuery),
    responses((status = 200, description = "A page of events", body = EventPage))
)]
pub(super) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    caller.require(READERS)?;
    let id = parse_id(&id)?;
    owned_device(&state, &caller, &id).await?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let mut events = fleetlog_eventlog::history(
        state.bus.pool(),
        fleetlog_eventlog::HistoryQuery {
            aggregate_type: "device",
            aggregate_id: id.as_str(),
            after_sequence: query.after.unwrap_or(0),
            event_type: query.event_type.as_deref(),
            limit: limit + 1,
        },
    )
    .await?;
    let next_after = if events.len() as i64 > limit {
        events.truncate(limit as usize);
        events.last().map(|e| e.sequence)
    } else {
        None
    };
    let items = events
        .into_iter()
        .map(|mut event| {
            event.redact_secrets();
            let text = |key: &str| {
                event
                    .metadata
                    .get(key)
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            EventView {
                actor: text("actor"),
                correlation_id: text("correlation_id"),
                sequence: event.sequence,
                global_position: event.global_position,
                event_type: event.event_type,
                event_version: event.event_version,
                recorded_at: event.recorded_at,
                payload: event.payload,
            }
        })
        .collect();
    Ok(axum::Json(EventPage { items, next_after }))
}
