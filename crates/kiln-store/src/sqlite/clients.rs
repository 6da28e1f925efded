//! [`Clients`] on SQLite: the clients' histories and contacts, and their credentials.

use super::legacy::unsigned;
use super::SqliteStore;
use crate::rules::{self, CredentialDecision};
use crate::{ClientCredential, Clients, CredentialPut, CredentialWrite, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::{ClientInfo, HeldJob};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::collections::HashMap;

fn credential_of(row: &SqliteRow) -> StoreResult<ClientCredential> {
    Ok(ClientCredential {
        client_id: row.try_get("client_id")?,
        secret_hash: row.try_get("secret_hash")?,
        origin: row.try_get("origin")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

#[async_trait]
impl Clients for SqliteStore {
    async fn touch_client(&self, id: &str, address: Option<&str>, now: i64) -> StoreResult<bool> {
        // One statement, atomic on its own: no BEGIN IMMEDIATE round trip for a write
        // that comes every few seconds from every client.
        let done = sqlx::query(
            "UPDATE clients SET last_contact = MAX(last_contact, ?), \
             address = COALESCE(?, address) WHERE id = ?",
        )
        .bind(now)
        .bind(address)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn clients(&self) -> StoreResult<Vec<ClientInfo>> {
        // One read transaction: the held jobs and the counters are of the same moment.
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, include, slots, version, address, first_seen, last_contact, n_claimed, \
             n_finished, n_failed, n_lost, image_bytes FROM clients ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let held_rows = sqlx::query(
            "SELECT client_id, build, id, percent, major_state FROM jobs \
             WHERE state = 'running' AND client_id IS NOT NULL ORDER BY pk",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let mut held: HashMap<String, Vec<HeldJob>> = HashMap::new();
        for row in &held_rows {
            held.entry(row.try_get("client_id")?)
                .or_default()
                .push(HeldJob {
                    build: row.try_get("build")?,
                    job: row.try_get("id")?,
                    percent: row
                        .try_get::<Option<i64>, _>("percent")?
                        .map(|p| p.clamp(0, 100) as u8),
                    major: row.try_get("major_state")?,
                });
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let include: String = row.try_get("include")?;
                Ok(ClientInfo {
                    held: held.remove(&id).unwrap_or_default(),
                    include: include
                        .split(',')
                        .filter(|entry| !entry.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    slots: row
                        .try_get::<Option<i64>, _>("slots")?
                        .map(|slots| slots.clamp(0, i64::from(u32::MAX)) as u32),
                    version: row.try_get("version")?,
                    address: row.try_get("address")?,
                    first_seen: row.try_get("first_seen")?,
                    last_contact: row.try_get("last_contact")?,
                    session_open: false,
                    n_claimed: unsigned(row, "n_claimed")?,
                    n_finished: unsigned(row, "n_finished")?,
                    n_failed: unsigned(row, "n_failed")?,
                    n_lost: unsigned(row, "n_lost")?,
                    image_bytes: unsigned(row, "image_bytes")?,
                    id,
                })
            })
            .collect()
    }

    async fn client_credential(&self, id: &str) -> StoreResult<Option<ClientCredential>> {
        let row = sqlx::query(
            "SELECT client_id, secret_hash, origin, created_at, revoked_at \
             FROM client_credentials WHERE client_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(credential_of).transpose()
    }

    async fn client_credentials(&self) -> StoreResult<Vec<ClientCredential>> {
        let rows = sqlx::query(
            "SELECT client_id, secret_hash, origin, created_at, revoked_at \
             FROM client_credentials ORDER BY client_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_of).collect()
    }

    async fn put_client_credential(
        &self,
        id: &str,
        secret_hash: &str,
        how: CredentialWrite,
        now: i64,
    ) -> StoreResult<CredentialPut> {
        let mut tx = self.write_tx().await?;
        let revoked_at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM client_credentials WHERE client_id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (origin, put) = match rules::credential_write(how, revoked_at.map(|at| at.is_some())) {
            CredentialDecision::Refuse(put) => return Ok(put),
            CredentialDecision::Write { origin, put } => (origin, put),
        };
        sqlx::query(
            "INSERT INTO client_credentials (client_id, secret_hash, origin, created_at) \
             VALUES (?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET \
             secret_hash = excluded.secret_hash, origin = excluded.origin, \
             created_at = excluded.created_at, revoked_at = NULL",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(origin)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(put)
    }

    async fn revoke_client_credential(&self, id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE client_credentials SET revoked_at = ? \
             WHERE client_id = ? AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn end_web_session(&self, nonce: &str, until: i64, now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM web_logouts WHERE until <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO web_logouts (nonce, until) VALUES (?, ?) \
             ON CONFLICT (nonce) DO UPDATE SET until = excluded.until",
        )
        .bind(nonce)
        .bind(until)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn web_session_ended(&self, nonce: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM web_logouts WHERE nonce = ?)")
                .bind(nonce)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
