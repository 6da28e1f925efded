-- A build's manifest in a table of its own. In `builds` it came before the files' key,
-- size and submission time, so every read of those (the dispatcher's candidates, a
-- job's files, a build's summary) followed the manifest's chain of overflow pages to
-- reach them: a 10,000-job manifest is about 2 MB, some 500 pages read for each such
-- read, on every job.
CREATE TABLE build_manifests (
    number   TEXT PRIMARY KEY NOT NULL REFERENCES builds (number) ON DELETE CASCADE,
    manifest TEXT NOT NULL
);
INSERT INTO build_manifests (number, manifest) SELECT number, manifest FROM builds;
ALTER TABLE builds DROP COLUMN manifest;
