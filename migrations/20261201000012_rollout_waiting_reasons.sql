-- An instant as RFC 3339 in UTC to the second, for the reasons the API composes in SQL
-- (why a rollout's device waits, until when).
CREATE FUNCTION fleetlog_rfc3339(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
