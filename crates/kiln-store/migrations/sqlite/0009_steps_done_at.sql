-- When a run's steps were first said to be over: its upload began then (the
-- dashboard's timeline shows it, and `uploading_since` in a job's status).
ALTER TABLE jobs ADD COLUMN steps_done_at INTEGER;
