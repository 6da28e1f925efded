//! TLS: a whole build over HTTPS (a master and a server with certificates from a test
//! CA, the server registering with the master, a client that knows only the master,
//! operator commands trusting the CA by `--ca-file`) releases its image with matching
//! checksums and leaks no credential; callers that do not trust the CA are refused
//! with words that say so, plain HTTP and silent peers on the TLS port are turned away,
//! and the server serves on through all of it; `--tls-cert` and `--tls-key` come in
//! pairs.

use crate::common;

use crate::common::{run_kiln, wait_until, write_build, Harness, Job};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A test CA, a certificate it signed for 127.0.0.1 and localhost with its key, and
/// a second CA that signed nothing of ours.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    other_ca: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca = new_ca("kiln test CA");
        let key = rcgen::KeyPair::generate().expect("a server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kiln test server");
        let cert = params
            .signed_by(&key, &ca.0, &ca.1)
            .expect("signing the server certificate");
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            other_ca: dir.join("other-ca.pem"),
        };
        std::fs::write(&pki.ca, ca.0.pem()).expect("writing the CA");
        std::fs::write(&pki.cert, cert.pem()).expect("writing the certificate");
        std::fs::write(&pki.key, key.serialize_pem()).expect("writing the key");
        std::fs::write(&pki.other_ca, new_ca("another CA").0.pem()).expect("writing a CA");
        pki
    }

    /// `--tls-cert CERT --tls-key KEY`.
    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("a CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signing the CA");
    (cert, key)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(
        std::fs::read(path).expect("reading an image"),
    ))
}

#[test]
fn a_build_runs_over_tls_and_untrusting_callers_are_refused() {
    let harness = Harness::new("tls").with_env("RUST_LOG", "debug");
    let pki = Pki::new(harness.path());
    let ca = pki.ca.display().to_string();
    let client_token = harness.path().join("client.secret");
    let server_token = harness.path().join("server.secret");
    std::fs::write(&client_token, "tls-client-secret-5e2b8c1d9a7f\n").expect("writing a token");
    std::fs::write(&server_token, "tls-server-secret-0b6d3f8e2c4a\n").expect("writing a token");
    let (client_arg, server_arg) = (
        client_token.display().to_string(),
        server_token.display().to_string(),
    );

    let mut master_args = vec![
        "--client-token-file".to_owned(),
        client_arg.clone(),
        "--server-token-file".to_owned(),
        server_arg.clone(),
    ];
    master_args.extend(pki.server_args());
    let master_args: Vec<&str> = master_args.iter().map(String::as_str).collect();
    let master = harness.start_master("m", &master_args);
    assert!(master.url.starts_with("https://"), "{}", master.url);

    let mut server_args = vec![
        "--heartbeat-secs".to_owned(),
        "1".to_owned(),
        "--master".to_owned(),
        master.url.clone(),
        "--master-token-file".to_owned(),
        server_arg,
        "--master-ca-file".to_owned(),
        ca.clone(),
    ];
    server_args.extend(pki.server_args());
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let data = harness.path().join("s-data");
    let mut server =
        harness.start_server_at("s", "127.0.0.1:0", &data, Some(&client_token), &server_args);
    server.ca_file = Some(pki.ca.clone());
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // The server registered over TLS, advertising its https:// URL.
    let servers_args = [
        "servers",
        "--master",
        &master.url,
        "--token-file",
        &client_arg,
        "--ca-file",
        &ca,
        "--json",
    ];
    wait_until(
        harness.path(),
        "the master to list the server's https:// URL",
        || {
            let run = run_kiln(harness.path(), &servers_args, &[]);
            (run.code == 0 && run.stdout.contains(&format!("\"{}\"", server.url))).then_some(())
        },
        || format!("{:?}", run_kiln(harness.path(), &servers_args, &[])),
    );

    // The client knows only the master, and trusts the CA.
    let client = harness.start_client_with_args(
        "c1",
        &[
            "client".into(),
            "--master".into(),
            master.url.clone(),
            "--ca-file".into(),
            ca.clone(),
            "--id".into(),
            "c1".into(),
            "--include".into(),
            "*".into(),
            "--token-file".into(),
            client_arg.clone(),
            "--wait-secs".into(),
            "5".into(),
        ],
    );
    let build = server.submit(&write_build(
        &harness.mkdir("b"),
        "950",
        &[
            Job::new("ok", "PRO"),
            Job::new("nosy", "PRO").install("env\n"),
        ],
    ));
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("kiln wait {build} should exit 0 (all finished): {waited:?}")
    });
    let release_dir = harness.mkdir("release");
    let released = server.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(released.code == 0, || {
        format!("kiln release {build} failed: {released:?}")
    });
    let build_dir = release_dir.join(&build);
    let sums = read(&build_dir.join("SHA256SUMS"));
    let mut n_images = 0;
    for line in sums.lines() {
        let (hash, path) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("SHA256SUMS line is `HASH  PATH`: {line:?}"));
        assert_eq!(sha256_hex(&build_dir.join(path)), hash, "{path}");
        n_images += 1;
    }
    assert_eq!(n_images, 2, "both images are released: {sums}");

    // A caller that does not trust the CA is refused, and told why.
    let admin = server.admin_token_file.display().to_string();
    let other_ca = pki.other_ca.display().to_string();
    for (what, extra) in [
        ("no --ca-file", vec![]),
        ("another CA", vec!["--ca-file", other_ca.as_str()]),
    ] {
        let mut args = vec!["status", "--server", &server.url, "--token-file", &admin];
        args.extend(&extra);
        let refused = run_kiln(harness.path(), &args, &[]);
        assert_eq!(refused.code, 2, "{what}: {refused:?}");
        assert!(
            refused.stderr.contains("certificate is not trusted"),
            "{what}: {refused:?}"
        );
        let mut args = vec![
            "servers",
            "--master",
            &master.url,
            "--token-file",
            &client_arg,
        ];
        args.extend(&extra);
        let refused = run_kiln(harness.path(), &args, &[]);
        assert_eq!(refused.code, 2, "{what}: {refused:?}");
        assert!(
            refused.stderr.contains("certificate is not trusted"),
            "{what}: {refused:?}"
        );
    }
    let mut untrusting = harness.start_client_with_args(
        "untrusting",
        &[
            "client".into(),
            "--server".into(),
            server.url.clone(),
            "--id".into(),
            "untrusting".into(),
            "--include".into(),
            "*".into(),
            "--token-file".into(),
            client_arg.clone(),
        ],
    );
    let untrusting_log = harness.path().join("client-untrusting.log");
    wait_until(
        harness.path(),
        "the untrusting client to say the certificate is not trusted",
        || {
            read(&untrusting_log)
                .contains("certificate is not trusted")
                .then_some(())
        },
        || read(&untrusting_log),
    );
    untrusting.process.kill();

    // The dashboard's session cookie is Secure over TLS, besides HttpOnly and
    // SameSite=Strict.
    let cookie = dashboard_login_cookie(&server.url, &pki.ca, &read(&server.admin_token_file));
    for attribute in ["; Secure", "; HttpOnly", "; SameSite=Strict"] {
        assert!(
            cookie.contains(attribute),
            "the session cookie over TLS lacks {attribute:?}: {cookie}"
        );
    }

    // Plain HTTP to the TLS port is turned away at once.
    let plain_url = server.url.replacen("https://", "http://", 1);
    let plain = common::http(&plain_url, "GET", "/v1/health", &[], None);
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    let plain = run_kiln(
        harness.path(),
        &["status", "--server", &plain_url, "--token-file", &admin],
        &[],
    );
    assert_eq!(plain.code, 2, "{plain:?}");

    // A peer that connects and says nothing holds up no one else.
    let address = server.url.trim_start_matches("https://");
    let _silent = std::net::TcpStream::connect(address).expect("connecting to the server");

    // The server serves on, and everything an operator or a log reader sees is free
    // of credentials.
    let mut seen = Vec::new();
    for args in [
        vec!["events", build.as_str(), "--json"],
        vec!["status", build.as_str(), "--json"],
        vec!["logs", "950/ok"],
        vec!["logs", "950/nosy"],
        vec!["clients", "--json"],
    ] {
        let run = server.kiln(&args);
        assert_eq!(run.code, 0, "kiln {args:?}: {run:?}");
        seen.push((format!("kiln {}", args.join(" ")), run.stdout + &run.stderr));
    }
    assert!(
        seen[3].1.contains("KILN_JOB_ID=nosy"),
        "the nosy job printed its environment: {}",
        seen[3].1
    );
    let logs = common::read_logs(harness.path());
    assert!(
        logs.len() >= 4,
        "the master, server and client logs were read"
    );
    let server_log = &logs
        .iter()
        .find(|(name, _)| name.ends_with("server-s.log"))
        .expect("the server's log")
        .1;
    assert!(
        server_log.contains("TLS handshake failed"),
        "the server logged the refused handshakes at debug level: {server_log}"
    );
    seen.extend(logs);
    // The secret the client enrolled with over TLS, as kept and as sent.
    let own = client.auth_for(&server);
    let own_secret = {
        use base64::Engine;
        let encoded = own.trim_start_matches("Basic ");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        let decoded = String::from_utf8(decoded).expect("utf-8");
        decoded.split_once(':').expect("id:secret").1.to_owned()
    };
    let secrets = [
        ("client's own", own_secret),
        (
            "client's own (as sent)",
            own.trim_start_matches("Basic ").to_owned(),
        ),
        ("admin", read(&server.admin_token_file).trim().to_owned()),
        ("client", read(&client_token).trim().to_owned()),
        ("server", read(&server_token).trim().to_owned()),
        (
            "master admin",
            read(&master.admin_token_file).trim().to_owned(),
        ),
    ];
    common::assert_no_secret_in(&secrets, &seen);
}

#[test]
fn tls_cert_and_key_come_in_pairs() {
    let harness = Harness::new("tls-pairs");
    let pki = Pki::new(harness.path());
    let data = harness.path().join("data").display().to_string();
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    for role in ["server", "master"] {
        let run = run_kiln(
            harness.path(),
            &[
                role,
                "--listen",
                "127.0.0.1:0",
                "--data",
                &data,
                "--tls-cert",
                &cert,
            ],
            &[],
        );
        assert_eq!(run.code, 2, "{role} --tls-cert alone: {run:?}");
        assert!(run.stderr.contains("--tls-key"), "{role}: {run:?}");
        let run = run_kiln(
            harness.path(),
            &[
                role,
                "--listen",
                "127.0.0.1:0",
                "--data",
                &data,
                "--tls-key",
                &key,
            ],
            &[],
        );
        assert_eq!(run.code, 2, "{role} --tls-key alone: {run:?}");
        assert!(run.stderr.contains("--tls-cert"), "{role}: {run:?}");
        // The key where the certificate belongs: the file is named.
        let run = run_kiln(
            harness.path(),
            &[
                role,
                "--listen",
                "127.0.0.1:0",
                "--data",
                &data,
                "--tls-cert",
                &key,
                "--tls-key",
                &key,
            ],
            &[],
        );
        assert_ne!(run.code, 0, "{role} with a key for a certificate: {run:?}");
        assert!(
            run.stderr
                .contains(&format!("no certificate found in {key}")),
            "{role}: {run:?}"
        );
    }
}

/// The `Set-Cookie` of a dashboard login with the admin token, over HTTPS trusting
/// `ca_file`.
fn dashboard_login_cookie(url: &str, ca_file: &Path, admin_token: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_file).expect("the CA file"))
            .expect("the CA certificate");
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .expect("an HTTPS client");
        let answer = http
            .post(format!("{url}/ui/login"))
            .json(&serde_json::json!({ "token": admin_token.trim() }))
            .send()
            .await
            .expect("POST /ui/login");
        assert_eq!(answer.status(), 200, "the admin token logs in over TLS");
        answer
            .headers()
            .get("set-cookie")
            .and_then(|value| value.to_str().ok())
            .expect("a Set-Cookie header")
            .to_owned()
    })
}
