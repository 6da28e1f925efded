//! [`Packs`] on SQLite: the pack index and the chunk pins.

use super::legacy::unsigned;
use super::SqliteStore;
use crate::{PackEntry, PackFill, PackedAt, Packs, StoreResult};
use async_trait::async_trait;
use kiln_proto::transfer::ChunkHash;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::collections::HashMap;

/// Hashes bound in one statement. Statements whose number of values varies are not
/// kept prepared: each length would be a cached statement of its own, and the cache
/// grew the server's memory by tens of MiB during a long upload.
const BIND_BATCH: usize = 500;
/// Rows written by one statement (each binds at most four values, well under
/// SQLite's limit of 32,766).
const ROW_BATCH: usize = 500;

fn hash_from(row: &SqliteRow) -> StoreResult<ChunkHash> {
    let bytes: Vec<u8> = row.try_get("hash")?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
        crate::StoreError::Conflict("a chunk name in the index is not 32 bytes".into())
    })?;
    Ok(ChunkHash(bytes))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

async fn insert_entries(tx: &mut super::legacy::Tx, pack: &str, entries: &[PackEntry]) -> StoreResult<u64> {
    // Many rows a statement: each statement is a round trip to SQLite's worker thread,
    // and a pack holds hundreds of chunks.
    let mut added = 0;
    for batch in entries.chunks(ROW_BATCH) {
        let sql = format!(
            "INSERT OR IGNORE INTO pack_chunks (hash, pack, offset, len) VALUES {}",
            rows_of(batch.len(), "(?, ?, ?, ?)")
        );
        let mut query = sqlx::query(&sql).persistent(false);
        for entry in batch {
            query = query
                .bind(&entry.hash.0[..])
                .bind(pack)
                .bind(entry.offset as i64)
                .bind(i64::from(entry.len));
        }
        added += query.execute(&mut **tx).await?.rows_affected();
    }
    Ok(added)
}

/// `n` copies of `row`, comma-separated: the VALUES of a statement of many rows.
fn rows_of(n: usize, row: &str) -> String {
    vec![row; n].join(", ")
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
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT OR REPLACE INTO packs (name, bytes, created_at) VALUES (?, ?, ?)")
            .bind(pack)
            .bind(bytes as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let added = insert_entries(&mut tx, pack, entries).await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn locate_chunks(&self, hashes: &[ChunkHash]) -> StoreResult<Vec<Option<PackedAt>>> {
        let mut found: HashMap<ChunkHash, PackedAt> = HashMap::with_capacity(hashes.len());
        for batch in hashes.chunks(BIND_BATCH) {
            let sql = format!(
                "SELECT hash, pack, offset, len FROM pack_chunks WHERE hash IN ({})",
                placeholders(batch.len())
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for hash in batch {
                query = query.bind(&hash.0[..]);
            }
            for row in query.fetch_all(&self.pool).await? {
                found.insert(
                    hash_from(&row)?,
                    PackedAt {
                        pack: row.try_get("pack")?,
                        offset: unsigned(&row, "offset")?,
                        len: unsigned(&row, "len")? as u32,
                    },
                );
            }
        }
        Ok(hashes.iter().map(|hash| found.get(hash).cloned()).collect())
    }

    async fn list_chunks(
        &self,
        after: Option<ChunkHash>,
        limit: u32,
    ) -> StoreResult<Vec<(ChunkHash, u32)>> {
        let after = after.map(|hash| hash.0.to_vec()).unwrap_or_default();
        let rows =
            sqlx::query("SELECT hash, len FROM pack_chunks WHERE hash > ? ORDER BY hash LIMIT ?")
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| Ok((hash_from(row)?, unsigned(row, "len")? as u32)))
            .collect()
    }

    async fn remove_unpinned_chunks(&self, hashes: &[ChunkHash], since: i64) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        let mut freed = 0u64;
        for batch in hashes.chunks(BIND_BATCH) {
            let list = placeholders(batch.len());
            let condition = format!(
                "hash IN ({list}) AND NOT EXISTS \
                 (SELECT 1 FROM chunk_pins p WHERE p.hash = pack_chunks.hash AND p.until > ?)"
            );
            let sum_sql =
                format!("SELECT COALESCE(SUM(len), 0) AS bytes FROM pack_chunks WHERE {condition}");
            let mut sum = sqlx::query(&sum_sql).persistent(false);
            for hash in batch {
                sum = sum.bind(&hash.0[..]);
            }
            freed += unsigned(&sum.bind(since).fetch_one(&mut *tx).await?, "bytes")?;
            let delete_sql = format!("DELETE FROM pack_chunks WHERE {condition}");
            let mut delete = sqlx::query(&delete_sql).persistent(false);
            for hash in batch {
                delete = delete.bind(&hash.0[..]);
            }
            delete.bind(since).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(freed)
    }

    async fn sparse_packs(&self, live_share: f64) -> StoreResult<Vec<PackFill>> {
        let rows = sqlx::query(
            "SELECT p.name, p.bytes, COALESCE(SUM(c.len), 0) AS live \
             FROM packs p LEFT JOIN pack_chunks c ON c.pack = p.name \
             GROUP BY p.name, p.bytes HAVING live < p.bytes * ? ORDER BY p.name",
        )
        .bind(live_share)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PackFill {
                    pack: row.try_get("name")?,
                    bytes: unsigned(row, "bytes")?,
                    live_bytes: unsigned(row, "live")?,
                })
            })
            .collect()
    }

    async fn pack_entries(&self, pack: &str) -> StoreResult<Vec<PackEntry>> {
        let rows =
            sqlx::query("SELECT hash, offset, len FROM pack_chunks WHERE pack = ? ORDER BY offset")
                .bind(pack)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(PackEntry {
                    hash: hash_from(row)?,
                    offset: unsigned(row, "offset")?,
                    len: unsigned(row, "len")? as u32,
                })
            })
            .collect()
    }

    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackEntry])>,
        now: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        if let Some((name, bytes, entries)) = new {
            sqlx::query("INSERT OR REPLACE INTO packs (name, bytes, created_at) VALUES (?, ?, ?)")
                .bind(name)
                .bind(bytes as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            for entry in entries {
                sqlx::query(
                    "UPDATE pack_chunks SET pack = ?, offset = ?, len = ? WHERE hash = ? AND pack = ?",
                )
                .bind(name)
                .bind(entry.offset as i64)
                .bind(i64::from(entry.len))
                .bind(&entry.hash.0[..])
                .bind(old)
                .execute(&mut *tx)
                .await?;
            }
        }
        let in_use = sqlx::query("SELECT 1 FROM pack_chunks WHERE pack = ? LIMIT 1")
            .bind(old)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !in_use {
            sqlx::query("DELETE FROM packs WHERE name = ?")
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(!in_use)
    }

    async fn pin_chunks(&self, owner: &str, hashes: &[ChunkHash], until: i64) -> StoreResult<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        // One row per chunk: an upload may name a chunk twice.
        for batch in ChunkHash::distinct(hashes).chunks(ROW_BATCH) {
            let sql = format!(
                "INSERT INTO chunk_pins (hash, owner, until) VALUES {} \
                 ON CONFLICT (hash, owner) DO UPDATE SET until = MAX(until, excluded.until)",
                rows_of(batch.len(), "(?, ?, ?)")
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for hash in batch {
                query = query.bind(&hash.0[..]).bind(owner).bind(until);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn release_pins(&self, owner: &str, hashes: &[ChunkHash], now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        for batch in ChunkHash::distinct(hashes).chunks(BIND_BATCH) {
            let sql = format!(
                "UPDATE chunk_pins SET until = MIN(until, ?) WHERE owner = ? AND hash IN ({})",
                placeholders(batch.len())
            );
            let mut query = sqlx::query(&sql).persistent(false).bind(now).bind(owner);
            for hash in batch {
                query = query.bind(&hash.0[..]);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn forget_pins(&self, now: i64) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        let forgotten = sqlx::query("DELETE FROM chunk_pins WHERE until <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(forgotten)
    }

    async fn image_store_id(&self) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM image_store WHERE one = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn claim_image_store_id(&self, id: &str) -> StoreResult<String> {
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO image_store (one, id) VALUES (1, ?) ON CONFLICT (one) DO NOTHING")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let recorded = sqlx::query_scalar("SELECT id FROM image_store WHERE one = 1")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(recorded)
    }
}
