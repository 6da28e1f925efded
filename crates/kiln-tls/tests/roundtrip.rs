//! The TLS listener and clients against each other over loopback: a client that
//! trusts the CA gets answers, one that does not is told the certificate is not
//! trusted, and a silent peer mid-handshake holds up no one.

use kiln_tls::{certificate_problem, ClientTls, ServerTls, TlsError};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Files {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("the CA");
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("the certificate");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).expect("writing");
    std::fs::write(path("cert.pem"), cert.pem()).expect("writing");
    std::fs::write(path("key.pem"), key.serialize_pem()).expect("writing");
    Files {
        ca: path("ca.pem"),
        cert: path("cert.pem"),
        key: path("key.pem"),
        _dir: dir,
    }
}

async fn start(files: &Files) -> String {
    let tls = ServerTls::from_pem_files(&files.cert, &files.key).expect("the server's TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding");
    let addr = listener.local_addr().expect("the address");
    let router =
        axum::Router::new().route(
            "/",
            axum::routing::get(
                |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                    std::net::SocketAddr,
                >| async move { format!("hello {}", peer.ip()) },
            ),
        );
    tokio::spawn(kiln_tls::serve(
        listener,
        Some(tls),
        router,
        std::future::pending(),
    ));
    format!("https://{addr}/")
}

#[tokio::test]
async fn trusted_clients_are_served_and_untrusting_ones_told_why() {
    let files = files();
    let url = start(&files).await;
    // A peer that connects and never speaks: the next handshake goes ahead anyway.
    let _silent =
        tokio::net::TcpStream::connect(url.trim_start_matches("https://").trim_end_matches('/'))
            .await
            .expect("connecting");
    let trusting = ClientTls::from_ca_file(Some(&files.ca))
        .expect("the CA file")
        .client_builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a client");
    let answer = trusting.get(&url).send().await.expect("an answer");
    assert_eq!(answer.text().await.expect("a body"), "hello 127.0.0.1");

    let untrusting = ClientTls::default()
        .client_builder()
        .build()
        .expect("a client");
    let err = untrusting.get(&url).send().await.expect_err("refused");
    let problem =
        certificate_problem(&err).unwrap_or_else(|| panic!("no problem found in {err:?}"));
    assert!(problem.contains("certificate is not trusted"), "{problem}");

    let plain = reqwest::Client::new()
        .get(url.replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(certificate_problem(&plain.unwrap_err()), None);
}

#[test]
fn errors_name_the_file() {
    let files = files();
    let message = |err: TlsError| err.to_string();
    let name = |path: &Path| path.display().to_string();
    assert_eq!(
        message(ServerTls::from_pem_files(&files.key, &files.key).unwrap_err()),
        format!("no certificate found in {}", name(&files.key))
    );
    assert_eq!(
        message(ServerTls::from_pem_files(&files.cert, &files.cert).unwrap_err()),
        format!("no private key in {}", name(&files.cert))
    );
    assert_eq!(
        message(ClientTls::from_ca_file(Some(&files.key)).unwrap_err()),
        format!("no certificate found in {}", name(&files.key))
    );
    let missing = files.ca.with_file_name("missing.pem");
    assert_eq!(
        message(ClientTls::from_ca_file(Some(&missing)).unwrap_err()),
        format!("cannot read {}", name(&missing))
    );
}

/// The self-signed certificate most people make first, exactly as they make it:
/// `openssl req -x509` marks it `CA:TRUE`, which a strict path check refuses as a
/// server's own certificate. Handed to callers as the CA file, it is pinned and
/// accepted (as curl accepts it with `--cacert`); handed to nobody, it is refused in
/// words that say what to do.
#[tokio::test]
async fn a_self_signed_openssl_certificate_given_as_the_ca_file_is_pinned() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let status = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running openssl (Debian package openssl)");
    assert!(status.success(), "openssl req failed: {status}");
    let cert = dir.path().join("cert.pem");
    let own = Files {
        ca: cert.clone(),
        cert: cert.clone(),
        key: dir.path().join("key.pem"),
        _dir: dir,
    };
    let url = start(&own).await;

    let pinning = ClientTls::from_ca_file(Some(&cert))
        .expect("the certificate as a CA file")
        .client_builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a client");
    let answer = pinning.get(&url).send().await.expect("an answer");
    assert_eq!(answer.text().await.expect("a body"), "hello 127.0.0.1");

    // Pinned for the names it holds only: by another name it is refused.
    let by_name = url.replacen("127.0.0.1", "localhost", 1);
    let err = pinning
        .get(&by_name)
        .send()
        .await
        .expect_err("refused by a name it does not hold");
    let problem = certificate_problem(&err).unwrap_or_else(|| panic!("no problem in {err:?}"));
    assert!(
        problem.contains("not valid for this host name"),
        "{problem}"
    );

    // Another CA file does not pin it.
    let other = files();
    let unpinned = ClientTls::from_ca_file(Some(&other.ca))
        .expect("another CA file")
        .client_builder()
        .build()
        .expect("a client");
    let err = unpinned.get(&url).send().await.expect_err("refused");
    let problem = certificate_problem(&err).unwrap_or_else(|| panic!("no problem in {err:?}"));
    assert!(problem.contains("--ca-file"), "{problem}");
}
