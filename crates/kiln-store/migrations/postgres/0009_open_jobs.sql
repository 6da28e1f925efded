-- Whether a build still has a job queued or running, asked at every end of a job of a
-- build with a webhook, read one entry instead of every job of the build. As SQLite's
-- 0014_open_jobs.sql.
CREATE INDEX jobs_open ON jobs (build) WHERE state IN ('queued', 'running');
