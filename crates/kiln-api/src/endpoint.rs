//! [`Endpoint`]: where a server or a master is (its base URL) and which certificates
//! calls to it trust.

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

/// A server's or a master's base URL (without a trailing `/`) and the TLS settings
/// calls to it use.
#[derive(Clone, Debug)]
pub struct Endpoint {
    base: String,
    tls: kiln_tls::ClientTls,
}

impl Endpoint {
    /// The endpoint at `url`, trusting certificates as `tls` says; `what` (`server`,
    /// `master`) names it in errors.
    pub fn new(
        what: &'static str,
        url: &str,
        tls: &kiln_tls::ClientTls,
    ) -> Result<Self, EndpointError> {
        let parsed = reqwest::Url::parse(url).map_err(|err| EndpointError::NotAUrl {
            what,
            url: url.to_owned(),
            reason: err.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(EndpointError::NotHttp {
                what,
                url: url.to_owned(),
            });
        }
        Ok(Endpoint {
            base: url.trim_end_matches('/').to_owned(),
            tls: tls.clone(),
        })
    }

    /// The base URL, without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The TLS settings calls to this endpoint use.
    pub fn tls(&self) -> &kiln_tls::ClientTls {
        &self.tls
    }

    /// `path` (starting with `/`) under the base URL.
    pub(crate) fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base)
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
}
