-- The event store: the postgres-es `events` and `snapshots` tables, extended for gap-safe
-- tailing by the relay (global order, committing transaction) and for as-of queries.

CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    -- Insertion order across all aggregates. Not commit order: a transaction that started
    -- earlier may commit later, which is why tailing also orders by transaction_id.
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    -- The inserting transaction. A reader that only reads rows of transactions older than its
    -- snapshot's xmin never skips a row that commits after it read a later position.
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position_idx ON events (global_position);
CREATE INDEX events_tail_idx ON events (transaction_id, global_position);

-- One snapshot per aggregate, replaced as the aggregate grows.
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
