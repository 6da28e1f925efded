-- A job's optional verify step (VERIFYSCRIPT): runs after the image step and checks
-- its result; NULL means the job has none, as every job submitted before it had.
ALTER TABLE jobs ADD COLUMN verify_script TEXT;
