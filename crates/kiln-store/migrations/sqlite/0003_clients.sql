-- The clients that claimed jobs here: what each said of itself at its latest claim, its
-- latest contact, and what became of the jobs it took. The counters change in the
-- transaction of the job transition that causes them. Times are unix microseconds.
CREATE TABLE clients (
    id           TEXT PRIMARY KEY NOT NULL,
    -- Config types it takes, comma-separated.
    include      TEXT NOT NULL,
    slots        INTEGER,
    version      TEXT,
    -- The IP address of its latest claim or contact.
    address      TEXT,
    first_seen   INTEGER NOT NULL,
    last_contact INTEGER NOT NULL,
    n_claimed    INTEGER NOT NULL DEFAULT 0,
    n_finished   INTEGER NOT NULL DEFAULT 0,
    n_failed     INTEGER NOT NULL DEFAULT 0,
    n_lost       INTEGER NOT NULL DEFAULT 0,
    image_bytes  INTEGER NOT NULL DEFAULT 0
);

-- A client that holds a job now has a row, so that the end of that job is counted:
-- claims write the row from now on, and this gives one to the holders of jobs claimed
-- before the table existed.
INSERT INTO clients (id, include, first_seen, last_contact, n_claimed)
SELECT client_id, '', COALESCE(MIN(time_start), 0), COALESCE(MAX(time_start), 0), COUNT(*)
FROM jobs WHERE state = 'running' AND client_id IS NOT NULL
GROUP BY client_id;
