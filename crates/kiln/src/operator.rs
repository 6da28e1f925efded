//! [`Operator`]: the operator commands' side of the HTTP API, with the admin
//! credential, and the mapping of failures to exit codes.

use crate::cli::ServerOpts;
use anyhow::Context;
use kiln_proto::api::ApiError;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// A call that could not reach the server: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {url}{}", kiln_tls::certificate_hint(.source))]
pub struct Unreachable {
    pub url: String,
    #[source]
    pub source: reqwest::Error,
}

/// A refusal from the server, with its words.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct Refused {
    pub status: reqwest::StatusCode,
    pub message: String,
}

/// A usage error found after argument parsing: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error: 2 for usage and connection errors, else 1.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    let usage_or_connection = err
        .chain()
        .any(|cause| cause.is::<Unreachable>() || cause.is::<Usage>());
    if usage_or_connection {
        2
    } else {
        1
    }
}

/// An HTTP client for one server, with the operator's credential.
#[derive(Clone)]
pub struct Operator {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Operator {
    /// From `--server` and `--token-file` (or KILN_TOKEN).
    pub fn new(opts: &ServerOpts) -> anyhow::Result<Self> {
        let token = match &opts.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("KILN_TOKEN")
                .ok()
                .map(|token| token.trim().to_owned()),
        };
        let tls = kiln_tls::ClientTls::from_ca_file(opts.ca_file.as_deref())
            .map_err(|err| Usage(format!("--ca-file: {}", kiln_proto::error_chain(&err))))?;
        Self::with_tls(&opts.server, token, &tls)
    }

    /// For a server URL and a secret.
    pub fn with_token(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// For a server URL and a secret, trusting what `tls` says.
    pub fn with_tls(
        url: &str,
        token: Option<String>,
        tls: &kiln_tls::ClientTls,
    ) -> anyhow::Result<Self> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| Usage(format!("server URL {url:?} is not a URL: {err}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Usage(format!(
                "server URL {url:?} is not an http:// or https:// URL"
            ))
            .into());
        }
        let http = tls
            .client_builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("setting up HTTP")?;
        Ok(Operator {
            base: url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// A request to `path` (under the server's URL) with the credential.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request and checks its status.
    pub async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = builder.send().await.map_err(|source| Unreachable {
            url: self.base.clone(),
            source,
        })?;
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
        Err(Refused { status, message }.into())
    }

    /// GET `path` as JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        response.json().await.map_err(|source| {
            Unreachable {
                url: self.base.clone(),
                source,
            }
            .into()
        })
    }

    /// POST to `path` without a body, JSON back.
    pub async fn post_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(self.request(reqwest::Method::POST, path)).await?;
        response.json().await.map_err(|source| {
            Unreachable {
                url: self.base.clone(),
                source,
            }
            .into()
        })
    }
}

/// Splits `BUILD/ID` into its parts.
pub fn split_job(name: &str) -> anyhow::Result<(String, String)> {
    match name.split_once('/') {
        Some((build, job)) if !build.is_empty() && !job.is_empty() && !job.contains('/') => {
            Ok((build.to_owned(), job.to_owned()))
        }
        _ => Err(Usage(format!("a job is named BUILD/ID, not {name:?}")).into()),
    }
}
