-- Each client's own credential: a slow hash (argon2id, PHC string) of the secret it
-- was given, never the secret. A client gets one by enrolling with the join token or
-- from an operator (`kiln server client add`); revoking keeps the row so that the id
-- cannot enroll again without an operator. Times are unix microseconds.
CREATE TABLE client_credentials (
    client_id   TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    -- 'enrolled' (with the join token) or 'issued' (by an operator).
    origin      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
