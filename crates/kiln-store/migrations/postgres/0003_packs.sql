-- Image chunks rest in packs (files or objects of tens of MiB); this is their index,
-- kept here so that every server on this database finds every chunk. As SQLite's
-- 0007_packs.sql.
CREATE TABLE packs (
    name       TEXT PRIMARY KEY,
    -- The pack's length in bytes.
    bytes      BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Where each stored chunk rests: the first pack that recorded it keeps it.
CREATE TABLE pack_chunks (
    hash        BYTEA PRIMARY KEY,
    pack        TEXT NOT NULL,
    -- Where the chunk's frame starts in the pack, and its length.
    pack_offset BIGINT NOT NULL,
    len         BIGINT NOT NULL
);
CREATE INDEX pack_chunks_by_pack ON pack_chunks (pack);

-- Chunks an upload (`owner`: its build and job) named, asked about, sent or is
-- committing: a garbage collection that started before `until` (unix microseconds)
-- removes none of them, whichever server runs it. A commit sets `until` to the time
-- it recorded its image, which collections that start later see.
CREATE TABLE chunk_pins (
    hash  BYTEA NOT NULL,
    owner TEXT NOT NULL,
    until BIGINT NOT NULL,
    PRIMARY KEY (hash, owner)
);
