//! The write side of fleetlog.
//!
//! A command enters through the [`CommandBus`], which every role shares (the API, the MQTT
//! bridge, the process managers, the CLI). The bus hands it to the [`AggregateStore`] of its
//! aggregate type, which
//!
//! 1. takes the aggregate from a bounded in-memory cache, or loads it from its snapshot plus the
//!    events after it, or replays its whole history;
//! 2. lets the aggregate decide (see `fleetlog-domain`);
//! 3. appends the new events to the Postgres `events` table in one statement, stamped with the
//!    command's [`CommandMetadata`], and every `snapshot_every` events also replaces the
//!    aggregate's snapshot in the same transaction;
//! 4. brings the read models kept inline ([`inline`]: the device models) in step, in the same
//!    transaction;
//! 5. on an optimistic-concurrency conflict (another writer took the next sequence) evicts the
//!    cached aggregate and retries, a bounded number of times.
//!
//! The tables are those of postgres-es, extended with `global_position`, `transaction_id` and
//! `recorded_at` (see `migrations/`), so the relay can tail them gap-safely.

mod bus;
pub mod credentials;
mod database;
mod error;
pub mod inline;
mod metadata;
pub mod provisioning;
mod store;

pub use bus::CommandBus;
pub use database::{connect, migrate, MIGRATOR};
pub use error::{CommandError, StoreError};
pub use inline::{Appended, Care, InlineError, InlineFuture, InlineProjection};
pub use metadata::CommandMetadata;
pub use store::{AggregateStore, BatchCommitted, Committed, LoadedAggregate, StoreSettings};
