-- Telemetry retention: the telemetry read model holds the readings from `kept_from` on. The
-- projection role's sweep moves the horizon forward (never back) and deletes the readings
-- behind it, a batch at a time; until it has, they are no longer part of the model: queries,
-- replays and their verification read only the rows from the horizon on. No row: every reading
-- is kept. The events themselves are never touched: the log keeps every reading.
CREATE TABLE telemetry_retention
(
    only_row  boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    kept_from timestamptz NOT NULL
);
