-- Rollouts that decide by themselves: what exceeding the error threshold does, the window in
-- which offline devices are still updated, when each wave started, counts per outcome and the
-- latest decision with the counts that justified it.
ALTER TABLE rollouts
    ADD COLUMN on_error        text          NOT NULL DEFAULT 'pause',
    ADD COLUMN window_secs     bigint        NOT NULL DEFAULT 604800,
    ADD COLUMN wave_started_at timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN sent            integer       NOT NULL DEFAULT 0,
    ADD COLUMN timed_out       integer       NOT NULL DEFAULT 0,
    ADD COLUMN canceled        integer       NOT NULL DEFAULT 0,
    ADD COLUMN last_decision   jsonb;

-- Per device: when the update was sent. Statuses are now queued, sent, succeeded, failed,
-- timed_out and canceled; the API refines `sent` with what the device reports (downloading,
-- installing, rebooting) from the devices read model.
ALTER TABLE rollout_devices ADD COLUMN sent_at timestamptz;
UPDATE rollout_devices SET status = 'queued' WHERE status IN ('pending', 'updating');
-- The process manager looks for devices to send to and for sent devices past their time.
CREATE INDEX ON rollout_devices (rollout_id, status, wave);
