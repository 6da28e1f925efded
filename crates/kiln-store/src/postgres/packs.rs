//! [`Packs`] on PostgreSQL: the pack index and the chunk pins.
//!
//! SQLite runs one writer at a time, so a pin and a removal never interleave there.
//! Here they could: a collection's removal could read "no pin" just before an upload's
//! pin commits, and the upload then find the chunk still indexed and not send it. So
//! pins take a shared advisory lock and removal an exclusive one, each until its
//! transaction ends: a pin that commits first is seen by the removal, and an upload
//! whose pin waited for a removal finds the chunk gone and sends it again.

use super::{unsigned, PgStore};
use crate::{PackEntry, PackFill, PackedAt, Packs, StoreError, StoreResult};
use async_trait::async_trait;
use kiln_proto::transfer::ChunkHash;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::collections::HashMap;

/// The advisory lock that orders pins against removals (any number; kiln's own).
const PINS_LOCK: i64 = 0x6b69_6c6e_7069_6e73; // "kilnpins"

fn hash_from(row: &PgRow) -> StoreResult<ChunkHash> {
    let bytes: Vec<u8> = row.try_get("hash")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Conflict("a chunk name in the index is not 32 bytes".into()))?;
    Ok(ChunkHash(bytes))
}

fn hash_list(hashes: &[ChunkHash]) -> Vec<Vec<u8>> {
    hashes.iter().map(|hash| hash.0.to_vec()).collect()
}

async fn insert_entries(tx: &mut super::Tx, pack: &str, entries: &[PackEntry]) -> StoreResult<u64> {
    let hashes: Vec<Vec<u8>> = entries.iter().map(|entry| entry.hash.0.to_vec()).collect();
    let offsets: Vec<i64> = entries.iter().map(|entry| entry.offset as i64).collect();
    let lens: Vec<i64> = entries.iter().map(|entry| i64::from(entry.len)).collect();
    let added = sqlx::query(
        "INSERT INTO pack_chunks (hash, pack, pack_offset, len) \
         SELECT hash, $1, pack_offset, len \
         FROM UNNEST($2::BYTEA[], $3::BIGINT[], $4::BIGINT[]) AS e (hash, pack_offset, len) \
         ON CONFLICT (hash) DO NOTHING",
    )
    .bind(pack)
    .bind(&hashes)
    .bind(&offsets)
    .bind(&lens)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(added)
}

async fn record_pack(tx: &mut super::Tx, pack: &str, bytes: u64, now: i64) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO packs (name, bytes, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET bytes = excluded.bytes, created_at = excluded.created_at",
    )
    .bind(pack)
    .bind(bytes as i64)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Packs for PgStore {
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        entries: &[PackEntry],
        now: i64,
    ) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        record_pack(&mut tx, pack, bytes, now).await?;
        let added = insert_entries(&mut tx, pack, entries).await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn locate_chunks(&self, hashes: &[ChunkHash]) -> StoreResult<Vec<Option<PackedAt>>> {
        let rows = sqlx::query(
            "SELECT hash, pack, pack_offset, len FROM pack_chunks WHERE hash = ANY($1::BYTEA[])",
        )
        .bind(hash_list(hashes))
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<ChunkHash, PackedAt> = HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(
                hash_from(row)?,
                PackedAt {
                    pack: row.try_get("pack")?,
                    offset: unsigned(row, "pack_offset")?,
                    len: unsigned(row, "len")? as u32,
                },
            );
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
            sqlx::query("SELECT hash, len FROM pack_chunks WHERE hash > $1 ORDER BY hash LIMIT $2")
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
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PINS_LOCK)
            .execute(&mut *tx)
            .await?;
        let freed: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM pack_chunks c WHERE c.hash = ANY($1::BYTEA[]) \
             AND NOT EXISTS (SELECT 1 FROM chunk_pins p WHERE p.hash = c.hash AND p.until > $2) \
             RETURNING c.len) \
             SELECT COALESCE(SUM(len), 0)::BIGINT FROM gone",
        )
        .bind(hash_list(hashes))
        .bind(since)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(freed.max(0) as u64)
    }

    async fn sparse_packs(&self, live_share: f64) -> StoreResult<Vec<PackFill>> {
        let rows = sqlx::query(
            "SELECT p.name, p.bytes, COALESCE(SUM(c.len), 0)::BIGINT AS live \
             FROM packs p LEFT JOIN pack_chunks c ON c.pack = p.name \
             GROUP BY p.name, p.bytes \
             HAVING COALESCE(SUM(c.len), 0) < p.bytes * $1 ORDER BY p.name",
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
        let rows = sqlx::query(
            "SELECT hash, pack_offset, len FROM pack_chunks WHERE pack = $1 ORDER BY pack_offset",
        )
        .bind(pack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PackEntry {
                    hash: hash_from(row)?,
                    offset: unsigned(row, "pack_offset")?,
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
            record_pack(&mut tx, name, bytes, now).await?;
            let hashes: Vec<Vec<u8>> = entries.iter().map(|entry| entry.hash.0.to_vec()).collect();
            let offsets: Vec<i64> = entries.iter().map(|entry| entry.offset as i64).collect();
            let lens: Vec<i64> = entries.iter().map(|entry| i64::from(entry.len)).collect();
            sqlx::query(
                "UPDATE pack_chunks c SET pack = $1, pack_offset = e.pack_offset, len = e.len \
                 FROM UNNEST($2::BYTEA[], $3::BIGINT[], $4::BIGINT[]) AS e (hash, pack_offset, len) \
                 WHERE c.hash = e.hash AND c.pack = $5",
            )
            .bind(name)
            .bind(&hashes)
            .bind(&offsets)
            .bind(&lens)
            .bind(old)
            .execute(&mut *tx)
            .await?;
        }
        let in_use: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pack_chunks WHERE pack = $1)")
                .bind(old)
                .fetch_one(&mut *tx)
                .await?;
        if !in_use {
            sqlx::query("DELETE FROM packs WHERE name = $1")
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
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(PINS_LOCK)
            .execute(&mut *tx)
            .await?;
        // One row per chunk: an upload may name a chunk twice.
        sqlx::query(
            "INSERT INTO chunk_pins (hash, owner, until) \
             SELECT DISTINCT hash, $2, $3::BIGINT FROM UNNEST($1::BYTEA[]) AS h (hash) \
             ON CONFLICT (hash, owner) DO UPDATE \
             SET until = GREATEST(chunk_pins.until, excluded.until)",
        )
        .bind(hash_list(hashes))
        .bind(owner)
        .bind(until)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn release_pins(&self, owner: &str, hashes: &[ChunkHash], now: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE chunk_pins SET until = LEAST(until, $1) \
             WHERE owner = $2 AND hash = ANY($3::BYTEA[])",
        )
        .bind(now)
        .bind(owner)
        .bind(hash_list(hashes))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn forget_pins(&self, now: i64) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM chunk_pins WHERE until <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn image_store_id(&self) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM image_store WHERE one = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn claim_image_store_id(&self, id: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO image_store (one, id) VALUES (1, $1) ON CONFLICT (one) DO NOTHING",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT id FROM image_store WHERE one = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
