-- A device's latest reading per sensor is the newest by reading time, not the last to arrive:
-- an incoming reading replaces the stored one only if it is at least as new.
CREATE FUNCTION fleetlog_newer_readings(current jsonb, incoming jsonb) RETURNS jsonb
    LANGUAGE sql STABLE AS
$$
SELECT COALESCE(current, '{}'::jsonb) || COALESCE(
    (SELECT jsonb_object_agg(i.key, i.value)
       FROM jsonb_each(COALESCE(incoming, '{}'::jsonb)) AS i
      WHERE NOT (COALESCE(current, '{}'::jsonb) ? i.key)
         OR (i.value ->> 'timestamp')::timestamptz
            >= (current -> i.key ->> 'timestamp')::timestamptz),
    '{}'::jsonb)
$$;
