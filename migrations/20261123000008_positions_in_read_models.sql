-- The two busiest projections stop writing a `projection_positions` row per event.
--
-- devices: every device event already sets `devices.last_sequence`; the worker now reads its
-- position there (Positions::Own).
--
-- telemetry: keeps no positions at all (Positions::Keyed). Each reading row carries the
-- sequence of the event it came from and a unique index makes applying an event again a no-op
-- (`ON CONFLICT DO NOTHING`); readings commute, so order does not matter. The index replaces
-- the time-range index, whose leading columns it keeps. Rows projected before this migration
-- have no sequence (NULL, never equal to another under the unique index); `fleetlog replay
-- telemetry` fills it in.
ALTER TABLE telemetry ADD COLUMN sequence bigint;
DROP INDEX telemetry_device_id_sensor_time_value_unit_idx;
CREATE UNIQUE INDEX telemetry_reading_idx ON telemetry (device_id, sensor, time, sequence) INCLUDE (value, unit);

DELETE FROM projection_positions WHERE projection IN ('devices', 'telemetry');
