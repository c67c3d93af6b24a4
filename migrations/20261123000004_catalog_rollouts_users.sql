-- Read models of the Firmware, Rollout and User aggregates. Indexes unnamed, as in the devices
-- read models, so replayed copies keep the same names.

-- The firmware catalog.
CREATE TABLE firmware
(
    firmware_id        text PRIMARY KEY,
    tenant             text        NOT NULL,
    model              text        NOT NULL,
    version            text        NOT NULL,
    sha256             text        NOT NULL,
    size_bytes         bigint      NOT NULL,
    storage_key        text        NOT NULL,
    compatible_models  text[]      NOT NULL,
    notes              text        NOT NULL,
    status             text        NOT NULL,
    registered_at      timestamptz NOT NULL,
    released_at        timestamptz,
    deprecated_at      timestamptz,
    deprecation_reason text,
    last_sequence      bigint      NOT NULL
);
CREATE INDEX ON firmware (tenant, model, firmware_id);

-- Rollouts and their progress.
CREATE TABLE rollouts
(
    rollout_id          text PRIMARY KEY,
    tenant              text        NOT NULL,
    firmware_id         text        NOT NULL,
    status              text        NOT NULL,
    waves               smallint[]  NOT NULL,
    success_threshold   smallint    NOT NULL,
    error_threshold     smallint    NOT NULL,
    device_timeout_secs bigint      NOT NULL,
    current_wave        integer,
    target_count        integer     NOT NULL,
    succeeded           integer     NOT NULL DEFAULT 0,
    failed              integer     NOT NULL DEFAULT 0,
    pause_reason        text,
    created_at          timestamptz NOT NULL,
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL,
    last_sequence       bigint      NOT NULL
);
CREATE INDEX ON rollouts (tenant, created_at);

-- Each target device of a rollout: its wave and how its update went.
CREATE TABLE rollout_devices
(
    rollout_id text        NOT NULL,
    device_id  text        NOT NULL,
    wave       integer     NOT NULL,
    status     text        NOT NULL,
    error      text,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX ON rollout_devices (device_id);

-- Users, without any secret: no password hash, no refresh-token hash.
CREATE TABLE users
(
    user_id         text PRIMARY KEY,
    tenant          text        NOT NULL,
    username        text        NOT NULL,
    roles           text[]      NOT NULL,
    disabled        boolean     NOT NULL DEFAULT false,
    last_login_at   timestamptz,
    registered_at   timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    last_sequence   bigint      NOT NULL
);
CREATE UNIQUE INDEX ON users (tenant, lower(username));
