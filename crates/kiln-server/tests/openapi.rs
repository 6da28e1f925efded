//! The API's OpenAPI description: built from the route table, committed as
//! `docs/openapi.json`, served at `GET /v1/openapi.json`, and true to what the server
//! answers. The regression tests at the end pin what checking the live server against
//! the description (schemathesis, `.ci/api-check`) found.

use kiln_server::http::openapi::{security_of, to_json};
use kiln_server::http::{endpoints, openapi, Access};
use kiln_server::{Server, ServerConfig};
use serde_json::Value;
use std::path::PathBuf;

/// Where the committed description lives.
fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

/// The description as JSON, to look into.
fn document() -> Value {
    serde_json::from_str(&to_json(&openapi())).expect("the description is JSON")
}

#[test]
fn docs_openapi_json_is_the_description_the_route_table_makes() {
    let made = to_json(&openapi());
    // KILN_BLESS=1 writes it, as `kiln openapi --out docs/openapi.json` does.
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(committed_path(), &made).expect("writing docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == made,
        "docs/openapi.json is stale: the route table describes the API otherwise. Write it \
         again with `cargo run -p kiln -- openapi --out docs/openapi.json` (or \
         KILN_BLESS=1 cargo test -p kiln-server --test openapi) and commit it"
    );
}

#[test]
fn only_the_dashboard_s_rows_are_left_out_of_the_description() {
    let document = document();
    let paths = document["paths"].as_object().expect("paths");
    for endpoint in endpoints().iter().filter(|endpoint| !endpoint.described) {
        assert!(
            endpoint.path == "/" || endpoint.path.starts_with("/ui/"),
            "{} {} is left out of the description but is not the dashboard's",
            endpoint.method,
            endpoint.path
        );
        assert!(
            !paths.contains_key(endpoint.path),
            "{} is described",
            endpoint.path
        );
        assert_eq!(endpoint.access, Access::Open, "{}", endpoint.path);
    }
}

#[test]
fn every_route_of_the_table_is_described_with_its_method_and_security() {
    let document = document();
    let paths = document["paths"].as_object().expect("paths");
    let table = endpoints();
    for endpoint in table.iter().filter(|endpoint| endpoint.described) {
        let method = endpoint.method.as_str().to_ascii_lowercase();
        let operation = &paths
            .get(endpoint.path)
            .unwrap_or_else(|| panic!("{} is not described", endpoint.path))[&method];
        assert!(
            operation.is_object(),
            "{} {} is not described",
            endpoint.method,
            endpoint.path
        );
        let security: Vec<Vec<String>> = operation["security"]
            .as_array()
            .expect("every operation says who may call it")
            .iter()
            .map(|requirement| {
                requirement
                    .as_object()
                    .expect("a requirement")
                    .keys()
                    .cloned()
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<String>> = security_of(endpoint.access)
            .into_iter()
            .map(|schemes| schemes.into_iter().map(str::to_owned).collect())
            .collect();
        assert_eq!(
            security, expected,
            "{} {}: security",
            endpoint.method, endpoint.path
        );
        let parameters = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has = |place: &str, name: &str| {
            parameters
                .iter()
                .any(|parameter| parameter["in"] == place && parameter["name"] == name)
        };
        for name in endpoint
            .path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
        {
            assert!(
                has("path", name),
                "{} {}: no path parameter {name}",
                endpoint.method,
                endpoint.path
            );
        }
        assert_eq!(
            has("header", kiln_proto::LEASE_HEADER),
            endpoint.access == Access::Holder || endpoint.path == "/v1/builds/{build}/files",
            "{} {}: the lease header",
            endpoint.method,
            endpoint.path
        );
        let responses = operation["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|status| status.starts_with('2')),
            "{} {}: no success answer",
            endpoint.method,
            endpoint.path
        );
        if endpoint.access != Access::Open {
            assert!(
                responses.contains_key("401"),
                "{} {}: 401 is not listed",
                endpoint.method,
                endpoint.path
            );
        }
    }
    // And nothing is described that the router does not serve.
    let n_operations: usize = paths
        .values()
        .map(|item| item.as_object().expect("a path item").len())
        .sum();
    let n_described = table.iter().filter(|endpoint| endpoint.described).count();
    assert_eq!(n_operations, n_described);
}

#[test]
fn every_refusal_is_an_api_error_whose_codes_are_listed() {
    let document = document();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            for (status, response) in operation["responses"].as_object().expect("responses") {
                if !(status.starts_with('4') || status.starts_with('5')) || status == "416" {
                    continue;
                }
                let schema = &response["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/ApiError",
                    "{method} {path} {status}"
                );
                let codes = response["x-kiln-codes"].as_array().expect("the codes");
                assert!(!codes.is_empty(), "{method} {path} {status}: no code");
            }
        }
    }
}

/// A server on loopback with a fresh data directory, and its admin token.
struct Running {
    url: String,
    admin: String,
    _data: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start() -> Running {
        let data = tempfile::tempdir().expect("a temporary directory");
        let server = Server::open(ServerConfig::new(data.path().to_owned()))
            .await
            .expect("the server opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        let admin = std::fs::read_to_string(data.path().join("admin.token"))
            .expect("the admin token")
            .trim()
            .to_owned();
        Running {
            url,
            admin,
            _data: data,
            stop: Some(stop),
            serving,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.serving).await;
    }
}

#[tokio::test]
async fn the_server_serves_its_description_without_a_credential() {
    let server = Running::start().await;
    let response = reqwest::get(format!("{}/v1/openapi.json", server.url))
        .await
        .expect("GET /v1/openapi.json");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content type"
    );
    let served: Value = response.json().await.expect("a JSON body");
    if let Some(difference) = first_difference(&served, &document(), "") {
        panic!("the server serves another description than `openapi()`: {difference}");
    }
    server.stop().await;
}

/// Where two JSON values first differ, as a JSON pointer and the two values there.
fn first_difference(left: &Value, right: &Value, at: &str) -> Option<String> {
    match (left, right) {
        (Value::Object(left), Value::Object(right)) => {
            left.keys().chain(right.keys()).find_map(|key| {
                let here = format!("{at}/{key}");
                match (left.get(key), right.get(key)) {
                    (Some(left), Some(right)) => first_difference(left, right, &here),
                    (left, right) => Some(format!("{here}: {left:?} != {right:?}")),
                }
            })
        }
        (Value::Array(left), Value::Array(right)) if left.len() == right.len() => left
            .iter()
            .zip(right)
            .enumerate()
            .find_map(|(idx, (left, right))| first_difference(left, right, &format!("{at}/{idx}"))),
        _ if left == right => None,
        _ => Some(format!("{at}: {left} != {right}")),
    }
}

// What checking the live server against the description found. Each test makes the
// call that showed it and asserts both the answer and that the description lists it.

/// The codes the description lists for `status` of `method path`.
fn described_codes(method: &str, path: &str, status: u16) -> Vec<String> {
    let document = document();
    let response =
        &document["paths"][path][method.to_ascii_lowercase()]["responses"][status.to_string()];
    response["x-kiln-codes"]
        .as_array()
        .map(|codes| {
            codes
                .iter()
                .map(|code| code.as_str().expect("a code").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that `response` is a refusal with `status` and `code`, and that the
/// description lists that code for that status of `method path`.
async fn assert_refused_as_described(
    response: reqwest::Response,
    method: &str,
    path: &str,
    status: u16,
    code: &str,
) {
    assert_eq!(response.status(), status, "{method} {path}");
    let body: Value = response.json().await.expect("a JSON refusal");
    assert_eq!(body["code"], code, "{method} {path}: {body}");
    assert!(
        body["error"].is_string(),
        "{method} {path}: a refusal says what was wrong: {body}"
    );
    let listed = described_codes(method, path, status);
    assert!(
        listed.iter().any(|listed| listed == code),
        "{method} {path} answers {status} {code}, which its description does not list \
         (it lists {listed:?})"
    );
}

impl Running {
    /// A client of this server with its own secret, enrolled by the admin.
    async fn enroll(&self, id: &str) -> (String, String) {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/enroll", self.url))
            .bearer_auth(&self.admin)
            .json(&serde_json::json!({ "client_id": id }))
            .send()
            .await
            .expect("POST /v1/enroll");
        assert_eq!(response.status(), 201);
        let secret: Value = response.json().await.expect("a secret");
        (
            id.to_owned(),
            secret["secret"].as_str().expect("a secret").to_owned(),
        )
    }
}

#[tokio::test]
async fn a_session_naming_a_client_id_that_is_not_a_name_is_refused_bad_name_as_described() {
    let server = Running::start().await;
    let (id, secret) = server.enroll("probe").await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/session", server.url))
        .query(&[("client_id", "G7ßÔ§ª𢦒")])
        .basic_auth(&id, Some(&secret))
        .header("content-type", "application/octet-stream")
        .body("")
        .send()
        .await
        .expect("POST /v1/session");
    assert_refused_as_described(response, "POST", "/v1/session", 400, "bad_name").await;
    server.stop().await;
}

/// What schemathesis's `positive_data_acceptance` check found: requests the description
/// allowed that the server refuses. The description now states each rule (a pattern,
/// a length, a count); each case asserts the rule is there and that a request breaking
/// it is refused as described.
#[tokio::test]
async fn what_the_server_refuses_the_description_rules_out() {
    let server = Running::start().await;
    let (id, secret) = server.enroll("probe").await;
    let document = document();
    let schema = |name: &str| document["components"]["schemas"][name].clone();
    let http = reqwest::Client::new();
    let post = |path: &str| http.post(format!("{}{path}", server.url));

    // An empty lease header is no lease.
    let lease = document["paths"]["/v1/jobs/{build}/{job}/heartbeat"]["post"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|parameter| parameter["name"] == kiln_proto::LEASE_HEADER)
        .expect("the lease header")
        .clone();
    assert_eq!(lease["schema"]["minLength"], 1);
    let response = post("/v1/jobs/4000/disk/heartbeat")
        .basic_auth(&id, Some(&secret))
        .header(kiln_proto::LEASE_HEADER, "")
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("a heartbeat");
    assert_refused_as_described(
        response,
        "POST",
        "/v1/jobs/{build}/{job}/heartbeat",
        400,
        "no_lease",
    )
    .await;

    // A claim names its client with a safe name, and takes at least one config type.
    let claim_request = schema("ClaimRequest");
    assert_eq!(
        claim_request["properties"]["client_id"]["pattern"],
        kiln_server::http::openapi::SAFE_NAME_PATTERN
    );
    assert_eq!(claim_request["properties"]["include"]["minItems"], 1);
    for (path, body, code) in [
        (
            "/v1/claim",
            serde_json::json!({"client_id": "", "include": ["*"], "wait_secs": 0}),
            "bad_name",
        ),
        (
            "/v1/offer",
            serde_json::json!({"client_id": "", "include": ["*"], "wait_secs": 0}),
            "bad_name",
        ),
        (
            "/v1/claim",
            serde_json::json!({"client_id": id, "include": [], "wait_secs": 0}),
            "no_include",
        ),
    ] {
        let response = post(path)
            .basic_auth(&id, Some(&secret))
            .json(&body)
            .send()
            .await
            .expect("a claim");
        assert_refused_as_described(response, "POST", path, 400, code).await;
    }

    // Enrolling names a safe client id.
    assert_eq!(
        schema("EnrollRequest")["properties"]["client_id"]["pattern"],
        kiln_server::http::openapi::SAFE_NAME_PATTERN
    );
    let response = post("/v1/enroll")
        .bearer_auth(&server.admin)
        .json(&serde_json::json!({"client_id": ""}))
        .send()
        .await
        .expect("an enrollment");
    assert_refused_as_described(response, "POST", "/v1/enroll", 400, "bad_name").await;

    // The join token is rotated or disabled, nothing else.
    assert_eq!(
        schema("JoinTokenRequest")["properties"]["action"]["pattern"],
        "^(rotate|disable)$"
    );
    let response = post("/v1/join-token")
        .bearer_auth(&server.admin)
        .json(&serde_json::json!({"action": ""}))
        .send()
        .await
        .expect("a join-token change");
    assert_refused_as_described(response, "POST", "/v1/join-token", 400, "bad_action").await;
    server.stop().await;
}
