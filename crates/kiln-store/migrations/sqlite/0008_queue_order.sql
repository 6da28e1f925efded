-- The dispatcher reads the best queued jobs in its order (priority, then jobs with an
-- accept deadline, earliest first, then submission order). `jobs_queue` cannot serve
-- the `accept_deadline IS NULL` term, so every read sorted every queued job. This
-- index of queued jobs alone serves the order as it is, so that reading the first
-- page costs the same with 300 or 10,000 jobs queued. (0007 is kept for the pack
-- store, made on another line of work.)
CREATE INDEX jobs_queued_order
    ON jobs (priority DESC, (accept_deadline IS NULL), accept_deadline, pk)
    WHERE state = 'queued';
