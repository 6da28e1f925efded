-- A job's optional verify step (VERIFYSCRIPT), as the SQLite store's migration 0006:
-- it runs after the image step and checks its result; NULL means the job has none, as
-- every job submitted before it had.
ALTER TABLE jobs ADD COLUMN verify_script TEXT;
