//! TLS for kiln, with rustls over ring: [`ServerTls`] (a certificate chain and its key
//! for `kiln server` and `kiln master`), [`serve`] (axum over plain TCP or over
//! [`TlsListener`]), [`ClientTls`] (HTTP clients that also trust a CA file) and
//! [`certificate_problem`] (what to tell a user whose call failed on the server's
//! certificate).

mod listener;

pub use listener::{TlsListener, HANDSHAKE_TIMEOUT};

use axum::serve::ListenerExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why certificates, keys or CA files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate found in {}", .0.display())]
    NoCertificate(PathBuf),
    #[error("no private key in {}", .0.display())]
    NoKey(PathBuf),
    #[error("the certificate in {} and the key in {} do not make a TLS setup", .cert.display(), .key.display())]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA certificate in {} is not usable", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; an error when there is none.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certificates)
}

/// A server's certificate chain and private key, ready to accept TLS connections.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key is a secret: never printed.
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From a PEM certificate chain (the server's certificate first) and a PEM private
    /// key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = certificates(cert)?;
        let key_pem = read(key)?;
        let private_key = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(private_key) => private_key,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => {
                return Err(TlsError::NoKey(key.to_owned()))
            }
            Err(source) => {
                return Err(TlsError::Pem {
                    path: key.to_owned(),
                    source,
                })
            }
        };
        let rejected = |source| TlsError::Rejected {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(rejected)?;
        // axum serves HTTP/1.1 only (no http2 feature), and so do our clients.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration, for a [`tokio_rustls::TlsAcceptor`].
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }
}

/// The scheme of this server's URLs: `https` with TLS, `http` without.
pub fn scheme(tls: Option<&ServerTls>) -> &'static str {
    match tls {
        Some(_) => "https",
        None => "http",
    }
}

/// Serves `router` on `listener` until `shutdown` resolves: over TLS with `tls`, over
/// plain TCP without. Either way every connection has TCP_NODELAY set and handlers see
/// the peer's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            // Small responses written in pieces (headers, then a body) would otherwise
            // wait for the peer's delayed ACK under Nagle's algorithm: 40 ms a request.
            let listener = listener.tap_io(|tcp| listener::set_nodelay(tcp));
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            // The tap does nothing (the listener set TCP_NODELAY before the handshake):
            // axum gives `ConnectInfo<SocketAddr>` to tapped listeners of any kind.
            let listener = TlsListener::new(listener, &tls)?.tap_io(|_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// How an HTTP client checks servers' certificates: the usual public roots, and the
/// CA certificates of a CA file when one is given.
#[derive(Clone, Default)]
pub struct ClientTls {
    extra_roots: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

impl ClientTls {
    /// Trusting also every certificate in the PEM file `ca_file`, when given.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let Some(path) = ca_file else {
            return Ok(ClientTls::default());
        };
        let mut extra_roots = Vec::new();
        for certificate in certificates(path)? {
            let certificate =
                reqwest::Certificate::from_der(&certificate).map_err(|source| TlsError::BadCa {
                    path: path.to_owned(),
                    source,
                })?;
            extra_roots.push(certificate);
        }
        // The builder only stores certificates; building a client checks them, so that
        // a bad CA file is named here and not at the first call.
        let mut builder = reqwest::Client::builder();
        for certificate in &extra_roots {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder.build().map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
        Ok(ClientTls { extra_roots })
    }

    /// A client builder that trusts what this says, to add timeouts and build.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        for certificate in &self.extra_roots {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder
    }
}

/// A client builder that also trusts the CA certificates in `ca_file`, when given.
pub fn client_builder(ca_file: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    Ok(ClientTls::from_ca_file(ca_file)?.client_builder())
}

/// When `err` (or one of its causes) is a refusal of the server's certificate, what to
/// tell the user about it; `None` for every other failure.
pub fn certificate_problem(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(rustls::Error::InvalidCertificate(problem)) = as_rustls_error(err) {
            use rustls::CertificateError as E;
            return Some(match problem {
                E::UnknownIssuer => {
                    "the server's certificate is not trusted: no CA we trust signed it \
                     (pass --ca-file with the CA certificate that did)"
                        .to_owned()
                }
                E::NotValidForName | E::NotValidForNameContext { .. } => {
                    "the server's certificate is not trusted: it is not valid for this host name"
                        .to_owned()
                }
                E::Expired | E::ExpiredContext { .. } => {
                    "the server's certificate is not trusted: it has expired".to_owned()
                }
                other => format!("the server's certificate is not trusted: {other:?}"),
            });
        }
        cause = err.source();
    }
    None
}

/// `err` as a rustls error, looking into the `io::Error`s it may come wrapped in
/// (their `source` skips the error they wrap).
fn as_rustls_error<'a>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    loop {
        if let Some(rustls_error) = err.downcast_ref::<rustls::Error>() {
            return Some(rustls_error);
        }
        err = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}

/// `": PROBLEM"` when `err` is a refusal of the server's certificate, else `""`: to
/// end a "cannot reach URL" message with.
pub fn certificate_hint(err: &(dyn std::error::Error + 'static)) -> String {
    certificate_problem(err)
        .map(|problem| format!(": {problem}"))
        .unwrap_or_default()
}
