-- The broker sync reads every device's standing credential at start (the latest of these
-- three events per device); without this index that read scans every device event, telemetry
-- included.
CREATE INDEX IF NOT EXISTS events_device_credentials_idx ON events (aggregate_id, sequence)
    WHERE aggregate_type = 'device'
      AND event_type IN ('DeviceCredentialsRotated', 'DeviceCredentialsRevoked', 'DeviceDecommissioned');
