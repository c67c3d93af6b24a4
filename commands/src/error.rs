//! Errors of the write side. A refusal by the domain, a conflict that outlasted the retries and
//! an infrastructure failure are different cases, answered differently at the edges
//! (422, 409 and 503 over HTTP).

/// The event store could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres failed or is unreachable.
    #[error("event store database error")]
    Database(#[from] sqlx::Error),
    /// An event or snapshot could not be turned into JSON.
    #[error("could not serialize {what}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An inline read model could not take the events even the careful way (which passes
    /// over what it cannot apply): a defect of the read model, not of the events.
    #[error("the {aggregate_type} read model kept inline refused the events: {reason}")]
    ReadModel {
        /// The aggregate type.
        aggregate_type: &'static str,
        /// Why.
        reason: String,
    },
    /// A stored event no longer reads as an event of its aggregate.
    #[error("stored event {aggregate_type}/{aggregate_id}#{sequence} cannot be read")]
    CorruptEvent {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The event's sequence.
        sequence: i64,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Why a command did not produce its events.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command: the request is wrong for the current state.
    #[error(transparent)]
    Refused(E),
    /// Other writers kept changing the aggregate; every attempt conflicted.
    #[error("aggregate {aggregate_type}/{aggregate_id} kept changing: gave up after {attempts} attempts")]
    Conflict {
        /// The aggregate type.
        aggregate_type: &'static str,
        /// The aggregate id.
        aggregate_id: String,
        /// How many times the command was tried.
        attempts: u32,
    },
    /// A conditional command found the aggregate at another version than the caller expected.
    #[error("the aggregate is at version {actual}, not {expected}")]
    VersionMismatch {
        /// The version the caller expected.
        expected: u64,
        /// The version it is at.
        actual: u64,
    },
    /// The command's events hold what no consumer of the event log could apply (a NUL
    /// character, which Postgres's `jsonb` refuses), so nothing was stored: a refusal of the
    /// input, final like [`Refused`](Self::Refused), not a failure to retry.
    #[error("cannot store the events of {aggregate_type}/{aggregate_id}: {reason}")]
    Unstorable {
        /// The aggregate type.
        aggregate_type: &'static str,
        /// The aggregate id.
        aggregate_id: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
