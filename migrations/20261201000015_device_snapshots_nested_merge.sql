-- Device aggregates now merge desired and reported documents at any depth: snapshots taken
-- under the one-level merge are dropped, so each device is rebuilt from its events by the
-- rule in force (read-model rows follow at the next `fleetlog replay devices`).
DELETE FROM snapshots WHERE aggregate_type = 'device';
