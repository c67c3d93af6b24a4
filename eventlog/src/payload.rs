//! An event's payload as the JSON text it was stored as.
//!
//! Every reader decodes a payload into its event type ([`Payload::decode`]) straight from the
//! text. Parsing it into a `serde_json::Value` first, and the value into the type, cost a replay
//! and every stream consumer about half of their CPU: a tree of maps built and torn down for
//! each event. Only the rare readers that look at a payload's fields by name ask for a value
//! ([`Payload::to_value`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::postgres::{PgTypeInfo, PgValueRef, Postgres};
use sqlx::types::Json;

/// An event's payload, externally tagged (`{"<event_type>": {fields}}`), as JSON text.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The payload decoded into `T`, the event type of its aggregate.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The payload as a JSON value, for a reader that looks at fields by name.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        self.decode()
    }

    /// The payload of an event (or of a `serde_json::Value`), serialized.
    pub fn of<T: Serialize + ?Sized>(event: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(event).map(Self)
    }

    /// `null`: what is left of a payload that cannot be shown.
    pub fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

/// Two payloads are equal when they hold the same JSON, however it is spaced or its keys are
/// ordered (Postgres' `jsonb` prints it its own way).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
            || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// Printed compactly, whatever spacing it was stored with.
impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_value() {
            Ok(value) => write!(f, "{value}"),
            Err(_) => f.write_str(self.get()),
        }
    }
}

impl sqlx::Type<Postgres> for Payload {
    fn type_info() -> PgTypeInfo {
        <Json<Box<RawValue>> as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Json<Box<RawValue>> as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for Payload {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        <Json<Box<RawValue>> as sqlx::Decode<'r, Postgres>>::decode(value).map(|json| Self(json.0))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn decodes_and_compares_by_content() {
        let stored: Payload = serde_json::from_str(r#"{"A": {"x": 1, "y": [true]}}"#).unwrap();
        let respaced: Payload = serde_json::from_str(r#"{"A":{"y":[true],"x":1}}"#).unwrap();
        assert_eq!(stored, respaced);
        assert_eq!(
            stored.to_value().unwrap(),
            json!({"A": {"x": 1, "y": [true]}})
        );
        let other = Payload::of(&json!({"A": {"x": 2}})).unwrap();
        assert_ne!(stored, other);
        #[derive(Deserialize, Debug, PartialEq)]
        enum Event {
            A { x: i64 },
        }
        assert_eq!(other.decode::<Event>().unwrap(), Event::A { x: 2 });
        // Written out, it is the text it holds.
        assert_eq!(serde_json::to_string(&other).unwrap(), r#"{"A":{"x":2}}"#);
    }
}
