//! [`Operator`]: the operator's side of the HTTP API of a server (or of a master's
//! list), with the admin credential: builds, jobs, logs and events, images and their
//! chunks, clients and their credentials, storage.
//!
//! Every refusal comes back as [`CallError::Refused`] with the server's words, every
//! failure to connect or to read an answer as [`CallError::Unreachable`].

use crate::endpoint::{Endpoint, EndpointError, SendThrough};
use crate::error::CallError;
use crate::secret::Secret;
use bytes::Bytes;
use kiln_proto::api::{
    ApiError, BuildSummary, ClientInfo, ClientSecret, CredentialInfo, Event, ImageInfo, JobStatus,
    LogChunk, ServerEntry,
};
use kiln_proto::transfer::{ChunkHash, DeleteReport, FetchRequest, ImageIndex, StorageStats};
use serde::de::DeserializeOwned;

/// What an operator can do to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Put it back in the queue as new.
    Restart,
    /// Cancel it, queued or running.
    Cancel,
}

impl JobAction {
    fn as_str(self) -> &'static str {
        match self {
            JobAction::Restart => "restart",
            JobAction::Cancel => "cancel",
        }
    }
}

/// An HTTP client for one server with the operator's credential.
#[derive(Clone)]
pub struct Operator {
    endpoint: Endpoint,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("base", &self.endpoint.url())
            .finish_non_exhaustive()
    }
}

impl Operator {
    /// The operator of the server at `endpoint`, calling with `token` (none: only what
    /// the server serves to anyone).
    pub fn new(endpoint: Endpoint, token: Option<Secret>) -> Result<Self, EndpointError> {
        let http = endpoint.http(|builder| builder)?;
        Ok(Operator {
            endpoint,
            token,
            http,
        })
    }

    /// For a server URL and a secret, trusting the usual public CAs.
    pub fn with_token(url: &str, token: Option<&str>) -> Result<Self, EndpointError> {
        let endpoint = Endpoint::new("server", url, &kiln_tls::ClientTls::default())?;
        Self::new(endpoint, token.map(Secret::new))
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        self.endpoint.url()
    }

    /// A request to `path` (under the server's URL) with the credential.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, self.endpoint.at(path));
        match &self.token {
            Some(token) => builder.bearer_auth(token.expose()),
            None => builder,
        }
    }

    /// Sends a request and checks its status: any refusal is [`CallError::Refused`].
    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response, CallError> {
        let response = builder.send_through(&self.endpoint).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let mut message = serde_json::from_str::<ApiError>(&text)
            .map(|body| body.error)
            .unwrap_or(text);
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            message.push_str(" (pass --token-file FILE or set KILN_TOKEN to the admin token)");
        }
        Err(CallError::Refused { status, message })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<T, CallError> {
        let response = self.send(builder).await?;
        response.json().await.map_err(self.endpoint.unreachable())
    }

    /// GET `path` as JSON: for calls without a method of their own here.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    /// POST to `path` without a body, JSON back.
    pub async fn post_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.json(self.request(reqwest::Method::POST, path)).await
    }

    /// The server's health (`GET /v1/health`, served to anyone): its version, its
    /// counts, the clients connected.
    pub async fn health(&self) -> Result<serde_json::Value, CallError> {
        self.get_json("/v1/health").await
    }

    /// Every build: `GET /v1/builds`.
    pub async fn builds(&self) -> Result<Vec<BuildSummary>, CallError> {
        self.get_json("/v1/builds").await
    }

    /// One build's counts.
    pub async fn build(&self, build: &str) -> Result<BuildSummary, CallError> {
        self.get_json(&format!("/v1/builds/{build}")).await
    }

    /// The jobs of a build.
    pub async fn jobs(&self, build: &str) -> Result<Vec<JobStatus>, CallError> {
        self.get_json(&format!("/v1/builds/{build}/jobs")).await
    }

    /// The images of a build.
    pub async fn images(&self, build: &str) -> Result<Vec<ImageInfo>, CallError> {
        self.get_json(&format!("/v1/builds/{build}/images")).await
    }

    /// Every event of a build's log.
    pub async fn events(&self, build: &str) -> Result<Vec<Event>, CallError> {
        self.get_json(&format!("/v1/builds/{build}/events")).await
    }

    /// The events of a build's log after `after`, waiting up to `wait_secs` for one.
    pub async fn events_after(
        &self,
        build: &str,
        after: i64,
        wait_secs: u64,
    ) -> Result<Vec<Event>, CallError> {
        self.get_json(&format!(
            "/v1/builds/{build}/events?after={after}&wait={wait_secs}"
        ))
        .await
    }

    /// The lines of a job's log after `after`, waiting up to `wait_secs` for one.
    pub async fn log(
        &self,
        build: &str,
        job: &str,
        after: i64,
        wait_secs: u64,
    ) -> Result<LogChunk, CallError> {
        self.get_json(&format!(
            "/v1/jobs/{build}/{job}/log?after={after}&wait={wait_secs}"
        ))
        .await
    }

    /// Restarts or cancels a job; the answer is the state change it made.
    pub async fn job_action(
        &self,
        build: &str,
        job: &str,
        action: JobAction,
    ) -> Result<Event, CallError> {
        self.post_json(&format!("/v1/jobs/{build}/{job}/{}", action.as_str()))
            .await
    }

    /// Deletes a build with its images.
    pub async fn delete_build(&self, build: &str) -> Result<DeleteReport, CallError> {
        self.json(self.request(reqwest::Method::DELETE, &format!("/v1/builds/{build}")))
            .await
    }

    /// What the server stores.
    pub async fn storage(&self) -> Result<StorageStats, CallError> {
        self.get_json("/v1/storage").await
    }

    /// The server's clients.
    pub async fn clients(&self) -> Result<Vec<ClientInfo>, CallError> {
        self.get_json("/v1/clients").await
    }

    /// The servers a master lists (with `all`, those that dropped off too).
    pub async fn servers(&self, all: bool) -> Result<Vec<ServerEntry>, CallError> {
        let path = if all {
            "/v1/servers?all=true"
        } else {
            "/v1/servers"
        };
        self.get_json(path).await
    }

    /// The clients' credentials (never the secrets).
    pub async fn credentials(&self) -> Result<Vec<CredentialInfo>, CallError> {
        self.get_json("/v1/credentials").await
    }

    /// Gives client `id` a new secret; any previous one stops working.
    pub async fn issue_credential(&self, id: &str) -> Result<ClientSecret, CallError> {
        self.post_json(&format!("/v1/credentials/{id}")).await
    }

    /// Ends client `id`'s secret.
    pub async fn revoke_credential(&self, id: &str) -> Result<(), CallError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/v1/credentials/{id}")))
            .await
            .map(drop)
    }

    /// Rotates the join token (`rotate`), returning the new one, or disables it.
    pub async fn set_join_token(&self, rotate: bool) -> Result<Option<String>, CallError> {
        let action = if rotate { "rotate" } else { "disable" };
        let body: serde_json::Value = self
            .json(
                self.request(reqwest::Method::POST, "/v1/join-token")
                    .json(&serde_json::json!({ "action": action })),
            )
            .await?;
        Ok(body["join_token"].as_str().map(str::to_owned))
    }

    /// The chunk index of an image.
    pub async fn image_index(&self, image: &ImageInfo) -> Result<ImageIndex, CallError> {
        self.get_json(&format!(
            "/v1/jobs/{}/{}/images/{}/index",
            image.build, image.job_id, image.name
        ))
        .await
    }

    /// Asks for chunks by hash: the answer is one frame per hash, in that order, read
    /// as it arrives.
    pub async fn fetch_chunks(&self, hashes: &[ChunkHash]) -> Result<Download, CallError> {
        let body = FetchRequest {
            chunks: hashes.to_vec(),
        };
        let request = self
            .request(reqwest::Method::POST, "/v1/chunks/fetch")
            .json(&body);
        self.download(request).await
    }

    /// An image's bytes, whole, read as they arrive.
    pub async fn download_image(&self, image: &ImageInfo) -> Result<Download, CallError> {
        let path = format!(
            "/v1/jobs/{}/{}/images/{}",
            image.build, image.job_id, image.name
        );
        self.download(self.request(reqwest::Method::GET, &path))
            .await
    }

    async fn download(&self, request: reqwest::RequestBuilder) -> Result<Download, CallError> {
        Ok(Download {
            url: self.url().to_owned(),
            response: self.send(request).await?,
        })
    }

    /// Submits a build: the manifest's text (named `file_name`) and the tar of its
    /// files at `archive`.
    pub(crate) async fn post_build(
        &self,
        text: String,
        file_name: String,
        archive: &std::path::Path,
    ) -> Result<kiln_proto::api::Submitted, CallError> {
        let local = |source| CallError::Local {
            what: format!("reading {}", archive.display()),
            source,
        };
        let size = std::fs::metadata(archive).map_err(local)?.len();
        let file = tokio::fs::File::open(archive).await.map_err(local)?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ));
        let files = reqwest::multipart::Part::stream_with_length(body, size)
            .file_name("files.tar")
            .mime_str("application/x-tar")
            .map_err(self.endpoint.unreachable())?;
        let form = reqwest::multipart::Form::new()
            .part(
                "manifest",
                reqwest::multipart::Part::text(text).file_name(file_name),
            )
            .part("files", files);
        self.json(
            self.request(reqwest::Method::POST, "/v1/builds")
                .multipart(form),
        )
        .await
    }
}

/// The body of an answer, piece by piece as it arrives.
pub struct Download {
    url: String,
    response: reqwest::Response,
}

impl Download {
    /// The next piece; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, CallError> {
        self.response
            .chunk()
            .await
            .map_err(CallError::unreachable(&self.url))
    }
}
