//! A server out of disk: an image upload is refused for lack of space (HTTP 507), the
//! job stays running, the server stays up, and once space is back the client's retry
//! stores the image whole.
//!
//! The server's data directory is a small tmpfs that the test mounts (it runs as root
//! in CI) and fills, so that the disk is full for real.

use crate::common::{text, wait_until, write_build, Harness, Job};
use sha2::Digest;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tmpfs's size.
const TMPFS_SIZE: &str = "64m";
/// Space left free once the filler is written.
const LEFT_FREE_BYTES: u64 = 12 << 20;
/// The image's size: twice what is left.
const IMAGE_BYTES: u64 = 24 << 20;

/// A tmpfs mounted for the test, unmounted when dropped (declare it before the
/// processes that use it, so that they are stopped first).
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|err| format!("cannot run mount: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount exited {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            path: path.to_owned(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            // Something still holds it: detach it now, it goes once that is gone.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Bytes an unprivileged writer may still write on the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string and stat a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    stat.f_bavail as u64 * stat.f_frsize as u64
}

/// Writes `path` until only `left_free` bytes are free on its file system.
fn fill_until_free(path: &Path, left_free: u64) {
    let mut file = std::fs::File::create(path).expect("creating the filler");
    let block = vec![0xa5u8; 1 << 20];
    loop {
        let free = free_bytes(path);
        if free <= left_free {
            return;
        }
        let n_bytes = (free - left_free).min(block.len() as u64) as usize;
        file.write_all(&block[..n_bytes])
            .expect("writing the filler");
    }
}

/// SHA-256 of a file, read in pieces.
fn sha256_of_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|err| panic!("opening {}: {err}", path.display()));
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n_read = file.read(&mut buffer).expect("reading a file to hash");
        if n_read == 0 {
            return hex::encode(hasher.finalize());
        }
        hasher.update(&buffer[..n_read]);
    }
}

#[test]
fn upload_to_a_full_disk_is_refused_the_job_waits_and_finishes_once_space_is_back() {
    let harness = Harness::new("disk-full");
    let data = harness.mkdir("data");
    let _mount = TmpfsMount::mount(&data, TMPFS_SIZE).unwrap_or_else(|err| {
        harness.fail(&format!(
            "this test needs to mount a {TMPFS_SIZE} tmpfs at {} as the server's data \
             directory (it runs as root in CI), and cannot: {err}",
            data.display()
        ))
    });
    let server = harness.start_server_at("main", "127.0.0.1:0", &data, None, &[]);
    let filler = data.join("filler");
    fill_until_free(&filler, LEFT_FREE_BYTES);

    let expected_file = harness.path().join("expected.sha256");
    let image = format!(
        "head -c {IMAGE_BYTES} /dev/urandom > \"$KILN_OUTPUT/big.img\"\n\
         sha256sum \"$KILN_OUTPUT/big.img\" | cut -d' ' -f1 > '{expected}'\n",
        expected = expected_file.display(),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1700",
        &[Job::new("large", "PRO").image(&image)],
    ));
    let _client = harness.start_client("uploader", &[&server], &["--include", "*"]);

    let client_log = harness.path().join("client-uploader.log");
    let refusal = wait_until(
        harness.path(),
        "the client to log its upload refused for lack of space",
        || {
            let log = std::fs::read_to_string(&client_log).ok()?;
            log.lines()
                .find(|line| line.contains("uploading an image") && line.contains("no space"))
                .map(str::to_owned)
        },
        || "no refusal in the client's log".into(),
    );
    assert!(
        refusal.contains("507"),
        "the refusal is HTTP 507: {refusal}"
    );
    let job = server.job(&build, "large");
    assert_eq!(
        text(&job, "state"),
        "running",
        "the job waits for space, neither finished nor failed: {job:#}"
    );
    let images = server.get(&format!("/v1/builds/{build}/images"));
    assert_eq!(images.body.trim(), "[]", "no image is stored: {images:?}");
    let health = server.get("/v1/health");
    assert_eq!(health.status, 200, "the server still answers: {health:?}");
    assert!(health.body.contains("\"ok\""), "{health:?}");

    std::fs::remove_file(&filler).expect("removing the filler");
    let job = server.wait_for_job(&build, "large", "to end once space is back", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(job["attempt"], 1, "the same run went on: {job:#}");
    // Uploads are spooled in DATA/tmp, and written beside their final names under
    // temporary names: none of them is left.
    let leftovers: Vec<PathBuf> = files_under(&data)
        .into_iter()
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            path.starts_with(data.join("tmp"))
                || name.starts_with(".part-")
                || name.starts_with(".kiln-tmp-")
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "nothing is left of the refused uploads: {leftovers:?}"
    );

    let expected = std::fs::read_to_string(&expected_file)
        .expect("the image step's sha256")
        .trim()
        .to_owned();
    assert_eq!(expected.len(), 64, "a sha256: {expected:?}");
    let images = server.get(&format!("/v1/builds/{build}/images"));
    let images: serde_json::Value = serde_json::from_str(&images.body).expect("the images as JSON");
    assert_eq!(images[0]["name"], "big.img", "{images:#}");
    assert_eq!(images[0]["size"], IMAGE_BYTES, "{images:#}");
    assert_eq!(images[0]["sha256"], expected.as_str(), "{images:#}");
    let release_dir = harness.mkdir("release");
    let released = server.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(released.code == 0, || {
        format!("kiln release failed: {released:?}")
    });
    let downloaded = release_dir.join(&build).join("PRO").join("big.img");
    assert_eq!(
        sha256_of_file(&downloaded),
        expected,
        "the stored image is the one the step made, whole"
    );
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("listing the data directory")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}
