-- The id of the image store whose packs this database indexes (one row): a server
-- started on this database and another image store refuses to start. As SQLite's
-- 0011_image_store.sql.
CREATE TABLE image_store (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL
);
