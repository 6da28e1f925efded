//! Who is calling, and what they may do.
//!
//! Three kinds of secret reach the server:
//! - the **admin token** (`DATA/admin.token`): operators; `Authorization: Bearer`.
//! - the **join token** (`DATA/client.token`, rotatable, can be disabled): it only
//!   enrolls a client (`POST /v1/enroll`), which receives a secret of its own.
//! - each **client's own secret**: `Authorization: Basic base64(ID:SECRET)`. The store
//!   keeps an argon2id hash of it, never the secret; a verified secret is remembered in
//!   memory as a keyed BLAKE3 digest so that only a client's first call pays for the
//!   slow hash, and the stored row is read on every call so that a revocation (through
//!   the API or straight in the data directory) takes effect at once.
//!
//! [`authorize`] is the one middleware that decides, from the route's [`Access`] in
//! [`crate::api`]'s table, whether a call goes through; handlers then read the
//! [`Caller`] it left in the request.

use crate::api::Access;
use crate::error::ApiErr;
use crate::AppState;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use kiln_store::StoreError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: operators.
    Admin,
    /// A client, by its own id and secret.
    Client(String),
    /// The join token: may enroll, nothing else.
    Join,
    /// No credential, on a route the server was told to serve publicly.
    Anonymous,
}

impl Caller {
    /// Refuses anyone but the admin.
    pub fn require_admin(&self) -> Result<(), ApiErr> {
        match self {
            Caller::Admin => Ok(()),
            _ => Err(ApiErr::Forbidden(
                "this call needs the admin credential".into(),
            )),
        }
    }

    /// Refuses anyone but an identified client; gives its id.
    pub fn require_client(&self) -> Result<&str, ApiErr> {
        match self {
            Caller::Client(id) => Ok(id),
            Caller::Join => Err(ApiErr::Forbidden(
                "the join token only enrolls a client (POST /v1/enroll): call with the \
                 client's own id and secret"
                    .into(),
            )),
            _ => Err(ApiErr::Forbidden(
                "this call needs a client credential".into(),
            )),
        }
    }

    /// Refuses a client that names an id other than its own.
    pub fn require_client_named(&self, named: &str) -> Result<(), ApiErr> {
        let id = self.require_client()?;
        if id == named {
            Ok(())
        } else {
            Err(ApiErr::Forbidden(format!(
                "this credential is client {id:?}'s: it cannot act as client {named:?}"
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiErr> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiErr::Internal("route served without authorization".into()))
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
    fn bearer(&self, secret: &str) -> Option<Caller> {
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

    /// A new join token, written to the join token file (atomically, mode 0600); the
    /// old one stops working at once. `None` disables enrollment.
    pub fn set_join_token(&self, token: Option<&str>) -> anyhow::Result<()> {
        kiln_common::secret::write_secret_file(&self.join_file, token.unwrap_or(JOIN_DISABLED))?;
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
    pub async fn hashing_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiErr> {
        self.hashing
            .acquire()
            .await
            .map_err(|_| ApiErr::Internal("shutting down".into()))
    }

    /// Forgets what was verified for `id` (its credential changed).
    pub fn forget(&self, id: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// Checks client `id`'s `secret`: `Ok(None)` when the id has no credential.
async fn client_caller(state: &AppState, id: &str, secret: &str) -> Result<Option<Caller>, ApiErr> {
    let credentials = &state.credentials;
    let digest = credentials.digest(secret);
    if credentials.matches(id, None, &digest) {
        return Ok(Some(Caller::Client(id.to_owned())));
    }
    let Some(row) = state.store.client_credential(id).await? else {
        return Ok(None);
    };
    if row.revoked_at.is_some() {
        credentials.forget(id);
        return Err(ApiErr::Unauthorized(format!(
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
        .map_err(|err| ApiErr::Internal(format!("verifying a secret failed: {err}")))?;
    if !matches {
        return Err(ApiErr::Unauthorized("the credential is not valid".into()));
    }
    credentials.remember_digest(id, &row.secret_hash, digest);
    Ok(Some(Caller::Client(id.to_owned())))
}

/// The caller the `Authorization` header makes: `Ok(None)` when there is none.
async fn caller_of(state: &AppState, parts: &Parts) -> Result<Option<Caller>, ApiErr> {
    let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let not_understood = || {
        ApiErr::Unauthorized(
            "the Authorization header is neither 'Bearer TOKEN' nor 'Basic' with a client \
             id and secret"
                .into(),
        )
    };
    let value = header.to_str().map_err(|_| not_understood())?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return state
            .credentials
            .bearer(token.trim())
            .map(Some)
            .ok_or_else(|| ApiErr::Unauthorized("the credential is not valid".into()));
    }
    let encoded = value.strip_prefix("Basic ").ok_or_else(not_understood)?;
    let decoded = base64_decode(encoded.trim()).ok_or_else(not_understood)?;
    let decoded = String::from_utf8(decoded).map_err(|_| not_understood())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(not_understood)?;
    // A client's own identity first; else the password may be a token (the seed's
    // buildclient.xml gives a USERNAME with every PASSWORD).
    if !id.is_empty() {
        match client_caller(state, id, secret).await {
            Ok(Some(caller)) => return Ok(Some(caller)),
            // No such client: the password may be a token.
            Ok(None) => {}
            // Not this client's secret; it may still be a token (a client that lost
            // its secret calls with the join token to be told what to do).
            Err(err) => return state.credentials.bearer(secret).map(Some).ok_or(err),
        }
    }
    state
        .credentials
        .bearer(secret)
        .map(Some)
        .ok_or_else(|| ApiErr::Unauthorized("the credential is not valid".into()))
}

/// Decides whether a request may reach its handler, from its route's [`Access`], and
/// leaves the [`Caller`] in the request for the handler.
pub async fn authorize(
    state: Arc<AppState>,
    access: Access,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    match decide(&state, access, &mut parts).await {
        Ok(caller) => {
            parts.extensions.insert(caller);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(err) => err.into_response(),
    }
}

async fn decide(state: &AppState, access: Access, parts: &mut Parts) -> Result<Caller, ApiErr> {
    if access == Access::Open {
        // Whatever credential comes with it: a liveness probe needs none.
        return Ok(Caller::Anonymous);
    }
    let caller = caller_of(state, parts).await?;
    let Some(caller) = caller else {
        return match access {
            Access::Open => Ok(Caller::Anonymous),
            Access::Read { public: true } if state.config.public_read => Ok(Caller::Anonymous),
            _ => Err(ApiErr::Unauthorized(
                "no credential: send Authorization: Bearer TOKEN (operators) or Basic \
                 with the client's id and secret"
                    .into(),
            )),
        };
    };
    match access {
        Access::Open | Access::AnyCredential => {}
        Access::Admin => caller.require_admin()?,
        Access::Client => {
            caller.require_client()?;
        }
        Access::Enroll => {
            if !matches!(caller, Caller::Join | Caller::Admin) {
                return Err(ApiErr::Forbidden(
                    "enrolling needs the join token (or the admin credential)".into(),
                ));
            }
        }
        Access::Holder => {
            let id = caller.require_client()?;
            let params = path_params(parts).await?;
            let (Some(build), Some(job)) = (params.get("build"), params.get("job")) else {
                return Err(ApiErr::Internal(
                    "holder route without build and job".into(),
                ));
            };
            // A call without a lease, or with one that is not current, is answered by
            // the handler (400 no_lease, 409 stale_lease). A current lease in the hands
            // of another client is refused here.
            let lease = parts
                .headers
                .get(kiln_proto::LEASE_HEADER)
                .and_then(|value| value.to_str().ok());
            if let Some(lease) = lease.filter(|lease| !lease.is_empty()) {
                match state.store.check_lease(build, job, lease).await {
                    Ok(holder) if holder.client_id != id => {
                        return Err(ApiErr::Forbidden(format!(
                            "job {build}/{job} is not held by client {id:?}"
                        )))
                    }
                    Ok(_) | Err(StoreError::StaleLease { .. }) | Err(StoreError::NotFound(_)) => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        Access::Read { .. } => match &caller {
            Caller::Admin => {}
            Caller::Client(id) => {
                let params = path_params(parts).await?;
                let Some(build) = params.get("build") else {
                    return Err(ApiErr::Forbidden(
                        "a client reads only the builds it runs a job of".into(),
                    ));
                };
                if !holds_job_of(state, id, build).await? {
                    return Err(ApiErr::Forbidden(format!(
                        "client {id:?} runs no job of build {build:?}: it cannot read it"
                    )));
                }
            }
            _ => caller.require_admin()?,
        },
    }
    Ok(caller)
}

/// Whether client `id` runs a job of `build` now.
async fn holds_job_of(state: &AppState, id: &str, build: &str) -> Result<bool, ApiErr> {
    match state.store.list_jobs(build).await {
        Ok(jobs) => Ok(jobs.iter().any(|job| {
            job.state == kiln_proto::state::JobState::Running
                && job.client_id.as_deref() == Some(id)
        })),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

async fn path_params(parts: &mut Parts) -> Result<HashMap<String, String>, ApiErr> {
    let params = RawPathParams::from_request_parts(parts, &())
        .await
        .map_err(|err| ApiErr::bad_request("bad_request", err.to_string()))?;
    Ok(params
        .iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect())
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

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
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
