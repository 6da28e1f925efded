-- Two reads made for every job read rows in proportion to the build or the queue, so
-- a job cost more the larger its build: a claim's "when was this job queued" (the
-- latest event of one job, which `events_build` could only find by reading every
-- event of the build), and the timekeeper's earliest accept deadline of a never
-- claimed job (which `jobs_lease` could only find by reading every queued job).
CREATE INDEX events_job ON events (build, job, time);
CREATE INDEX jobs_unclaimed ON jobs (accept_deadline) WHERE state = 'queued' AND attempt = 0;
