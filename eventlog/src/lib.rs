//! The event log, read: the one place that knows how to read the Postgres `events` table.
//!
//! The table is the source of truth; `fleetlog-commands` appends to it (and loads aggregates
//! from it), and everyone else reads it through this crate:
//!
//! - [`EventEnvelope`], one recorded event with its position, the row shape and also the JSON
//!   body the relay publishes on JetStream ([`envelope`]); its [`Payload`] stays the stored
//!   JSON text until a reader decodes it into its event type;
//! - a history: one aggregate's events in order, a page at a time ([`history`]), and what
//!   never leaves in one ([`EventEnvelope::redact_secrets`]);
//! - as of an instant: one aggregate's events recorded until then ([`until`], [`count_until`]);
//! - commit-safe order: pages of `(transaction_id, global_position)` order, for those who tail
//!   the table (the relay, a replay) ([`page_in_commit_order`], [`outgoing_page`]);
//! - look-ups: an event by position ([`at_position`]), the recent digests of a device's
//!   reports ([`recent_digests`]), and counts ([`count_of_type`], [`count_after`],
//!   [`summary`]);
//! - credentials: each device's standing credential event and each provisioning key's, for
//!   the broker sync ([`device_credential_events`], [`device_credential_event`],
//!   [`provisioning_key_events`], [`provisioning_key_event`]).
//!
//! It is its own crate, not part of the write side, so the read models (replay, past views)
//! read the log without depending on `fleetlog-commands`.

pub mod envelope;
mod payload;
mod read;

pub use envelope::{EventEnvelope, OutgoingEvent, StoredEvent};
pub use payload::Payload;
pub use read::{
    at_position, count_after, count_of_type, count_until, device_credential_event,
    device_credential_events, history, outgoing_page, page_in_commit_order, provisioning_key_event,
    provisioning_key_events, ranges, recent_digests, summary, until, Cursor, HistoryQuery, Horizon,
    SequenceRange, Summary, DEVICE_CREDENTIAL_EVENTS, PROVISIONING_KEY_EVENTS,
};
