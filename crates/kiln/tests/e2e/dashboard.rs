//! The dashboard in a real browser: headless Chromium (Debian's `chromium` package)
//! driven by playwright-core (npm) through `browser/dashboard.mjs`, against a real
//! server and real clients. The script checks login, live job states with no reload,
//! the timeline's bars and client rows, a reclaimed run, the growing log tail,
//! restart from the page, the CSRF refusal, a server restart under an open page,
//! both screen sizes, logout and a clean console; it takes the screenshots that
//! `docs/dashboard.md` shows.
//!
//! Needs `/usr/bin/chromium` and playwright-core installed with npm under
//! `target/node` (`.ci/run` installs both), or in `KILN_PLAYWRIGHT_DIR`.

use crate::common::{wait_for_gate, write_build, Client, Harness, Job};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where playwright-core is installed (the directory holding `node_modules`).
fn playwright_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_PLAYWRIGHT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/node"));
    let package = dir.join("node_modules/playwright-core/package.json");
    assert!(
        package.exists(),
        "playwright-core is not installed in {}: run `npm install --prefix target/node \
         playwright-core` (as .ci/run does), or set KILN_PLAYWRIGHT_DIR",
        dir.display()
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium), \
         as .ci/run does"
    );
    dir.canonicalize().expect("the playwright directory")
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let playwright = playwright_dir();
    let harness = Harness::new("dashboard");
    let server_args = ["--lease-secs", "3", "--heartbeat-secs", "1"];
    let mut server = harness.start_server("main", &server_args);
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1700",
        &[
            Job::new("log", "PRO")
                .install("for i in $(seq 1 40); do echo \"building part $i\"; sleep 0.25; done\n")
                .timeout(600),
            Job::new("gated", "PRO")
                .install(&wait_for_gate(&gate))
                .timeout(600),
            Job::new("victim", "SRV")
                .install(&wait_for_gate(&gate))
                .timeout(600)
                .max_attempts(3),
        ],
    ));
    let done = harness.mkdir("done");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let screenshots = std::env::var_os("KILN_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| harness.mkdir("screenshots"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/browser/dashboard.mjs");
    let mut node = Command::new("node")
        .arg(&script)
        .env("KILN_PLAYWRIGHT_DIR", &playwright)
        .env("KILN_URL", &server.url)
        .env("KILN_ADMIN_TOKEN", server.admin_token())
        .env("KILN_BUILD", &build)
        .env("KILN_GATE", &gate)
        .env("KILN_DONE_DIR", &done)
        .env("KILN_SCREENSHOTS", &screenshots)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run node ({err}): install Node.js"));
    let stdout = BufReader::new(node.stdout.take().expect("node's stdout"));
    let mut clients: Vec<Client> = Vec::new();
    let mut said = Vec::new();
    for line in stdout.lines() {
        let line = line.expect("reading node's output");
        said.push(line.clone());
        match line.as_str() {
            "@start-clients" => {
                clients.push(harness.start_client(
                    "runner",
                    &[&server],
                    &["--include", "PRO", "--slots", "2"],
                ));
                clients.push(harness.start_client("doomed", &[&server], &["--include", "SRV"]));
            }
            "@kill-doomed" => {
                let doomed = clients
                    .iter_mut()
                    .find(|client| client.id == "doomed")
                    .expect("the doomed client");
                doomed.process.kill();
                clients.push(harness.start_client("rescuer", &[&server], &["--include", "SRV"]));
            }
            "@restart-server" | "@restart-server-again" => {
                // SIGKILL, then the same address and data, as a crash and a restart.
                let listen = server.url.trim_start_matches("http://").to_owned();
                let data = server.data.clone();
                let token_file = server.client_token_file.clone();
                drop(server);
                server = harness.start_server_at(
                    "restarted",
                    &listen,
                    &data,
                    Some(&token_file),
                    &server_args,
                );
            }
            _ => continue,
        }
        std::fs::write(done.join(line.trim_start_matches('@')), b"").expect("saying done");
    }
    let output = node.wait_with_output().expect("waiting for node");
    let stderr = String::from_utf8_lossy(&output.stderr);
    harness.check(output.status.success(), || {
        format!(
            "the browser checks failed ({}):\n{}\n{stderr}",
            output.status,
            said.join("\n")
        )
    });
    for check in [
        "login is required",
        "a wrong token is refused",
        "restart from the page",
        "server restart under an open page",
        "stays ended across a server restart",
        "reclaimed",
        "log tail grows",
        "one bar per run",
        "uploading",
        "no reload",
        "no errors in the browser console",
        "phone",
    ] {
        assert!(
            said.iter()
                .any(|line| line.starts_with("ok:") && line.contains(check)),
            "no check passed saying {check:?}:\n{}",
            said.join("\n")
        );
    }
    // KILN_SCREENSHOTS=docs writes the pictures docs/dashboard.md shows.
    for name in [
        "farm", "build", "job", "clients", "storage", "phone", "login",
    ] {
        let shot = screenshots.join(format!("dashboard-{name}.png"));
        let bytes = std::fs::read(&shot).unwrap_or_else(|err| panic!("{}: {err}", shot.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is a PNG", shot.display());
        assert!(
            docs.join(format!("dashboard-{name}.png")).exists(),
            "docs/dashboard-{name}.png is not committed (KILN_SCREENSHOTS=docs writes it)"
        );
    }
}
