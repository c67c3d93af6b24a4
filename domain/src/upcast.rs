//! Upcasting: reading events stored in an older shape as the shape the code knows today.
//!
//! Events are never rewritten: the `events` table keeps every payload as it was stored, with the
//! `event_version` of its day. When an event's shape changes in a way old payloads cannot be
//! read as (a field renamed or split, a unit changed, a value given structure), the change bumps
//! that event's version and adds an [`Upcaster`] from the old version to the new one. Every
//! reader turns stored payloads into today's shape on the way in, by [`upcast`]: the write side
//! loading an aggregate, the event log's reads (histories, past views, replays) and every
//! consumer of the JetStream stream (whose messages carry the payload as stored). So the
//! aggregates, projections and process managers only ever see today's shape.
//!
//! A change that old payloads can be read as (a new optional field with a default) needs no
//! new version; serde's defaults read the old payloads.
//!
//! Upcasters are registered where they are written, with [`inventory::submit!`]:
//!
//! ```
//! use fleetlog_domain::upcast::Upcaster;
//! use serde_json::Value;
//!
//! /// 0.9 named the field `hardware_model`.
//! fn rename_hardware_model(mut fields: Value) -> Result<Value, String> {
//!     let fields_map = fields.as_object_mut().ok_or("not an object")?;
//!     let model = fields_map.remove("hardware_model").ok_or("no hardware_model")?;
//!     fields_map.insert("model".into(), model);
//!     Ok(fields)
//! }
//!
//! inventory::submit! {
//!     Upcaster {
//!         aggregate_type: "device",
//!         event_type: "DeviceRegistered",
//!         from_version: "0.9",
//!         to_version: "1.0",
//!         upcast: rename_hardware_model,
//!     }
//! }
//! ```
//!
//! Chains apply in turn (0.8 → 0.9 → 1.0). A version no upcaster starts from is today's, or a
//! shape today's code reads as it is.

use serde_json::Value;

/// Turns the fields of one event type's payload from one version into the next.
#[derive(Debug)]
pub struct Upcaster {
    /// The aggregate type whose events it reads, e.g. `device`.
    pub aggregate_type: &'static str,
    /// The event type, e.g. `DeviceRegistered`.
    pub event_type: &'static str,
    /// The version it reads.
    pub from_version: &'static str,
    /// The version it produces.
    pub to_version: &'static str,
    /// The event's fields (the object under the event type's tag) in `from_version`'s shape,
    /// to `to_version`'s; an error says what in the stored payload it could not read.
    pub upcast: fn(Value) -> Result<Value, String>,
}

inventory::collect!(Upcaster);

/// A stored payload no upcaster could read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot upcast {aggregate_type} {event_type} from version {version}: {reason}")]
pub struct UpcastError {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The event type.
    pub event_type: String,
    /// The version the failing upcaster reads.
    pub version: String,
    /// What it could not read.
    pub reason: String,
}

/// The most upcasters one payload goes through: a longer chain is a cycle in the registry.
const MAX_CHAIN: usize = 64;

/// Whether a stored payload of this type and version goes through an upcaster: readers decode
/// every other one as it is, without first parsing it into a value for [`upcast`].
pub fn applies(aggregate_type: &str, event_type: &str, version: &str) -> bool {
    inventory::iter::<Upcaster>.into_iter().any(|upcaster| {
        upcaster.aggregate_type == aggregate_type
            && upcaster.event_type == event_type
            && upcaster.from_version == version
    })
}

/// Brings `payload` (externally tagged: `{"<event_type>": {fields}}`) and `version` from the
/// stored shape to today's, through every upcaster that applies in turn. Untouched when none
/// does: the common case costs one look through the (usually empty) registry.
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    version: &mut String,
    payload: &mut Value,
) -> Result<(), UpcastError> {
    for _ in 0..MAX_CHAIN {
        let Some(upcaster) = inventory::iter::<Upcaster>.into_iter().find(|upcaster| {
            upcaster.aggregate_type == aggregate_type
                && upcaster.event_type == event_type
                && upcaster.from_version == version
        }) else {
            return Ok(());
        };
        let failed = |reason: String| UpcastError {
            aggregate_type: aggregate_type.to_string(),
            event_type: event_type.to_string(),
            version: version.clone(),
            reason,
        };
        let fields = payload
            .as_object_mut()
            .and_then(|tagged| tagged.get_mut(event_type))
            .ok_or_else(|| failed(format!("the payload is not tagged {event_type}")))?;
        *fields = (upcaster.upcast)(fields.take()).map_err(failed)?;
        *version = upcaster.to_version.to_string();
    }
    Err(UpcastError {
        aggregate_type: aggregate_type.to_string(),
        event_type: event_type.to_string(),
        version: version.clone(),
        reason: format!("more than {MAX_CHAIN} upcasters in a row: a cycle"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn add_unit(mut fields: Value) -> Result<Value, String> {
        let object = fields.as_object_mut().ok_or("not an object")?;
        let celsius = object
            .remove("celsius")
            .and_then(|v| v.as_f64())
            .ok_or("no celsius")?;
        object.insert("value".into(), json!(celsius));
        object.insert("unit".into(), json!("°C"));
        Ok(fields)
    }

    fn round(mut fields: Value) -> Result<Value, String> {
        let value = fields["value"].as_f64().ok_or("no value")?;
        fields["value"] = json!((value * 10.0).round() / 10.0);
        Ok(fields)
    }

    fn forever(fields: Value) -> Result<Value, String> {
        Ok(fields)
    }

    inventory::submit! {
        Upcaster { aggregate_type: "probe", event_type: "Measured", from_version: "1", to_version: "2", upcast: add_unit }
    }
    inventory::submit! {
        Upcaster { aggregate_type: "probe", event_type: "Measured", from_version: "2", to_version: "3", upcast: round }
    }
    inventory::submit! {
        Upcaster { aggregate_type: "probe", event_type: "Looped", from_version: "a", to_version: "b", upcast: forever }
    }
    inventory::submit! {
        Upcaster { aggregate_type: "probe", event_type: "Looped", from_version: "b", to_version: "a", upcast: forever }
    }

    #[test]
    fn a_payload_goes_through_the_whole_chain_to_todays_shape() {
        let mut version = "1".to_string();
        let mut payload = json!({"Measured": {"celsius": 21.54, "at": "2026-01-01T00:00:00Z"}});
        upcast("probe", "Measured", &mut version, &mut payload).unwrap();
        assert_eq!(version, "3");
        assert_eq!(
            payload,
            json!({"Measured": {"value": 21.5, "unit": "°C", "at": "2026-01-01T00:00:00Z"}})
        );
        // Today's shape, another aggregate or another event type: untouched.
        for (aggregate_type, event_type) in [
            ("probe", "Measured"),
            ("device", "Measured"),
            ("probe", "Other"),
        ] {
            let mut again = payload.clone();
            let mut today = if aggregate_type == "probe" && event_type == "Measured" {
                "3".to_string()
            } else {
                "1".to_string()
            };
            let before = today.clone();
            upcast(aggregate_type, event_type, &mut today, &mut again).unwrap();
            assert_eq!((today, &again), (before, &payload));
        }
    }

    #[test]
    fn a_payload_an_upcaster_cannot_read_is_an_error_naming_the_event() {
        let mut version = "1".to_string();
        let mut payload = json!({"Measured": {"fahrenheit": 70}});
        let error = upcast("probe", "Measured", &mut version, &mut payload).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot upcast probe Measured from version 1: no celsius"
        );
        let mut untagged = json!({"Other": {}});
        let error = upcast("probe", "Measured", &mut version, &mut untagged).unwrap_err();
        assert!(error.reason.contains("not tagged Measured"), "{error}");
    }

    #[test]
    fn a_cycle_in_the_registry_ends_in_an_error_not_a_hang() {
        let mut version = "a".to_string();
        let mut payload = json!({"Looped": {}});
        let error = upcast("probe", "Looped", &mut version, &mut payload).unwrap_err();
        assert!(error.reason.contains("a cycle"), "{error}");
    }
}
