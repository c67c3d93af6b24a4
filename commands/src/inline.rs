//! Read models kept inline: written in the very transaction that appends the events they
//! read, by whichever process appends them.
//!
//! Why: the device read models (`devices`, `device_commands`, `telemetry`) follow the busiest
//! events of the platform, several per device and second. Fed from the event stream, each of
//! those events would be read back from the table by the relay, delivered by JetStream,
//! decoded and written in a transaction of its own, and acknowledged; inline, it costs the
//! rows it changes and nothing else, and the model is never behind the log: a write answers
//! only once its read model shows it, in every process, whatever role made it.
//!
//! The contract ([`InlineProjection`]): the store appends an attempt's events, then hands them
//! to the projection on the same connection, inside the same transaction, [`Care::Fast`]
//! first. The fast way writes set-wise and may refuse ([`InlineError::NeedsCare`]) when the
//! events do not follow on from what the model holds (the model lags the log, say after an
//! upgrade) or one of them cannot be applied. The store then rolls the whole attempt back
//! and writes it again with [`Care::Careful`], which brings the model up to date from the
//! log and passes over what it cannot apply (recorded as a dead letter, as a projection
//! worker would), so a model problem never stops the log from taking events. Only a failure of
//! Postgres itself fails the append.

use std::future::Future;
use std::pin::Pin;

use cqrs_es::Aggregate;
use sqlx::PgConnection;

/// The events one aggregate appended in a transaction, as an inline projection sees them.
#[derive(Debug)]
pub struct Appended<'a, E> {
    /// The aggregate's id.
    pub aggregate_id: &'a str,
    /// The sequence of the first of `events`; the others follow it without gaps.
    pub first_sequence: i64,
    /// The events, in order.
    pub events: &'a [E],
    /// The global position of each event, in order.
    pub global_positions: &'a [i64],
    /// The metadata stored with them (JSON).
    pub metadata: &'a str,
}

/// How an inline projection is to apply events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Care {
    /// Set-wise, trusting that the events follow on from what the model holds: refuses
    /// ([`InlineError::NeedsCare`]) rather than write anything doubtful.
    Fast,
    /// One event at a time, catching the model up from the log first and passing over an
    /// event it cannot apply: always succeeds unless Postgres fails.
    Careful,
}

/// Why an inline projection did not apply events.
#[derive(Debug, thiserror::Error)]
pub enum InlineError {
    /// The fast way cannot apply these events: the attempt is rolled back and written again
    /// with [`Care::Careful`].
    #[error("the read model needs the careful way: {0}")]
    NeedsCare(String),
    /// Postgres failed: the append fails as a whole (and is retried like any other failure).
    #[error("read model database error")]
    Database(#[from] sqlx::Error),
}

/// What an inline projection's `apply` returns.
pub type InlineFuture<'a> = Pin<Box<dyn Future<Output = Result<(), InlineError>> + Send + 'a>>;

/// A read model written in the transaction that appends the events of `A`. See the module
/// documentation.
pub trait InlineProjection<A: Aggregate>: Send + Sync + 'static {
    /// Applies `appended` (each aggregate's events of one attempt, the aggregates in the order
    /// they were appended) on `connection`, inside the appending transaction.
    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        appended: &'a [Appended<'a, A::Event>],
        care: Care,
    ) -> InlineFuture<'a>;
}
