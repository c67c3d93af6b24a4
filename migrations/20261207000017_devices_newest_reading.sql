-- The newest reading time among a device's latest readings (`sensors`), as Postgres reads the
-- readings' own timestamps. It lets the write side merge incoming readings with a plain `||`
-- whenever all of them are at least as new as every reading held (nearly always: clocks run
-- forward), instead of comparing them sensor by sensor in `fleetlog_newer_readings`, which
-- cost more than the rest of the row's update. Both ways give the same document.
ALTER TABLE devices ADD COLUMN sensors_newest_at timestamptz;

UPDATE devices
   SET sensors_newest_at = (SELECT max((r.value ->> 'timestamp')::timestamptz)
                              FROM jsonb_each(sensors) AS r)
 WHERE sensors <> '{}'::jsonb;
