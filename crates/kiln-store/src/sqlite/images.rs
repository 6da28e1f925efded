//! [`Images`] on SQLite: image records, chunk lists and the storage counters.

use super::{collect, first, leased_job_row, run, unsigned, SqliteStore};
use crate::{ImageRecord, ImageTotals, Images, LegacyImage, NewImage, StoreError, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::ImageInfo;
use rusqlite::Row;
use std::collections::BTreeMap;

fn image_info_from_row(row: &Row) -> StoreResult<ImageInfo> {
    Ok(ImageInfo {
        build: row.get("build")?,
        job_id: row.get("job")?,
        config_type: row.get("config_type")?,
        name: row.get("name")?,
        size: row.get::<_, i64>("size")? as u64,
        blake3: row.get("blake3")?,
        sha256: row.get("sha256")?,
        created_at: row.get("created_at")?,
    })
}

/// Adds `deltas` to the named counters (`set`: sets them to the values instead).
async fn write_counters(store: &SqliteStore, values: &[(&str, i64)], set: bool) -> StoreResult<()> {
    let values: Vec<(String, i64)> = values
        .iter()
        .map(|(name, value)| ((*name).to_owned(), *value))
        .collect();
    let query = if set {
        "INSERT INTO counters (name, value) VALUES (?, ?) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value"
    } else {
        "INSERT INTO counters (name, value) VALUES (?, ?) \
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
    };
    store
        .db
        .write(move |conn| {
            for (name, value) in &values {
                run(conn, query, rusqlite::params![name, value])?;
            }
            Ok(())
        })
        .await
}

#[async_trait]
impl Images for SqliteStore {
    async fn add_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        image: &NewImage,
    ) -> StoreResult<()> {
        let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
        let image = image.clone();
        self.db
            .write(move |conn| {
                leased_job_row(conn, &build, &job, &lease)?;
                run(
                    conn,
                    "INSERT OR REPLACE INTO images (build, job, name, lease_token, size, blake3, \
                     sha256, blob_key, created_at, chunk_list) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rusqlite::params![
                        build,
                        job,
                        image.name,
                        lease,
                        image.size as i64,
                        image.blake3,
                        image.sha256,
                        image.blob_key,
                        image.created_at,
                        image.chunk_list,
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn list_images(&self, build: &str) -> StoreResult<Vec<ImageInfo>> {
        let build = build.to_owned();
        self.db
            .read_blocking(move |conn| {
                collect(
                    conn,
                    "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, \
                     i.created_at FROM images i JOIN jobs j ON j.build = i.build AND j.id = i.job \
                     WHERE i.build = ? AND j.state = 'finished' ORDER BY j.pk, i.name",
                    [&build],
                    image_info_from_row,
                )
            })
            .await
    }

    async fn get_image(&self, build: &str, job: &str, name: &str) -> StoreResult<ImageRecord> {
        self.db
            .read(|conn| {
                first(
                    conn,
                    "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, \
                     i.created_at, i.blob_key, i.chunk_list FROM images i \
                     JOIN jobs j ON j.build = i.build AND j.id = i.job \
                     WHERE i.build = ? AND i.job = ? AND i.name = ? AND j.state = 'finished'",
                    [build, job, name],
                    |row| {
                        Ok(ImageRecord {
                            info: image_info_from_row(row)?,
                            blob_key: row.get("blob_key")?,
                            chunk_list: row.get("chunk_list")?,
                        })
                    },
                )
            })?
            .ok_or_else(|| StoreError::NotFound(format!("image {name} of job {build}/{job}")))
    }

    async fn legacy_images(&self) -> StoreResult<Vec<LegacyImage>> {
        self.db
            .read_blocking(|conn| {
                collect(
                    conn,
                    "SELECT build, job, name, blob_key FROM images WHERE chunk_list IS NULL \
                     ORDER BY build, job, name",
                    [],
                    |row| {
                        Ok(LegacyImage {
                            build: row.get("build")?,
                            job: row.get("job")?,
                            name: row.get("name")?,
                            blob_key: row.get("blob_key")?,
                        })
                    },
                )
            })
            .await
    }

    async fn set_chunk_list(
        &self,
        build: &str,
        job: &str,
        name: &str,
        chunk_list: &[u8],
    ) -> StoreResult<()> {
        let (build, job, name) = (build.to_owned(), job.to_owned(), name.to_owned());
        let chunk_list = chunk_list.to_vec();
        self.db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE images SET chunk_list = ? WHERE build = ? AND job = ? AND name = ?",
                    rusqlite::params![chunk_list, build, job, name],
                )?;
                Ok(())
            })
            .await
    }

    async fn chunk_lists(&self) -> StoreResult<Vec<Vec<u8>>> {
        self.db
            .read_blocking(|conn| {
                collect(
                    conn,
                    "SELECT chunk_list FROM images WHERE chunk_list IS NOT NULL",
                    [],
                    |row| Ok(row.get::<_, Vec<u8>>(0)?),
                )
            })
            .await
    }

    async fn image_totals(&self) -> StoreResult<ImageTotals> {
        self.db
            .read_blocking(|conn| {
                first(
                    conn,
                    "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM images",
                    [],
                    |row| {
                        Ok(ImageTotals {
                            images: unsigned(row, "n")?,
                            bytes: unsigned(row, "bytes")?,
                        })
                    },
                )?
                .ok_or_else(|| StoreError::Conflict("no row of image totals".into()))
            })
            .await
    }

    async fn add_counters(&self, deltas: &[(&str, i64)]) -> StoreResult<()> {
        write_counters(self, deltas, false).await
    }

    async fn set_counters(&self, values: &[(&str, i64)]) -> StoreResult<()> {
        write_counters(self, values, true).await
    }

    async fn counters(&self) -> StoreResult<BTreeMap<String, i64>> {
        let all = self.db.read(|conn| {
            collect(conn, "SELECT name, value FROM counters", [], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
        })?;
        Ok(all.into_iter().collect())
    }
}
