//! [`Images`] on PostgreSQL: image records, chunk lists and the storage counters.

use super::{batch, unsigned, wrong_answer, PgStore};
use crate::{ImageRecord, ImageTotals, Images, LegacyImage, NewImage, StoreError, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::ImageInfo;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::collections::BTreeMap;

fn image_info_from_row(row: &PgRow) -> StoreResult<ImageInfo> {
    Ok(ImageInfo {
        build: row.try_get("build")?,
        job_id: row.try_get("job")?,
        config_type: row.try_get("config_type")?,
        name: row.try_get("name")?,
        size: row.try_get::<i64, _>("size")? as u64,
        blake3: row.try_get("blake3")?,
        sha256: row.try_get("sha256")?,
        created_at: row.try_get("created_at")?,
    })
}

#[async_trait]
impl Images for PgStore {
    async fn add_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        image: &NewImage,
    ) -> StoreResult<()> {
        let call = batch::Call::AddImage {
            lease: lease.to_owned(),
            image: image.clone(),
        };
        match self.batcher.call(build, job, call).await? {
            batch::Answer::Stored => Ok(()),
            _ => Err(wrong_answer("add_image")),
        }
    }

    async fn list_images(&self, build: &str) -> StoreResult<Vec<ImageInfo>> {
        let rows = sqlx::query(
            "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, i.created_at \
             FROM images i JOIN jobs j ON j.build = i.build AND j.id = i.job \
             WHERE i.build = $1 AND j.state = 'finished' ORDER BY j.pk, i.name",
        )
        .bind(build)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(image_info_from_row).collect()
    }

    async fn get_image(&self, build: &str, job: &str, name: &str) -> StoreResult<ImageRecord> {
        let row = sqlx::query(
            "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, i.created_at, \
             i.blob_key, i.chunk_list FROM images i JOIN jobs j ON j.build = i.build AND j.id = i.job \
             WHERE i.build = $1 AND i.job = $2 AND i.name = $3 AND j.state = 'finished'",
        )
        .bind(build)
        .bind(job)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("image {name} of job {build}/{job}")))?;
        Ok(ImageRecord {
            info: image_info_from_row(&row)?,
            blob_key: row.try_get("blob_key")?,
            chunk_list: row.try_get("chunk_list")?,
        })
    }

    async fn legacy_images(&self) -> StoreResult<Vec<LegacyImage>> {
        let rows = sqlx::query(
            "SELECT build, job, name, blob_key FROM images WHERE chunk_list IS NULL \
             ORDER BY build, job, name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LegacyImage {
                    build: row.try_get("build")?,
                    job: row.try_get("job")?,
                    name: row.try_get("name")?,
                    blob_key: row.try_get("blob_key")?,
                })
            })
            .collect()
    }

    async fn set_chunk_list(
        &self,
        build: &str,
        job: &str,
        name: &str,
        chunk_list: &[u8],
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "UPDATE images SET chunk_list = $1 WHERE build = $2 AND job = $3 AND name = $4",
        )
        .bind(chunk_list)
        .bind(build)
        .bind(job)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn chunk_lists(&self) -> StoreResult<Vec<Vec<u8>>> {
        let rows = sqlx::query("SELECT chunk_list FROM images WHERE chunk_list IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<Vec<u8>, _>("chunk_list")?))
            .collect()
    }

    async fn image_totals(&self) -> StoreResult<ImageTotals> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0)::BIGINT AS bytes FROM images",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ImageTotals {
            images: unsigned(&row, "n")?,
            bytes: unsigned(&row, "bytes")?,
        })
    }

    async fn add_counters(&self, deltas: &[(&str, i64)]) -> StoreResult<()> {
        // One statement (a transaction of its own): a name given twice adds both.
        let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
        for (name, delta) in deltas {
            *sums.entry(name).or_default() += delta;
        }
        write_counters(
            &self.pool,
            sums,
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
        )
        .await
    }

    async fn set_counters(&self, values: &[(&str, i64)]) -> StoreResult<()> {
        // A name given twice is set to its last value.
        let values: BTreeMap<&str, i64> = values.iter().copied().collect();
        write_counters(
            &self.pool,
            values,
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .await
    }

    async fn counters(&self) -> StoreResult<BTreeMap<String, i64>> {
        let rows = sqlx::query("SELECT name, value FROM counters")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("name")?, row.try_get("value")?)))
            .collect()
    }
}

/// Writes counters in one statement, `on_conflict` saying what an existing one
/// becomes. In name order (a `BTreeMap`'s), so that two writers lock the rows in the
/// same order; each name once, as one statement may change a row only once.
async fn write_counters(
    pool: &sqlx::PgPool,
    values: BTreeMap<&str, i64>,
    on_conflict: &str,
) -> StoreResult<()> {
    if values.is_empty() {
        return Ok(());
    }
    let (names, values): (Vec<&str>, Vec<i64>) = values.into_iter().unzip();
    sqlx::query(&format!(
        "INSERT INTO counters (name, value) \
         SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[]) {on_conflict}"
    ))
    .bind(&names)
    .bind(&values)
    .execute(pool)
    .await?;
    Ok(())
}
