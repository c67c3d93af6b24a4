//! Provisioning over MQTT: the topics and payloads a new device uses to present a provisioning
//! key and receive its own credentials (the HTTP form is `POST /api/v1/provision`, with the same
//! request body and rules).
//!
//! The device connects with user name and client id `provision.{key_id}` and the key's secret
//! (the part after the `.`) as password, subscribes to
//! `fleetlog/provisioning/{key_id}/{request_id}/response` for a request id of its own choosing
//! (16 to 64 of `[A-Za-z0-9_-]`, random: it is what keeps its answer its own), and publishes the
//! request to `fleetlog/provisioning/{key_id}/{request_id}/request`.

use serde::{Deserialize, Serialize};

/// The first levels of every provisioning topic.
pub const ROOT: &str = "fleetlog/provisioning";
/// What the ingest subscribes to.
pub const REQUEST_FILTER: &str = "fleetlog/provisioning/+/+/request";

/// The broker user name (and client id) of provisioning key `key_id`.
pub fn username_of(key_id: &str) -> String {
    format!("provision.{key_id}")
}

/// The request topic of `key_id` and `request_id`.
pub fn request_topic(key_id: &str, request_id: &str) -> String {
    format!("{ROOT}/{key_id}/{request_id}/request")
}

/// The response topic of `key_id` and `request_id`.
pub fn response_topic(key_id: &str, request_id: &str) -> String {
    format!("{ROOT}/{key_id}/{request_id}/response")
}

/// The key id and request id of a request topic, if it is one with ids of the right shape.
pub fn parse_request_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (key_id, request_id, leaf, extra) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next());
    let token = |value: &str, min: usize| {
        (min..=64).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    (leaf == "request" && extra.is_none() && token(key_id, 1) && token(request_id, 16))
        .then_some((key_id, request_id))
}

/// What the device sends: as the HTTP request body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// The key, as it was shown: `{key_id}.{secret}`.
    pub provisioning_key: String,
    /// The id the device wants.
    pub device_id: String,
    /// Its name; default: its id.
    #[serde(default)]
    pub name: Option<String>,
    /// Its model; default (and the only one allowed, if the key names one): the key's.
    #[serde(default)]
    pub model: Option<String>,
}

/// What the device gets back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ProvisionResponse {
    /// Registered: its own credentials, shown this once.
    Provisioned {
        /// Its id.
        device_id: String,
        /// Its secret: MQTT password and HTTP token.
        device_token: String,
        /// The MQTT user name to connect with (its id).
        mqtt_username: String,
        /// The MQTT client id to connect with (its id).
        mqtt_client_id: String,
    },
    /// Not registered, and why: `unknown_key`, `key_refused` (revoked, expired, used up),
    /// `invalid`, `taken`, `failed` (try again).
    Refused {
        /// The kind of refusal.
        code: String,
        /// The reason, for people.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_name_a_key_and_a_long_enough_request_id() {
        let id = "r".repeat(16);
        assert_eq!(
            parse_request_topic(&request_topic("k1", &id)),
            Some(("k1", id.as_str()))
        );
        for bad in [
            format!("{ROOT}/k1/short/request"),
            format!("{ROOT}/k1/{id}/response"),
            format!("{ROOT}/k1/{id}/request/more"),
            format!("{ROOT}/k 1/{id}/request"),
            format!("devices/k1/{id}/request"),
            format!("{ROOT}/k1/{}/request", "r".repeat(65)),
        ] {
            assert_eq!(parse_request_topic(&bad), None, "{bad}");
        }
    }

    #[test]
    fn responses_say_their_status() {
        let refused = ProvisionResponse::Refused {
            code: "taken".into(),
            reason: "device id d1 is taken".into(),
        };
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["status"], "refused");
        assert_eq!(json["code"], "taken");
    }
}
