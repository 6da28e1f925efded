//! [`ServerConn`]: the client's side of the HTTP API of one server.

use kiln_blob::wire::{
    CommitRequest, MissingRequest, MissingResponse, PutChunksResponse, FRAMES_CONTENT_TYPE,
};
use kiln_blob::{ChunkEntry, ChunkHash};
use kiln_proto::api::{ApiError, Claim, ClaimRequest, Fail, Finish, Heartbeat, LogBatch, Offer};
use kiln_proto::progress::Progress;
use kiln_proto::LEASE_HEADER;
use reqwest::StatusCode;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Why a call to the server did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The lease is no longer ours (409): stop the job.
    #[error("the server says our lease is stale: {0}")]
    Stale(String),
    /// The server refused the call; retrying the same call will not help.
    #[error("the server refused: {status}: {message}")]
    Refused { status: StatusCode, message: String },
    /// The server could not do it now (5xx, e.g. out of disk); retry later.
    #[error("the server failed: {status}: {message}")]
    ServerFailed { status: StatusCode, message: String },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the server{}", kiln_tls::certificate_hint(.0))]
    Transport(#[source] reqwest::Error),
    /// A commit named chunks the server lacks (it may have collected them): send
    /// them and commit again.
    #[error("the server lacks {} chunks of the image", .0.len())]
    MissingChunks(Vec<kiln_blob::ChunkHash>),
    /// A local file could not be read or written.
    #[error("{what}")]
    Local {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CallError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CallError::Transport(_) | CallError::ServerFailed { .. }
        )
    }
}

/// One server as the client talks to it.
#[derive(Clone)]
pub struct ServerConn {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("ServerConn")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let (code, message, missing) = match serde_json::from_str::<ApiError>(&text) {
        Ok(body) => (body.code, body.error, body.missing),
        Err(_) => (String::new(), text, None),
    };
    if status == StatusCode::CONFLICT && code == "missing_chunks" {
        let missing = missing
            .unwrap_or_default()
            .iter()
            .filter_map(|hex| kiln_blob::ChunkHash::parse(hex))
            .collect();
        return Err(CallError::MissingChunks(missing));
    }
    // 409 also answers other conflicts (finishing without the images, say): only
    // `stale_lease` means the job is no longer ours.
    Err(if status == StatusCode::CONFLICT && code == "stale_lease" {
        CallError::Stale(message)
    } else if status.is_server_error() {
        CallError::ServerFailed { status, message }
    } else {
        CallError::Refused { status, message }
    })
}

impl ServerConn {
    /// A connection to the server at `url` with the client credential `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, String> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// As [`ServerConn::new`], trusting the server's certificate as `tls` says.
    pub fn with_tls(url: &str, token: &str, tls: &kiln_tls::ClientTls) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| format!("server URL {url:?} is not a URL: {err}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "server URL {url:?} is not an http:// or https:// URL"
            ));
        }
        let http = tls
            .client_builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|err| format!("cannot set up HTTP: {err}"))?;
        Ok(ServerConn {
            base: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn job_url(&self, build: &str, job: &str, rest: &str) -> String {
        format!("{}/v1/jobs/{build}/{job}/{rest}", self.base)
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.token)
    }

    /// Long-polls for a job; `None` when the wait ended without one.
    pub async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>, CallError> {
        self.wait_post("claim", request).await
    }

    /// Asks which job a claim would get (waiting up to `request.wait_secs` for one),
    /// without claiming it; `None` when there was none.
    pub async fn offer(&self, request: &ClaimRequest) -> Result<Option<Offer>, CallError> {
        self.wait_post("offer", request).await
    }

    /// `POST /v1/{what}` with a claim request, waiting as long as it says: the answer's
    /// body, or `None` for `204 No Content`.
    async fn wait_post<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        request: &ClaimRequest,
    ) -> Result<Option<T>, CallError> {
        let response = self
            .request(reqwest::Method::POST, format!("{}/v1/{what}", self.base))
            .timeout(Duration::from_secs(request.wait_secs + 30))
            .json(request)
            .send()
            .await
            .map_err(CallError::Transport)?;
        let response = check(response).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(CallError::Transport)
    }

    /// Extends the lease, reporting progress.
    pub async fn heartbeat(
        &self,
        claim: &Claim,
        progress: Option<Progress>,
    ) -> Result<(), CallError> {
        self.beat(claim, progress, false).await
    }

    /// Tells the server the job's steps are over: its timeout no longer applies while
    /// the images upload.
    pub async fn steps_done(&self, claim: &Claim) -> Result<(), CallError> {
        self.beat(claim, None, true).await
    }

    async fn beat(
        &self,
        claim: &Claim,
        progress: Option<Progress>,
        steps_done: bool,
    ) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "heartbeat"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(claim.heartbeat_secs.max(1) * 2))
            .json(&Heartbeat {
                progress,
                steps_done,
            })
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Appends log lines (and the latest progress).
    pub async fn log(&self, claim: &Claim, batch: &LogBatch) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "log"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(30))
            .json(batch)
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Reports the job finished with these images.
    pub async fn finish(&self, claim: &Claim, images: Vec<String>) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "finish"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(30))
            .json(&Finish { images })
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Reports the job failed.
    pub async fn fail(&self, claim: &Claim, report: &Fail) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "fail"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(30))
            .json(report)
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Gives back a job this client will not run.
    pub async fn release(&self, claim: &Claim) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "release"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Gives a started job back to the server (queued again at once, the run counted).
    pub async fn give_up(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        reason: &str,
    ) -> Result<(), CallError> {
        let response = self
            .request(reqwest::Method::POST, self.job_url(build, job, "giveup"))
            .header(LEASE_HEADER, lease)
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({ "reason": reason }))
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Holds the client's session open until the connection or the server ends it. The
    /// request body is a trickle of keep-alive bytes that never ends, so the server
    /// sees this client's death as the end of the body.
    pub async fn session(&self, client_id: &str) -> Result<(), CallError> {
        let keepalive = futures::stream::unfold(true, |first| async move {
            if !first {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"\n")),
                false,
            ))
        });
        let response = self
            .request(
                reqwest::Method::POST,
                format!("{}/v1/session?client_id={client_id}", self.base),
            )
            .body(reqwest::Body::wrap_stream(keepalive))
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Downloads the build's files archive to `dest`.
    pub async fn fetch_files(&self, claim: &Claim, dest: &Path) -> Result<(), CallError> {
        let url = format!(
            "{}/v1/builds/{}/files?job={}",
            self.base, claim.build, claim.job_id
        );
        let response = self
            .request(reqwest::Method::GET, url)
            .header(LEASE_HEADER, &claim.lease)
            .send()
            .await
            .map_err(CallError::Transport)?;
        let mut response = check(response).await?;
        let local = |source| CallError::Local {
            what: format!("writing {}", dest.display()),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        while let Some(chunk) = response.chunk().await.map_err(CallError::Transport)? {
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        Ok(())
    }

    /// Uploads one image as a whole-file stream, with its BLAKE3 hash.
    pub async fn put_image(
        &self,
        claim: &Claim,
        name: &str,
        path: &Path,
        blake3: &str,
        size: u64,
    ) -> Result<(), CallError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| CallError::Local {
                what: format!("opening image {}", path.display()),
                source,
            })?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
        let response = self
            .request(
                reqwest::Method::PUT,
                self.job_url(&claim.build, &claim.job_id, &format!("images/{name}")),
            )
            .header(LEASE_HEADER, &claim.lease)
            .header(kiln_proto::BLAKE3_HEADER, blake3)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }

    /// Which of `chunks` the server lacks. Naming the image they continue (and the
    /// offset where they start) lets the server hash it while it arrives.
    pub async fn missing_chunks(
        &self,
        claim: &Claim,
        image: Option<(&str, u64)>,
        chunks: Vec<ChunkEntry>,
    ) -> Result<Vec<ChunkHash>, CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "chunks/missing"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .json(&MissingRequest {
                chunks,
                image: image.map(|(name, _)| name.to_owned()),
                offset: image.map_or(0, |(_, offset)| offset),
            })
            .send()
            .await
            .map_err(CallError::Transport)?;
        let answer: MissingResponse = check(response)
            .await?
            .json()
            .await
            .map_err(CallError::Transport)?;
        Ok(answer.missing)
    }

    /// Sends a body of chunk frames.
    pub async fn put_chunks(
        &self,
        claim: &Claim,
        frames: Vec<u8>,
    ) -> Result<PutChunksResponse, CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "chunks"),
            )
            .header(LEASE_HEADER, &claim.lease)
            .header(reqwest::header::CONTENT_TYPE, FRAMES_CONTENT_TYPE)
            .body(frames)
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response)
            .await?
            .json()
            .await
            .map_err(CallError::Transport)
    }

    /// Commits an image whose chunks the server has.
    pub async fn commit_image(
        &self,
        claim: &Claim,
        name: &str,
        commit: &CommitRequest,
    ) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(
                    &claim.build,
                    &claim.job_id,
                    &format!("images/{name}/commit"),
                ),
            )
            .header(LEASE_HEADER, &claim.lease)
            .json(commit)
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }
}
