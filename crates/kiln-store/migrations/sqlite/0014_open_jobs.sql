-- Every end of a job of a build with a webhook asks whether the build still has a job
-- queued or running (its end notice goes with the last one). Counting them read every
-- job of the build through the jobs' primary key, so each end cost more the larger
-- its build, and a build's ends together grew with the square of its size. With this
-- index the question reads one entry.
CREATE INDEX jobs_open ON jobs (build) WHERE state IN ('queued', 'running');
