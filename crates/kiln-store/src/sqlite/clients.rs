//! [`Clients`] on SQLite: the clients' histories and contacts, and their credentials.

use super::{collect, first, run, scalar, unsigned, SqliteStore};
use crate::rules::{self, CredentialDecision};
use crate::{ClientCredential, Clients, CredentialPut, CredentialWrite, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::{ClientInfo, HeldJob};
use rusqlite::Row;
use std::collections::HashMap;

fn credential_of(row: &Row) -> StoreResult<ClientCredential> {
    Ok(ClientCredential {
        client_id: row.get("client_id")?,
        secret_hash: row.get("secret_hash")?,
        origin: row.get("origin")?,
        created_at: row.get("created_at")?,
        revoked_at: row.get("revoked_at")?,
    })
}

#[async_trait]
impl Clients for SqliteStore {
    async fn touch_client(&self, id: &str, address: Option<&str>, now: i64) -> StoreResult<bool> {
        let (id, address) = (id.to_owned(), address.map(str::to_owned));
        let changed = self
            .db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE clients SET last_contact = MAX(last_contact, ?), \
                     address = COALESCE(?, address) WHERE id = ?",
                    rusqlite::params![now, address, id],
                )
            })
            .await?;
        Ok(changed > 0)
    }

    async fn clients(&self) -> StoreResult<Vec<ClientInfo>> {
        self.db
            .read_blocking(|conn| {
                // One read transaction: the held jobs and the counters are of the same
                // moment.
                let tx = conn.unchecked_transaction()?;
                let held_rows = collect(
                    &tx,
                    "SELECT client_id, build, id, percent, major_state FROM jobs \
                     WHERE state = 'running' AND client_id IS NOT NULL ORDER BY pk",
                    [],
                    |row| {
                        Ok((
                            row.get::<_, String>("client_id")?,
                            HeldJob {
                                build: row.get("build")?,
                                job: row.get("id")?,
                                percent: row
                                    .get::<_, Option<i64>>("percent")?
                                    .map(|p| p.clamp(0, 100) as u8),
                                major: row.get("major_state")?,
                            },
                        ))
                    },
                )?;
                let mut held: HashMap<String, Vec<HeldJob>> = HashMap::new();
                for (client_id, job) in held_rows {
                    held.entry(client_id).or_default().push(job);
                }
                collect(
                    &tx,
                    "SELECT id, include, slots, version, address, first_seen, last_contact, \
                     n_claimed, n_finished, n_failed, n_lost, image_bytes FROM clients ORDER BY id",
                    [],
                    |row| {
                        let id: String = row.get("id")?;
                        let include: String = row.get("include")?;
                        Ok(ClientInfo {
                            held: held.remove(&id).unwrap_or_default(),
                            include: include
                                .split(',')
                                .filter(|entry| !entry.is_empty())
                                .map(str::to_owned)
                                .collect(),
                            slots: row
                                .get::<_, Option<i64>>("slots")?
                                .map(|slots| slots.clamp(0, i64::from(u32::MAX)) as u32),
                            version: row.get("version")?,
                            address: row.get("address")?,
                            first_seen: row.get("first_seen")?,
                            last_contact: row.get("last_contact")?,
                            session_open: false,
                            n_claimed: unsigned(row, "n_claimed")?,
                            n_finished: unsigned(row, "n_finished")?,
                            n_failed: unsigned(row, "n_failed")?,
                            n_lost: unsigned(row, "n_lost")?,
                            image_bytes: unsigned(row, "image_bytes")?,
                            id,
                        })
                    },
                )
            })
            .await
    }

    async fn client_credential(&self, id: &str) -> StoreResult<Option<ClientCredential>> {
        self.db.read(|conn| {
            first(
                conn,
                "SELECT client_id, secret_hash, origin, created_at, revoked_at \
                 FROM client_credentials WHERE client_id = ?",
                [id],
                credential_of,
            )
        })
    }

    async fn client_credentials(&self) -> StoreResult<Vec<ClientCredential>> {
        self.db.read(|conn| {
            collect(
                conn,
                "SELECT client_id, secret_hash, origin, created_at, revoked_at \
                 FROM client_credentials ORDER BY client_id",
                [],
                credential_of,
            )
        })
    }

    async fn put_client_credential(
        &self,
        id: &str,
        secret_hash: &str,
        how: CredentialWrite,
        now: i64,
    ) -> StoreResult<CredentialPut> {
        let (id, secret_hash) = (id.to_owned(), secret_hash.to_owned());
        self.db
            .write(move |conn| {
                let revoked_at: Option<Option<i64>> = scalar(
                    conn,
                    "SELECT revoked_at FROM client_credentials WHERE client_id = ?",
                    [&id],
                )?;
                let (origin, put) =
                    match rules::credential_write(how, revoked_at.map(|at| at.is_some())) {
                        CredentialDecision::Refuse(put) => return Ok(put),
                        CredentialDecision::Write { origin, put } => (origin, put),
                    };
                run(
                    conn,
                    "INSERT INTO client_credentials (client_id, secret_hash, origin, created_at) \
                     VALUES (?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET \
                     secret_hash = excluded.secret_hash, origin = excluded.origin, \
                     created_at = excluded.created_at, revoked_at = NULL",
                    rusqlite::params![id, secret_hash, origin, now],
                )?;
                Ok(put)
            })
            .await
    }

    async fn revoke_client_credential(&self, id: &str, now: i64) -> StoreResult<bool> {
        let id = id.to_owned();
        let changed = self
            .db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE client_credentials SET revoked_at = ? \
                     WHERE client_id = ? AND revoked_at IS NULL",
                    rusqlite::params![now, id],
                )
            })
            .await?;
        Ok(changed > 0)
    }

    async fn end_web_session(&self, nonce: &str, until: i64, now: i64) -> StoreResult<()> {
        let nonce = nonce.to_owned();
        self.db
            .write(move |conn| {
                run(conn, "DELETE FROM web_logouts WHERE until <= ?", [now])?;
                run(
                    conn,
                    "INSERT INTO web_logouts (nonce, until) VALUES (?, ?) \
                     ON CONFLICT (nonce) DO UPDATE SET until = excluded.until",
                    rusqlite::params![nonce, until],
                )?;
                Ok(())
            })
            .await
    }

    async fn web_session_ended(&self, nonce: &str) -> StoreResult<bool> {
        let ended: Option<bool> = self.db.read(|conn| {
            scalar(
                conn,
                "SELECT EXISTS (SELECT 1 FROM web_logouts WHERE nonce = ?)",
                [nonce],
            )
        })?;
        Ok(ended.unwrap_or(false))
    }
}
