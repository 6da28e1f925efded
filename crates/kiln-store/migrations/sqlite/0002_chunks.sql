-- Images are stored as chunks: each image row keeps its ordered chunk list, packed as
-- 36 bytes a chunk (BLAKE3 name, u32 LE length). Rows written before chunking have
-- NULL here until the server converts their whole-file blob at start.
ALTER TABLE images ADD COLUMN chunk_list BLOB;

-- Storage counters that outlive a restart (bytes received, bytes deduplicated, ...).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
