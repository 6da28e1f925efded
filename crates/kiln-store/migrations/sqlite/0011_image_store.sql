-- The id of the image store whose packs this database indexes (one row): a server
-- started on this database and another image store refuses to start.
CREATE TABLE image_store (
    one INTEGER PRIMARY KEY NOT NULL CHECK (one = 1),
    id TEXT NOT NULL
);
