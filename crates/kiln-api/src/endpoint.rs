//! [`Endpoint`]: where a server or a master is (its base URL, or the base URLs of a
//! farm's replicas, comma-separated) and which certificates calls to it trust.
//!
//! A farm served by several replicas is one endpoint with several URLs: calls go to
//! one of them until it cannot be reached, then to the next. A request that never
//! reached its server (the connection was refused, say) is sent again at once to the
//! next URL, whatever its method; one that broke after it was sent fails, and its
//! caller's own retry goes to the next URL.

use crate::error::CallError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why an endpoint cannot be called.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL does not parse.
    #[error("{what} URL {url:?} is not a URL: {reason}")]
    NotAUrl {
        what: &'static str,
        url: String,
        reason: String,
    },
    /// The URL is not http:// or https://.
    #[error("{what} URL {url:?} is not an http:// or https:// URL")]
    NotHttp { what: &'static str, url: String },
    /// The HTTP client could not be built (the TLS setup, say).
    #[error("cannot set up HTTP")]
    Http(#[source] reqwest::Error),
}

/// Sends a request through an [`Endpoint`], failing over as [`Endpoint::send`] says.
pub(crate) trait SendThrough {
    async fn send_through(self, endpoint: &Endpoint) -> Result<reqwest::Response, CallError>;
}

impl SendThrough for reqwest::RequestBuilder {
    async fn send_through(self, endpoint: &Endpoint) -> Result<reqwest::Response, CallError> {
        endpoint.send(self).await
    }
}

/// A server's or a master's base URLs (without a trailing `/`), the one calls go to
/// now, and the TLS settings calls use. Clones share which URL is the current one.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The URLs in sorted order, joined by commas: how the endpoint is named and
    /// keyed.
    name: String,
    bases: Arc<[String]>,
    current: Arc<AtomicUsize>,
    tls: kiln_tls::ClientTls,
}

impl Endpoint {
    /// The endpoint at `url` (one URL, or several of one farm separated by commas),
    /// trusting certificates as `tls` says; `what` (`server`, `master`) names it in
    /// errors.
    pub fn new(
        what: &'static str,
        url: &str,
        tls: &kiln_tls::ClientTls,
    ) -> Result<Self, EndpointError> {
        let mut bases = Vec::new();
        for one in url.split(',').map(str::trim) {
            let parsed = reqwest::Url::parse(one).map_err(|err| EndpointError::NotAUrl {
                what,
                url: one.to_owned(),
                reason: err.to_string(),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(EndpointError::NotHttp {
                    what,
                    url: one.to_owned(),
                });
            }
            // As the HTTP client spells it, so that a request's URL names its base.
            let base = parsed.as_str().trim_end_matches('/').to_owned();
            if !bases.contains(&base) {
                bases.push(base);
            }
        }
        // In one order whatever order they were given in: a client given the same
        // URLs in another order is the same client of the same farm.
        let mut sorted = bases.clone();
        sorted.sort();
        Ok(Endpoint {
            name: sorted.join(","),
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            tls: tls.clone(),
        })
    }

    /// The endpoint's name: its URLs, without trailing `/`, sorted and joined by
    /// commas. One farm's replicas are one endpoint, so this is what keys it (its
    /// sessions, its jobs' directories, a kept secret), whatever order the URLs were
    /// given in.
    pub fn url(&self) -> &str {
        &self.name
    }

    /// The base URL calls go to now.
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Every base URL, in the order they are tried.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// The TLS settings calls to this endpoint use.
    pub fn tls(&self) -> &kiln_tls::ClientTls {
        &self.tls
    }

    /// `path` (starting with `/`) under the current base URL.
    pub(crate) fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Which base URL `url` is under.
    fn index_of(&self, url: &str) -> Option<usize> {
        self.bases.iter().position(|base| {
            url.strip_prefix(base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        })
    }

    /// A call to `url` could not reach its server: calls go to the next base URL
    /// from now on, unless another call moved on already.
    fn fail_over(&self, url: &str) {
        let n = self.bases.len();
        if n < 2 {
            return;
        }
        if let Some(failed) = self.index_of(url) {
            let moved = self.current.compare_exchange(
                failed,
                (failed + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if moved.is_ok() {
                tracing::warn!(from = %self.bases[failed], to = %self.bases[(failed + 1) % n], "cannot reach the server; calling the next of the farm's URLs");
            }
        }
    }

    /// The [`CallError::Unreachable`] for a failed call, after failing over to the
    /// next base URL: for errors of calls to this endpoint (reading an answer's body,
    /// say).
    pub(crate) fn unreachable(&self) -> impl FnOnce(reqwest::Error) -> CallError + '_ {
        move |source| {
            let url = match source.url() {
                Some(url) => {
                    self.fail_over(url.as_str());
                    self.index_of(url.as_str())
                        .map_or_else(|| url.to_string(), |i| self.bases[i].clone())
                }
                None => self.base().to_owned(),
            };
            CallError::Unreachable { url, source }
        }
    }

    /// Sends a request made for the current base URL. When it cannot connect, it is
    /// sent to each other URL in turn (if its body can be sent again); any other
    /// failure fails over for the next call and comes back as
    /// [`CallError::Unreachable`].
    pub(crate) async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        let (http, request) = builder.build_split();
        let mut request = request.map_err(self.unreachable())?;
        let mut tries_left = self.bases.len();
        loop {
            tries_left -= 1;
            let again = if tries_left > 0 {
                request.try_clone()
            } else {
                None
            };
            let sent_to = request.url().to_string();
            let err = match http.execute(request).await {
                Ok(response) => return Ok(response),
                Err(err) => err,
            };
            let not_sent = err.is_connect();
            let failed = self.unreachable()(err);
            match again {
                Some(mut next) if not_sent => {
                    let Some(rewritten) = self.rebase(&sent_to) else {
                        return Err(failed);
                    };
                    *next.url_mut() = rewritten;
                    tracing::debug!(cause = %kiln_proto::error_chain(&failed), url = %next.url(), "sending the call to the next URL");
                    request = next;
                }
                _ => return Err(failed),
            }
        }
    }

    /// `url`, under one of the base URLs, moved under the current one.
    fn rebase(&self, url: &str) -> Option<reqwest::Url> {
        let from = &self.bases[self.index_of(url)?];
        reqwest::Url::parse(&format!("{}{}", self.base(), &url[from.len()..])).ok()
    }

    /// An HTTP client for this endpoint: its TLS, a connect timeout of 5 s, and what
    /// `tune` adds.
    pub(crate) fn http(
        &self,
        tune: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<reqwest::Client, EndpointError> {
        tune(
            self.tls
                .client_builder()
                .connect_timeout(Duration::from_secs(5)),
        )
        .build()
        .map_err(EndpointError::Http)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_are_endpoints_and_the_trailing_slash_goes() {
        let tls = kiln_tls::ClientTls::default();
        let endpoint = Endpoint::new("server", "http://127.0.0.1:7070/", &tls).unwrap();
        assert_eq!(endpoint.url(), "http://127.0.0.1:7070");
        let err = Endpoint::new("master", "ftp://x", &tls).unwrap_err();
        assert_eq!(
            err.to_string(),
            "master URL \"ftp://x\" is not an http:// or https:// URL"
        );
        let err = Endpoint::new("server", "nonsense", &tls).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("server URL \"nonsense\" is not a URL: "));
    }

    #[test]
    fn a_farm_is_its_urls_separated_by_commas() {
        let tls = kiln_tls::ClientTls::default();
        let endpoint = Endpoint::new(
            "server",
            "http://10.0.0.1:7070/, http://10.0.0.2:7070",
            &tls,
        )
        .unwrap();
        assert_eq!(endpoint.url(), "http://10.0.0.1:7070,http://10.0.0.2:7070");
        assert_eq!(endpoint.bases().len(), 2);
        assert_eq!(endpoint.base(), "http://10.0.0.1:7070");
        // A URL given twice is one.
        let endpoint =
            Endpoint::new("server", "http://10.0.0.1:7070,http://10.0.0.1:7070/", &tls).unwrap();
        assert_eq!(endpoint.bases().len(), 1);
        let err = Endpoint::new("server", "http://10.0.0.1:7070,ftp://x", &tls).unwrap_err();
        assert_eq!(
            err.to_string(),
            "server URL \"ftp://x\" is not an http:// or https:// URL"
        );
        let err = Endpoint::new("server", "http://10.0.0.1:7070,", &tls).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("server URL \"\" is not a URL: "));
    }

    /// A port nothing listens on: bound, then let go.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    /// A server on loopback that answers each connection's first request with `200 ok`
    /// and no more (or, when `hang_up`, closes the connection once the request is
    /// read); counts the connections, so each request it answers is one.
    async fn one_line_server(hang_up: bool) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let n_connections = Arc::new(AtomicUsize::new(0));
        let counted = n_connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !hang_up {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (url, n_connections)
    }

    #[tokio::test]
    async fn a_call_that_cannot_connect_goes_to_the_next_url_at_once_and_stays_there() {
        let tls = kiln_tls::ClientTls::default();
        let (live, n_connections) = one_line_server(false).await;
        let endpoint = Endpoint::new("server", &format!("{},{live}", closed_port()), &tls).unwrap();
        let http = endpoint.http(|builder| builder).unwrap();
        let response = endpoint
            .send(http.post(endpoint.at("/v1/x?y=1")).body("body"))
            .await
            .unwrap();
        assert_eq!(response.url().as_str(), format!("{live}/v1/x?y=1"));
        assert_eq!(response.text().await.unwrap(), "ok");
        assert_eq!(endpoint.base(), live);
        // The clones share the current URL; the next call goes straight there.
        let clone = endpoint.clone();
        assert_eq!(clone.at("/v1/health"), format!("{live}/v1/health"));
        endpoint
            .send(http.get(clone.at("/v1/health")))
            .await
            .unwrap();
        assert_eq!(
            n_connections.load(Ordering::SeqCst),
            2,
            "both calls reached it"
        );
    }

    #[tokio::test]
    async fn a_call_that_broke_after_it_was_sent_is_not_sent_again_but_the_next_goes_on() {
        let tls = kiln_tls::ClientTls::default();
        let (hangs_up, n_connections) = one_line_server(true).await;
        let (live, _) = one_line_server(false).await;
        let endpoint = Endpoint::new("server", &format!("{hangs_up},{live}"), &tls).unwrap();
        let http = endpoint.http(|builder| builder).unwrap();
        let err = endpoint
            .send(http.post(endpoint.at("/v1/finish")).body("once"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CallError::Unreachable { url, .. } if *url == hangs_up),
            "{err:?}"
        );
        assert_eq!(n_connections.load(Ordering::SeqCst), 1, "sent once");
        assert_eq!(endpoint.base(), live);
        // Every URL unreachable: the error names the last one tried.
        let endpoint = Endpoint::new(
            "server",
            &format!("{},{}", closed_port(), closed_port()),
            &tls,
        )
        .unwrap();
        let second = endpoint.bases()[1].clone();
        let err = endpoint
            .send(http.get(endpoint.at("/v1/health")))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CallError::Unreachable { url, .. } if *url == second),
            "{err:?}"
        );
        assert_eq!(endpoint.base(), endpoint.bases()[0], "round and round");
    }
}
