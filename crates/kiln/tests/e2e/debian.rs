//! A real installed image, end to end: the Debian example's `server-base` SKU built
//! through a real server and client (mmdebstrap, configure in a chroot, a whole-disk
//! image with GRUB), booted under qemu by its verify step until its login prompt names
//! it, then released and checked.
//!
//! The tools must be on the machine (`.ci/run` installs them): a missing tool fails
//! the test, naming the tool and the line that installs it; it never skips. The
//! client's job cache lives in cargo's target directory, so that a second run on one
//! machine downloads no package again.

use crate::common::{text, wait_until_within, Harness};
use kiln_harness::demo::debian;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the build may take at most: install, image and a boot under software
/// emulation on a loaded 2-core machine. A bound against hangs, not a claim.
const BUILD_DEADLINE: Duration = Duration::from_secs(45 * 60);

/// Fails the test when the machine cannot build the example, naming each absent tool
/// and the line that installs it; the test goes on only with every tool present.
fn require_tools() {
    let missing = debian::missing_tools();
    let tools: Vec<&str> = missing.iter().map(|(tool, _)| *tool).collect();
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    assert!(
        missing.is_empty(),
        "the Debian example needs {} on this machine, not found: {} (.ci/run installs them; \
         qemu-system-x86 and qemu-utils in one command)",
        tools.join(", "),
        debian::install_line(&packages)
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the Debian example's steps run as root (mmdebstrap's root mode, chroot); run this \
         test as root, as CI does"
    );
}

/// Writes the Debian example (as `kiln demo --example debian` ships it) into `dir`,
/// with a manifest of the one job `job_id`.
fn write_one_sku_build(dir: &Path, job_id: &str) -> PathBuf {
    let path = debian::write_example(dir).expect("writing the Debian example");
    let full = std::fs::read_to_string(&path).expect("reading the example's manifest");
    let start = full
        .find(&format!("<JOB ID=\"{job_id}\">"))
        .unwrap_or_else(|| panic!("the example has no job {job_id}"));
    let end = start + full[start..].find("</JOB>").expect("the job ends") + "</JOB>".len();
    let manifest = format!(
        "<SERVER>\n  <BUILDNUMBER>deb1</BUILDNUMBER>\n  <TITLE>One Debian SKU</TITLE>\n  \
         <JOBS>\n    {}\n  </JOBS>\n</SERVER>\n",
        &full[start..end]
    );
    std::fs::write(&path, manifest).expect("writing relbuild.xml");
    path
}

fn sha256_hex(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hashing an image");
    hex::encode(hasher.finalize())
}

#[test]
fn debian_server_sku_installs_boots_in_its_verify_step_and_is_released() {
    require_tools();
    let harness = Harness::new("debian");
    let server = harness.start_server("main", &[]);
    let manifest = write_one_sku_build(&harness.mkdir("build"), "server-base");
    let build = server.submit(&manifest);

    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-debian-cache");
    let _client = harness.start_client(
        "debian-1",
        &[&server],
        &["--include", "*", "--cache", &cache.display().to_string()],
    );

    let job = wait_until_within(
        harness.path(),
        "the Debian SKU to be built, booted and uploaded",
        BUILD_DEADLINE,
        || {
            let job = server.job(&build, "server-base");
            let state = text(&job, "state");
            (state != "queued" && state != "running").then_some(job)
        },
        || format!("{:#}", server.job(&build, "server-base")),
    );
    let logs = server.kiln(&["logs", &format!("{build}/server-base")]);
    harness.check(text(&job, "state") == "finished", || {
        format!("the job should finish: {job:#}\njob log:\n{}", logs.stdout)
    });

    // The verify step booted the image: the console's login prompt names the SKU.
    let log = logs.stdout;
    for step in ["install", "configure", "image", "verify"] {
        assert!(
            log.contains(&format!("step {step}: ")),
            "step {step} ran: {log}"
        );
    }
    assert!(
        log.lines()
            .any(|line| line.starts_with("console: server-base login:")),
        "the serial console showed the SKU's login prompt: {log}"
    );
    assert!(
        log.contains("kiln debian: server-base booted to its login prompt"),
        "the verify step says it saw the prompt: {log}"
    );
    assert!(
        log.contains("kiln debian: apt cache: "),
        "the install step used the job cache: {log}"
    );
    assert!(
        cache
            .join("apt-bookworm-amd64/archives")
            .read_dir()
            .is_ok_and(|mut d| d
                .any(|e| e
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("linux-image-")))),
        "the job cache keeps the downloaded packages for the next SKU"
    );

    // Released: both images, with matching sums; the raw one is a whole disk with an
    // MBR partition table and GRUB's boot sector.
    let release_dir = harness.path().join("release");
    let released = server.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(released.code == 0, || format!("kiln release: {released:?}"));
    let dir = release_dir.join(&build);
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("reading SHA256SUMS");
    let mut n_images = 0;
    for line in sums.lines() {
        let (sum, name) = line.split_once("  ").expect("a SHA256SUMS line");
        assert_eq!(sha256_hex(&dir.join(name)), sum, "{name}");
        n_images += 1;
    }
    assert_eq!(n_images, 2, "a raw and a qcow2 image: {sums}");
    let raw = dir.join("BASE/server-base.raw");
    let mut sector = [0u8; 512];
    std::io::Read::read_exact(
        &mut std::fs::File::open(&raw).expect("opening the raw image"),
        &mut sector,
    )
    .expect("reading the boot sector");
    assert_eq!(&sector[510..], &[0x55, 0xaa], "an MBR boot signature");
    assert_eq!(sector[446], 0x80, "the first partition is bootable");
    assert_eq!(sector[450], 0x83, "the first partition is a Linux one");
    let lba = u32::from_le_bytes(sector[454..458].try_into().expect("4 bytes"));
    assert_eq!(
        lba, 2048,
        "the partition starts at 1 MiB, after GRUB's core image"
    );
    assert!(
        sector[..440].windows(4).any(|w| w == b"GRUB"),
        "GRUB's boot sector is in the MBR"
    );
    let qcow = std::fs::read(dir.join("BASE/server-base.qcow2")).expect("reading the qcow2");
    assert_eq!(&qcow[..4], b"QFI\xfb", "a qcow2 image");
}
