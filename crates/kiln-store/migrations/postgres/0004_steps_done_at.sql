-- When a run's steps were first said to be over: its upload began then (the
-- dashboard's timeline shows it, and `uploading_since` in a job's status). As SQLite's
-- 0009_steps_done_at.sql.
ALTER TABLE jobs ADD COLUMN steps_done_at BIGINT;
