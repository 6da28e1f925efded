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
    #[error("the CA certificates in {} are not usable", .path.display())]
    BadCaFile {
        path: PathBuf,
        #[source]
        source: rustls::Error,
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
/// certificates of a CA file when one is given.
///
/// A certificate in the CA file is trusted both as a CA (it may sign the server's
/// certificate) and as the server's own certificate, pinned: a self-signed server
/// certificate made with `openssl req -x509` carries `CA:TRUE`, which the usual path
/// check refuses as a server's certificate ("CA used as end entity"); like curl, kiln
/// accepts it when it is byte for byte one of the CA file's certificates and is valid
/// for the host name called.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The rustls setup with the CA file's certificates; `None` for reqwest's own.
    config: Option<Arc<rustls::ClientConfig>>,
    n_extra: usize,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("extra_roots", &self.n_extra)
            .finish()
    }
}

impl ClientTls {
    /// Trusting also every certificate in the PEM file `ca_file`, when given.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let Some(path) = ca_file else {
            return Ok(ClientTls::default());
        };
        let pinned = certificates(path)?;
        let bad_ca = |source: rustls::Error| TlsError::BadCaFile {
            path: path.to_owned(),
            source,
        };
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for certificate in &pinned {
            roots.add(certificate.clone()).map_err(bad_ca)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|err| bad_ca(rustls::Error::General(err.to_string())))?;
        let n_extra = pinned.len();
        let verifier = PinningVerifier { inner, pinned };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(bad_ca)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // Our servers speak HTTP/1.1 only, and so do our clients.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            n_extra,
            config: Some(Arc::new(config)),
        })
    }

    /// A client builder that trusts what this says, to add timeouts and build.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder().use_rustls_tls();
        match &self.config {
            Some(config) => builder.use_preconfigured_tls((**config).clone()),
            None => builder,
        }
    }
}

/// The usual certificate path check, and the CA file's certificates pinned as servers'
/// own (see [`ClientTls`]).
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let refusal = match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(refusal) => refusal,
        };
        let is_pinned = self
            .pinned
            .iter()
            .any(|pinned| pinned.as_ref() == end_entity.as_ref());
        // Only the path check is waived for a pinned certificate: a wrong name or an
        // expired certificate is refused as ever.
        let path_refused = matches!(
            &refusal,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::Other(_)
            )
        );
        if !(is_pinned && path_refused) {
            return Err(refusal);
        }
        let certificate = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|err| pki_error(err, "the pinned certificate"))?;
        certificate
            .verify_is_valid_for_subject_name(server_name)
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn pki_error(err: webpki::Error, what: &str) -> rustls::Error {
    rustls::Error::General(format!("{what}: {err}"))
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
                E::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
                    "the server's certificate is not trusted: it is a CA certificate used as \
                     the server's own (pass that very certificate with --ca-file to pin it, \
                     or have a CA sign a server certificate)"
                        .to_owned()
                }
                other => format!(
                    "the server's certificate is not trusted ({other:?}); pass --ca-file \
                     with the CA certificate that signed it, or with the server's own \
                     certificate"
                ),
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
