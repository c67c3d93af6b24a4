-- The rollout manager's sweep looks every few seconds for devices sent an update and still
-- without an outcome, across all rollouts. They are few next to the finished devices of past
-- rollouts, so a partial index keeps the sweep's cost to the devices in flight.
CREATE INDEX rollout_devices_in_flight ON rollout_devices (sent_at) WHERE status = 'sent';
