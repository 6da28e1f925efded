//! An nginx of a test's own in front of a farm's replicas: one URL for the whole farm,
//! as docs/operations.md sets it up ("Behind a load balancer"). It is one process (no
//! master) on a free loopback port, with its configuration, logs and temporary files in
//! the test's directory, killed when dropped. A machine without `nginx` fails the tests
//! that start one: they never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `location` settings kiln needs from a proxy, as docs/operations.md gives them:
/// bodies of any size, streamed both ways (a client's session is a request body that
/// never ends; event streams and long polls answer slowly), and hours before a quiet
/// connection is cut.
pub const KILN_LOCATION: &str = "\
        proxy_pass http://kiln;
        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
        proxy_set_header Host $host;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 24h;
        proxy_send_timeout 24h;
";

/// The arguments that run nginx on the configuration `conf` with `dir` as its prefix
/// and its error log there (see [`config`]).
pub fn args(dir: &Path, conf: &Path) -> [std::ffi::OsString; 6] {
    [
        "-p".into(),
        dir.into(),
        "-e".into(),
        dir.join("error.log").into(),
        "-c".into(),
        conf.into(),
    ]
}

/// An nginx configuration for one process (no master, no daemon) whose pid file, logs
/// and temporary files are under `dir`, taking bodies of any size, with `http` (the
/// servers and what else goes in the `http` block).
pub fn config(dir: &Path, http: &str) -> String {
    // nginx started as root drops to `nobody` unless told otherwise, and nobody cannot
    // write into the directories of a test or a bench.
    // SAFETY: geteuid(2) has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    let d = dir.display();
    format!(
        "{user}daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/temp/body;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    client_max_body_size 0;
{http}}}
"
    )
}

/// An nginx balancing requests over a farm's replicas.
pub struct LoadBalancer {
    dir: PathBuf,
    child: Child,
    url: String,
}

impl LoadBalancer {
    /// Starts one in `dir` over the replicas at `upstreams` (`http://127.0.0.1:PORT`
    /// each) and waits until it answers.
    pub fn start(dir: &Path, upstreams: &[&str]) -> LoadBalancer {
        let temp = dir.join("temp");
        std::fs::create_dir_all(&temp).expect("the load balancer's directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let servers: String = upstreams
            .iter()
            .map(|url| {
                let address = url.trim_start_matches("http://").trim_end_matches('/');
                format!("        server {address} max_fails=1 fail_timeout=10s;\n")
            })
            .collect();
        let d = dir.display();
        let conf = config(
            dir,
            &format!(
                "    access_log {d}/access.log;
    upstream kiln {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{KILN_LOCATION}        }}
    }}
"
            ),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let log = std::fs::File::create(dir.join("stderr.log")).expect("nginx's stderr log");
        let child = Command::new(crate::find_tool("nginx").unwrap_or_else(|| "nginx".into()))
            .args(args(dir, &conf_path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start nginx (Debian's `nginx` package installs it): {err}")
            });
        let mut balancer = LoadBalancer {
            dir: dir.to_owned(),
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = balancer.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nginx did not listen on port {port} ({exited:?}): {}",
                balancer.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        balancer
    }

    /// `http://127.0.0.1:PORT`: the farm's one URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What nginx logged (its errors), for a failing test's message.
    pub fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .filter_map(|name| std::fs::read_to_string(self.dir.join(name)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
