-- Every statement that writes events sends `NOTIFY kiln_changes` when its transaction
-- commits, so that other servers on this database look at the queue again (see
-- `postgres/changes.rs`). It was a `SELECT pg_notify(...)` of its own after each event
-- written: one more round trip in every transaction that changes a job, taken while
-- it held its build's event lock. PostgreSQL sends one notification per transaction
-- for a channel and payload, however many statements asked.
CREATE FUNCTION kiln_announce_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_changes', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER events_announce AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_announce_change();
