-- kiln's job store. Times are unix microseconds.

CREATE TABLE builds (
    number       TEXT PRIMARY KEY NOT NULL,
    title        TEXT NOT NULL,
    build_time   TEXT,
    log_file     TEXT,
    notify       TEXT NOT NULL DEFAULT '[]',
    manifest     TEXT NOT NULL,
    files_key    TEXT NOT NULL,
    files_size   INTEGER NOT NULL,
    submitted_at INTEGER NOT NULL
);

CREATE TABLE jobs (
    pk                 INTEGER PRIMARY KEY AUTOINCREMENT,
    build              TEXT NOT NULL REFERENCES builds(number) ON DELETE CASCADE,
    id                 TEXT NOT NULL,
    title              TEXT NOT NULL,
    config_type        TEXT NOT NULL,
    install_script     TEXT NOT NULL,
    configure_script   TEXT,
    image_script       TEXT NOT NULL,
    timeout_secs       INTEGER NOT NULL,
    priority           INTEGER NOT NULL,
    accept_within_secs INTEGER,
    accept_deadline    INTEGER,
    assigned_to        TEXT,
    max_attempts       INTEGER NOT NULL,
    retries            INTEGER NOT NULL,
    retries_used       INTEGER NOT NULL DEFAULT 0,
    leases_lost        INTEGER NOT NULL DEFAULT 0,
    steps_done         INTEGER NOT NULL DEFAULT 0,
    state              TEXT NOT NULL,
    client_id          TEXT,
    lease_token        TEXT,
    lease_expires_at   INTEGER,
    attempt            INTEGER NOT NULL DEFAULT 0,
    time_start         INTEGER,
    time_complete      INTEGER,
    major_state        TEXT,
    minor_state        TEXT,
    percent            INTEGER,
    error              TEXT,
    UNIQUE (build, id)
);

CREATE INDEX jobs_queue ON jobs (state, priority DESC, accept_deadline, pk);
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    build      TEXT NOT NULL,
    job        TEXT NOT NULL,
    time       INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    client_id  TEXT,
    attempt    INTEGER NOT NULL,
    reason     TEXT
);

CREATE INDEX events_build ON events (build, seq);

CREATE TABLE log_lines (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    build   TEXT NOT NULL,
    job     TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    time    INTEGER NOT NULL,
    stream  TEXT NOT NULL,
    text    TEXT NOT NULL
);

CREATE INDEX log_lines_job ON log_lines (build, job, seq);

CREATE TABLE images (
    build       TEXT NOT NULL,
    job         TEXT NOT NULL,
    name        TEXT NOT NULL,
    lease_token TEXT NOT NULL,
    size        INTEGER NOT NULL,
    blake3      TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (build, job, name)
);

-- Webhook deliveries, written in the same transaction as the event they announce, and
-- sent (with retries) by the server's notifier.
CREATE TABLE notifications (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    build           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    delivered_at    INTEGER,
    gave_up_at      INTEGER,
    last_error      TEXT
);

CREATE INDEX notifications_due ON notifications (delivered_at, gave_up_at, next_attempt_at);
