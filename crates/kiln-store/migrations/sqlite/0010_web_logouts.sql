-- Dashboard sessions logged out, kept until they would have expired anyway, so that a
-- logout holds across a restart and on every server sharing the database.
CREATE TABLE web_logouts (
    nonce TEXT PRIMARY KEY NOT NULL,
    until INTEGER NOT NULL
) WITHOUT ROWID;
