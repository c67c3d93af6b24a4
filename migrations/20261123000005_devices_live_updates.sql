-- Telemetry, status and heartbeats rewrite a device's row many times a second across a fleet.
-- Postgres can then keep the new row version on the same page without touching any index
-- (a HOT update) only when no indexed column changed and the page has room:
--   * last_seen changes with every message, so it is not indexed. Sorting devices by last
--     seen reads the tenant's rows through (tenant, device_id) and sorts them; the liveness
--     scan (every 15 s by default) reads the table once.
--   * a lower fillfactor leaves each page room for the next versions of its rows.
DROP INDEX IF EXISTS devices_tenant_last_seen_idx;
ALTER TABLE devices SET (fillfactor = 70);
