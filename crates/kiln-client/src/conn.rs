//! [`ServerConn`]: the client's side of the HTTP API of one server.

use crate::identity::{kept_secret_path, Credential, Given};
use kiln_blob::{ChunkEntry, ChunkHash};
use kiln_proto::api::{
    ApiError, Claim, ClaimRequest, Fail, Finish, Heartbeat, LogAppended, LogBatch, Offer,
};
use kiln_proto::progress::Progress;
use kiln_proto::transfer::{
    CommitRequest, MissingRequest, MissingResponse, PutChunksResponse, FRAMES_CONTENT_TYPE,
};
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
    /// The server is taking as many uploads from this client as it accepts at once
    /// (429): send this one again after the pause it asks for.
    #[error("the server is busy with this client's other uploads: {message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
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
            CallError::Transport(_) | CallError::ServerFailed { .. } | CallError::Busy { .. }
        )
    }
}

/// One server as the client talks to it.
#[derive(Clone)]
pub struct ServerConn {
    base: String,
    credential: std::sync::Arc<Credential>,
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

/// The pause after a `429` that names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest pause a `429` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long an upload call is sent again while the server answers it is busy with
/// this client's other uploads; then the busy answer goes up to the caller.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(600);

/// Calls `send` again while the server answers busy (429), after the pause it asks
/// for, for at most [`BUSY_RETRY_FOR`].
async fn while_busy<T, F, Fut>(mut send: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let give_up = tokio::time::Instant::now() + BUSY_RETRY_FOR;
    let mut n_busy: u32 = 0;
    loop {
        match send().await {
            Err(CallError::Busy {
                retry_after,
                message,
            }) if tokio::time::Instant::now() + retry_after < give_up => {
                // Once per call: a long wait would otherwise log every second.
                if n_busy == 0 {
                    tracing::info!(%message, ?retry_after, "the server takes no more uploads from this client at once; sending it again after a pause");
                }
                n_busy += 1;
                tokio::time::sleep(retry_after).await;
            }
            result => return result,
        }
    }
}

pub(crate) async fn check(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    // Read before the body: a pause the server asks for when it is busy.
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, |secs| {
            Duration::from_secs(secs).min(MAX_RETRY_AFTER)
        });
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
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        CallError::Busy {
            message,
            retry_after,
        }
    } else if status.is_server_error() {
        CallError::ServerFailed { status, message }
    } else {
        CallError::Refused { status, message }
    })
}

impl ServerConn {
    /// A connection to the server at `url` with the join token (or, on a server from
    /// before client identities, the client credential) `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, String> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// As [`ServerConn::new`], trusting the server's certificate as `tls` says.
    pub fn with_tls(url: &str, token: &str, tls: &kiln_tls::ClientTls) -> Result<Self, String> {
        Self::with_given(url, Given::Token(token.to_owned()), tls)
    }

    /// A connection to the server at `url` with the credential `given`, trusting the
    /// server's certificate as `tls` says.
    pub fn with_given(url: &str, given: Given, tls: &kiln_tls::ClientTls) -> Result<Self, String> {
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
            credential: std::sync::Arc::new(Credential::new(given)),
            http,
        })
    }

    /// This connection as client `client_id`'s: calls are made with its own identity
    /// (enrolled with the join token if need be), and an enrolled secret is kept under
    /// `keep_dir` (`WORK/credentials`) when given.
    pub fn for_client(mut self, client_id: &str, keep_dir: Option<&Path>) -> Self {
        let mut credential = Credential::new(self.credential.given.clone());
        credential.client_id = Some(client_id.to_owned());
        credential.keep_in = keep_dir.map(|dir| kept_secret_path(dir, &self.base));
        self.credential = std::sync::Arc::new(credential);
        self
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn job_url(&self, build: &str, job: &str, rest: &str) -> String {
        format!("{}/v1/jobs/{build}/{job}/{rest}", self.base)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        url: String,
    ) -> Result<reqwest::RequestBuilder, CallError> {
        self.request_as(None, method, url).await
    }

    /// A request with the identity of `client_id` (else the connection's client).
    async fn request_as(
        &self,
        client_id: Option<&str>,
        method: reqwest::Method,
        url: String,
    ) -> Result<reqwest::RequestBuilder, CallError> {
        let header = self
            .credential
            .header(&self.http, &self.base, client_id)
            .await?;
        Ok(self
            .http
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, header))
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
        match self.wait_post_once(what, request).await {
            // An enrolled secret the server no longer takes (the server's data was
            // reset, say): enroll again, once. A revoked client is refused that.
            Err(CallError::Refused { status, .. })
                if status == StatusCode::UNAUTHORIZED && self.credential.forget().await =>
            {
                tracing::warn!(server = %self.base, "the server does not take our enrolled secret; enrolling again");
                self.wait_post_once(what, request).await
            }
            other => other,
        }
    }

    async fn wait_post_once<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        request: &ClaimRequest,
    ) -> Result<Option<T>, CallError> {
        let response = self
            .request_as(
                Some(&request.client_id),
                reqwest::Method::POST,
                format!("{}/v1/{what}", self.base),
            )
            .await?
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
            .await?
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(claim.heartbeat_secs.max(1) * 2))
            .json(&Heartbeat {
                progress,
                steps_done,
            })
            .send()
            .await
            .map_err(CallError::Transport)?;
        match check(response).await {
            // Our credential was revoked: nothing of this job can be reported any more,
            // and the server takes it back when the lease lapses. Stop it.
            Err(CallError::Refused { status, message }) if status == StatusCode::UNAUTHORIZED => {
                Err(CallError::Stale(message))
            }
            other => other.map(drop),
        }
    }

    /// Appends log lines (and the latest progress). The answer says whether the
    /// job's log reached the server's limit (the server stores no more of its lines).
    pub async fn log(&self, claim: &Claim, batch: &LogBatch) -> Result<LogAppended, CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "log"),
            )
            .await?
            .header(LEASE_HEADER, &claim.lease)
            .timeout(Duration::from_secs(30))
            .json(batch)
            .send()
            .await
            .map_err(CallError::Transport)?;
        let response = check(response).await?;
        // A server older than the answer's body says `204 No Content`.
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(LogAppended::default());
        }
        response.json().await.map_err(CallError::Transport)
    }

    /// Reports the job finished with these images.
    pub async fn finish(&self, claim: &Claim, images: Vec<String>) -> Result<(), CallError> {
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "finish"),
            )
            .await?
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
            .await?
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
            .await?
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
            .await?
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
            .request_as(
                Some(client_id),
                reqwest::Method::POST,
                format!("{}/v1/session?client_id={client_id}", self.base),
            )
            .await?
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
            .await?
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
        while_busy(|| async {
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
                .await?
                .header(LEASE_HEADER, &claim.lease)
                .header(kiln_proto::BLAKE3_HEADER, blake3)
                .header(reqwest::header::CONTENT_LENGTH, size)
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response).await.map(drop)
        })
        .await
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
            .await?
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
        // Shared, not copied, each time the body is sent again.
        let frames = bytes::Bytes::from(frames);
        while_busy(|| async {
            let response = self
                .request(
                    reqwest::Method::POST,
                    self.job_url(&claim.build, &claim.job_id, "chunks"),
                )
                .await?
                .header(LEASE_HEADER, &claim.lease)
                .header(reqwest::header::CONTENT_TYPE, FRAMES_CONTENT_TYPE)
                .body(frames.clone())
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response)
                .await?
                .json()
                .await
                .map_err(CallError::Transport)
        })
        .await
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
            .await?
            .header(LEASE_HEADER, &claim.lease)
            .json(commit)
            .send()
            .await
            .map_err(CallError::Transport)?;
        check(response).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn busy() -> CallError {
        CallError::Busy {
            message: "too many uploads".into(),
            retry_after: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn a_busy_answer_is_sent_again_after_its_pause_and_other_answers_go_up() {
        let n_calls = AtomicU32::new(0);
        let answer = while_busy(|| async {
            match n_calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(busy()),
                _ => Ok("stored"),
            }
        })
        .await;
        assert_eq!(answer.ok(), Some("stored"));
        assert_eq!(n_calls.load(Ordering::SeqCst), 3);

        let n_calls = AtomicU32::new(0);
        let answer: Result<(), CallError> = while_busy(|| async {
            n_calls.fetch_add(1, Ordering::SeqCst);
            Err(CallError::Refused {
                status: StatusCode::BAD_REQUEST,
                message: "hash_mismatch".into(),
            })
        })
        .await;
        assert!(matches!(answer, Err(CallError::Refused { .. })));
        assert_eq!(n_calls.load(Ordering::SeqCst), 1);
        // Busy is worth retrying for callers that retry whole uploads, too.
        assert!(busy().is_retryable());
    }
}
