-- A claim's "when was this job queued" (the latest event of one job) read every event
-- of the build through `events_build`, so a job cost more the larger its build. As
-- SQLite's 0012_flat_per_job_reads.sql (whose other index PostgreSQL has had since
-- 0001: `jobs_unclaimed`).
CREATE INDEX events_job ON events (build, job, time);
