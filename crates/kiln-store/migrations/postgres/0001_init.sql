-- kiln's store on PostgreSQL: the same tables as the SQLite store's migrations 0001 to
-- 0005 leave behind. Times are unix microseconds; counts and sizes are BIGINT.

CREATE TABLE builds (
    number       TEXT PRIMARY KEY NOT NULL,
    -- Insertion order, to list builds submitted in the same microsecond stably.
    seqno        BIGSERIAL NOT NULL UNIQUE,
    title        TEXT NOT NULL,
    build_time   TEXT,
    log_file     TEXT,
    notify       TEXT NOT NULL DEFAULT '[]',
    manifest     TEXT NOT NULL,
    files_key    TEXT NOT NULL,
    files_size   BIGINT NOT NULL,
    submitted_at BIGINT NOT NULL
);

CREATE INDEX builds_files_key ON builds (files_key);

CREATE TABLE jobs (
    pk                 BIGSERIAL PRIMARY KEY,
    build              TEXT NOT NULL REFERENCES builds(number) ON DELETE CASCADE,
    id                 TEXT NOT NULL,
    title              TEXT NOT NULL,
    config_type        TEXT NOT NULL,
    install_script     TEXT NOT NULL,
    configure_script   TEXT,
    image_script       TEXT NOT NULL,
    timeout_secs       BIGINT NOT NULL,
    priority           BIGINT NOT NULL,
    accept_within_secs BIGINT,
    accept_deadline    BIGINT,
    assigned_to        TEXT,
    max_attempts       BIGINT NOT NULL,
    retries            BIGINT NOT NULL,
    retries_used       BIGINT NOT NULL DEFAULT 0,
    leases_lost        BIGINT NOT NULL DEFAULT 0,
    steps_done         BOOLEAN NOT NULL DEFAULT FALSE,
    state              TEXT NOT NULL,
    client_id          TEXT,
    lease_token        TEXT,
    lease_expires_at   BIGINT,
    attempt            BIGINT NOT NULL DEFAULT 0,
    time_start         BIGINT,
    time_complete      BIGINT,
    major_state        TEXT,
    minor_state        TEXT,
    percent            BIGINT,
    error              TEXT,
    -- Bytes of log text stored, and whether the log reached its limit and was cut.
    log_bytes          BIGINT NOT NULL DEFAULT 0,
    log_cut            BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (build, id)
);

-- The queue in scheduling order, queued jobs only, so that a dispatch round reads the
-- first jobs of the index and sorts nothing: priority, then jobs with an accept
-- deadline (earliest first), then submission.
CREATE INDEX jobs_queue ON jobs (priority DESC, (accept_deadline IS NULL), accept_deadline, pk)
    WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_client ON jobs (client_id) WHERE state = 'running';
CREATE INDEX jobs_unclaimed ON jobs (accept_deadline) WHERE state = 'queued' AND attempt = 0;
CREATE INDEX jobs_config_finished ON jobs (config_type) WHERE state = 'finished';

CREATE TABLE events (
    seq        BIGSERIAL PRIMARY KEY,
    build      TEXT NOT NULL,
    job        TEXT NOT NULL,
    time       BIGINT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    client_id  TEXT,
    attempt    BIGINT NOT NULL,
    reason     TEXT
);

CREATE INDEX events_build ON events (build, seq);

CREATE TABLE log_lines (
    seq     BIGSERIAL PRIMARY KEY,
    build   TEXT NOT NULL,
    job     TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    time    BIGINT NOT NULL,
    stream  TEXT NOT NULL,
    text    TEXT NOT NULL
);

CREATE INDEX log_lines_job ON log_lines (build, job, seq);

-- Each image keeps its ordered chunk list, packed as 36 bytes a chunk (BLAKE3 name,
-- u32 LE length); NULL only for an image stored whole and not yet converted.
CREATE TABLE images (
    build       TEXT NOT NULL,
    job         TEXT NOT NULL,
    name        TEXT NOT NULL,
    lease_token TEXT NOT NULL,
    size        BIGINT NOT NULL,
    blake3      TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    chunk_list  BYTEA,
    PRIMARY KEY (build, job, name)
);

-- Webhook deliveries, written in the same transaction as the event they announce.
CREATE TABLE notifications (
    id              BIGSERIAL PRIMARY KEY,
    build           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    gave_up_at      BIGINT,
    last_error      TEXT
);

CREATE INDEX notifications_pending ON notifications (url, id)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE INDEX notifications_build ON notifications (build, kind, seq);

-- Storage counters that outlive a restart.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

-- The clients that claimed jobs here and what became of the jobs they took.
CREATE TABLE clients (
    id           TEXT PRIMARY KEY NOT NULL,
    include      TEXT NOT NULL,
    slots        BIGINT,
    version      TEXT,
    address      TEXT,
    first_seen   BIGINT NOT NULL,
    last_contact BIGINT NOT NULL,
    n_claimed    BIGINT NOT NULL DEFAULT 0,
    n_finished   BIGINT NOT NULL DEFAULT 0,
    n_failed     BIGINT NOT NULL DEFAULT 0,
    n_lost       BIGINT NOT NULL DEFAULT 0,
    image_bytes  BIGINT NOT NULL DEFAULT 0
);

-- Each client's own credential: an argon2id hash of its secret, never the secret.
CREATE TABLE client_credentials (
    client_id   TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    origin      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
