//! The bounds inputs are held to, in one place: instants, overflow-free deadlines, and text
//! the event store and the read models can hold. The edges (HTTP, MQTT, CLI) check instants
//! and NULs and answer a clear refusal; the aggregates check what they decide on (reading
//! timestamps, timeouts, document sizes); the event store refuses any event holding a NUL.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

/// The earliest instant fleetlog accepts from a client: 1970-01-01T00:00:00Z.
pub fn earliest_instant() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

/// The latest instant fleetlog accepts from a client: 9999-12-31T23:59:59.999999Z (what RFC 3339
/// can write with four year digits, and well inside what Postgres and chrono can add to).
pub fn latest_instant() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|day| day.and_hms_micro_opt(23, 59, 59, 999_999))
        .map(|time| time.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Why an input is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// An instant outside [`earliest_instant`]..=[`latest_instant`].
    #[error("{0} is outside 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z")]
    Instant(String),
    /// A text holding a NUL character, which Postgres cannot store in text or jsonb.
    #[error("text must not contain NUL (\\u0000) characters")]
    Nul,
}

/// `Ok` for an instant fleetlog accepts from a client.
pub fn check_instant(instant: DateTime<Utc>) -> Result<DateTime<Utc>, LimitError> {
    if instant < earliest_instant() || instant > latest_instant() {
        return Err(LimitError::Instant(instant.to_rfc3339()));
    }
    Ok(instant)
}

/// `start + seconds`, or `None` when that is past the last instant chrono can hold: a deadline
/// that never comes. Never panics, whatever `seconds` is.
pub fn deadline(start: DateTime<Utc>, seconds: u64) -> Option<DateTime<Utc>> {
    let seconds = i64::try_from(seconds).ok()?;
    start.checked_add_signed(TimeDelta::try_seconds(seconds)?)
}

/// `instant` cut to whole microseconds: the precision of Postgres's `timestamptz`, and so of
/// every read model. An instant compared with one read back from a read model is cut first:
/// Postgres rounds to the nearest microsecond, so the cut instant is never later than the
/// stored copy of itself.
pub fn to_microseconds(instant: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::Timelike;
    let nanos = instant.nanosecond();
    instant
        .with_nanosecond(nanos - nanos % 1_000)
        .unwrap_or(instant)
}

/// Whether JSON text holds a NUL character in any string (a member name included): a raw NUL
/// byte, or the escape `\u0000` (whose backslash is not itself escaped). Postgres's `jsonb`
/// refuses such a document, so an event holding one could be stored (the events table is
/// `json`) but never applied by a read model: it is refused before it is stored.
pub fn json_has_nul(json: &[u8]) -> bool {
    let mut index = 0;
    while index < json.len() {
        match json[index] {
            0 => return true,
            b'\\' => {
                // An escape: `\\`, `\"`, `\n`, ..., or `\uXXXX`.
                if json.get(index + 1) == Some(&b'u')
                    && json
                        .get(index + 2..index + 6)
                        .is_some_and(|hex| hex == b"0000")
                {
                    return true;
                }
                index += 2;
            }
            _ => index += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_escaped_and_raw_nul_only() {
        assert!(json_has_nul(br#"{"note":"a\u0000b"}"#));
        assert!(json_has_nul(br#"{"\u0000":1}"#));
        assert!(json_has_nul(b"{\"note\":\"a\0b\"}"));
        assert!(json_has_nul(br#"["\\\u0000"]"#));
        // An escaped backslash followed by the letters u0000 is no NUL.
        assert!(!json_has_nul(br#"{"path":"C:\\u0000"}"#));
        assert!(!json_has_nul(br#"{"a":"\u0001","b":"\\\\u0000"}"#));
        assert!(!json_has_nul(b""));
        assert!(!json_has_nul(b"\\"));
    }

    #[test]
    fn instants_at_the_edges_of_the_calendar() {
        assert!(check_instant(earliest_instant()).is_ok());
        assert!(check_instant(latest_instant()).is_ok());
        assert!(check_instant(DateTime::<Utc>::MIN_UTC).is_err());
        assert!(check_instant(DateTime::<Utc>::MAX_UTC).is_err());
        assert!(check_instant(earliest_instant() - TimeDelta::microseconds(1)).is_err());
        assert!(check_instant(latest_instant() + TimeDelta::microseconds(1)).is_err());
    }

    #[test]
    fn microseconds_are_cut_not_rounded() {
        let instant = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.123456789Z")
            .unwrap()
            .to_utc();
        let cut = to_microseconds(instant);
        assert_eq!(cut.to_rfc3339(), "2026-01-01T00:00:00.123456+00:00");
        assert_eq!(to_microseconds(cut), cut);
    }

    #[test]
    fn deadlines_never_overflow() {
        let now = Utc::now();
        assert_eq!(deadline(now, 0), Some(now));
        assert_eq!(deadline(now, 60), Some(now + TimeDelta::seconds(60)));
        assert_eq!(deadline(now, u64::MAX), None);
        assert_eq!(deadline(now, i64::MAX as u64), None);
        assert_eq!(deadline(DateTime::<Utc>::MAX_UTC, 1), None);
    }

    proptest::proptest! {
        #[test]
        fn any_string_with_a_nul_is_found_in_its_json(prefix in ".*", suffix in ".*") {
            let text = format!("{prefix}\0{suffix}");
            let json = serde_json::to_vec(&serde_json::json!({ "note": text })).unwrap();
            proptest::prop_assert!(json_has_nul(&json));
        }

        #[test]
        fn no_string_without_a_nul_is_flagged(text in "[^\u{0}]*") {
            let json = serde_json::to_vec(&serde_json::json!({ text.clone(): text })).unwrap();
            proptest::prop_assert!(!json_has_nul(&json));
        }
    }
}
