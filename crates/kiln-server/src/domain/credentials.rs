//! The server's secrets, and who a caller is.
//!
//! Three kinds of secret reach the server:
//! - the **admin token** (`DATA/admin.token`): operators.
//! - the **join token** (`DATA/client.token`, rotatable, can be disabled): it only
//!   enrolls a client, which receives a secret of its own.
//! - each **client's own secret**. The store keeps an argon2id hash of it, never the
//!   secret; a verified secret is remembered in memory as a keyed BLAKE3 digest so
//!   that only a client's first call pays for the slow hash, and the stored row is read
//!   again after at most [`FRESH`] so that a revocation (through the API or straight
//!   in the data directory) takes effect.
//!
//! [`Farm::identify`] turns what a caller presented into a [`Caller`].

use super::{Caller, Farm, FarmError, FarmResult};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// A credential as a caller presented it.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented {
    /// A token: the admin's or the join token.
    Bearer(String),
    /// A client id with a secret (the client's own, or a token given as a password).
    Basic { id: String, secret: String },
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are never printed.
        match self {
            Presented::Bearer(_) => f.write_str("Bearer(..)"),
            Presented::Basic { id, .. } => write!(f, "Basic({id:?}, ..)"),
        }
    }
}

/// The server's secrets: the admin token, the join token, and what it remembers of
/// verified client secrets.
pub struct Credentials {
    admin: String,
    join: RwLock<Option<String>>,
    join_file: PathBuf,
    /// A key for the digests of verified secrets, new each start.
    key: [u8; 32],
    /// Client id → what was verified for it.
    verified: Mutex<HashMap<String, Verified>>,
    /// Argon2 runs at most this many at once: wrong secrets cannot take every core.
    hashing: tokio::sync::Semaphore,
}

/// A client secret verified against its stored hash.
struct Verified {
    /// The stored hash it was verified against.
    hash: String,
    /// The keyed digest of the secret.
    digest: [u8; 32],
    /// When the stored row was last read and found live.
    checked: Instant,
}

/// How long a verified secret is taken without reading its row again: a revocation
/// through the API is seen at once, one written straight into the data directory
/// within this.
const FRESH: Duration = Duration::from_secs(1);

/// What the join token file holds when enrollment is disabled.
const JOIN_DISABLED: &str = "disabled";

impl Credentials {
    /// Reads the secrets from their files, or creates them (random, mode 0600) in
    /// `data_dir` on first start. A join token file holding `disabled` disables
    /// enrollment.
    pub fn load_or_create(
        data_dir: &Path,
        admin_file: Option<&Path>,
        client_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let admin =
            kiln_common::secret::read_or_create_secret(&data_dir.join("admin.token"), admin_file)?;
        let join_file = client_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data_dir.join("client.token"));
        let join = kiln_common::secret::read_or_create_secret(
            &data_dir.join("client.token"),
            client_file,
        )?;
        let join = (join != JOIN_DISABLED).then_some(join);
        if join.is_none() {
            tracing::info!(file = %join_file.display(), "enrollment with the join token is disabled");
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
        Ok(Credentials {
            admin,
            join: RwLock::new(join),
            join_file,
            key,
            verified: Mutex::new(HashMap::new()),
            hashing: tokio::sync::Semaphore::new(2),
        })
    }

    /// The caller a bearer token makes, if any. Both tokens are compared, so timing
    /// says nothing about which one was close.
    pub fn bearer(&self, secret: &str) -> Option<Caller> {
        let secret = secret.as_bytes();
        let is_admin: bool = secret.ct_eq(self.admin.as_bytes()).into();
        let join = self.join.read().unwrap_or_else(|e| e.into_inner());
        let is_join: bool = match join.as_deref() {
            Some(join) => secret.ct_eq(join.as_bytes()).into(),
            None => false,
        };
        if is_admin {
            Some(Caller::Admin)
        } else if is_join {
            Some(Caller::Join)
        } else {
            None
        }
    }

    /// The key that signs dashboard sessions: derived from the admin token, so that
    /// sessions outlive a restart and end when the admin token changes.
    pub fn session_key(&self) -> [u8; 32] {
        blake3::derive_key("kiln dashboard session v1", self.admin.as_bytes())
    }

    /// A new join token, written to the join token file (atomically, mode 0600); the
    /// old one stops working at once. `None` disables enrollment.
    pub fn set_join_token(
        &self,
        token: Option<&str>,
    ) -> Result<(), kiln_common::secret::SecretFileError> {
        write_join_token(&self.join_file, token)?;
        *self.join.write().unwrap_or_else(|e| e.into_inner()) = token.map(str::to_owned);
        Ok(())
    }

    fn digest(&self, secret: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.key, secret.as_bytes()).as_bytes()
    }

    /// Remembers `secret` as verified against `hash` for client `id` (it was just made).
    pub fn remember(&self, id: &str, hash: &str, secret: &str) {
        let digest = self.digest(secret);
        self.remember_digest(id, hash, digest);
    }

    fn remember_digest(&self, id: &str, hash: &str, digest: [u8; 32]) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.to_owned(),
                Verified {
                    hash: hash.to_owned(),
                    digest,
                    checked: Instant::now(),
                },
            );
    }

    /// Whether `digest` is client `id`'s secret as verified against `hash` (or, with no
    /// `hash`, as verified within [`FRESH`]); a match against `hash` counts as checked now.
    fn matches(&self, id: &str, hash: Option<&str>, digest: &[u8; 32]) -> bool {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let Some(known) = verified.get_mut(id) else {
            return false;
        };
        let same_secret: bool = known.digest.ct_eq(digest).into();
        match hash {
            Some(hash) if same_secret && known.hash == hash => {
                known.checked = Instant::now();
                true
            }
            Some(_) => false,
            None => same_secret && known.checked.elapsed() < FRESH,
        }
    }

    /// Whether client `id`'s credential was found live within [`FRESH`].
    pub fn recently_live(&self, id: &str) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|known| known.checked.elapsed() < FRESH)
    }

    /// A turn to run argon2 (hash or verify): at most two run at once.
    pub async fn hashing_permit(&self) -> FarmResult<tokio::sync::SemaphorePermit<'_>> {
        self.hashing
            .acquire()
            .await
            .map_err(|_| FarmError::Internal("shutting down".into()))
    }

    /// Forgets what was verified for `id` (its credential changed).
    pub fn forget(&self, id: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

impl Farm {
    /// The caller a presented credential makes; `Ok(None)` without one.
    pub async fn identify(&self, presented: Option<Presented>) -> FarmResult<Option<Caller>> {
        let not_valid = || FarmError::NotAuthenticated("the credential is not valid".into());
        let (id, secret) = match presented {
            None => return Ok(None),
            Some(Presented::Bearer(token)) => {
                return self
                    .credentials
                    .bearer(&token)
                    .map(Some)
                    .ok_or_else(not_valid)
            }
            Some(Presented::Basic { id, secret }) => (id, secret),
        };
        // A client's own identity first; else the password may be a token (the seed's
        // buildclient.xml gives a USERNAME with every PASSWORD).
        if !id.is_empty() {
            match self.client_caller(&id, &secret).await {
                Ok(Some(caller)) => return Ok(Some(caller)),
                // No such client: the password may be a token.
                Ok(None) => {}
                // Not this client's secret; it may still be a token (a client that lost
                // its secret calls with the join token to be told what to do).
                Err(err) => return self.credentials.bearer(&secret).map(Some).ok_or(err),
            }
        }
        self.credentials
            .bearer(&secret)
            .map(Some)
            .ok_or_else(not_valid)
    }

    /// Checks client `id`'s `secret`: `Ok(None)` when the id has no credential.
    async fn client_caller(&self, id: &str, secret: &str) -> FarmResult<Option<Caller>> {
        let credentials = &self.credentials;
        let digest = credentials.digest(secret);
        if credentials.matches(id, None, &digest) {
            return Ok(Some(Caller::Client(id.to_owned())));
        }
        let Some(row) = self.store.client_credential(id).await? else {
            return Ok(None);
        };
        if row.revoked_at.is_some() {
            credentials.forget(id);
            return Err(FarmError::NotAuthenticated(format!(
                "client {id:?}'s credential was revoked"
            )));
        }
        if credentials.matches(id, Some(&row.secret_hash), &digest) {
            return Ok(Some(Caller::Client(id.to_owned())));
        }
        let _permit = credentials.hashing_permit().await?;
        let hash = row.secret_hash.clone();
        let secret = secret.to_owned();
        let matches = tokio::task::spawn_blocking(move || verify_secret(&secret, &hash))
            .await
            .map_err(|err| FarmError::task("verifying a secret", err))?;
        if !matches {
            return Err(FarmError::NotAuthenticated(
                "the credential is not valid".into(),
            ));
        }
        credentials.remember_digest(id, &row.secret_hash, digest);
        Ok(Some(Caller::Client(id.to_owned())))
    }

    /// Hashes a new secret on a blocking thread, as one of the few argon2 runs allowed
    /// at once (each takes 19 MiB: a crowd of enrolling clients must not take them all).
    pub(super) async fn hash_off_thread(&self, secret: &str) -> FarmResult<String> {
        let _permit = self.credentials.hashing_permit().await?;
        let secret = secret.to_owned();
        tokio::task::spawn_blocking(move || hash_secret(&secret))
            .await
            .map_err(|err| FarmError::task("hashing a secret", err))?
            .map_err(|err| FarmError::Internal(err.to_string()))
    }
}

/// Writes the join token file (atomically, mode 0600): the token, or what disables
/// enrollment.
pub(crate) fn write_join_token(
    file: &Path,
    token: Option<&str>,
) -> Result<(), kiln_common::secret::SecretFileError> {
    kiln_common::secret::write_secret_file(file, token.unwrap_or(JOIN_DISABLED))
}

/// An argon2id hash (PHC string) of `secret`, with a random salt.
pub fn hash_secret(secret: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| anyhow::anyhow!("hashing a secret failed: {err}"))
}

/// Whether `secret` matches the argon2id PHC string `hash` (compared in constant time
/// by the argon2 crate).
pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_secret_only() {
        let hash = hash_secret("right").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("right"));
        assert!(verify_secret("right", &hash));
        assert!(!verify_secret("wrong", &hash));
        assert!(!verify_secret("right", "not a PHC string"));
        // Salted: the same secret hashes differently each time.
        assert_ne!(hash, hash_secret("right").unwrap());
    }

    #[test]
    fn bearer_tokens_make_admin_or_join_and_rotation_ends_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials::load_or_create(dir.path(), None, None).unwrap();
        let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let join = std::fs::read_to_string(dir.path().join("client.token")).unwrap();
        assert_eq!(credentials.bearer(admin.trim()), Some(Caller::Admin));
        assert_eq!(credentials.bearer(join.trim()), Some(Caller::Join));
        assert_eq!(credentials.bearer("nonsense"), None);
        credentials.set_join_token(Some("fresh")).unwrap();
        assert_eq!(credentials.bearer(join.trim()), None);
        assert_eq!(credentials.bearer("fresh"), Some(Caller::Join));
        credentials.set_join_token(None).unwrap();
        assert_eq!(credentials.bearer("fresh"), None);
        assert_eq!(credentials.bearer(JOIN_DISABLED), None);
        // Disabled survives a restart.
        let again = Credentials::load_or_create(dir.path(), None, None).unwrap();
        assert_eq!(again.bearer(JOIN_DISABLED), None);
        assert_eq!(again.bearer(admin.trim()), Some(Caller::Admin));
    }
}
