//! The kiln master: keeps the list of live build servers. Servers register and
//! heartbeat with `POST /v1/servers`; anyone with the client or admin credential reads
//! the list with `GET /v1/servers`. It holds no jobs.
//!
//! Each answer carries the list's membership version ([`VERSION_HEADER`]); a reader
//! that sends it back with `?version=V&wait_secs=N` is answered as soon as a server
//! joins, returns or drops off (or after N seconds), so clients learn of a new server
//! at once without polling often.
//!
//! Start it with [`Master::open`] then [`Master::run`] on a bound listener.

mod list;

pub use list::{Registration, ServerEntry};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kiln_common::now_micros;
use kiln_proto::api::ApiError;
use list::{Change, ServerList};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

/// The longest server URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// The longest server name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// Heartbeats that change nothing but counts are saved at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// The response header with the list's membership version.
pub const VERSION_HEADER: &str = "x-kiln-list-version";
/// The longest a list request waits for a change.
pub const MAX_LIST_WAIT_SECS: u64 = 60;

/// How the master runs.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Where `servers.json` and the token files live.
    pub data_dir: PathBuf,
    /// A server that has not heartbeat for this long drops off the list.
    pub heartbeat_timeout_secs: u64,
    /// An existing admin token file instead of `DATA/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// An existing server token file instead of `DATA/server.token` (so that several
    /// masters accept the same servers).
    pub server_token_file: Option<PathBuf>,
    /// An existing client token file instead of `DATA/client.token`.
    pub client_token_file: Option<PathBuf>,
    /// The certificate and key to serve HTTPS with; plain HTTP without.
    pub tls: Option<kiln_tls::ServerTls>,
}

impl MasterConfig {
    /// The defaults, with data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        MasterConfig {
            data_dir,
            heartbeat_timeout_secs: 15,
            admin_token_file: None,
            server_token_file: None,
            client_token_file: None,
            tls: None,
        }
    }
}

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Reads everything.
    Admin,
    /// Registers and heartbeats.
    Server,
    /// Reads the list.
    Client,
}

struct Credentials {
    admin: String,
    server: String,
    client: String,
}

impl Credentials {
    fn role_of(&self, secret: &str) -> Option<Role> {
        let secret = secret.as_bytes();
        // Compare with all three so that timing says nothing about which one matched.
        let admin: bool = secret.ct_eq(self.admin.as_bytes()).into();
        let server: bool = secret.ct_eq(self.server.as_bytes()).into();
        let client: bool = secret.ct_eq(self.client.as_bytes()).into();
        if admin {
            Some(Role::Admin)
        } else if server {
            Some(Role::Server)
        } else if client {
            Some(Role::Client)
        } else {
            None
        }
    }
}

/// A refusal of the API.
#[derive(Debug)]
struct ApiErr {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiErr {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiErr {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                code: self.code.to_owned(),
                error: self.message,
                missing: None,
            }),
        )
            .into_response()
    }
}

struct MasterState {
    credentials: Credentials,
    list: Mutex<ServerList>,
    /// Wakes the saver at once (a membership change).
    save_now: tokio::sync::Notify,
    timeout_secs: u64,
    /// The membership version: changes when a server joins, returns or drops off.
    /// Starts at the master's start time, so that a restarted master never repeats a
    /// version a reader saw before.
    membership: tokio::sync::watch::Sender<u64>,
    /// Becomes true when the master stops: waiting readers are answered at once.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl MasterState {
    fn caller(&self, headers: &HeaderMap) -> Result<Role, ApiErr> {
        let unauthorized = |message: &str| {
            ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", message.to_owned())
        };
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("no credential: send Authorization: Bearer SECRET"))?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("the Authorization header is not 'Bearer SECRET'"))?;
        self.credentials
            .role_of(secret.trim())
            .ok_or_else(|| unauthorized("the credential is not valid"))
    }
}

/// Checks a server's advertised URL: http or https, a host, no user info, bounded.
pub fn validate_server_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!(
            "the url is {} bytes long; at most {MAX_URL_LEN} are accepted",
            url.len()
        ));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|err| format!("the url {url:?} is not a URL: {err}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "the url {url:?} has scheme {:?}; only http and https are accepted",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("the url {url:?} names no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "the url {url:?} carries user info; advertise a URL without credentials"
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("the url {url:?} has a query or fragment"));
    }
    Ok(())
}

async fn register(
    State(state): State<Arc<MasterState>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiErr> {
    match state.caller(&headers)? {
        Role::Server => {}
        Role::Admin | Role::Client => {
            return Err(ApiErr::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "registering needs the server credential (server.token)",
            ))
        }
    }
    let reg: Registration = serde_json::from_slice(&body).map_err(|err| {
        ApiErr::bad_request(
            "invalid_registration",
            format!("the body is not a registration {{\"url\", \"name\"?, \"builds\", \"queued\", \"running\"}}: {err}"),
        )
    })?;
    validate_server_url(&reg.url).map_err(|message| ApiErr::bad_request("invalid_url", message))?;
    if let Some(name) = &reg.name {
        if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(ApiErr::bad_request(
                "invalid_name",
                format!("the name must be at most {MAX_NAME_LEN} bytes without control characters"),
            ));
        }
    }
    let url = reg.url.clone();
    let change = state
        .list
        .lock()
        .expect("server list lock")
        .register(reg, now_micros());
    match change {
        Change::New => {
            tracing::info!(%url, "server registered");
            state.save_now.notify_one();
            state.membership.send_modify(|version| *version += 1);
        }
        Change::Returned => {
            tracing::info!(%url, "server is back");
            state.save_now.notify_one();
            state.membership.send_modify(|version| *version += 1);
        }
        Change::Heartbeat => {}
    }
    Ok(Json(serde_json::json!({
        "heartbeat_timeout_secs": state.timeout_secs,
    })))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
    /// The membership version the reader has.
    version: Option<u64>,
    /// How long to wait for the version to change.
    #[serde(default)]
    wait_secs: u64,
}

async fn list_servers(
    State(state): State<Arc<MasterState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiErr> {
    match state.caller(&headers)? {
        Role::Admin | Role::Client => {}
        Role::Server => {
            return Err(ApiErr::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "reading the list needs the client or admin credential",
            ))
        }
    }
    let Query(query) = query.map_err(|err| {
        ApiErr::bad_request(
            "invalid_query",
            format!("bad query (all=true|false, version=N, wait_secs=N): {err}"),
        )
    })?;
    let mut membership = state.membership.subscribe();
    if let Some(seen) = query.version {
        let wait = Duration::from_secs(query.wait_secs.min(MAX_LIST_WAIT_SECS));
        let mut stopping = state.stopping.subscribe();
        let changed = membership.wait_for(|version| *version != seen);
        tokio::select! {
            _ = tokio::time::timeout(wait, changed) => {}
            _ = stopping.wait_for(|stopping| *stopping) => {}
        }
    }
    let version = *membership.borrow();
    let servers = state
        .list
        .lock()
        .expect("server list lock")
        .list(query.all, now_micros());
    Ok(([(VERSION_HEADER, version.to_string())], Json(servers)).into_response())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true, "role": "master" }))
}

/// Notes servers dropping off and saves the list: at once on a membership change, at
/// most every [`SAVE_EVERY`] for heartbeats.
async fn keeper(state: Arc<MasterState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let tick = Duration::from_millis((state.timeout_secs * 1000 / 4).clamp(100, 1000));
    let mut last_save = tokio::time::Instant::now();
    loop {
        // A registration that changed membership wakes the keeper to save at once.
        let (stopping, changed) = tokio::select! {
            _ = tokio::time::sleep(tick) => (false, false),
            _ = state.save_now.notified() => (false, true),
            _ = stop.changed() => (true, false),
        };
        let snapshot = {
            let mut list = state.list.lock().expect("server list lock");
            let dropped = list.sweep(now_micros());
            for url in &dropped {
                tracing::warn!(%url, timeout_secs = state.timeout_secs, "server dropped off: no heartbeat within the timeout");
            }
            if !dropped.is_empty() {
                state.membership.send_modify(|version| *version += 1);
            }
            let due =
                stopping || changed || !dropped.is_empty() || last_save.elapsed() >= SAVE_EVERY;
            (list.is_dirty() && due).then(|| list.snapshot())
        };
        if let Some((path, bytes)) = snapshot {
            last_save = tokio::time::Instant::now();
            let result =
                tokio::task::spawn_blocking(move || kiln_common::fs::write_atomic(&path, &bytes))
                    .await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(cause = %format!("{err:#}"), "cannot save the server list")
                }
                Err(err) => tracing::error!(cause = %err, "the save task failed"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// A master ready to serve.
pub struct Master {
    state: Arc<MasterState>,
    tls: Option<kiln_tls::ServerTls>,
}

impl Master {
    /// Opens the data directory: credentials and the saved list.
    pub fn open(config: MasterConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let dir = &config.data_dir;
        let credentials = Credentials {
            admin: kiln_common::secret::read_or_create_secret(
                &dir.join("admin.token"),
                config.admin_token_file.as_deref(),
            )?,
            server: kiln_common::secret::read_or_create_secret(
                &dir.join("server.token"),
                config.server_token_file.as_deref(),
            )?,
            client: kiln_common::secret::read_or_create_secret(
                &dir.join("client.token"),
                config.client_token_file.as_deref(),
            )?,
        };
        let timeout_secs = config.heartbeat_timeout_secs.max(1);
        let list = ServerList::load(&dir.join("servers.json"), timeout_secs, now_micros());
        Ok(Master {
            state: Arc::new(MasterState {
                credentials,
                list: Mutex::new(list),
                save_now: tokio::sync::Notify::new(),
                timeout_secs,
                membership: tokio::sync::watch::channel(now_micros().max(0) as u64).0,
                stopping: tokio::sync::watch::channel(false).0,
            }),
            tls: config.tls,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then saves the list.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let keeper = tokio::spawn(keeper(self.state.clone(), self.state.stopping.subscribe()));
        let app = Router::new()
            .route("/v1/health", get(health))
            .route("/v1/servers", get(list_servers).post(register))
            .with_state(self.state.clone());
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            // Answers the readers waiting for a change, so that they do not hold the
            // shutdown up.
            let _ = state.stopping.send(true);
        };
        let result = kiln_tls::serve(listener, self.tls, app, shutdown)
            .await
            .context("serving HTTP");
        let _ = self.state.stopping.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), keeper).await;
        result
    }
}
