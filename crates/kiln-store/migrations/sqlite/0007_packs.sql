-- Image chunks rest in packs (files or objects of tens of MiB); this is their index,
-- kept here so that every server on this database finds every chunk.
CREATE TABLE packs (
    name       TEXT PRIMARY KEY NOT NULL,
    -- The pack's length in bytes.
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

-- Where each stored chunk rests: the first pack that recorded it keeps it.
CREATE TABLE pack_chunks (
    hash   BLOB PRIMARY KEY NOT NULL,
    pack   TEXT NOT NULL,
    -- Where the chunk's frame starts in the pack, and its length.
    offset INTEGER NOT NULL,
    len    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX pack_chunks_by_pack ON pack_chunks (pack);

-- Chunks an upload (`owner`: its build and job) named, asked about, sent or is
-- committing: a garbage collection that started before `until` (unix microseconds)
-- removes none of them, whichever server runs it. A commit sets `until` to the time
-- it recorded its image, which collections that start later see.
CREATE TABLE chunk_pins (
    hash  BLOB NOT NULL,
    owner TEXT NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (hash, owner)
) WITHOUT ROWID;
