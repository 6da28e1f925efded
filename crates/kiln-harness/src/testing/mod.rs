//! The end-to-end tests' support: each test drives the real `kiln` binary as
//! real processes over loopback HTTP (or HTTPS: [`Harness::with_env`] and the
//! servers' and masters' `ca_file` let a test run a farm with TLS).
//!
//! A [`Harness`] owns a test's temporary directory; every process it starts logs into
//! a `*.log` file there, and every failed wait panics with those logs attached.
//! [`Server`] and [`Client`] are the running processes (SIGKILLed when dropped);
//! [`Server::kiln`] runs an operator command against a server; [`http`] is a tiny
//! HTTP/1.1 client for calls the CLI does not make; [`Job`] and [`write_build`] write
//! small builds (manifest and scripts) for a test; [`TcpProxy`] stands between a client
//! and a server and can cut the network between them.

mod builds;
mod http;

pub use crate::nginx::LoadBalancer;
pub use crate::proxy::TcpProxy;
pub use crate::seaweed::*;
pub use builds::*;
pub use http::*;

use serde_json::Value;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test (see [`crate::kiln_exe`]); panics when there is none.
pub fn kiln() -> &'static Path {
    static KILN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KILN.get_or_init(|| crate::kiln_exe().unwrap_or_else(|err| panic!("{err}")))
}

/// How long any awaited condition may take before the test fails. Generous: it is a
/// bound against hangs, not a performance claim.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often a condition is checked while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How many lines of each log a failure message quotes.
const LOG_TAIL_LINES: usize = 80;

/// The seed's example build, as shipped in the repository.
pub const SEED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");

/// The last lines of every `*.log` file directly in `dir`, for failure messages.
pub fn logs_report(dir: &Path) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut report = String::new();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|err| format!("<{err}>"));
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        let _ = writeln!(
            report,
            "\n----- {} (last {} of {} lines) -----",
            path.display(),
            lines.len() - skip,
            lines.len()
        );
        for line in &lines[skip..] {
            let _ = writeln!(report, "{line}");
        }
    }
    report
}

std::thread_local! {
    /// Whether this thread's panic message already carries the logs.
    static LOGS_REPORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics with `message` and the logs of every process of the test.
pub fn fail(log_dir: &Path, message: &str) -> ! {
    LOGS_REPORTED.with(|reported| reported.set(true));
    panic!("{message}\n{}", logs_report(log_dir))
}

/// Checks `check` every [`POLL_INTERVAL`] until it returns `Some`, for up to
/// [`DEADLINE`]; on timeout panics naming `what`, with the last value `observe` gave and
/// the logs in `log_dir`.
pub fn wait_until<T>(
    log_dir: &Path,
    what: &str,
    check: impl FnMut() -> Option<T>,
    observe: impl Fn() -> String,
) -> T {
    wait_until_within(log_dir, what, DEADLINE, check, observe)
}

/// As [`wait_until`], with its own bound instead of [`DEADLINE`]: for a test whose
/// point is that a mechanism acts well before some slower one would (a lease, a grace).
pub fn wait_until_within<T>(
    log_dir: &Path,
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
    observe: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            fail(
                log_dir,
                &format!(
                    "timed out after {deadline:?} waiting for {what}; last observed: {}",
                    observe()
                ),
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether a process with this pid exists (zombies included): `kill(pid, 0)` does not
/// fail with ESRCH.
pub fn process_exists(pid: i32) -> bool {
    assert!(pid > 0, "not a process id: {pid}");
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Sends SIGKILL to every process of the group `pgid`; a group already gone is fine.
pub fn kill_process_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill has no memory-safety preconditions; pgid > 1 names one group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// The state a client's state file (`WORK/state.jsonl`) holds, if it has one.
pub fn client_state(work_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(work_dir.join(kiln_client::state::STATE_FILE)).ok()?;
    kiln_client::state::parse_state_lines(&text)
}

/// The process groups a client's state file says its jobs' steps run in.
pub fn state_file_pgids(work_dir: &Path) -> Vec<i32> {
    let Some(state) = client_state(work_dir) else {
        return Vec::new();
    };
    state["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| job["pgid"].as_i64())
        .filter_map(|pgid| i32::try_from(pgid).ok())
        .collect()
}

/// A child process that is SIGKILLed and reaped when dropped.
pub struct ProcessGuard {
    child: Child,
    /// A client's work directory: the process groups its state file names are killed
    /// too, so that no step outlives the test.
    work_dir: Option<PathBuf>,
}

impl ProcessGuard {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILLs the process (not its steps) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        unsafe { libc::kill(self.pid(), signal) };
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
        if let Some(work_dir) = &self.work_dir {
            for pgid in state_file_pgids(work_dir) {
                kill_process_group(pgid);
            }
        }
    }
}

/// What a finished `kiln` command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    /// The exit code; -1 when a signal ended it.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last non-empty stdout line.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("")
            .trim()
    }
}

/// Runs `kiln ARGS` with `envs`, capturing its output; panics (with the logs in
/// `log_dir`) if it runs past [`DEADLINE`].
pub fn run_kiln(log_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut child = Command::new(kiln())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", kiln().display()));
    let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
    let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                fail(
                    log_dir,
                    &format!("`kiln {}` ran for more than {DEADLINE:?}", args.join(" ")),
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => panic!("waiting for `kiln {}`: {err}", args.join(" ")),
        }
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A test's temporary directory, where its processes' logs, data and builds live.
/// When a test fails on a plain `assert!`, dropping the harness prints the logs.
pub struct Harness {
    dir: tempfile::TempDir,
    /// Environment variables for every server, master and client this starts.
    envs: Vec<(String, String)>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() && !LOGS_REPORTED.with(std::cell::Cell::get) {
            eprintln!("logs of the failed test:{}", logs_report(self.path()));
        }
    }
}

impl Harness {
    pub fn new(test_name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-e2e-{test_name}-"))
            .tempdir()
            .expect("creating the test's temporary directory");
        Harness {
            dir,
            envs: Vec::new(),
        }
    }

    /// Sets `name=value` in the environment of every server, master and client this
    /// harness starts from now on (`RUST_LOG=debug`, say).
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Panics with `message` and every process's log.
    pub fn fail(&self, message: &str) -> ! {
        fail(self.path(), message)
    }

    /// Asserts `condition`, else fails with `message` and the logs.
    pub fn check(&self, condition: bool, message: impl FnOnce() -> String) {
        if !condition {
            self.fail(&message());
        }
    }

    /// A fresh directory `name` under the test's directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::create_dir_all(&path).expect("creating a directory");
        path
    }

    /// Starts `kiln server --listen 127.0.0.1:0 --data DIR/NAME-data EXTRA...`.
    pub fn start_server(&self, name: &str, extra: &[&str]) -> Server {
        self.start_server_with_client_token(name, None, extra)
    }

    /// As [`Harness::start_server`], with `--client-token-file` so that several
    /// servers share one client credential.
    pub fn start_server_with_client_token(
        &self,
        name: &str,
        client_token_file: Option<&Path>,
        extra: &[&str],
    ) -> Server {
        let data = self.path().join(format!("{name}-data"));
        self.start_server_at(name, "127.0.0.1:0", &data, client_token_file, extra)
    }

    /// Starts `kiln server --listen LISTEN --data DATA EXTRA...` (to restart a server
    /// where it was), logging into `server-NAME.log`.
    pub fn start_server_at(
        &self,
        name: &str,
        listen: &str,
        data: &Path,
        client_token_file: Option<&Path>,
        extra: &[&str],
    ) -> Server {
        let data = data.to_path_buf();
        let log_path = self.path().join(format!("server-{name}.log"));
        let log = File::create(&log_path).expect("creating the server log");
        let mut command = Command::new(kiln());
        command
            .args(["server", "--listen", listen, "--data"])
            .arg(&data);
        if let Some(token_file) = client_token_file {
            command.arg("--client-token-file").arg(token_file);
        }
        command
            .args(extra)
            .env_remove("KILN_SERVER")
            .env_remove("KILN_TOKEN")
            .stderr(log);
        let (guard, url) = self.spawn_listening("server", name, command);
        let client_token = client_token_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data.join("client.token"));
        Server {
            name: name.to_owned(),
            url,
            admin_token_file: data.join("admin.token"),
            client_token_file: client_token,
            data,
            ca_file: None,
            log_dir: self.path().to_owned(),
            process: guard,
            probe: std::sync::OnceLock::new(),
        }
    }

    /// Spawns `command` (a `kiln server` or `kiln master` with its stderr set), keeps
    /// reading its stdout for its whole life so that it never blocks on a full pipe,
    /// and returns it with the loopback URL its first line gives.
    fn spawn_listening(
        &self,
        role: &str,
        name: &str,
        mut command: Command,
    ) -> (ProcessGuard, String) {
        let mut child = command
            .envs(self.envs.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {} {role}: {err}", kiln().display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = ProcessGuard {
            child,
            work_dir: None,
        };
        let (line_tx, line_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = line_tx.send(line);
            }
        });
        let first = line_rx.recv_timeout(DEADLINE).unwrap_or_else(|err| {
            fail(
                self.path(),
                &format!("{role} {name} printed no URL on stdout ({err})"),
            )
        });
        let url = first
            .strip_prefix(&format!("kiln {role} listening on "))
            .unwrap_or_else(|| {
                fail(
                    self.path(),
                    &format!("{role} {name}'s stdout line is not the URL line: {first:?}"),
                )
            })
            .trim()
            .to_owned();
        if !url.starts_with("http://127.0.0.1:") && !url.starts_with("https://127.0.0.1:") {
            fail(
                self.path(),
                &format!("{role} {name} is not on loopback: {url}"),
            );
        }
        (guard, url)
    }

    /// Starts `kiln client --server URL... --id ID --work DIR/ID-work --token-file
    /// (the first server's client token) EXTRA...`.
    pub fn start_client(&self, id: &str, servers: &[&Server], extra: &[&str]) -> Client {
        assert!(!servers.is_empty(), "a client needs a server");
        let mut args: Vec<String> = vec!["client".into()];
        for server in servers {
            args.push("--server".into());
            args.push(server.url.clone());
        }
        args.extend(["--id".into(), id.into()]);
        args.push("--token-file".into());
        args.push(servers[0].client_token_file.display().to_string());
        args.extend(extra.iter().map(|arg| arg.to_string()));
        self.start_client_with_args(id, &args)
    }

    /// Starts `kiln ARGS --work DIR/ID-work` as the client `id`.
    pub fn start_client_with_args(&self, id: &str, args: &[String]) -> Client {
        self.start_client_with_env(id, args, &[])
    }

    /// As [`Harness::start_client_with_args`], with these environment variables set.
    pub fn start_client_with_env(
        &self,
        id: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Client {
        let work_dir = self.path().join(format!("{id}-work"));
        let log_path = self.path().join(format!("client-{id}.log"));
        // Appended to, so that a client restarted under the same id keeps both logs.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("opening the client log");
        let child = Command::new(kiln())
            .args(args)
            .arg("--work")
            .arg(&work_dir)
            .env_remove("KILN_SERVER")
            .env_remove("KILN_TOKEN")
            .envs(self.envs.iter().map(|(name, value)| (name, value)))
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {} client: {err}", kiln().display()));
        Client {
            id: id.to_owned(),
            work_dir: work_dir.clone(),
            process: ProcessGuard {
                child,
                work_dir: Some(work_dir),
            },
        }
    }
}

/// A running `kiln server`.
pub struct Server {
    pub name: String,
    /// `http://127.0.0.1:PORT`, or `https://` when it serves TLS.
    pub url: String,
    pub data: PathBuf,
    /// The CA file operator commands trust it by (`--ca-file`), for a server with TLS.
    pub ca_file: Option<PathBuf>,
    pub admin_token_file: PathBuf,
    pub client_token_file: PathBuf,
    log_dir: PathBuf,
    pub process: ProcessGuard,
    /// The Authorization header of a client enrolled by the test itself.
    probe: std::sync::OnceLock<String>,
}

impl Server {
    /// Panics with `message` and the logs.
    pub fn fail(&self, message: &str) -> ! {
        fail(&self.log_dir, message)
    }

    pub fn admin_token(&self) -> String {
        read_token(&self.admin_token_file)
    }

    pub fn client_token(&self) -> String {
        read_token(&self.client_token_file)
    }

    /// Runs `kiln ARGS --server URL --token-file ADMIN_TOKEN` (and `--ca-file` when
    /// the server has one).
    pub fn kiln(&self, args: &[&str]) -> Run {
        let admin = self.admin_token_file.display().to_string();
        let ca_file = self.ca_file.as_ref().map(|path| path.display().to_string());
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &self.url, "--token-file", &admin]);
        if let Some(ca_file) = &ca_file {
            all.extend(["--ca-file", ca_file]);
        }
        run_kiln(&self.log_dir, &all, &[])
    }

    /// `kiln submit MANIFEST`, which must succeed; returns the build number it printed.
    pub fn submit(&self, manifest: &Path) -> String {
        let run = self.kiln(&["submit", &manifest.display().to_string()]);
        if run.code != 0 {
            self.fail(&format!(
                "kiln submit {} exited {}: {run:?}",
                manifest.display(),
                run.code
            ));
        }
        run.last_line().to_owned()
    }

    /// `kiln status BUILD --json`, parsed.
    pub fn status_json(&self, build: &str) -> Vec<Value> {
        let run = self.kiln(&["status", build, "--json"]);
        if run.code != 0 {
            self.fail(&format!("kiln status {build} --json failed: {run:?}"));
        }
        match serde_json::from_str::<Value>(&run.stdout) {
            Ok(Value::Array(jobs)) => jobs,
            _ => self.fail(&format!(
                "kiln status {build} --json did not print a JSON array: {run:?}"
            )),
        }
    }

    /// One job from `kiln status BUILD --json`.
    pub fn status_of(&self, build: &str, job: &str) -> Value {
        self.status_json(build)
            .into_iter()
            .find(|entry| entry["id"] == job)
            .unwrap_or_else(|| self.fail(&format!("kiln status {build} lists no job {job}")))
    }

    /// GET `path` with the admin credential over plain HTTP.
    pub fn get(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.admin_token());
        http(&self.url, "GET", path, &[("Authorization", &auth)], None)
            .unwrap_or_else(|err| self.fail(&format!("GET {path}: {err}")))
    }

    /// The jobs of `build` as the API lists them (cheaper than spawning `kiln status`
    /// while polling).
    pub fn jobs(&self, build: &str) -> Vec<Value> {
        let response = self.get(&format!("/v1/builds/{build}/jobs"));
        if response.status != 200 {
            self.fail(&format!("listing the jobs of {build}: {response:?}"));
        }
        match serde_json::from_str(&response.body) {
            Ok(Value::Array(jobs)) => jobs,
            _ => self.fail(&format!(
                "the jobs of {build} are not a JSON array: {response:?}"
            )),
        }
    }

    /// One job as the API shows it.
    pub fn job(&self, build: &str, job: &str) -> Value {
        let response = self.get(&format!("/v1/jobs/{build}/{job}"));
        if response.status != 200 {
            self.fail(&format!("reading job {build}/{job}: {response:?}"));
        }
        serde_json::from_str(&response.body)
            .unwrap_or_else(|err| self.fail(&format!("job {build}/{job}: {err}: {response:?}")))
    }

    /// Waits until job `build/job` satisfies `condition`; returns it then.
    pub fn wait_for_job(
        &self,
        build: &str,
        job: &str,
        what: &str,
        condition: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(
            &self.log_dir,
            &format!("job {build}/{job} on server {}: {what}", self.name),
            || Some(self.job(build, job)).filter(|value| condition(value)),
            || format!("{:#}", self.job(build, job)),
        )
    }

    /// Waits until every job of `build` is in a final state.
    pub fn wait_for_build_end(&self, build: &str) -> Vec<Value> {
        wait_until(
            &self.log_dir,
            &format!("every job of build {build} on server {} to end", self.name),
            || {
                let jobs = self.jobs(build);
                let ended = jobs.iter().all(|job| {
                    matches!(
                        job["state"].as_str(),
                        Some("finished" | "failed" | "expired" | "cancelled")
                    )
                });
                ended.then_some(jobs)
            },
            || format!("{:#}", Value::Array(self.jobs(build))),
        )
    }

    /// Enrolls client `id` with the join token; its `Authorization` header.
    pub fn enroll(&self, id: &str) -> String {
        let join = format!("Bearer {}", self.client_token());
        let body = format!(r#"{{"client_id":"{id}"}}"#);
        let response = http(
            &self.url,
            "POST",
            "/v1/enroll",
            &[("Authorization", &join)],
            Some(&body),
        )
        .unwrap_or_else(|err| self.fail(&format!("enrolling {id}: {err}")));
        if response.status != 201 {
            self.fail(&format!("enrolling {id}: {response:?}"));
        }
        let answer: Value = serde_json::from_str(&response.body).expect("enroll JSON");
        basic_auth(id, answer["secret"].as_str().expect("a secret"))
    }

    /// POSTs `body` to `path` as a client of the test's own (enrolled once, holding no
    /// job) with these extra headers.
    pub fn client_post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        let auth = self.probe.get_or_init(|| self.enroll("test-probe")).clone();
        self.post_with(&auth, path, headers, body)
    }

    /// POSTs `body` to `path` as `client` (with the secret it enrolled with).
    pub fn client_post_as(
        &self,
        client: &Client,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        let auth = client.auth_for(self);
        self.post_with(&auth, path, headers, body)
    }

    /// POSTs `body` to `path` with the admin credential.
    pub fn admin_post(&self, path: &str, body: &str) -> HttpResponse {
        let auth = format!("Bearer {}", self.admin_token());
        self.post_with(&auth, path, &[], body)
    }

    fn post_with(
        &self,
        auth: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        let mut all = vec![("Authorization", auth)];
        all.extend_from_slice(headers);
        http(&self.url, "POST", path, &all, Some(body))
            .unwrap_or_else(|err| self.fail(&format!("POST {path}: {err}")))
    }
}

fn read_token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading token file {}: {err}", path.display()))
        .trim()
        .to_owned()
}

/// A running `kiln client`.
pub struct Client {
    pub id: String,
    pub work_dir: PathBuf,
    pub process: ProcessGuard,
}

impl Client {
    /// The `Authorization` header of the secret this client enrolled with at `server`
    /// (kept in `WORK/credentials`).
    pub fn auth_for(&self, server: &Server) -> String {
        let dir = self.work_dir.join("credentials");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()));
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let Ok(kept) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if kept["server"] == server.url.as_str() {
                return basic_auth(
                    kept["client_id"].as_str().expect("client_id"),
                    kept["secret"].as_str().expect("secret"),
                );
            }
        }
        panic!("client {} has no secret for {}", self.id, server.url)
    }

    /// The lease of `build/job` once it runs here, read from the client's state file.
    pub fn lease_of_running(&self, server: &Server, build: &str, job: &str) -> String {
        server.wait_for_job(build, job, "running", |value| {
            text(value, "state") == "running"
        });
        let held = wait_until(
            &server.data,
            &format!("client {} to hold {build}/{job}", self.id),
            || self.held_job(build, job),
            || format!("{:?}", self.state()),
        );
        text(&held, "lease").to_owned()
    }

    /// The client's state (`WORK/state.jsonl`), if it has one.
    pub fn state(&self) -> Option<Value> {
        client_state(&self.work_dir)
    }

    /// The state file's entry for `build/job`, if the client holds it.
    pub fn held_job(&self, build: &str, job: &str) -> Option<Value> {
        let state = self.state()?;
        state["jobs"]
            .as_array()?
            .iter()
            .find(|held| held["build"] == build && held["job"] == job)
            .cloned()
    }
}

impl Server {
    /// The build's event log as the API serves it (`GET /v1/builds/BUILD/events`).
    pub fn events(&self, build: &str) -> Vec<Value> {
        let response = self.get(&format!("/v1/builds/{build}/events"));
        if response.status != 200 {
            self.fail(&format!("reading the events of {build}: {response:?}"));
        }
        match serde_json::from_str(&response.body) {
            Ok(Value::Array(events)) => events,
            _ => self.fail(&format!(
                "the events of {build} are not a JSON array: {response:?}"
            )),
        }
    }

    /// Starts `kiln ARGS --server URL --token-file ADMIN_TOKEN` in the background (a
    /// follower, say), its stdout going to `NAME.log` and its stderr to
    /// `NAME-stderr.log` in the test's directory; returns the process and the stdout
    /// file.
    pub fn spawn_kiln(&self, name: &str, args: &[&str]) -> (ProcessGuard, PathBuf) {
        let stdout_path = self.log_dir.join(format!("{name}.log"));
        let stdout = File::create(&stdout_path).expect("creating a command's stdout file");
        let stderr = File::create(self.log_dir.join(format!("{name}-stderr.log")))
            .expect("creating a command's stderr file");
        let child = Command::new(kiln())
            .args(args)
            .arg("--server")
            .arg(&self.url)
            .arg("--token-file")
            .arg(&self.admin_token_file)
            .args(
                self.ca_file
                    .iter()
                    .flat_map(|path| [OsStr::new("--ca-file"), path.as_os_str()]),
            )
            .env_remove("KILN_SERVER")
            .env_remove("KILN_TOKEN")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start `kiln {}`: {err}", args.join(" ")));
        (
            ProcessGuard {
                child,
                work_dir: None,
            },
            stdout_path,
        )
    }
}

/// A free loopback port, for a process that must know its URL before it starts (a
/// server advertising itself to masters) or come back at the same one.
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener
        .local_addr()
        .expect("reading the bound address")
        .to_string()
}

/// A running `kiln master`.
pub struct Master {
    pub name: String,
    /// `http://127.0.0.1:PORT`, or `https://` when it serves TLS.
    pub url: String,
    pub data: PathBuf,
    pub admin_token_file: PathBuf,
    pub server_token_file: PathBuf,
    pub client_token_file: PathBuf,
    log_dir: PathBuf,
    pub process: ProcessGuard,
}

impl Harness {
    /// Starts `kiln master --listen LISTEN --data DATA EXTRA...`, logging into
    /// `master-NAME.log` (appended to, so that a restarted master keeps both logs).
    pub fn start_master_at(&self, name: &str, listen: &str, data: &Path, extra: &[&str]) -> Master {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("master-{name}.log")))
            .expect("opening the master log");
        let mut command = Command::new(kiln());
        command
            .args(["master", "--listen", listen, "--data"])
            .arg(data)
            .args(extra)
            .env_remove("KILN_TOKEN")
            .stderr(log);
        let (process, url) = self.spawn_listening("master", name, command);
        Master {
            name: name.to_owned(),
            url,
            data: data.to_owned(),
            admin_token_file: data.join("admin.token"),
            server_token_file: data.join("server.token"),
            client_token_file: data.join("client.token"),
            log_dir: self.path().to_owned(),
            process,
        }
    }

    /// Starts `kiln master --listen 127.0.0.1:0 --data DIR/NAME-data EXTRA...`.
    pub fn start_master(&self, name: &str, extra: &[&str]) -> Master {
        let data = self.path().join(format!("{name}-data"));
        self.start_master_at(name, "127.0.0.1:0", &data, extra)
    }
}

impl Master {
    /// Panics with `message` and the logs.
    pub fn fail(&self, message: &str) -> ! {
        fail(&self.log_dir, message)
    }

    /// `GET /v1/servers` (with `?all=true` when `all`) with the client credential,
    /// parsed; fails the test unless it answers 200 with a JSON array.
    pub fn servers(&self, all: bool) -> Vec<Value> {
        let auth = format!("Bearer {}", read_token(&self.client_token_file));
        let path = if all {
            "/v1/servers?all=true"
        } else {
            "/v1/servers"
        };
        let response = http(&self.url, "GET", path, &[("Authorization", &auth)], None)
            .unwrap_or_else(|err| {
                self.fail(&format!("GET {path} from master {}: {err}", self.name))
            });
        if response.status != 200 {
            self.fail(&format!(
                "GET {path} from master {} answered {}: {}",
                self.name, response.status, response.body
            ));
        }
        match serde_json::from_str::<Value>(&response.body) {
            Ok(Value::Array(servers)) => servers,
            _ => self.fail(&format!(
                "GET {path} from master {} is not a JSON array: {}",
                self.name, response.body
            )),
        }
    }

    /// The URLs of the live servers, sorted.
    pub fn live_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .servers(false)
            .iter()
            .filter_map(|server| server["url"].as_str().map(str::to_owned))
            .collect();
        urls.sort();
        urls
    }
}

/// Every `*.log` file directly in `dir`, as (its path, its text).
pub fn read_logs(dir: &Path) -> Vec<(String, String)> {
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading the test directory") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|ext| ext == "log") {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            logs.push((path.display().to_string(), text));
        }
    }
    logs
}

/// Panics unless no secret of `secrets` (what it is, the secret) appears in any text
/// of `seen` (where it was seen, the text). Each secret must be a real one (16 bytes
/// or more), so that an empty token file cannot pass for "not found".
pub fn assert_no_secret_in(secrets: &[(&str, String)], seen: &[(String, String)]) {
    for (what, secret) in secrets {
        assert!(secret.len() >= 16, "{what} secret is a real secret");
        for (place, text) in seen {
            assert!(
                !text.contains(secret.as_str()),
                "the {what} credential appears in {place}"
            );
        }
    }
}
