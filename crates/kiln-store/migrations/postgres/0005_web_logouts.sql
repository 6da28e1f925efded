-- Dashboard sessions logged out, kept until they would have expired anyway, so that a
-- logout holds across a restart and on every server sharing the database. As SQLite's
-- 0010_web_logouts.sql.
CREATE TABLE web_logouts (
    nonce TEXT PRIMARY KEY,
    until BIGINT NOT NULL
);
