//! The client's credential for one server: what it was given (the join token, or its
//! own id and secret), and the identity it calls with.
//!
//! A client given the join token enrolls (`POST /v1/enroll`) with its id at its first
//! claim and receives a secret of its own, which it keeps in
//! `WORK/credentials/s-HASH.json` (mode 0600) and calls with from then on as
//! `Authorization: Basic ID:SECRET`. A client given its own secret (a REDIRECT's
//! USERNAME and PASSWORD, issued by `kiln server client add`) calls with it directly.
//! Which of the two a credential is, the server says (`GET /v1/whoami`).

use crate::endpoint::{Endpoint, SendThrough};
use crate::error::{check, CallError};
use crate::secret::Secret;
use base64::Engine;
use kiln_proto::api::ClientSecret;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the client was given for a server.
#[derive(Clone, Debug)]
pub enum Given {
    /// A bearer token: the join token (an older server takes it as the client
    /// credential itself).
    Token(Secret),
    /// A user name and password (buildclient.xml's USERNAME and PASSWORD): the client's
    /// own id and secret, or any name with the join token.
    Basic { user: String, password: Secret },
}

impl Given {
    /// The header presenting this credential; a token goes with the client's id when
    /// there is one, so that it can be the client's own secret as well as the join
    /// token.
    fn header(&self, client_id: Option<&str>) -> HeaderValue {
        match (self, client_id) {
            (Given::Token(token), Some(id)) => basic(id, token.expose()),
            (Given::Token(token), None) => bearer(token.expose()),
            (Given::Basic { user, password }, _) => basic(user, password.expose()),
        }
    }
}

fn bearer(token: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer -"));
    value.set_sensitive(true);
    value
}

fn basic(user: &str, password: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic -"));
    value.set_sensitive(true);
    value
}

/// The identity calls are made with, once known.
#[derive(Clone)]
pub(crate) struct Identity {
    pub client_id: String,
    pub header: HeaderValue,
    /// Whether it came from enrolling (and may be enrolled again if the server forgot it).
    pub enrolled: bool,
}

/// The kept form of an enrolled secret.
#[derive(Serialize, Deserialize)]
struct Kept {
    server: String,
    client_id: String,
    secret: String,
}

/// A client's credential state for one server.
pub(crate) struct Credential {
    pub given: Given,
    /// The client's id, when the connection belongs to a client.
    pub client_id: Option<String>,
    /// Where an enrolled secret is kept.
    pub keep_in: Option<PathBuf>,
    pub identity: tokio::sync::Mutex<Option<Identity>>,
}

#[derive(Deserialize)]
struct WhoAmI {
    role: String,
    client_id: Option<String>,
}

impl Credential {
    pub fn new(given: Given) -> Self {
        Credential {
            given,
            client_id: None,
            keep_in: None,
            identity: tokio::sync::Mutex::new(None),
        }
    }

    /// The header to call with: the identity of `client_id` (or of the connection's
    /// client), found or enrolled first; the given credential when no client is named.
    pub async fn header(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        client_id: Option<&str>,
    ) -> Result<HeaderValue, CallError> {
        let mut identity = self.identity.lock().await;
        let wanted = client_id.or(self.client_id.as_deref());
        if let Some(known) = identity.as_ref() {
            if wanted.is_none_or(|id| id == known.client_id) {
                return Ok(known.header.clone());
            }
        }
        let Some(id) = wanted else {
            return Ok(self.given.header(None));
        };
        let found = self.identify(http, endpoint, id).await?;
        let header = found.header.clone();
        *identity = Some(found);
        Ok(header)
    }

    /// Forgets an identity the server no longer takes (its secret was revoked, or the
    /// server's data was reset), so that the next call finds or enrolls one again.
    /// Only an enrolled identity is forgotten: a given one stays what it is.
    pub async fn forget(&self) -> bool {
        let mut identity = self.identity.lock().await;
        match identity.as_ref() {
            Some(known) if known.enrolled => {
                if let Some(path) = &self.keep_in {
                    let _ = std::fs::remove_file(path);
                }
                *identity = None;
                true
            }
            _ => false,
        }
    }

    async fn identify(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        id: &str,
    ) -> Result<Identity, CallError> {
        let farm = endpoint.url();
        if let Some(kept) = self
            .keep_in
            .as_deref()
            .and_then(|path| read_kept(path, farm))
        {
            if kept.client_id == id {
                return Ok(Identity {
                    client_id: kept.client_id.clone(),
                    header: basic(&kept.client_id, &kept.secret),
                    enrolled: true,
                });
            }
        }
        let given = self.given.header(Some(id));
        let response = http
            .get(endpoint.at("/v1/whoami"))
            .header(reqwest::header::AUTHORIZATION, given.clone())
            .timeout(Duration::from_secs(30))
            .send_through(endpoint)
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            // A server from before client identities: the given credential is the
            // client credential.
            return Ok(Identity {
                client_id: id.to_owned(),
                header: self.given.header(None),
                enrolled: false,
            });
        }
        let who: WhoAmI = check(response)
            .await?
            .json()
            .await
            .map_err(endpoint.unreachable())?;
        match who.role.as_str() {
            "client" => {
                let known = who.client_id.unwrap_or_default();
                if known != id {
                    return Err(refused(
                        StatusCode::FORBIDDEN,
                        format!(
                            "the credential given for {farm} is client {known:?}'s, but this \
                             client is {id:?}: give it the id {known:?} or its own credential"
                        ),
                    ));
                }
                Ok(Identity {
                    client_id: known,
                    header: given,
                    enrolled: false,
                })
            }
            "join" => self.enroll(http, endpoint, id, given).await,
            other => Err(refused(
                StatusCode::FORBIDDEN,
                format!(
                    "the credential given for {farm} is the {other} credential: a client \
                     needs the join token (client.token) or its own id and secret"
                ),
            )),
        }
    }

    async fn enroll(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        id: &str,
        join: HeaderValue,
    ) -> Result<Identity, CallError> {
        let response = http
            .post(endpoint.at("/v1/enroll"))
            .header(reqwest::header::AUTHORIZATION, join)
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({ "client_id": id }))
            .send_through(endpoint)
            .await?;
        let secret: ClientSecret = check(response)
            .await?
            .json()
            .await
            .map_err(endpoint.unreachable())?;
        if let Some(path) = &self.keep_in {
            let kept = Kept {
                server: endpoint.url().to_owned(),
                client_id: secret.client_id.clone(),
                secret: secret.secret.clone(),
            };
            write_kept(path, &kept).map_err(|source| CallError::Local {
                what: format!("keeping the enrolled secret in {}", path.display()),
                source,
            })?;
        }
        tracing::info!(server = %endpoint.url(), client = %id, "enrolled with the join token; calling with our own secret from now on");
        Ok(Identity {
            client_id: secret.client_id.clone(),
            header: basic(&secret.client_id, &secret.secret),
            enrolled: true,
        })
    }
}

fn refused(status: StatusCode, message: String) -> CallError {
    CallError::Refused { status, message }
}

fn read_kept(path: &Path, base: &str) -> Option<Kept> {
    let text = std::fs::read_to_string(path).ok()?;
    let kept: Kept = serde_json::from_str(&text).ok()?;
    (kept.server == base).then_some(kept)
}

fn write_kept(path: &Path, kept: &Kept) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec(kept).map_err(std::io::Error::other)?;
    kiln_common::fs::write_atomic_with_mode(path, &bytes, 0o600)
}

/// The file a client keeps its enrolled secret for the server at `url` in, under
/// `dir` (`WORK/credentials`).
pub fn kept_secret_path(dir: &Path, url: &str) -> PathBuf {
    let hash =
        kiln_proto::transfer::ChunkHash::of(url.trim_end_matches('/').as_bytes()).to_string();
    dir.join(format!("s-{}.json", &hash[..16]))
}

/// The client id a work directory enrolled as at the server at `url`, if it did: how
/// `kiln client reset` acts as the client whose jobs it gives back.
pub fn kept_client_id(dir: &Path, url: &str) -> Option<String> {
    let base = url.trim_end_matches('/');
    read_kept(&kept_secret_path(dir, base), base).map(|kept| kept.client_id)
}
