//! [`Packs`] on SQLite: the pack index and the chunk pins.
//!
//! One prepared statement per row or per hash, run many times: with SQLite called
//! directly a statement costs microseconds, and statements of one length are kept
//! prepared where statements binding lists of every length would each be a cached
//! statement of their own.

use super::{collect, first, run, scalar, unsigned, SqliteStore};
use crate::{PackEntry, PackFill, PackedAt, Packs, StoreError, StoreResult};
use async_trait::async_trait;
use kiln_proto::transfer::ChunkHash;
use rusqlite::{Connection, Row};

/// Hash lists up to this long are looked up on the caller's thread; longer ones (an
/// image's whole chunk list) on a blocking thread.
const INLINE_LOOKUPS: usize = 256;

fn hash_from(row: &Row) -> StoreResult<ChunkHash> {
    let bytes: Vec<u8> = row.get("hash")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Conflict("a chunk name in the index is not 32 bytes".into()))?;
    Ok(ChunkHash(bytes))
}

fn insert_entries(conn: &Connection, pack: &str, entries: &[PackEntry]) -> StoreResult<u64> {
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO pack_chunks (hash, pack, offset, len) VALUES (?, ?, ?, ?)",
    )?;
    let mut added = 0;
    for entry in entries {
        added += insert.execute(rusqlite::params![
            &entry.hash.0[..],
            pack,
            entry.offset as i64,
            i64::from(entry.len),
        ])? as u64;
    }
    Ok(added)
}

fn locate(conn: &Connection, hashes: &[ChunkHash]) -> StoreResult<Vec<Option<PackedAt>>> {
    let mut lookup =
        conn.prepare_cached("SELECT pack, offset, len FROM pack_chunks WHERE hash = ?")?;
    let mut found = Vec::with_capacity(hashes.len());
    for hash in hashes {
        let mut rows = lookup.query([&hash.0[..]])?;
        found.push(match rows.next()? {
            Some(row) => Some(PackedAt {
                pack: row.get("pack")?,
                offset: unsigned(row, "offset")?,
                len: unsigned(row, "len")? as u32,
            }),
            None => None,
        });
    }
    Ok(found)
}

fn put_pack(conn: &Connection, pack: &str, bytes: u64, now: i64) -> StoreResult<()> {
    run(
        conn,
        "INSERT OR REPLACE INTO packs (name, bytes, created_at) VALUES (?, ?, ?)",
        rusqlite::params![pack, bytes as i64, now],
    )?;
    Ok(())
}

#[async_trait]
impl Packs for SqliteStore {
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        entries: &[PackEntry],
        now: i64,
    ) -> StoreResult<u64> {
        let (pack, entries) = (pack.to_owned(), entries.to_vec());
        self.db
            .write(move |conn| {
                put_pack(conn, &pack, bytes, now)?;
                insert_entries(conn, &pack, &entries)
            })
            .await
    }

    async fn locate_chunks(&self, hashes: &[ChunkHash]) -> StoreResult<Vec<Option<PackedAt>>> {
        if hashes.len() <= INLINE_LOOKUPS {
            return self.db.read(|conn| locate(conn, hashes));
        }
        let hashes = hashes.to_vec();
        self.db
            .read_blocking(move |conn| locate(conn, &hashes))
            .await
    }

    async fn list_chunks(
        &self,
        after: Option<ChunkHash>,
        limit: u32,
    ) -> StoreResult<Vec<(ChunkHash, u32)>> {
        let after = after.map(|hash| hash.0.to_vec()).unwrap_or_default();
        self.db
            .read_blocking(move |conn| {
                collect(
                    conn,
                    "SELECT hash, len FROM pack_chunks WHERE hash > ? ORDER BY hash LIMIT ?",
                    rusqlite::params![after, i64::from(limit)],
                    |row| Ok((hash_from(row)?, unsigned(row, "len")? as u32)),
                )
            })
            .await
    }

    async fn remove_unpinned_chunks(&self, hashes: &[ChunkHash], since: i64) -> StoreResult<u64> {
        let hashes = hashes.to_vec();
        self.db
            .write(move |conn| {
                let mut remove = conn.prepare_cached(
                    "DELETE FROM pack_chunks WHERE hash = ? AND NOT EXISTS \
                     (SELECT 1 FROM chunk_pins p WHERE p.hash = pack_chunks.hash AND p.until > ?) \
                     RETURNING len",
                )?;
                let mut freed = 0u64;
                for hash in &hashes {
                    let mut rows = remove.query(rusqlite::params![&hash.0[..], since])?;
                    while let Some(row) = rows.next()? {
                        freed += row.get::<_, i64>(0)?.max(0) as u64;
                    }
                }
                Ok(freed)
            })
            .await
    }

    async fn sparse_packs(&self, live_share: f64) -> StoreResult<Vec<PackFill>> {
        self.db
            .read_blocking(move |conn| {
                collect(
                    conn,
                    "SELECT p.name, p.bytes, COALESCE(SUM(c.len), 0) AS live \
                     FROM packs p LEFT JOIN pack_chunks c ON c.pack = p.name \
                     GROUP BY p.name, p.bytes HAVING live < p.bytes * ? ORDER BY p.name",
                    [live_share],
                    |row| {
                        Ok(PackFill {
                            pack: row.get("name")?,
                            bytes: unsigned(row, "bytes")?,
                            live_bytes: unsigned(row, "live")?,
                        })
                    },
                )
            })
            .await
    }

    async fn pack_entries(&self, pack: &str) -> StoreResult<Vec<PackEntry>> {
        let pack = pack.to_owned();
        self.db
            .read_blocking(move |conn| {
                collect(
                    conn,
                    "SELECT hash, offset, len FROM pack_chunks WHERE pack = ? ORDER BY offset",
                    [&pack],
                    |row| {
                        Ok(PackEntry {
                            hash: hash_from(row)?,
                            offset: unsigned(row, "offset")?,
                            len: unsigned(row, "len")? as u32,
                        })
                    },
                )
            })
            .await
    }

    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackEntry])>,
        now: i64,
    ) -> StoreResult<bool> {
        let old = old.to_owned();
        let new = new.map(|(name, bytes, entries)| (name.to_owned(), bytes, entries.to_vec()));
        self.db
            .write(move |conn| {
                if let Some((name, bytes, entries)) = &new {
                    put_pack(conn, name, *bytes, now)?;
                    let mut moved = conn.prepare_cached(
                        "UPDATE pack_chunks SET pack = ?, offset = ?, len = ? \
                         WHERE hash = ? AND pack = ?",
                    )?;
                    for entry in entries {
                        moved.execute(rusqlite::params![
                            name,
                            entry.offset as i64,
                            i64::from(entry.len),
                            &entry.hash.0[..],
                            old,
                        ])?;
                    }
                }
                let in_use: Option<i64> = scalar(
                    conn,
                    "SELECT 1 FROM pack_chunks WHERE pack = ? LIMIT 1",
                    [&old],
                )?;
                if in_use.is_none() {
                    run(conn, "DELETE FROM packs WHERE name = ?", [&old])?;
                }
                Ok(in_use.is_none())
            })
            .await
    }

    async fn pin_chunks(&self, owner: &str, hashes: &[ChunkHash], until: i64) -> StoreResult<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let owner = owner.to_owned();
        // One row per chunk: an upload may name a chunk twice.
        let hashes = ChunkHash::distinct(hashes);
        self.db
            .write(move |conn| {
                let mut pin = conn.prepare_cached(
                    "INSERT INTO chunk_pins (hash, owner, until) VALUES (?, ?, ?) \
                     ON CONFLICT (hash, owner) DO UPDATE SET until = MAX(until, excluded.until)",
                )?;
                for hash in &hashes {
                    pin.execute(rusqlite::params![&hash.0[..], owner, until])?;
                }
                Ok(())
            })
            .await
    }

    async fn release_pins(&self, owner: &str, hashes: &[ChunkHash], now: i64) -> StoreResult<()> {
        let owner = owner.to_owned();
        let hashes = ChunkHash::distinct(hashes);
        self.db
            .write(move |conn| {
                let mut release = conn.prepare_cached(
                    "UPDATE chunk_pins SET until = MIN(until, ?) WHERE owner = ? AND hash = ?",
                )?;
                for hash in &hashes {
                    release.execute(rusqlite::params![now, owner, &hash.0[..]])?;
                }
                Ok(())
            })
            .await
    }

    async fn forget_pins(&self, now: i64) -> StoreResult<u64> {
        let forgotten = self
            .db
            .write(move |conn| run(conn, "DELETE FROM chunk_pins WHERE until <= ?", [now]))
            .await?;
        Ok(forgotten as u64)
    }

    async fn image_store_id(&self) -> StoreResult<Option<String>> {
        self.db.read(|conn| {
            first(
                conn,
                "SELECT id FROM image_store WHERE one = 1",
                [],
                |row| Ok(row.get(0)?),
            )
        })
    }

    async fn claim_image_store_id(&self, id: &str) -> StoreResult<String> {
        let id = id.to_owned();
        self.db
            .write(move |conn| {
                run(
                    conn,
                    "INSERT INTO image_store (one, id) VALUES (1, ?) ON CONFLICT (one) DO NOTHING",
                    [&id],
                )?;
                scalar::<String>(conn, "SELECT id FROM image_store WHERE one = 1", [])?
                    .ok_or_else(|| StoreError::Conflict("the image store id was not kept".into()))
            })
            .await
    }
}
