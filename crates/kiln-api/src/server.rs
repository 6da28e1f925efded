//! [`ServerConn`]: the agent's side of the HTTP API of one server: claims and offers,
//! heartbeats, logs, the end of a job, sessions, the build's files and image uploads,
//! each call made with the client's own identity ([`crate::identity`]).

use crate::endpoint::{Endpoint, EndpointError, SendThrough};
use crate::error::{check, CallError};
use crate::identity::{kept_secret_path, Credential, Given};
use crate::secret::Secret;
use kiln_proto::api::{Claim, ClaimRequest, Fail, Finish, Heartbeat, LogAppended, LogBatch, Offer};
use kiln_proto::progress::Progress;
use kiln_proto::transfer::{
    pack_chunk_list, CommitRequest, MissingRequest, MissingResponse, PutChunksResponse,
    CHUNK_LIST_CONTENT_TYPE, FRAMES_CONTENT_TYPE,
};
use kiln_proto::transfer::{ChunkEntry, ChunkHash};
use kiln_proto::LEASE_HEADER;
use reqwest::StatusCode;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What [`ServerConn::fetch_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesFetch {
    /// The build's files are the kept archive with this ETag: nothing was written.
    Kept { etag: String },
    /// The build's files were written to the destination; their ETag, if the server
    /// gave one.
    Fetched { etag: Option<String> },
}

/// One server as the client talks to it.
#[derive(Clone)]
pub struct ServerConn {
    endpoint: Endpoint,
    credential: std::sync::Arc<Credential>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("ServerConn")
            .field("base", &self.endpoint.url())
            .finish_non_exhaustive()
    }
}

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

impl ServerConn {
    /// A connection to the server at `url` with the join token (or, on a server from
    /// before client identities, the client credential) `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, EndpointError> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// As [`ServerConn::new`], trusting the server's certificate as `tls` says.
    pub fn with_tls(
        url: &str,
        token: &str,
        tls: &kiln_tls::ClientTls,
    ) -> Result<Self, EndpointError> {
        Self::with_given(url, Given::Token(Secret::new(token)), tls)
    }

    /// A connection to the server at `url` with the credential `given`, trusting the
    /// server's certificate as `tls` says.
    pub fn with_given(
        url: &str,
        given: Given,
        tls: &kiln_tls::ClientTls,
    ) -> Result<Self, EndpointError> {
        Self::at(Endpoint::new("server", url, tls)?, given)
    }

    /// A connection to `endpoint` with the credential `given`.
    pub fn at(endpoint: Endpoint, given: Given) -> Result<Self, EndpointError> {
        let http = endpoint.http(|builder| builder.tcp_nodelay(true))?;
        Ok(ServerConn {
            endpoint,
            credential: std::sync::Arc::new(Credential::new(given)),
            http,
        })
    }

    /// The same client, with the same identity (enrolled or given), calling the same
    /// server at another URL: through a relay or a proxy, say. An identity already
    /// enrolled is not enrolled again.
    pub fn through(&self, url: &str) -> Result<Self, EndpointError> {
        let endpoint = Endpoint::new("server", url, self.endpoint.tls())?;
        let http = endpoint.http(|builder| builder.tcp_nodelay(true))?;
        Ok(ServerConn {
            endpoint,
            credential: self.credential.clone(),
            http,
        })
    }

    /// This connection as client `client_id`'s: calls are made with its own identity
    /// (enrolled with the join token if need be), and an enrolled secret is kept under
    /// `keep_dir` (`WORK/credentials`) when given.
    pub fn for_client(mut self, client_id: &str, keep_dir: Option<&Path>) -> Self {
        let mut credential = Credential::new(self.credential.given.clone());
        credential.client_id = Some(client_id.to_owned());
        credential.keep_in = keep_dir.map(|dir| kept_secret_path(dir, self.endpoint.url()));
        self.credential = std::sync::Arc::new(credential);
        self
    }

    /// The server's URL (a farm's URLs, sorted, separated by commas).
    pub fn url(&self) -> &str {
        self.endpoint.url()
    }

    /// The URL calls go to now: of a farm's URLs, the one that answered last.
    pub fn current_url(&self) -> &str {
        self.endpoint.base()
    }

    fn job_url(&self, build: &str, job: &str, rest: &str) -> String {
        self.endpoint.at(&format!("/v1/jobs/{build}/{job}/{rest}"))
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
            .header(&self.http, &self.endpoint, client_id)
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
                tracing::warn!(server = %self.endpoint.url(), "the server does not take our enrolled secret; enrolling again");
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
                self.endpoint.at(&format!("/v1/{what}")),
            )
            .await?
            .timeout(Duration::from_secs(request.wait_secs + 30))
            .json(request)
            .send_through(&self.endpoint)
            .await?;
        let response = check(response).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(self.endpoint.unreachable())
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
            .send_through(&self.endpoint)
            .await?;
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
            .send_through(&self.endpoint)
            .await?;
        let response = check(response).await?;
        // A server older than the answer's body says `204 No Content`.
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(LogAppended::default());
        }
        response.json().await.map_err(self.endpoint.unreachable())
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
            .send_through(&self.endpoint)
            .await?;
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
            .send_through(&self.endpoint)
            .await?;
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
            .send_through(&self.endpoint)
            .await?;
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
            .send_through(&self.endpoint)
            .await?;
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
                self.endpoint
                    .at(&format!("/v1/session?client_id={client_id}")),
            )
            .await?
            .body(reqwest::Body::wrap_stream(keepalive))
            .send_through(&self.endpoint)
            .await?;
        check(response).await.map(drop)
    }

    /// Fetches the build's files for `claim` into `dest`, unless they are one of the
    /// archives whose ETags `kept` lists (the server answers 304 naming it).
    pub async fn fetch_files(
        &self,
        claim: &Claim,
        dest: &Path,
        kept: &[String],
    ) -> Result<FilesFetch, CallError> {
        let url = self.endpoint.at(&format!(
            "/v1/builds/{}/files?job={}",
            claim.build, claim.job_id
        ));
        let mut request = self
            .request(reqwest::Method::GET, url)
            .await?
            .header(LEASE_HEADER, &claim.lease);
        if !kept.is_empty() {
            request = request.header(reqwest::header::IF_NONE_MATCH, kept.join(", "));
        }
        let response = request.send_through(&self.endpoint).await?;
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        if response.status() == StatusCode::NOT_MODIFIED {
            if let Some(etag) = etag.filter(|etag| kept.contains(etag)) {
                return Ok(FilesFetch::Kept { etag });
            }
            return Err(CallError::Local {
                what: "fetching the build's files".into(),
                source: std::io::Error::other(
                    "the server answered 304 Not Modified naming no archive this client keeps",
                ),
            });
        }
        let mut response = check(response).await?;
        let local = |source| CallError::Local {
            what: format!("writing {}", dest.display()),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(self.endpoint.unreachable())?
        {
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        Ok(FilesFetch::Fetched { etag })
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
                .send_through(&self.endpoint)
                .await?;
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
        // Packed, 36 bytes a chunk; a server from before packed lists refuses the
        // media type (415) and is asked again in JSON.
        let place: Vec<(&str, String)> = match image {
            Some((name, offset)) => {
                vec![("image", name.to_owned()), ("offset", offset.to_string())]
            }
            None => Vec::new(),
        };
        let response = self
            .request(
                reqwest::Method::POST,
                self.job_url(&claim.build, &claim.job_id, "chunks/missing"),
            )
            .await?
            .query(&place)
            .header(LEASE_HEADER, &claim.lease)
            .header(reqwest::header::CONTENT_TYPE, CHUNK_LIST_CONTENT_TYPE)
            .body(pack_chunk_list(&chunks))
            .send_through(&self.endpoint)
            .await?;
        let response = if response.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            self.request(
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
            .send_through(&self.endpoint)
            .await?
        } else {
            response
        };
        let answer: MissingResponse = check(response)
            .await?
            .json()
            .await
            .map_err(self.endpoint.unreachable())?;
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
                .send_through(&self.endpoint)
                .await?;
            check(response)
                .await?
                .json()
                .await
                .map_err(self.endpoint.unreachable())
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
            .send_through(&self.endpoint)
            .await?;
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
