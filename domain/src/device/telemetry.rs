//! Telemetry values and their validation rules, shared by every edge that accepts telemetry
//! (MQTT, HTTP) so a reading is judged the same wherever it arrives.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The most readings one telemetry message may carry.
pub const MAX_READINGS: usize = 256;

/// One sensor value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Sensor name, `^[a-z_][a-z0-9_]{0,49}$`.
    pub sensor: String,
    /// The measured value; finite.
    pub value: f64,
    /// Unit of the value, e.g. `celsius`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// When the device measured it, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
}

/// A position on earth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Degrees, -90 to 90.
    pub latitude: f64,
    /// Degrees, -180 to 180.
    pub longitude: f64,
}

/// Why a telemetry message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryError {
    /// No reading, no status and no location.
    #[error("telemetry carries no reading, status or location")]
    Empty,
    /// More than [`MAX_READINGS`] readings.
    #[error("telemetry carries {0} readings, at most {MAX_READINGS} are accepted")]
    TooManyReadings(usize),
    /// A sensor name outside `^[a-z_][a-z0-9_]{0,49}$`.
    #[error("sensor name {0:?} must match ^[a-z_][a-z0-9_]{{0,49}}$")]
    InvalidSensorName(String),
    /// NaN or infinity.
    #[error("sensor {0:?} has a value that is not a finite number")]
    NonFiniteValue(String),
    /// A unit that is empty, longer than 32 characters or holds control characters.
    #[error("sensor {0:?} has a unit that is empty, longer than 32 characters or holds control characters")]
    InvalidUnit(String),
    /// A reading's timestamp outside the instants fleetlog accepts.
    #[error("sensor {sensor:?}: {error}")]
    InstantOutOfRange {
        /// The sensor.
        sensor: String,
        /// Why.
        error: crate::limits::LimitError,
    },
    /// A position off the globe.
    #[error("location ({latitude}, {longitude}) is outside latitude -90..90, longitude -180..180")]
    InvalidLocation {
        /// The latitude given.
        latitude: f64,
        /// The longitude given.
        longitude: f64,
    },
    /// A message digest that is empty or longer than 128 characters.
    #[error("message digest must be 1 to 128 characters")]
    InvalidDigest,
}

/// Checks a sensor name against `^[a-z_][a-z0-9_]{0,49}$`.
pub fn validate_sensor_name(name: &str) -> Result<(), TelemetryError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 50 {
        Ok(())
    } else {
        Err(TelemetryError::InvalidSensorName(name.to_string()))
    }
}

/// Checks one reading: its sensor name, a finite value and a sane unit.
pub fn validate_reading(reading: &Reading) -> Result<(), TelemetryError> {
    validate_sensor_name(&reading.sensor)?;
    if !reading.value.is_finite() {
        return Err(TelemetryError::NonFiniteValue(reading.sensor.clone()));
    }
    if let Some(unit) = &reading.unit {
        if unit.is_empty() || unit.chars().count() > 32 || unit.chars().any(char::is_control) {
            return Err(TelemetryError::InvalidUnit(reading.sensor.clone()));
        }
    }
    if let Some(timestamp) = reading.timestamp {
        crate::limits::check_instant(timestamp).map_err(|error| {
            TelemetryError::InstantOutOfRange {
                sensor: reading.sensor.clone(),
                error,
            }
        })?;
    }
    Ok(())
}

/// Checks every reading of a message.
pub(crate) fn validate_readings(readings: &[Reading]) -> Result<(), TelemetryError> {
    if readings.len() > MAX_READINGS {
        return Err(TelemetryError::TooManyReadings(readings.len()));
    }
    readings.iter().try_for_each(validate_reading)
}

/// Checks a position.
pub fn validate_location(location: &Location) -> Result<(), TelemetryError> {
    let Location {
        latitude,
        longitude,
    } = *location;
    if (-90.0..=90.0).contains(&latitude) && (-180.0..=180.0).contains(&longitude) {
        Ok(())
    } else {
        Err(TelemetryError::InvalidLocation {
            latitude,
            longitude,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_outside_the_calendar_bounds_or_with_control_characters_are_refused() {
        let reading = |unit: Option<&str>, timestamp| Reading {
            sensor: "t".into(),
            value: 1.0,
            unit: unit.map(Into::into),
            timestamp,
        };
        assert!(validate_reading(&reading(Some("a\0b"), None)).is_err());
        let past = chrono::DateTime::<chrono::Utc>::MIN_UTC;
        assert!(validate_reading(&reading(None, Some(past))).is_err());
        assert!(
            validate_reading(&reading(Some("°C"), Some(crate::limits::latest_instant()))).is_ok()
        );
    }

    #[test]
    fn sensor_names_follow_the_contract() {
        for good in ["temperature", "_x", "a1_b2", &"a".repeat(50)] {
            assert_eq!(validate_sensor_name(good), Ok(()), "{good}");
        }
        for bad in ["", "1abc", "Temp", "temp-1", "temp.1", &"a".repeat(51)] {
            assert!(validate_sensor_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locations_stay_on_the_globe() {
        let at = |latitude, longitude| Location {
            latitude,
            longitude,
        };
        assert!(validate_location(&at(90.0, -180.0)).is_ok());
        assert!(validate_location(&at(90.1, 0.0)).is_err());
        assert!(validate_location(&at(0.0, 180.5)).is_err());
        assert!(validate_location(&at(f64::NAN, 0.0)).is_err());
    }

    #[test]
    fn readings_must_be_finite() {
        let reading = |value| Reading {
            sensor: "t".into(),
            value,
            unit: None,
            timestamp: None,
        };
        assert!(validate_readings(&[reading(1.5)]).is_ok());
        assert_eq!(
            validate_readings(&[reading(f64::INFINITY)]),
            Err(TelemetryError::NonFiniteValue("t".into()))
        );
    }
}
