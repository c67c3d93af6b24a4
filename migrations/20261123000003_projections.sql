-- Projection bookkeeping and the first read models.

-- The last event sequence each projection applied, per aggregate. Moved in the same
-- transaction as the read-model change, so an event takes effect exactly once.
CREATE TABLE projection_positions
(
    projection     text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);

-- Events a projection gave up on, with the reason; also published on fleetlog.deadletter.>.
CREATE TABLE projection_dead_letters
(
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection       text        NOT NULL,
    aggregate_type   text,
    aggregate_id     text,
    sequence         bigint,
    reason           text        NOT NULL,
    message          text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

-- A one-level JSON merge patch: keys of `patch` replace those of `target`, `null` removes.
CREATE FUNCTION fleetlog_merge(target jsonb, patch jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE AS
$$
SELECT COALESCE(jsonb_object_agg(key, value) FILTER (WHERE value <> 'null'::jsonb), '{}'::jsonb)
  FROM jsonb_each(COALESCE(target, '{}'::jsonb) || COALESCE(patch, '{}'::jsonb))
$$;

-- Desired properties whose reported value differs: what the device still has to do.
CREATE FUNCTION fleetlog_delta(desired jsonb, reported jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE AS
$$
SELECT COALESCE(jsonb_object_agg(d.key, d.value), '{}'::jsonb)
  FROM jsonb_each(COALESCE(desired, '{}'::jsonb)) AS d
 WHERE COALESCE(reported, '{}'::jsonb) -> d.key IS DISTINCT FROM d.value
$$;

-- Read-model indexes are left unnamed: Postgres names them from table and columns, exactly as
-- it names the copies `fleetlog replay` builds with CREATE TABLE (LIKE ... INCLUDING ALL), so a
-- replayed table swapped in keeps the same index names.

-- The device registry with each device's live state.
CREATE TABLE devices
(
    device_id          text PRIMARY KEY,
    tenant             text        NOT NULL,
    owner              text        NOT NULL,
    name               text        NOT NULL,
    model              text        NOT NULL,
    tags               text[]      NOT NULL DEFAULT '{}',
    lifecycle          text        NOT NULL,
    online             boolean     NOT NULL DEFAULT false,
    offline_reason     text,
    last_seen          timestamptz,
    last_heartbeat     timestamptz,
    last_telemetry_at  timestamptz,
    -- The latest reading per sensor: {"temperature": {"value": 21.5, "unit": "celsius", "timestamp": "…"}}
    sensors            jsonb       NOT NULL DEFAULT '{}',
    location           jsonb,
    reported           jsonb       NOT NULL DEFAULT '{}',
    desired            jsonb       NOT NULL DEFAULT '{}',
    delta              jsonb       NOT NULL DEFAULT '{}',
    desired_version    bigint      NOT NULL DEFAULT 0,
    firmware_version   text,
    firmware_update    jsonb,
    open_commands      integer     NOT NULL DEFAULT 0,
    credential_version integer     NOT NULL DEFAULT 0,
    registered_at      timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    last_sequence      bigint      NOT NULL
);
CREATE INDEX ON devices (tenant, device_id);
CREATE INDEX ON devices (tenant, online, device_id);
CREATE INDEX ON devices (tenant, model, device_id);
CREATE INDEX ON devices (tenant, last_seen);
CREATE INDEX ON devices USING gin (tags);

-- Commands sent to devices and how they ended.
CREATE TABLE device_commands
(
    device_id   text        NOT NULL,
    command_id  text        NOT NULL,
    name        text        NOT NULL,
    params      jsonb       NOT NULL,
    status      text        NOT NULL,
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    finished_at timestamptz,
    result      jsonb,
    PRIMARY KEY (device_id, command_id)
);
CREATE INDEX ON device_commands (expires_at) WHERE status = 'pending';

-- Telemetry as a time series, one row per reading.
-- Queries are "one device's sensor over a time range". Readings arrive in time order, so one
-- device's readings are scattered over the heap, one page each. The btree on
-- (device_id, sensor, time) carrying value and unit (INCLUDE) keeps a device's series
-- contiguous in its leaf pages and answers the query by an index-only scan: O(log n) to find
-- the range, then a few pages for a day of readings, however large the table grows
-- (deploy/bench/telemetry_range.sh measures it). A BRIN index on time, a few pages even for
-- hundreds of millions of rows, serves fleet-wide time windows and retention deletes.
-- Partitioning by time is the next step once retention drops whole months.
CREATE TABLE telemetry
(
    device_id text             NOT NULL,
    sensor    text             NOT NULL,
    time      timestamptz      NOT NULL,
    value     double precision NOT NULL,
    unit      text
);
CREATE INDEX ON telemetry (device_id, sensor, time) INCLUDE (value, unit);
CREATE INDEX ON telemetry USING brin (time);
