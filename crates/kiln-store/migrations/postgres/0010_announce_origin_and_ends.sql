-- The word a change sends (`NOTIFY kiln_changes`, migration 0008) now says which store
-- made it and whether a job ended: the payload is the writing connection's
-- `application_name` (each server's store names its connections uniquely), followed
-- by " end" when the statement wrote an event of a job's end. A server used to hear
-- its own changes too, and each woke its dispatcher, its streams and its notifier
-- again, three times a job, for what it already knew; and its notifier read the outbox
-- for every claim, though only an end queues a notice.
CREATE OR REPLACE FUNCTION kiln_announce_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_changes', current_setting('application_name') ||
        CASE WHEN EXISTS (SELECT 1 FROM new_events
                          WHERE to_state IN ('finished', 'failed', 'expired', 'cancelled'))
             THEN ' end' ELSE '' END);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER events_announce ON events;
CREATE TRIGGER events_announce AFTER INSERT ON events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_announce_change();
