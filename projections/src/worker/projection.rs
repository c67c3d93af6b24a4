//! What a read model implements to be fed by a worker (and by replay and past views alike),
//! and why applying an event can fail.

use super::*;

/// A read model fed by the events of one aggregate type.
pub trait Projection: Send + Sync + 'static {
    /// The projection's name: its durable consumer and its key in `projection_positions`.
    const NAME: &'static str;
    /// The aggregate type whose events it reads.
    const AGGREGATE_TYPE: &'static str;
    /// The read-model tables it writes, and nothing else writes. Replay rebuilds exactly these.
    const TABLES: &'static [&'static str];
    /// Where it keeps which events it has applied.
    const POSITIONS: Positions = Positions::Shared;
    /// Whether the write side keeps this model inline (see [`crate::inline`]): it then has no
    /// worker, and the live model is never behind the events table.
    const KEPT_INLINE: bool = false;
    /// The rows of a table that belong to the model, as `(table, SQL condition)`, for a model
    /// that lets old rows go ([`crate::retention`]): a replay keeps only these, and a
    /// verification compares only these. Tables not named keep every row.
    const RETAINED: &'static [(&'static str, &'static str)] = &[];

    /// Applies one event, inside the transaction that also moves the projection's position.
    fn apply(
        &self,
        connection: &mut PgConnection,
        event: &EventEnvelope,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies several events, in the order given (each one the next of its aggregate), inside
    /// one transaction. The default applies them one by one; a projection may do it set-wise.
    /// The result must equal applying them one by one: replay does that.
    fn apply_batch(
        &self,
        connection: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        async move {
            for event in events {
                self.apply(connection, event).await?;
            }
            Ok(())
        }
    }

    /// Whether `event` is in the model already: how read-your-writes asks a
    /// [`Positions::Keyed`] projection, which keeps no positions. Projections with positions
    /// are asked through them and need not implement it.
    fn contains(
        &self,
        connection: &mut PgConnection,
        event: &EventEnvelope,
    ) -> impl Future<Output = Result<bool, ProjectionError>> + Send {
        let _ = (connection, event);
        async { Ok(false) }
    }
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The event does not read as an event of the aggregate type.
    #[error("cannot read the event: {0}")]
    Undecodable(#[from] serde_json::Error),
    /// Postgres refused or failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A position moved under a batch (another worker, a replay); the batch was not committed.
    #[error("a projection position moved while the batch was applied")]
    PositionMoved,
}

impl ProjectionError {
    /// Failures that come from the event itself and would come again however often it is
    /// applied: it does not decode, or Postgres refuses its data (SQLSTATE class 22, data
    /// exception, such as a NUL that jsonb cannot hold; class 23, integrity constraint).
    /// Anything else (a timeout, a deadlock, a full disk) says nothing about the event.
    pub(crate) fn is_about_the_event(&self) -> bool {
        match self {
            Self::Undecodable(_) => true,
            Self::Database(error) => error
                .as_database_error()
                .and_then(|error| error.code())
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            Self::PositionMoved => false,
        }
    }

    /// Failures that say nothing about the event (Postgres unreachable, pool exhausted):
    /// retried for as long as they last, never dead-lettered.
    pub(super) fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}
