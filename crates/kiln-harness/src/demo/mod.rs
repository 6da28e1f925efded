//! `kiln demo`: a whole farm on this machine. It starts a server and N clients as real
//! processes on loopback, submits the bundled example build (2 products × 3
//! configurations, each job making a real ext4 image and a qcow2 copy), shows
//! progress, releases the images and stops everything. [`debian`] is
//! `kiln demo --example debian`: real Debian systems, installed, imaged and booted.

pub mod debian;

use crate::farm::Farm;
use crate::find_tool;
use anyhow::Context;
use kiln_api::Operator;
use kiln_release::Released;
use std::path::{Path, PathBuf};

/// The examples `kiln demo` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Example {
    /// `examples/demo`: 2 products × 3 configurations of small ext4 images, in seconds.
    #[default]
    Demo,
    /// `examples/debian`: 2 products × 2 configurations of bootable Debian disks
    /// ([`debian`]).
    Debian,
}

/// What `kiln demo` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which example to build.
    pub example: Example,
    /// How many clients to start.
    pub clients: u32,
    /// Where to release the images (default: ./kiln-demo-release, or
    /// ./kiln-debian-release for the Debian example).
    pub out: Option<PathBuf>,
    /// Keep the farm's data directory here instead of a temporary one.
    pub data: Option<PathBuf>,
}

/// The example build, embedded so that the demo runs from anywhere.
const EXAMPLE_FILES: &[(&str, &str)] = &[
    (
        "relbuild.xml",
        include_str!("../../../../examples/demo/relbuild.xml"),
    ),
    (
        "common/lib.sh",
        include_str!("../../../../examples/demo/common/lib.sh"),
    ),
    (
        "common/configure.sh",
        include_str!("../../../../examples/demo/common/configure.sh"),
    ),
    (
        "common/image.sh",
        include_str!("../../../../examples/demo/common/image.sh"),
    ),
    (
        "common/mke2fs.conf",
        include_str!("../../../../examples/demo/common/mke2fs.conf"),
    ),
    (
        "pro/install.sh",
        include_str!("../../../../examples/demo/pro/install.sh"),
    ),
    (
        "home/install.sh",
        include_str!("../../../../examples/demo/home/install.sh"),
    ),
];

/// Writes the bundled example build under `dir`; returns its manifest.
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

/// Runs the demo; returns whether every job finished and its images were released.
pub async fn run(args: Options) -> anyhow::Result<bool> {
    if args.example == Example::Debian {
        return debian::run(args).await;
    }
    let missing: Vec<&str> = ["mkfs.ext4", "debugfs"]
        .into_iter()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "kiln demo cannot make disk images here: {} not found (install Debian's e2fsprogs: apt-get install e2fsprogs)",
            missing.join(" and ")
        );
        return Ok(false);
    }
    let has_qemu_img = find_tool("qemu-img").is_some();
    if !has_qemu_img {
        eprintln!("note: qemu-img not found: the demo makes raw ext4 images only (apt-get install qemu-utils for qcow2 copies)");
    }
    let n_clients = args.clients.max(1);
    let (dir, _temp) = work_dir(args.data.as_deref(), "kiln-demo-")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("kiln-demo-release"));
    let manifest = write_example(&dir.join("example"))?;

    let mut farm = Farm::start(&dir, &[]).await?;
    eprintln!(
        "server  {} (log: {})",
        farm.url,
        dir.join("server.log").display()
    );
    for idx in 1..=n_clients {
        let id = format!("demo-client-{idx}");
        farm.add_client(&id, "*", 1)?;
        eprintln!(
            "client  {id} (log: {})",
            dir.join(format!("client-{id}.log")).display()
        );
    }
    let result = drive(&farm, &manifest, &out).await;
    farm.stop().await;
    let (all_finished, released) = result?;
    if let Some(released) = released {
        println!();
        println!(
            "Images of build {} are in {}:",
            1000,
            released.dir.display()
        );
        for (path, image) in &released.images {
            println!(
                "  {}  ({} bytes, job {})",
                path.display(),
                image.size,
                image.job_id
            );
        }
        println!();
        println!("Check them:");
        println!(
            "  (cd {} && sha256sum -c SHA256SUMS)",
            released.dir.display()
        );
        if let Some((path, _)) = released
            .images
            .iter()
            .find(|(path, _)| path.extension().is_some_and(|e| e == "raw"))
        {
            println!("  e2fsck -fn {}", path.display());
            println!("  debugfs -R 'cat /etc/os-release' {}", path.display());
        }
        if let Some((path, _)) = released
            .images
            .iter()
            .find(|(path, _)| path.extension().is_some_and(|e| e == "qcow2"))
        {
            println!("  qemu-img info {}", path.display());
        }
    }
    Ok(all_finished)
}

/// The farm's directory: `--data` (created if missing), or a temporary directory named
/// after `prefix` that lives as long as the returned guard.
fn work_dir(
    data: Option<&Path>,
    prefix: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match data {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Ok((dir.to_owned(), None))
        }
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

async fn drive(
    farm: &Farm,
    manifest: &Path,
    out: &Path,
) -> anyhow::Result<(bool, Option<Released>)> {
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let files_dir = manifest.parent().context("the example has a directory")?;
    let submitted = operator.submit(manifest, files_dir).await?;
    eprintln!(
        "build   {} submitted: {} jobs",
        submitted.number, submitted.n_jobs
    );
    let all_finished = operator
        .wait_for_build(&submitted.number, Some(std::time::Duration::from_secs(900)))
        .await?;
    if !all_finished {
        eprintln!(
            "some jobs did not finish: their errors are above; the client logs listed at the start hold their output"
        );
        return Ok((false, None));
    }
    let released = kiln_release::release(&operator, &submitted.number, out).await?;
    Ok((true, Some(released)))
}
