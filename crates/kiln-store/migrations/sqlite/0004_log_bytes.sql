-- How many bytes of log text each job has stored, and whether its log reached the
-- server's limit and was cut (a last line says so; later lines are dropped). Kept in
-- the job's row so that the count survives a restart without summing the log again.
ALTER TABLE jobs ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN log_cut INTEGER NOT NULL DEFAULT 0;

UPDATE jobs SET log_bytes = COALESCE(
    (SELECT SUM(LENGTH(CAST(text AS BLOB))) FROM log_lines
     WHERE log_lines.build = jobs.build AND log_lines.job = jobs.id),
    0);
