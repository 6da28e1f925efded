//! [`MasterConn`]: a master's side of the HTTP API. A client reads the list of live
//! servers from it (`GET /v1/servers`, long-polled on the list's version); a server
//! registers and heartbeats with it (`POST /v1/servers`, [`Registration`]).

use crate::endpoint::{Endpoint, EndpointError, SendThrough};
use crate::error::CallError;
use crate::secret::Secret;
use crate::server::ServerConn;
use kiln_proto::api::ServerEntry;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The header a master's list answer carries its membership version in.
const LIST_VERSION_HEADER: &str = "x-kiln-list-version";

/// What a server tells a master at each heartbeat.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registration {
    /// The URL the master hands out for the server.
    pub url: String,
    pub builds: u64,
    pub queued: u64,
    pub running: u64,
}

/// One master as a client or a server talks to it. Servers a client learns from it are
/// called with the same credential.
#[derive(Clone)]
pub struct MasterConn {
    endpoint: Endpoint,
    token: Option<Secret>,
    http: reqwest::Client,
    /// The client id servers learned from this master are called as, and where
    /// enrolled secrets are kept.
    client: Option<(String, Option<PathBuf>)>,
}

impl std::fmt::Debug for MasterConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("MasterConn")
            .field("base", &self.endpoint.url())
            .finish_non_exhaustive()
    }
}

impl MasterConn {
    /// A connection to the master at `url` with the client credential `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, EndpointError> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// As [`MasterConn::new`], trusting the certificates of the master and of the
    /// servers it lists as `tls` says.
    pub fn with_tls(
        url: &str,
        token: &str,
        tls: &kiln_tls::ClientTls,
    ) -> Result<Self, EndpointError> {
        let endpoint = Endpoint::new("master", url, tls)?;
        let http = endpoint.http(|builder| builder)?;
        Ok(MasterConn {
            endpoint,
            token: Some(Secret::new(token)),
            http,
            client: None,
        })
    }

    /// A server's connection to the master at `endpoint`, with the masters' server
    /// credential (if they want one); each call gives up after `timeout`.
    pub fn for_server(
        endpoint: Endpoint,
        token: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, EndpointError> {
        let http = endpoint.http(|builder| builder.timeout(timeout))?;
        Ok(MasterConn {
            endpoint,
            token,
            http,
            client: None,
        })
    }

    /// Servers learned from this master are called as client `client_id` (see
    /// [`ServerConn::for_client`]).
    pub fn for_client(mut self, client_id: &str, keep_dir: Option<&Path>) -> Self {
        self.client = Some((client_id.to_owned(), keep_dir.map(ToOwned::to_owned)));
        self
    }

    /// The master's URL.
    pub fn url(&self) -> &str {
        self.endpoint.url()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.endpoint.at(path));
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// The live servers the master lists, and the list's membership version. With
    /// `seen`, the master answers once its version differs from it, or after
    /// `wait_secs`.
    pub async fn servers(
        &self,
        seen: Option<u64>,
        wait_secs: u64,
    ) -> Result<(Vec<ServerEntry>, Option<u64>), CallError> {
        let mut request = self
            .request(reqwest::Method::GET, "/v1/servers")
            .timeout(Duration::from_secs(wait_secs + 15));
        if let Some(seen) = seen {
            request = request.query(&[("version", seen), ("wait_secs", wait_secs)]);
        }
        let response = self.plain(request).await?;
        let version = response
            .headers()
            .get(LIST_VERSION_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        let entries = response.json().await.map_err(self.endpoint.unreachable())?;
        Ok((entries, version))
    }

    /// Registers the server, or heartbeats: the master lists it while these come.
    pub async fn register(&self, registration: &Registration) -> Result<(), CallError> {
        let request = self
            .request(reqwest::Method::POST, "/v1/servers")
            .json(registration);
        self.plain(request).await.map(drop)
    }

    /// Sends `request`; a refusal carries the master's answer as it is.
    async fn plain(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        let response = request.send_through(&self.endpoint).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = response.text().await.unwrap_or_default();
        Err(if status.is_server_error() {
            CallError::ServerFailed { status, message }
        } else {
            CallError::Refused { status, message }
        })
    }

    /// A connection to a server this master listed, with the same credential.
    pub fn server_conn(&self, url: &str) -> Result<ServerConn, EndpointError> {
        let token = self.token.as_ref().map_or("", Secret::expose);
        let conn = ServerConn::with_tls(url, token, self.endpoint.tls())?;
        Ok(match &self.client {
            Some((id, keep_dir)) => conn.for_client(id, keep_dir.as_deref()),
            None => conn,
        })
    }
}
