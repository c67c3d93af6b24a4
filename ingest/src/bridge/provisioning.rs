//! Provisioning requests over MQTT (`fleetlog_protocol::provisioning`): the bridge answers each
//! on its response topic, through the same flow as `POST /api/v1/provision`
//! (`fleetlog_commands::provisioning`), then acks it. A request is answered once; a request
//! delivered again after its answer went out (the bridge stopped before the ack) is answered
//! again, as "taken" if the first one registered the device.

use fleetlog_commands::provisioning::{self, key_id_of, ProvisionError, ProvisionRequest};
use fleetlog_protocol::provisioning::{parse_request_topic, response_topic, ProvisionResponse};

use super::*;

/// The largest request body taken.
const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// At most this many requests are answered at once; more wait, holding the event loop back.
pub(super) const CONCURRENT_REQUESTS: usize = 16;

/// Whether `topic` is one of the provisioning topics (answered here, not by a shard).
pub(super) fn is_provisioning(topic: &str) -> bool {
    topic
        .strip_prefix(fleetlog_protocol::provisioning::ROOT)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// The provisioning filters, as `settings` subscribes to them.
pub(super) fn filters(settings: &IngestSettings) -> Vec<String> {
    let filter = fleetlog_protocol::provisioning::REQUEST_FILTER;
    match &settings.share_group {
        Some(group) => vec![format!("$share/{group}/{filter}"), filter.to_string()],
        None => vec![filter.to_string()],
    }
}

/// Answers one request and acks it: with `key` and a free slot, through the provisioning flow;
/// without the key, not at all (the request is dropped, never dead-lettered: it holds a key's
/// secret); without a slot, "busy".
pub(super) async fn answer(
    bus: CommandBus,
    key: Option<DeviceCredentialKey>,
    slot: bool,
    client: AsyncClient,
    publish: Publish,
) {
    let request = parse_request_topic(&publish.topic);
    let (Some(key), Some((key_id, request_id)), false) = (key, request, publish.retain) else {
        // No key here, a topic that names no request, or a retained copy (one stored at the
        // broker, delivered again with a new subscription): nothing to answer. Acked, so it
        // stops coming.
        tracing::warn!(
            topic = publish.topic,
            retained = publish.retain,
            "provisioning request dropped"
        );
        let _ = client.ack(&publish).await;
        return;
    };
    let response = if slot {
        respond(&bus, &key, key_id, &publish.payload).await
    } else {
        ProvisionResponse::Refused {
            code: "busy".into(),
            reason: "too many provisioning requests at once; try again shortly".into(),
        }
    };
    let outcome = match &response {
        ProvisionResponse::Provisioned { .. } => "provisioned",
        ProvisionResponse::Refused { code, .. } if code == "unknown_key" => "unknown_key",
        ProvisionResponse::Refused { code, .. } if code == "failed" || code == "busy" => "failed",
        ProvisionResponse::Refused { .. } => "refused",
    };
    metrics::counter!("fleetlog_provisioning_total", "transport" => "mqtt", "outcome" => outcome)
        .increment(1);
    let body = serde_json::to_vec(&response).unwrap_or_default();
    let topic = response_topic(key_id, request_id);
    if let Err(error) = client.publish(topic, QoS::AtLeastOnce, false, body).await {
        // Not acked: the request comes back and is answered then.
        tracing::warn!(%error, "cannot answer a provisioning request");
        return;
    }
    let _ = client.ack(&publish).await;
}

async fn respond(
    bus: &CommandBus,
    key: &DeviceCredentialKey,
    topic_key_id: &str,
    payload: &[u8],
) -> ProvisionResponse {
    let refused = |code: &str, reason: String| ProvisionResponse::Refused {
        code: code.into(),
        reason,
    };
    if payload.len() > MAX_REQUEST_BYTES {
        return refused(
            "invalid",
            format!("a request is at most {MAX_REQUEST_BYTES} bytes"),
        );
    }
    if fleetlog_domain::limits::json_has_nul(payload) {
        return refused("invalid", "the request holds a NUL character".into());
    }
    let request: fleetlog_protocol::provisioning::ProvisionRequest =
        match serde_json::from_slice(payload) {
            Ok(request) => request,
            Err(error) => {
                return refused("invalid", format!("not a provisioning request: {error}"))
            }
        };
    // The account a device connects with is the key's: the request must present that key.
    if key_id_of(&request.provisioning_key)
        .map(|id| id.to_string())
        .as_deref()
        != Some(topic_key_id)
    {
        return refused("unknown_key", ProvisionError::UnknownKey.to_string());
    }
    let request = ProvisionRequest {
        provisioning_key: request.provisioning_key,
        device_id: request.device_id,
        name: request.name,
        model: request.model,
    };
    match provisioning::provision(bus, key, request, Utc::now()).await {
        Ok(provisioned) => {
            let device_id = provisioned.device_id.to_string();
            ProvisionResponse::Provisioned {
                device_token: secrecy::ExposeSecret::expose_secret(&provisioned.secret).to_string(),
                mqtt_username: device_id.clone(),
                mqtt_client_id: device_id.clone(),
                device_id,
            }
        }
        Err(error) => {
            let code = match &error {
                ProvisionError::UnknownKey => "unknown_key",
                ProvisionError::KeyRefused(_) => "key_refused",
                ProvisionError::Invalid(_) => "invalid",
                ProvisionError::Taken(_) => "taken",
                ProvisionError::Failed(_) => "failed",
            };
            refused(code, error.to_string())
        }
    }
}
