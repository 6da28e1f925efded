//! Credentials: the admin and client secrets, and the [`Caller`] extractor that checks
//! `Authorization: Bearer SECRET` in constant time.

use crate::error::ApiErr;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submit, cancel, restart, release; read everything.
    Admin,
    /// Claim, heartbeat, log, upload, finish: only for jobs it holds.
    Client,
}

/// The server's secrets.
pub struct Credentials {
    admin: String,
    client: String,
}

impl Credentials {
    /// Reads the secrets from their files, or creates them (random, mode 0600) in
    /// `data_dir` on first start.
    pub fn load_or_create(
        data_dir: &Path,
        admin_file: Option<&Path>,
        client_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let admin = read_or_create_secret(&data_dir.join("admin.token"), admin_file)?;
        let client = read_or_create_secret(&data_dir.join("client.token"), client_file)?;
        Ok(Credentials { admin, client })
    }

    /// The role a presented secret grants, if any.
    pub fn role_of(&self, secret: &str) -> Option<Role> {
        let secret = secret.as_bytes();
        // Compare with both so that timing says nothing about which one matched.
        let is_admin: bool = secret.ct_eq(self.admin.as_bytes()).into();
        let is_client: bool = secret.ct_eq(self.client.as_bytes()).into();
        if is_admin {
            Some(Role::Admin)
        } else if is_client {
            Some(Role::Client)
        } else {
            None
        }
    }
}

/// Reads a secret from `given`, else from `default_path`, else makes a new one there
/// (random, mode 0600): how the server's and the master's token files come to be.
pub fn read_or_create_secret(default_path: &Path, given: Option<&Path>) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(path) = given {
        let secret = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let secret = secret.trim().to_owned();
        anyhow::ensure!(!secret.is_empty(), "token file {} is empty", path.display());
        return Ok(secret);
    }
    if default_path.exists() {
        let secret = std::fs::read_to_string(default_path)
            .with_context(|| format!("reading token file {}", default_path.display()))?;
        let secret = secret.trim().to_owned();
        anyhow::ensure!(
            !secret.is_empty(),
            "token file {} is empty (delete it to have a new secret made)",
            default_path.display()
        );
        return Ok(secret);
    }
    let secret = new_secret();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(default_path)
        .with_context(|| format!("creating token file {}", default_path.display()))?;
    writeln!(file, "{secret}")?;
    file.sync_all()?;
    Ok(secret)
}

/// A fresh random secret: 32 bytes, hex.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Role);

impl Caller {
    /// Refuses anyone but the admin.
    pub fn require_admin(self) -> Result<(), ApiErr> {
        match self.0 {
            Role::Admin => Ok(()),
            Role::Client => Err(ApiErr::Forbidden(
                "this call needs the admin credential".into(),
            )),
        }
    }

    /// Refuses anyone but a client.
    pub fn require_client(self) -> Result<(), ApiErr> {
        match self.0 {
            Role::Client => Ok(()),
            Role::Admin => Err(ApiErr::Forbidden(
                "this call needs a client credential".into(),
            )),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiErr> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiErr::Unauthorized("no credential: send Authorization: Bearer SECRET".into())
            })?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiErr::Unauthorized("the Authorization header is not 'Bearer SECRET'".into())
            })?;
        state
            .credentials
            .role_of(secret.trim())
            .map(Caller)
            .ok_or_else(|| ApiErr::Unauthorized("the credential is not valid".into()))
    }
}
