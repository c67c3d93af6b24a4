-- The relay's progress, and a wake-up call for it whenever events are appended.

-- Where each relay (by name) has published up to, in (transaction_id, global_position) order.
CREATE TABLE relay_cursors
(
    relay           text        PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One notification per appending transaction (identical notifications collapse), delivered
-- at commit: exactly when new events become visible.
CREATE FUNCTION notify_events_appended() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('fleetlog_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION notify_events_appended();
