//! `kiln demo --example debian`: the Debian example on a farm on this machine. A
//! server and one client (so that every SKU shares one package cache) build
//! `examples/debian`: 2 products × 2 configurations of Debian bookworm, each installed
//! by mmdebstrap, configured, made a bootable disk and booted under qemu by its
//! verify step; then the images are released and the server's storage is shown.
//!
//! Before starting anything it checks for the tools the steps run, and says how to
//! install the missing ones.

use super::Options;
use crate::farm::Farm;
use crate::find_tool;
use anyhow::Context;
use kiln_api::Operator;
use kiln_proto::transfer::StorageStats;
use kiln_release::Released;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The example, embedded so that the demo runs from anywhere.
const EXAMPLE_FILES: &[(&str, &str)] = &[
    (
        "relbuild.xml",
        include_str!("../../../../examples/debian/relbuild.xml"),
    ),
    (
        "common/lib.sh",
        include_str!("../../../../examples/debian/common/lib.sh"),
    ),
    (
        "common/install.sh",
        include_str!("../../../../examples/debian/common/install.sh"),
    ),
    (
        "common/cache-in.sh",
        include_str!("../../../../examples/debian/common/cache-in.sh"),
    ),
    (
        "common/cache-out.sh",
        include_str!("../../../../examples/debian/common/cache-out.sh"),
    ),
    (
        "common/initramfs.sh",
        include_str!("../../../../examples/debian/common/initramfs.sh"),
    ),
    (
        "common/configure.sh",
        include_str!("../../../../examples/debian/common/configure.sh"),
    ),
    (
        "common/image.sh",
        include_str!("../../../../examples/debian/common/image.sh"),
    ),
    (
        "common/verify.sh",
        include_str!("../../../../examples/debian/common/verify.sh"),
    ),
    (
        "server/install.sh",
        include_str!("../../../../examples/debian/server/install.sh"),
    ),
    (
        "desktop-lite/install.sh",
        include_str!("../../../../examples/debian/desktop-lite/install.sh"),
    ),
];

/// The tools the example's steps run, with the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("grub-mkimage", "grub-common"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
];

/// GRUB's BIOS boot sector and modules.
const GRUB_BOOT_IMG: &str = "/usr/lib/grub/i386-pc/boot.img";

/// How long the whole build may take: four installs and four boots under software
/// emulation.
const BUILD_TIMEOUT: Duration = Duration::from_secs(3 * 60 * 60);

/// What is missing to build the example here, as (tool, package) pairs.
pub fn missing_tools() -> Vec<(&'static str, &'static str)> {
    let mut missing: Vec<(&str, &str)> = TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .collect();
    if !Path::new(GRUB_BOOT_IMG).is_file() {
        missing.push((GRUB_BOOT_IMG, "grub-pc-bin"));
    }
    missing
}

/// The apt-get line that installs `packages`. qemu-system-x86 comes with the
/// qemu-utils of its own release, in one command, so that apt does not remove a newer
/// qemu-utils.
pub fn install_line(packages: &[&str]) -> String {
    let mut packages: Vec<&str> = packages.to_vec();
    if packages.contains(&"qemu-system-x86") || packages.contains(&"qemu-utils") {
        packages.retain(|package| !package.starts_with("qemu-"));
        packages.extend(["qemu-system-x86", "qemu-utils"]);
    }
    packages.dedup();
    format!(
        "apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Writes the Debian example under `dir`; returns its manifest.
pub fn write_example(dir: &Path) -> anyhow::Result<PathBuf> {
    for (name, text) in EXAMPLE_FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir.join("relbuild.xml"))
}

/// Runs the Debian demo; returns whether every SKU was built, booted and released.
pub async fn run(args: Options) -> anyhow::Result<bool> {
    let missing = missing_tools();
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|(tool, _)| *tool).collect();
        let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
        eprintln!(
            "kiln demo --example debian cannot build Debian images here: {} not found.\n\
             Install them (Debian or Ubuntu, as root) with:\n  {}",
            tools.join(", "),
            install_line(&packages)
        );
        return Ok(false);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "kiln demo --example debian must run as root: its steps install Debian with \
             mmdebstrap (root mode) and configure it in a chroot"
        );
        return Ok(false);
    }
    if args.clients != 1 {
        eprintln!("note: the Debian example runs one client, so that its four SKUs share one package cache");
    }
    let (dir, _temp) = super::work_dir(args.data.as_deref(), "kiln-demo-debian-")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("kiln-debian-release"));
    let manifest = write_example(&dir.join("example"))?;

    let mut farm = Farm::start(&dir, &[]).await?;
    eprintln!(
        "server  {} (log: {})",
        farm.url,
        dir.join("server.log").display()
    );
    let id = "debian-client-1";
    farm.add_client(id, "*", 1)?;
    eprintln!(
        "client  {id} (log: {}; package cache: {})",
        dir.join(format!("client-{id}.log")).display(),
        dir.join(format!("client-{id}")).join("cache").display()
    );
    eprintln!("this takes a while: four Debian installs, and four boots under software emulation; `kiln logs` shows a job's steps as they run");
    let result = drive(&farm, &manifest, &out).await;
    farm.stop().await;
    let (all_finished, released) = result?;
    if let Some((released, stats)) = released {
        println!();
        println!("The images are in {}:", released.dir.display());
        for (path, image) in &released.images {
            println!(
                "  {}  ({} bytes, job {})",
                path.display(),
                image.size,
                image.job_id
            );
        }
        println!();
        println!(
            "The server holds {} of images in {} of chunks.",
            mib(stats.image_bytes),
            mib(stats.bytes_stored)
        );
        println!();
        println!("Boot one (log in as no one: the login prompt names the SKU; Ctrl-A X quits):");
        if let Some((path, _)) = released
            .images
            .iter()
            .find(|(path, _)| path.extension().is_some_and(|e| e == "qcow2"))
        {
            println!(
                "  qemu-system-x86_64 -nographic -m 1024 -snapshot -drive file={},format=qcow2",
                path.display()
            );
        }
    }
    Ok(all_finished)
}

/// Bytes in MiB, for people.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

async fn drive(
    farm: &Farm,
    manifest: &Path,
    out: &Path,
) -> anyhow::Result<(bool, Option<(Released, StorageStats)>)> {
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let files_dir = manifest.parent().context("the example has a directory")?;
    let submitted = operator.submit(manifest, files_dir).await?;
    eprintln!(
        "build   {} submitted: {} jobs",
        submitted.number, submitted.n_jobs
    );
    let all_finished = operator
        .wait_for_build(&submitted.number, Some(BUILD_TIMEOUT))
        .await?;
    if !all_finished {
        eprintln!(
            "some jobs did not finish: `kiln logs {}/JOB --server {}` shows why (the client log listed above holds the client's side)",
            submitted.number, farm.url
        );
        return Ok((false, None));
    }
    let released = kiln_release::release(&operator, &submitted.number, out).await?;
    let stats = operator.storage().await?;
    Ok((true, Some((released, stats))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_line_keeps_qemu_system_and_utils_together() {
        assert_eq!(
            install_line(&["mmdebstrap", "qemu-system-x86"]),
            "apt-get install -y --no-install-recommends mmdebstrap qemu-system-x86 qemu-utils"
        );
        assert_eq!(
            install_line(&["fdisk", "grub-pc-bin"]),
            "apt-get install -y --no-install-recommends fdisk grub-pc-bin"
        );
    }

    #[test]
    fn every_file_the_manifest_names_is_embedded() {
        let manifest =
            kiln_proto::manifest::BuildManifest::parse("relbuild.xml", EXAMPLE_FILES[0].1)
                .expect("the example's manifest parses");
        assert_eq!(manifest.jobs.len(), 4);
        for job in &manifest.jobs {
            for script in [
                Some(&job.install_script),
                job.configure_script.as_ref(),
                Some(&job.image_script),
                job.verify_script.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                assert!(
                    EXAMPLE_FILES.iter().any(|(name, _)| name == script),
                    "{script} is embedded"
                );
            }
        }
    }

    #[test]
    fn every_file_of_the_example_is_embedded_as_it_is_in_the_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/debian");
        let mut stack = vec![PathBuf::new()];
        let mut n_files = 0;
        while let Some(relative) = stack.pop() {
            for entry in std::fs::read_dir(root.join(&relative)).expect("reading the example") {
                let entry = entry.expect("reading the example");
                let name = relative.join(entry.file_name());
                if entry.file_type().expect("a file type").is_dir() {
                    stack.push(name);
                    continue;
                }
                let name = name.to_str().expect("a UTF-8 name").to_owned();
                if name == "README.md" {
                    continue;
                }
                let embedded = EXAMPLE_FILES
                    .iter()
                    .find(|(embedded, _)| *embedded == name)
                    .unwrap_or_else(|| panic!("examples/debian/{name} is not embedded"));
                let text = std::fs::read_to_string(entry.path()).expect("reading a file");
                assert_eq!(embedded.1, text, "examples/debian/{name}");
                n_files += 1;
            }
        }
        assert_eq!(n_files, EXAMPLE_FILES.len());
    }
}
