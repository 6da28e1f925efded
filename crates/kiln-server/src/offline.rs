//! Credential changes on a data directory, with or without a server running on it:
//! what `kiln server client add|revoke|list --data DIR` and `kiln server join-token
//! rotate|disable --data DIR` do. [`OfflineCredentials`] opens the directory's store
//! (it must exist: a typo must not make a new one) and issues, revokes and lists
//! client credentials with the farm's own rules, through the store's [`Clients`]
//! trait.
//!
//! A client credential written here takes effect at once, even on a running server
//! (it reads the stored row again within a second); a join token written here is read
//! by the server at its next start.

use crate::domain::clients::{issue, list_credentials, revoke, JoinTokenAction};
use crate::domain::credentials::{hash_secret, write_join_token};
use kiln_proto::api::{ClientSecret, CredentialInfo};
use kiln_store::{Clients, CredentialPut, SqliteStore, StoreError};
use std::path::{Path, PathBuf};

/// Why a credential change on a data directory did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The directory holds no server data.
    #[error("{} holds no kiln server data (no kiln.db)", .0.display())]
    NoData(PathBuf),
    /// The store could not be opened.
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The client has no live credential to revoke.
    #[error("client {id:?} has no live credential in {}", dir.display())]
    NotLive { id: String, dir: PathBuf },
    /// A new secret could not be hashed.
    #[error("{0}")]
    Hash(String),
    /// The join token file could not be written.
    #[error(transparent)]
    SecretFile(#[from] kiln_common::secret::SecretFileError),
}

impl OfflineError {
    /// Whether the directory named is not a server's data directory (a usage error).
    pub fn is_usage(&self) -> bool {
        matches!(self, OfflineError::NoData(_))
    }
}

/// A client secret issued on a data directory.
#[derive(Debug)]
pub struct Issued {
    /// The client and its new secret, shown once.
    pub secret: ClientSecret,
    /// The client had a secret before, which no longer works.
    pub replaced: bool,
}

/// The credentials of a server's data directory.
pub struct OfflineCredentials {
    data_dir: PathBuf,
    store: SqliteStore,
}

impl OfflineCredentials {
    /// Opens the store of `data_dir`, which must hold one.
    pub async fn open(data_dir: &Path) -> Result<Self, OfflineError> {
        let db = database(data_dir)?;
        let store = SqliteStore::open(&db)
            .await
            .map_err(|source| OfflineError::Open { path: db, source })?;
        Ok(OfflineCredentials {
            data_dir: data_dir.to_owned(),
            store,
        })
    }

    fn clients(&self) -> &dyn Clients {
        &self.store
    }

    /// A new secret for client `id`; its old one, revoked or not, stops working.
    pub async fn issue(&self, id: &str) -> Result<Issued, OfflineError> {
        let secret = kiln_common::secret::new_secret();
        let hash = hash_secret(&secret).map_err(|err| OfflineError::Hash(err.to_string()))?;
        let put = issue(self.clients(), id, &hash).await?;
        Ok(Issued {
            secret: ClientSecret {
                client_id: id.to_owned(),
                secret,
            },
            replaced: put == CredentialPut::Replaced,
        })
    }

    /// Client `id`'s secret stops working; the id cannot enroll again until a new one
    /// is issued.
    pub async fn revoke(&self, id: &str) -> Result<(), OfflineError> {
        if !revoke(self.clients(), id).await? {
            return Err(OfflineError::NotLive {
                id: id.to_owned(),
                dir: self.data_dir.clone(),
            });
        }
        Ok(())
    }

    /// Every client credential (never a secret or its hash).
    pub async fn list(&self) -> Result<Vec<CredentialInfo>, OfflineError> {
        Ok(list_credentials(self.clients()).await?)
    }
}

/// Rotates (`rotate`) or disables the join token of the data directory `data_dir`,
/// writing it to `token_file` (default `DATA/client.token`); returns the file and the
/// new token, if any. A running server takes it at its next start.
pub fn set_join_token(
    data_dir: &Path,
    token_file: Option<&Path>,
    rotate: bool,
) -> Result<(PathBuf, Option<String>), OfflineError> {
    database(data_dir)?;
    let file = token_file
        .map(ToOwned::to_owned)
        .unwrap_or_else(|| data_dir.join("client.token"));
    let action = if rotate {
        JoinTokenAction::Rotate
    } else {
        JoinTokenAction::Disable
    };
    let token = action.new_token();
    write_join_token(&file, token.as_deref())?;
    Ok((file, token))
}

/// The database of `data_dir`, which must exist.
fn database(data_dir: &Path) -> Result<PathBuf, OfflineError> {
    let db = data_dir.join("kiln.db");
    if !db.exists() {
        return Err(OfflineError::NoData(data_dir.to_owned()));
    }
    Ok(db)
}
