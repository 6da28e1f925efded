//! Clients: their contacts, the inventory operators read (`kiln clients`), and their
//! credentials (enrollment with the join token, secrets issued and revoked by
//! operators, the join token rotated or disabled).

use super::{Farm, FarmError, FarmResult};
use kiln_proto::api::{ClientInfo, ClientSecret, CredentialInfo};
use kiln_proto::names::check_name;
use kiln_store::{ClientCredential, Clients, CredentialPut, CredentialWrite, StoreError};
use std::sync::Arc;

/// What an operator does to the join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTokenAction {
    /// A new token, returned once; the old one stops working.
    Rotate,
    /// No token: enrollment is off.
    Disable,
}

impl Farm {
    /// Notes a contact from a client (see [`crate::contacts`]). When the store is due
    /// to get it, it is written in a task of its own: the caller does not wait for it,
    /// and a caller that is cancelled (a long poll whose client hung up) cannot cancel
    /// it half-way.
    pub(super) fn note_contact(self: &Arc<Self>, client_id: &str, address: Option<&str>) {
        let now = kiln_common::now_micros();
        if !self.contacts.note(client_id, address, now) {
            return;
        }
        let farm = self.clone();
        let client_id = client_id.to_owned();
        let address = address.map(str::to_owned);
        tokio::spawn(async move {
            match farm
                .store
                .touch_client(&client_id, address.as_deref(), now)
                .await
            {
                Ok(true) => {}
                Ok(false) => farm.contacts.unknown_to_store(&client_id, now),
                Err(err) => {
                    tracing::warn!(cause = %kiln_proto::error_chain(&err), client = %client_id, "cannot record a client's contact")
                }
            }
        });
    }

    /// Every client the store has (those that claimed a job here) and every client
    /// heard from since the server started, by id, with the latest contact from memory
    /// and whether a session is open.
    pub async fn clients(&self) -> FarmResult<Vec<ClientInfo>> {
        let mut clients = self.store.clients().await?;
        let mut contacts = self.contacts.snapshot();
        for client in clients.iter_mut() {
            let Some(contact) = contacts.remove(&client.id) else {
                continue;
            };
            if contact.at > client.last_contact {
                client.last_contact = contact.at;
                if contact.address.is_some() {
                    client.address = contact.address;
                }
            }
            // A claim request that got no job yet may say more than the last claim did.
            if let Some(announced) = contact.announced {
                client.include = announced.include;
                client.slots = announced.slots;
                client.version = announced.version;
            }
        }
        clients.extend(contacts.into_iter().map(|(id, contact)| {
            let announced = contact.announced;
            ClientInfo {
                include: announced
                    .as_ref()
                    .map(|announced| announced.include.clone())
                    .unwrap_or_default(),
                slots: announced.as_ref().and_then(|announced| announced.slots),
                version: announced.and_then(|announced| announced.version),
                address: contact.address,
                first_seen: contact.first_at,
                last_contact: contact.at,
                session_open: false,
                held: Vec::new(),
                n_claimed: 0,
                n_finished: 0,
                n_failed: 0,
                n_lost: 0,
                image_bytes: 0,
                id,
            }
        }));
        for client in clients.iter_mut() {
            client.session_open = self.sessions.is_open(&client.id);
        }
        clients.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(clients)
    }

    /// With the join token, a client id that has no credential yet gets one; the
    /// secret is in this answer and nowhere else.
    pub async fn enroll(&self, id: &str) -> FarmResult<ClientSecret> {
        check_name("client id", id).map_err(|msg| FarmError::invalid("bad_name", msg))?;
        let secret = kiln_common::secret::new_secret();
        let hash = self.hash_off_thread(&secret).await?;
        let put = self
            .store
            .put_client_credential(
                id,
                &hash,
                CredentialWrite::Enroll,
                kiln_common::now_micros(),
            )
            .await?;
        match put {
            CredentialPut::Exists => Err(FarmError::Exists {
                code: "client_exists",
                message: format!(
                    "client {id:?} is enrolled already: it calls with the secret it was given \
                     (an operator can issue a new one: kiln server client add {id})"
                ),
            }),
            CredentialPut::Revoked => Err(FarmError::NotAllowed(format!(
                "client {id:?}'s credential was revoked: only an operator can give it a new \
                 one (kiln server client add {id})"
            ))),
            CredentialPut::Created | CredentialPut::Replaced => {
                self.credentials.remember(id, &hash, &secret);
                tracing::info!(client = %id, "client enrolled");
                Ok(ClientSecret {
                    client_id: id.to_owned(),
                    secret,
                })
            }
        }
    }

    /// Every client credential (never a secret or its hash).
    pub async fn credentials(&self) -> FarmResult<Vec<CredentialInfo>> {
        Ok(list_credentials(self.store.as_ref()).await?)
    }

    /// A new secret for client `id`; its old one, revoked or not, stops working.
    pub async fn issue_credential(&self, id: &str) -> FarmResult<ClientSecret> {
        let secret = kiln_common::secret::new_secret();
        let hash = self.hash_off_thread(&secret).await?;
        issue(self.store.as_ref(), id, &hash).await?;
        self.credentials.remember(id, &hash, &secret);
        tracing::info!(client = %id, "client credential issued");
        Ok(ClientSecret {
            client_id: id.to_owned(),
            secret,
        })
    }

    /// Client `id`'s secret stops working; the id cannot enroll again until an
    /// operator issues it a new one.
    pub async fn revoke_credential(&self, id: &str) -> FarmResult<()> {
        let revoked = revoke(self.store.as_ref(), id).await?;
        self.credentials.forget(id);
        if !revoked {
            return Err(StoreError::NotFound(format!("a live credential of client {id:?}")).into());
        }
        tracing::info!(client = %id, "client credential revoked");
        Ok(())
    }

    /// Rotates or disables the join token; a rotated one is returned, once.
    pub fn change_join_token(&self, action: JoinTokenAction) -> FarmResult<Option<String>> {
        let token = action.new_token();
        self.credentials
            .set_join_token(token.as_deref())
            .map_err(|err| FarmError::Internal(kiln_proto::error_chain(&err)))?;
        tracing::info!(?action, "join token changed");
        Ok(token)
    }
}

impl JoinTokenAction {
    /// The token the action leaves: a new random one, or none.
    pub(crate) fn new_token(self) -> Option<String> {
        match self {
            JoinTokenAction::Rotate => Some(kiln_common::secret::new_secret()),
            JoinTokenAction::Disable => None,
        }
    }
}

/// Every client credential in `store`, as operators see them (never a secret or its
/// hash). The farm and [`crate::offline`] list them alike.
pub(crate) async fn list_credentials(
    store: &dyn Clients,
) -> Result<Vec<CredentialInfo>, StoreError> {
    let rows = store.client_credentials().await?;
    Ok(rows.into_iter().map(credential_info).collect())
}

fn credential_info(row: ClientCredential) -> CredentialInfo {
    CredentialInfo {
        client_id: row.client_id,
        origin: row.origin,
        created_at: row.created_at,
        revoked_at: row.revoked_at,
    }
}

/// Stores `hash` as client `id`'s issued secret, replacing any other (revoked or not).
/// The farm and [`crate::offline`] issue alike.
pub(crate) async fn issue(
    store: &dyn Clients,
    id: &str,
    hash: &str,
) -> Result<CredentialPut, StoreError> {
    store
        .put_client_credential(id, hash, CredentialWrite::Issue, kiln_common::now_micros())
        .await
}

/// Ends client `id`'s live secret; `false` when it had none.
pub(crate) async fn revoke(store: &dyn Clients, id: &str) -> Result<bool, StoreError> {
    store
        .revoke_client_credential(id, kiln_common::now_micros())
        .await
}
