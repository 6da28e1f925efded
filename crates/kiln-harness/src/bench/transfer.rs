//! `kiln bench transfer`: kiln's chunked image transfer beside the usual tools, in one
//! run on the same machine and the same files.
//!
//! - (a) a fresh incompressible image: kiln's upload to a real `kiln server` against
//!   `curl -T` to nginx (a WebDAV PUT), in alternating trials;
//! - (b) a variant of that image (ten 1 MiB regions rewritten and 4 KiB inserted, so
//!   that every later byte shifts) sent after the original: bytes sent, bytes stored
//!   and time, against `casync make` into one store and rsync's delta transfer to an
//!   rsync daemon;
//! - (c) the bundled demo build: bytes its images take in the store against the sum of
//!   their sizes;
//! - (d) the server's peak memory while it receives a large image;
//! - (e) the fresh image into a SeaweedFS of the bench's own (`weed mini` on loopback):
//!   kiln's upload to a server with `--images s3://...` against boto3's
//!   `upload_file` (a multipart upload, its default settings) of the same file to the
//!   same SeaweedFS, in alternating trials, with the objects each left per GiB.
//!
//! Every process the bench starts listens on 127.0.0.1 only and is killed when the
//! bench ends, on error too; every file lives in one work directory, removed at the end.

use super::throughput::process_use;
use crate::farm::Farm;
use anyhow::Context;
use kiln_api::Operator;
use kiln_api::ServerConn;
use kiln_client::upload::{ChunkedUploader, ImageUploader, UploadReport};
use kiln_proto::api::{Claim, ClaimRequest};
use kiln_proto::transfer::StorageStats;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const MIB: u64 = 1 << 20;

/// The name every upload goes by, on every side.
const IMAGE_NAME: &str = "image.bin";

/// What `kiln bench transfer` measures, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the image of parts (a) and (b), in MiB.
    pub size_mib: u64,
    /// Size of the image of part (d), in MiB.
    pub rss_size_mib: u64,
    /// Leave part (d) out.
    pub skip_rss: bool,
    /// Leave part (e), object storage, out.
    pub skip_s3: bool,
    /// Only the parts whose letters this holds, if given.
    pub only: Option<String>,
    /// Timed trials of each system in parts (a) and (b).
    pub trials: u32,
    /// Where to make the work directory (default: the system's temporary directory).
    pub work: Option<PathBuf>,
}

/// Runs the bench until its end or until `interrupted` resolves (SIGINT or SIGTERM,
/// say), then kills every process it started and removes its work directory.
pub async fn run(
    options: Options,
    interrupted: impl std::future::Future<Output = ()>,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        options.size_mib >= 64,
        "--size-mib must be at least 64: the variant rewrites ten 1 MiB regions spread over the image"
    );
    anyhow::ensure!(options.trials >= 1, "--trials must be at least 1");
    for (tool, package) in [
        ("nginx", "nginx"),
        ("curl", "curl"),
        ("casync", "casync"),
        ("rsync", "rsync"),
        ("python3", "python3"),
    ] {
        anyhow::ensure!(
            crate::find_tool(tool).is_some(),
            "{tool} not found; the transfer benchmark compares kiln with it (apt-get install {package})"
        );
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix("kiln-bench-transfer-");
    let work = match &options.work {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating work directory {}", dir.display()))?;
            builder.tempdir_in(dir)
        }
        None => builder.tempdir(),
    }
    .context("creating the work directory")?;
    eprintln!("transfer: work directory {}", work.path().display());
    // On SIGINT or SIGTERM the bench future is dropped: every child is killed (they
    // are all kill_on_drop) before the work directory is removed.
    let result = tokio::select! {
        result = bench(&options, work.path()) => result,
        _ = interrupted => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(err) = work.close() {
        eprintln!("transfer: could not remove the work directory: {err}");
    }
    result.map(|()| true)
}

async fn bench(options: &Options, work: &Path) -> anyhow::Result<()> {
    println!(
        "kiln bench transfer: {} MiB image, {} trials; {}; load average at start {}",
        options.size_mib,
        options.trials,
        machine(),
        load_average()
    );
    println!();
    let wanted = |part: char| options.only.as_ref().is_none_or(|only| only.contains(part));
    if wanted('a') || wanted('b') || wanted('e') {
        let files = make_files(work, options.size_mib).await?;
        if wanted('a') {
            part_a(work, &files, options.trials).await?;
        }
        if wanted('b') {
            part_b(work, &files, options.trials).await?;
        }
        if wanted('e') {
            if options.skip_s3 {
                eprintln!("transfer: (e) left out (--skip-s3)");
            } else {
                part_e(work, &files, options.trials).await?;
            }
        }
        std::fs::remove_file(&files.base)?;
        std::fs::remove_file(&files.variant)?;
    }
    if wanted('c') {
        part_c(work).await?;
    }
    if wanted('d') {
        if options.skip_rss {
            eprintln!("transfer: (d) skipped (--skip-rss)");
        } else {
            part_d(work, options.rss_size_mib, !options.skip_s3).await?;
        }
    }
    println!("load average at the end {}", load_average());
    Ok(())
}

// ---------------------------------------------------------------------------------
// The files.

/// The image and its variant.
struct Files {
    base: PathBuf,
    variant: PathBuf,
    size: u64,
    edits: Edits,
}

/// Where the variant differs from the image.
#[derive(Debug, Clone)]
struct Edits {
    /// 1 MiB pieces (by index) overwritten with other random bytes.
    rewritten: Vec<u64>,
    /// Offset in the image where 4 KiB of random bytes are inserted.
    insert_at: u64,
}

/// Bytes inserted in the variant.
const INSERTED: usize = 4096;

impl Edits {
    /// Ten pieces spread over the image (at 1/21, 3/21, ... 19/21 of it) and an
    /// insertion at about 3/10 of it, at an odd offset inside a piece left alone.
    fn plan(n_pieces: u64) -> Self {
        let rewritten: Vec<u64> = (0..10).map(|idx| (2 * idx + 1) * n_pieces / 21).collect();
        let mut piece = n_pieces * 3 / 10;
        while rewritten.contains(&piece) {
            piece += 1;
        }
        Edits {
            rewritten,
            insert_at: piece * MIB + 12_345,
        }
    }
}

/// MiB number `idx` of the noise of `seed`: incompressible, the same every run.
fn noise_piece(seed: u64, idx: u64) -> Vec<u8> {
    kiln_blob::noise::noise(MIB as usize, (seed << 32) | idx)
}

/// Writes `size_mib` MiB of the noise of `seed`, one MiB at a time.
fn write_noise(path: &Path, size_mib: u64, seed: u64) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for idx in 0..size_mib {
        file.write_all(&noise_piece(seed, idx))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes the variant of `base` that `edits` describe, one MiB at a time.
fn write_variant(base: &Path, variant: &Path, edits: &Edits, seed: u64) -> anyhow::Result<()> {
    let mut input =
        std::fs::File::open(base).with_context(|| format!("opening {}", base.display()))?;
    let mut output = std::fs::File::create(variant)
        .with_context(|| format!("creating {}", variant.display()))?;
    let mut piece = vec![0u8; MIB as usize];
    for idx in 0.. {
        let n = read_full(&mut input, &mut piece)
            .with_context(|| format!("reading {}", base.display()))?;
        if n == 0 {
            break;
        }
        let piece = &mut piece[..n];
        if edits.rewritten.contains(&idx) {
            piece.copy_from_slice(&noise_piece(seed, idx)[..n]);
        }
        let start = idx * MIB;
        let write = |output: &mut std::fs::File, bytes: &[u8]| {
            output
                .write_all(bytes)
                .with_context(|| format!("writing {}", variant.display()))
        };
        if (start..start + n as u64).contains(&edits.insert_at) {
            let split = (edits.insert_at - start) as usize;
            write(&mut output, &piece[..split])?;
            write(&mut output, &kiln_blob::noise::noise(INSERTED, seed))?;
            write(&mut output, &piece[split..])?;
        } else {
            write(&mut output, piece)?;
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

async fn make_files(work: &Path, size_mib: u64) -> anyhow::Result<Files> {
    let base = work.join("base.img");
    let variant = work.join("variant.img");
    let edits = Edits::plan(size_mib);
    eprintln!("transfer: writing a {size_mib} MiB image of random bytes and its variant");
    let (base_path, variant_path, plan) = (base.clone(), variant.clone(), edits.clone());
    tokio::task::spawn_blocking(move || {
        write_noise(&base_path, size_mib, 1)?;
        write_variant(&base_path, &variant_path, &plan, 2)
    })
    .await??;
    Ok(Files {
        base,
        variant,
        size: size_mib * MIB,
        edits,
    })
}

// ---------------------------------------------------------------------------------
// Part (a): a fresh image, kiln against curl -T to nginx.

async fn part_a(work: &Path, files: &Files, trials: u32) -> anyhow::Result<()> {
    eprintln!("transfer: (a) fresh image: kiln and curl -T to nginx, alternating; the first of each is a warm-up");
    let nginx = Nginx::start(&work.join("nginx")).await?;
    let mut kiln_wall = Vec::new();
    let mut kiln_reported = Vec::new();
    let mut curl = Vec::new();
    let mut curl_synced = Vec::new();
    let mut pack_files = 0;
    let mut server_cpu = Vec::new();
    let mut uploader_cpu = Vec::new();
    for trial in 0..=trials {
        let label = if trial == 0 {
            "warm-up".to_owned()
        } else {
            format!("trial {trial}/{trials}")
        };
        sync_fs(work)?;
        let dir = work.join(format!("a-kiln-{trial}"));
        let kiln = Kiln::start(&dir, 1).await?;
        let claim = kiln.claim().await?;
        let (report, wall, cpu) = kiln.upload_with_cpu(&claim, &files.base).await?;
        kiln.stop().await;
        anyhow::ensure!(
            report.size == files.size,
            "kiln reported uploading {} bytes of a {}-byte image",
            report.size,
            files.size
        );
        let packs = tree_size(&dir.join("server").join("packs"))?;
        remove_dir(&dir)?;
        eprintln!(
            "transfer: (a) {label}: kiln {:.2} s (uploader {:.2} s), {} pack files; CPU: server {:.2} s, uploader {:.2} s",
            wall.as_secs_f64(),
            report.elapsed.as_secs_f64(),
            packs.files,
            cpu.server,
            cpu.uploader
        );
        pack_files = packs.files;

        sync_fs(work)?;
        let (secs, sync_secs) = nginx.put(&files.base, files.size).await?;
        eprintln!(
            "transfer: (a) {label}: curl -T to nginx {secs:.2} s, then syncfs {sync_secs:.2} s"
        );
        if trial > 0 {
            kiln_wall.push(wall.as_secs_f64());
            kiln_reported.push(report.elapsed.as_secs_f64());
            server_cpu.push(cpu.server);
            uploader_cpu.push(cpu.uploader);
            curl.push(secs);
            curl_synced.push(secs + sync_secs);
        }
    }
    nginx.stop().await;
    let mib = files.size as f64 / MIB as f64;
    println!(
        "(a) upload of a fresh {} MiB incompressible image, {trials} trials each, alternating (after one warm-up each)",
        files.size / MIB
    );
    println!();
    println!("| system | median | min | MiB/s at the median |");
    println!("|---|---|---|---|");
    for (what, times) in [
        ("kiln (wall time around the upload call)", &mut kiln_wall),
        ("kiln (the uploader's own elapsed)", &mut kiln_reported),
        ("curl -T to nginx (WebDAV PUT)", &mut curl),
        (
            "curl -T to nginx, then syncfs (on disk, as kiln's is when it answers)",
            &mut curl_synced,
        ),
    ] {
        times.sort_by(f64::total_cmp);
        let median = median(times);
        println!(
            "| {what} | {median:.2} s | {:.2} s | {:.0} |",
            times[0],
            mib / median
        );
    }
    println!();
    println!(
        "kiln stored the image in {pack_files} pack files ({:.1} per GiB); nginx in 1 file",
        pack_files as f64 * 1024.0 / mib
    );
    server_cpu.sort_by(f64::total_cmp);
    uploader_cpu.sort_by(f64::total_cmp);
    println!(
        "kiln's CPU during the upload (user and system), median: server {:.2} s, uploader {:.2} s",
        median(&server_cpu),
        median(&uploader_cpu)
    );
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// Part (e): the fresh image into object storage, kiln against boto3.

/// Uploads a file to S3 with boto3's `upload_file` (multipart above 8 MiB, 10 threads:
/// its defaults), or counts the objects under a prefix; prints the upload's seconds
/// and the CPU seconds its process used (all threads), or objects and bytes.
const BOTO3_SCRIPT: &str = r#"import sys, time, boto3
endpoint, key, secret, bucket, what = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name="us-east-1")
if what == "put":
    path, name = sys.argv[6:8]
    started, cpu = time.monotonic(), time.process_time()
    s3.upload_file(path, bucket, name)
    print(f"{time.monotonic() - started:.6f} {time.process_time() - cpu:.6f}")
else:
    prefix = sys.argv[6]
    objects = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            objects += 1
            size += item["Size"]
    print(objects, size)
"#;

async fn boto3(work: &Path, endpoint: &str, args: &[&str]) -> anyhow::Result<String> {
    use crate::seaweed::{S3_BUCKET, S3_KEY, S3_SECRET};
    let script = work.join("boto3-bench.py");
    if !script.exists() {
        std::fs::write(&script, BOTO3_SCRIPT)?;
    }
    let output = Command::new("python3")
        .arg(&script)
        .args([endpoint, S3_KEY, S3_SECRET, S3_BUCKET])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running python3 (boto3)")?;
    anyhow::ensure!(
        output.status.success(),
        "boto3 failed ({}): {} (pip install boto3)",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

async fn part_e(work: &Path, files: &Files, trials: u32) -> anyhow::Result<()> {
    use crate::seaweed::{Seaweed, S3_KEY, S3_SECRET};
    eprintln!(
        "transfer: (e) fresh image into SeaweedFS: kiln --images s3:// and boto3 upload_file, \
         alternating; the first of each is a warm-up"
    );
    let weed_dir = work.join("weed");
    let weed = tokio::task::spawn_blocking(move || Seaweed::start(&weed_dir)).await?;
    let endpoint = weed.endpoint();
    let credentials = work.join("s3-credentials");
    std::fs::write(
        &credentials,
        format!("aws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"),
    )?;
    let weed_cpu = || cpu_secs(weed.pid().context("SeaweedFS exited")?);
    let mut kiln_runs = Vec::new();
    let mut boto_runs = Vec::new();
    let mut kiln_objects = (0u64, 0u64);
    for trial in 0..=trials {
        let label = if trial == 0 {
            "warm-up".to_owned()
        } else {
            format!("trial {trial}/{trials}")
        };
        let prefix = format!("e-kiln-{trial}");
        let mut server_args = weed.server_args(&prefix);
        server_args.push("--s3-credentials-file".into());
        server_args.push(credentials.display().to_string());
        let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
        let dir = work.join(&prefix);
        let kiln = Kiln::start_with(&dir, 1, &server_args).await?;
        let claim = kiln.claim().await?;
        let weed_before = weed_cpu()?;
        let (report, wall, cpu) = kiln.upload_with_cpu(&claim, &files.base).await?;
        let run = S3Run {
            wall: wall.as_secs_f64(),
            store_cpu: weed_cpu()? - weed_before,
            server_cpu: Some(cpu.server),
            uploader_cpu: cpu.uploader,
        };
        kiln.stop().await;
        anyhow::ensure!(
            report.size == files.size,
            "kiln reported uploading {} bytes of a {}-byte image",
            report.size,
            files.size
        );
        remove_dir(&dir)?;
        let counted = boto3(work, &endpoint, &["count", &format!("{prefix}/packs/")]).await?;
        let mut counted = counted.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(objects)), Some(Ok(bytes))) = (counted.next(), counted.next()) {
            kiln_objects = (objects, bytes);
        }
        eprintln!(
            "transfer: (e) {label}: kiln {:.2} s, {} pack objects of {} bytes; CPU: SeaweedFS {:.2} s, server {:.2} s, uploader {:.2} s",
            run.wall,
            kiln_objects.0,
            kiln_objects.1,
            run.store_cpu,
            run.server_cpu.unwrap_or_default(),
            run.uploader_cpu
        );
        let weed_before = weed_cpu()?;
        let printed = boto3(
            work,
            &endpoint,
            &[
                "put",
                &files.base.display().to_string(),
                &format!("e-boto3-{trial}/image.bin"),
            ],
        )
        .await?;
        let mut printed = printed.split_whitespace().map(str::parse::<f64>);
        let (Some(Ok(secs)), Some(Ok(cpu))) = (printed.next(), printed.next()) else {
            anyhow::bail!("boto3's script printed no time");
        };
        let boto_run = S3Run {
            wall: secs,
            store_cpu: weed_cpu()? - weed_before,
            server_cpu: None,
            uploader_cpu: cpu,
        };
        eprintln!(
            "transfer: (e) {label}: boto3 upload_file {secs:.2} s; CPU: SeaweedFS {:.2} s, uploader {cpu:.2} s",
            boto_run.store_cpu
        );
        if trial > 0 {
            kiln_runs.push(run);
            boto_runs.push(boto_run);
        }
    }
    drop(weed);
    let mib = files.size as f64 / MIB as f64;
    println!(
        "(e) upload of the fresh {} MiB image into SeaweedFS (`weed mini` on loopback), \
         {trials} trials each, alternating (after one warm-up each); CPU is user and system \
         time of each process during the upload, the median of the trials",
        files.size / MIB
    );
    println!();
    println!(
        "| system | median | min | MiB/s at the median | objects per GiB | CPU: SeaweedFS | CPU: kiln server | CPU: uploader | CPU in all / wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (what, runs, objects) in [
        (
            "kiln, `--images s3://` (wall time around the upload call)",
            &kiln_runs,
            kiln_objects.0 as f64 * 1024.0 / mib,
        ),
        (
            "boto3 `upload_file` (multipart, 8 MiB parts, 10 threads)",
            &boto_runs,
            1024.0 / mib,
        ),
    ] {
        let of = |field: fn(&S3Run) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(field).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let walls = of(|run| run.wall);
        let median_wall = median(&walls);
        let server = if runs.iter().any(|run| run.server_cpu.is_some()) {
            format!(
                "{:.2} s",
                median(&of(|run| run.server_cpu.unwrap_or_default()))
            )
        } else {
            "—".to_owned()
        };
        println!(
            "| {what} | {median_wall:.2} s | {:.2} s | {:.0} | {objects:.1} | {:.2} s | {server} | {:.2} s | {:.2} |",
            walls[0],
            mib / median_wall,
            median(&of(|run| run.store_cpu)),
            median(&of(|run| run.uploader_cpu)),
            median(&of(|run| {
                (run.store_cpu + run.server_cpu.unwrap_or_default() + run.uploader_cpu) / run.wall
            })),
        );
    }
    println!();
    Ok(())
}

/// One upload of part (e): its wall time and the CPU seconds each process used.
struct S3Run {
    wall: f64,
    store_cpu: f64,
    /// The kiln server's (none for boto3).
    server_cpu: Option<f64>,
    uploader_cpu: f64,
}

// ---------------------------------------------------------------------------------
// Part (b): the variant after the image, kiln against casync and rsync.

/// One run of one system on the variant.
#[derive(Debug, Default, Clone)]
struct DeltaRun {
    secs: f64,
    sent: Option<u64>,
    received: Option<u64>,
    stored: Option<u64>,
    detail: String,
}

async fn part_b(work: &Path, files: &Files, trials: u32) -> anyhow::Result<()> {
    eprintln!(
        "transfer: (b) variant ({} KiB inserted at byte {}, 1 MiB rewritten at MiB {:?}): kiln, casync, rsync",
        INSERTED / 1024,
        files.edits.insert_at,
        files.edits.rewritten
    );
    let rsync = RsyncDaemon::start(&work.join("rsync")).await?;
    let mut runs: [Vec<DeltaRun>; 3] = Default::default();
    for trial in 1..=trials {
        sync_fs(work)?;
        let run = kiln_delta(work, files, trial, false).await?;
        eprintln!(
            "transfer: (b) trial {trial}/{trials}: kiln {:.2} s",
            run.secs
        );
        runs[0].push(run);

        sync_fs(work)?;
        let run = casync_delta(work, files, trial).await?;
        eprintln!(
            "transfer: (b) trial {trial}/{trials}: casync {:.2} s",
            run.secs
        );
        runs[1].push(run);

        sync_fs(work)?;
        let run = rsync.delta(files).await?;
        eprintln!(
            "transfer: (b) trial {trial}/{trials}: rsync {:.2} s",
            run.secs
        );
        runs[2].push(run);
    }
    rsync.stop().await;
    // Once more for kiln, through a relay that counts every byte on the connection:
    // the chunk frames and also the hash lists, the commit and the HTTP around them.
    sync_fs(work)?;
    let counted = kiln_delta(work, files, 0, true).await?;
    eprintln!("transfer: (b) kiln through the counting relay: done");

    println!(
        "(b) the variant ({} KiB inserted at byte {}, ten 1 MiB regions rewritten) sent after the image, {trials} trials each",
        INSERTED / 1024,
        files.edits.insert_at
    );
    println!();
    println!("| system | bytes sent | bytes received | bytes stored | median | min | notes |");
    println!("|---|---|---|---|---|---|---|");
    let names = [
        "kiln",
        "casync make (default chunking)",
        "rsync to a daemon (delta)",
    ];
    for (name, runs) in names.iter().zip(runs.iter_mut()) {
        let mut times: Vec<f64> = runs.iter().map(|run| run.secs).collect();
        times.sort_by(f64::total_cmp);
        let first = if *name == "kiln" {
            // Bytes: from the counted run; the trials were timed without the relay.
            DeltaRun {
                detail: format!(
                    "{}; bytes sent and received counted on the TCP connection in one more (untimed) run",
                    runs[0].detail
                ),
                ..counted.clone()
            }
        } else {
            runs[0].clone()
        };
        println!(
            "| {name} | {} | {} | {} | {:.2} s | {:.2} s | {} |",
            first.sent.map_or("—".into(), bytes),
            first.received.map_or("—".into(), bytes),
            first.stored.map_or("—".into(), bytes),
            median(&times),
            times[0],
            first.detail
        );
    }
    println!();
    Ok(())
}

/// A fresh server; the image uploaded as job 1, then the variant as job 2 (timed).
/// With `counted`, the variant goes through a relay counting the bytes each way.
async fn kiln_delta(
    work: &Path,
    files: &Files,
    trial: u32,
    counted: bool,
) -> anyhow::Result<DeltaRun> {
    let dir = work.join(format!("b-kiln-{trial}"));
    let kiln = Kiln::start(&dir, 2).await?;
    let first = kiln.claim().await?;
    kiln.upload(&first, &files.base).await?;
    let relay = if counted {
        Some(CountingRelay::start(&kiln.farm.url).await?)
    } else {
        None
    };
    // The same client through the relay: it enrolled at the first claim, and a
    // second enrollment of its id would be refused.
    let conn = match &relay {
        Some(relay) => kiln.conn.through(&relay.url)?,
        None => kiln.conn.clone(),
    };
    let second = claim(&conn).await?;
    let chunk_dir = dir.join("server").join("packs");
    let before = kiln.storage().await?;
    let on_disk_before = tree_size(&chunk_dir)?;
    if let Some(relay) = &relay {
        relay.reset();
    }
    let started = Instant::now();
    let report = upload(&conn, &second, &files.variant).await?;
    let secs = started.elapsed().as_secs_f64();
    let (up, down) = relay.as_ref().map_or((None, None), |relay| {
        let (up, down) = relay.counts();
        (Some(up), Some(down))
    });
    let after = kiln.storage().await?;
    let on_disk_after = tree_size(&chunk_dir)?;
    drop(relay);
    kiln.stop().await;
    remove_dir(&dir)?;
    Ok(DeltaRun {
        secs,
        sent: up.or(Some(report.wire_bytes_sent)),
        received: down,
        stored: Some(after.bytes_stored.saturating_sub(before.bytes_stored)),
        detail: format!(
            "{} of {} chunks sent: {} raw, {} as chunk frames; the server counted {} received, {} deduplicated; its chunk files grew {}",
            report.chunks_sent,
            report.chunks,
            bytes(report.raw_bytes_sent),
            bytes(report.wire_bytes_sent),
            bytes(after.bytes_received.saturating_sub(before.bytes_received)),
            bytes(after.bytes_deduplicated.saturating_sub(before.bytes_deduplicated)),
            bytes(on_disk_after.file_bytes.saturating_sub(on_disk_before.file_bytes)),
        ),
    })
}

/// `casync make` of the image into a fresh store, then of the variant into the same
/// store (timed); the store's growth is what the variant adds.
async fn casync_delta(work: &Path, files: &Files, trial: u32) -> anyhow::Result<DeltaRun> {
    let dir = work.join(format!("b-casync-{trial}"));
    let store = dir.join("store");
    std::fs::create_dir_all(&dir)?;
    let make = |index: PathBuf, input: PathBuf| {
        let store = store.clone();
        async move {
            let output = Command::new("casync")
                .arg("make")
                .arg(format!("--store={}", store.display()))
                .arg(&index)
                .arg(&input)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .context("running casync")?;
            anyhow::ensure!(
                output.status.success(),
                "casync make {} failed ({}): {}",
                input.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
            anyhow::Ok(())
        }
    };
    make(dir.join("base.caibx"), files.base.clone()).await?;
    let before = tree_size(&store)?;
    sync_fs(work)?;
    let started = Instant::now();
    make(dir.join("variant.caibx"), files.variant.clone()).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = tree_size(&store)?;
    remove_dir(&dir)?;
    Ok(DeltaRun {
        secs,
        sent: None,
        received: None,
        stored: Some(after.file_bytes - before.file_bytes),
        detail: format!(
            "stored: growth of the chunk files in the store (`du -sb` of the store grew {}, directories included); a local store: nothing sent",
            bytes(after.all_bytes - before.all_bytes)
        ),
    })
}

/// What a directory tree holds.
struct TreeSize {
    /// Files in it, other than directories.
    files: u64,
    /// Their sizes.
    file_bytes: u64,
    /// Their sizes and the directories' (what `du -sb` adds up).
    all_bytes: u64,
}

fn tree_size(dir: &Path) -> anyhow::Result<TreeSize> {
    let mut size = TreeSize {
        files: 0,
        file_bytes: 0,
        all_bytes: 0,
    };
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        size.all_bytes += std::fs::metadata(&dir)?.len();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                size.files += 1;
                size.file_bytes += meta.len();
                size.all_bytes += meta.len();
            }
        }
    }
    Ok(size)
}

// ---------------------------------------------------------------------------------
// Part (c): the demo build's images.

async fn part_c(work: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = ["mkfs.ext4", "debugfs"]
        .into_iter()
        .filter(|tool| crate::find_tool(tool).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "transfer: (c) skipped: {} not found (apt-get install e2fsprogs)",
            missing.join(" and ")
        );
        return Ok(());
    }
    eprintln!("transfer: (c) the demo build on 3 clients");
    let dir = work.join("demo");
    let mut farm = Farm::start(&dir, &[]).await?;
    for idx in 1..=3 {
        farm.add_client(&format!("demo-client-{idx}"), "*", 1)?;
    }
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let manifest = crate::demo::write_example(&dir.join("example"))?;
    let files_dir = manifest.parent().context("the example has a directory")?;
    let submitted = operator.submit(&manifest, files_dir).await?;
    let all_finished = operator
        .wait_for_build(&submitted.number, Some(Duration::from_secs(900)))
        .await?;
    anyhow::ensure!(
        all_finished,
        "the demo build did not finish; the client logs in {} hold the jobs' output",
        dir.display()
    );
    let storage: StorageStats = operator
        .storage()
        .await
        .context("reading the server's storage counters")?;
    farm.stop().await;
    // The counters, checked against the chunk files themselves.
    let on_disk = tree_size(&dir.join("server").join("packs"))?;
    remove_dir(&dir)?;
    println!(
        "(c) the demo build ({} jobs): its images in the store",
        submitted.n_jobs
    );
    println!();
    println!("| images | sum of image sizes | bytes stored | stored / sum | chunks stored | chunk files on disk |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} % | {} | {} files, {} |",
        storage.images,
        bytes(storage.image_bytes),
        bytes(storage.bytes_stored),
        storage.bytes_stored as f64 / storage.image_bytes.max(1) as f64 * 100.0,
        storage.chunks_stored,
        on_disk.files,
        bytes(on_disk.file_bytes)
    );
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// Part (d): the server's memory during a large upload.

async fn part_d(work: &Path, size_mib: u64, with_s3: bool) -> anyhow::Result<()> {
    use crate::seaweed::{Seaweed, S3_KEY, S3_SECRET};
    let path = work.join("large.img");
    eprintln!("transfer: (d) writing a {size_mib} MiB image of random bytes");
    let file = path.clone();
    tokio::task::spawn_blocking(move || write_noise(&file, size_mib, 3)).await??;
    sync_fs(work)?;
    let mut rows = vec![memory_during_upload(work, &path, "local packs", &[]).await?];
    if with_s3 {
        let weed_dir = work.join("d-weed");
        let weed = tokio::task::spawn_blocking(move || Seaweed::start(&weed_dir)).await?;
        let credentials = work.join("d-s3-credentials");
        std::fs::write(
            &credentials,
            format!("aws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"),
        )?;
        let mut args = weed.server_args("d-kiln");
        args.push("--s3-credentials-file".into());
        args.push(credentials.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rows.push(memory_during_upload(work, &path, "SeaweedFS (`--images s3://`)", &args).await?);
        drop(weed);
        remove_dir(&work.join("d-weed"))?;
    }
    std::fs::remove_file(&path)?;
    println!(
        "(d) the server's memory while it receives a fresh {size_mib} MiB incompressible image"
    );
    println!();
    println!("| images in | upload | RSS before | max RSS, first half of the upload | max RSS, second half | peak RSS (VmHWM) | target |");
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        println!("{row}");
    }
    println!();
    println!("VmRSS sampled every 100 ms; VmHWM is the kernel's peak, between samples too.");
    println!();
    Ok(())
}

/// One upload of `path` to a fresh server with `server_args`, its memory sampled: the
/// row of part (d)'s table.
async fn memory_during_upload(
    work: &Path,
    path: &Path,
    label: &str,
    server_args: &[&str],
) -> anyhow::Result<String> {
    let dir = work.join("d-kiln");
    let kiln = Kiln::start_with(&dir, 1, server_args).await?;
    let pid = kiln.farm.server_pid().context("the server has exited")?;
    let claim = kiln.claim().await?;
    let rss_before = proc_status_kib(pid, "VmRSS")?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                if let Ok(kib) = proc_status_kib(pid, "VmRSS") {
                    samples.push(kib);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };
    eprintln!("transfer: (d) uploading it to a fresh server on {label} (pid {pid})");
    let upload = kiln.upload(&claim, path).await;
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await?;
    let max_mib = |samples: &[u64]| samples.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
    let (first_half, second_half) = samples.split_at(samples.len() / 2);
    let (report, wall) = upload?;
    let hwm = proc_status_kib(pid, "VmHWM")?;
    kiln.stop().await;
    remove_dir(&dir)?;
    Ok(format!(
        "| {label} | {:.1} s ({:.0} MiB/s) | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | flat, under 64 MiB |",
        wall.as_secs_f64(),
        report.size as f64 / MIB as f64 / wall.as_secs_f64(),
        rss_before as f64 / 1024.0,
        max_mib(first_half),
        max_mib(second_half),
        hwm as f64 / 1024.0
    ))
}

/// A `kB` line of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("{path} has no {field} line"))
}

// ---------------------------------------------------------------------------------
// kiln: a real server with a build whose jobs the bench claims itself.

/// A fresh `kiln server` with a build of jobs submitted for the bench to claim.
struct Kiln {
    farm: Farm,
    operator: Operator,
    conn: ServerConn,
}

impl Kiln {
    /// Starts a server with data in `dir` and submits a build of `n_jobs` jobs. The
    /// bench holds its jobs without heartbeats, so the server's lease is an hour.
    async fn start(dir: &Path, n_jobs: u32) -> anyhow::Result<Self> {
        Self::start_with(dir, n_jobs, &[]).await
    }

    /// As [`Kiln::start`], the server with `server_args` too.
    async fn start_with(dir: &Path, n_jobs: u32, server_args: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--lease-secs", "3600"];
        args.extend_from_slice(server_args);
        let farm = Farm::start(dir, &args).await?;
        let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
        let conn = ServerConn::new(&farm.url, &farm.client_token()?)?;
        let build_dir = dir.join("build");
        std::fs::create_dir_all(&build_dir)?;
        std::fs::write(build_dir.join("step.sh"), "true\n")?;
        let mut xml = String::from("<SERVER>\n  <BUILDNUMBER>transfer</BUILDNUMBER>\n  <TITLE>transfer benchmark</TITLE>\n  <JOBS>\n");
        for idx in 1..=n_jobs {
            xml.push_str(&format!(
                "    <JOB ID=\"j{idx}\">\n      <CONFIGTYPE>BENCH</CONFIGTYPE>\n      <INSTALLSCRIPT>step.sh</INSTALLSCRIPT>\n      <IMAGESCRIPT>step.sh</IMAGESCRIPT>\n      <TIMEOUT>86400</TIMEOUT>\n    </JOB>\n"
            ));
        }
        xml.push_str("  </JOBS>\n</SERVER>\n");
        let manifest = build_dir.join("relbuild.xml");
        std::fs::write(&manifest, xml)?;
        operator
            .submit(&manifest, &build_dir)
            .await
            .context("submitting the benchmark's build")?;
        Ok(Kiln {
            farm,
            operator,
            conn,
        })
    }

    async fn claim(&self) -> anyhow::Result<Claim> {
        claim(&self.conn).await
    }

    /// Uploads `path`; returns the uploader's report and the wall time of the call.
    async fn upload(&self, claim: &Claim, path: &Path) -> anyhow::Result<(UploadReport, Duration)> {
        let started = Instant::now();
        let report = upload(&self.conn, claim, path).await.with_context(|| {
            format!(
                "(server log: {})",
                self.farm.dir.join("server.log").display()
            )
        })?;
        Ok((report, started.elapsed()))
    }

    /// As [`Kiln::upload`], with the CPU the server and this process (the uploader)
    /// used during the call.
    async fn upload_with_cpu(
        &self,
        claim: &Claim,
        path: &Path,
    ) -> anyhow::Result<(UploadReport, Duration, KilnCpu)> {
        let server = self.farm.server_pid().context("the kiln server exited")?;
        let uploader = std::process::id();
        let before = (cpu_secs(server)?, cpu_secs(uploader)?);
        let (report, wall) = self.upload(claim, path).await?;
        let cpu = KilnCpu {
            server: cpu_secs(server)? - before.0,
            uploader: cpu_secs(uploader)? - before.1,
        };
        Ok((report, wall, cpu))
    }

    async fn storage(&self) -> anyhow::Result<StorageStats> {
        self.operator
            .storage()
            .await
            .context("reading the server's storage counters")
    }

    async fn stop(self) {
        self.farm.stop().await;
    }
}

/// CPU seconds (user and system) kiln's two ends used during one upload.
struct KilnCpu {
    server: f64,
    uploader: f64,
}

/// CPU seconds (user and system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    Ok(process_use(pid)?.cpu_secs)
}

/// Claims the next job of the benchmark's build.
async fn claim(conn: &ServerConn) -> anyhow::Result<Claim> {
    let request = ClaimRequest {
        client_id: "bench-transfer".into(),
        include: vec!["*".into()],
        wait_secs: 5,
        slots: Some(1),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    };
    for _ in 0..6 {
        if let Some(claim) = conn
            .claim(&request)
            .await
            .context("claiming a job of the benchmark's build")?
        {
            return Ok(claim);
        }
    }
    anyhow::bail!("the server offered no job of the benchmark's build within 30 s")
}

async fn upload(conn: &ServerConn, claim: &Claim, path: &Path) -> anyhow::Result<UploadReport> {
    ChunkedUploader::new()
        .upload(conn, claim, IMAGE_NAME, path, &|_, _| {})
        .await
        .with_context(|| format!("kiln's upload of {} failed", path.display()))
}

// ---------------------------------------------------------------------------------
// nginx and rsync: started by the bench with their configuration in the work directory.

/// An nginx accepting WebDAV PUTs on a free loopback port: one process (no master),
/// which is the process the bench starts and kills.
struct Nginx {
    child: Child,
    url: String,
    dav: PathBuf,
}

impl Nginx {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let dav = dir.join("dav");
        let temp = dir.join("temp");
        std::fs::create_dir_all(&dav)?;
        std::fs::create_dir_all(&temp)?;
        let port = free_port()?;
        let d = dir.display();
        let conf = crate::nginx::config(
            dir,
            &format!(
                "    access_log off;
    server {{
        listen 127.0.0.1:{port};
        root {d}/dav;
        location / {{
            dav_methods PUT;
        }}
    }}
"
            ),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new("nginx")
            .args(crate::nginx::args(dir, &conf_path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("stderr.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dav,
        };
        wait_for_port(&mut nginx.child, port, "nginx", dir).await?;
        Ok(nginx)
    }

    /// `curl -T FILE` to nginx; checks what arrived, syncs the file system (nginx does
    /// not: the file may not be on disk yet when it answers) and deletes the file again
    /// (files piling up would be written back during later trials). Returns the wall
    /// time of curl and then of the sync.
    async fn put(&self, path: &Path, size: u64) -> anyhow::Result<(f64, f64)> {
        let url = format!("{}/{IMAGE_NAME}", self.url);
        let started = Instant::now();
        let output = Command::new("curl")
            .args(["-sS", "--fail", "-w", "%{http_code}", "-T"])
            .arg(path)
            .arg(&url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running curl")?;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            output.status.success(),
            "curl -T {} {url} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let stored = self.dav.join(IMAGE_NAME);
        let stored_size = std::fs::metadata(&stored)
            .with_context(|| {
                format!(
                    "nginx answered the PUT but {} is not there",
                    stored.display()
                )
            })?
            .len();
        anyhow::ensure!(
            stored_size == size,
            "nginx stored {stored_size} bytes of a {size}-byte file"
        );
        let synced = Instant::now();
        sync_fs(&self.dav)?;
        let sync_secs = synced.elapsed().as_secs_f64();
        std::fs::remove_file(&stored)?;
        Ok((secs, sync_secs))
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An rsync daemon on a free loopback port with one writable module.
struct RsyncDaemon {
    child: Child,
    url: String,
    module: PathBuf,
}

impl RsyncDaemon {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let module = dir.join("module");
        std::fs::create_dir_all(&module)?;
        let port = free_port()?;
        // Started as root, the daemon would switch to `nobody` for the module.
        let ids = if is_root() {
            "    uid = 0\n    gid = 0\n"
        } else {
            ""
        };
        let conf = format!(
            "use chroot = no\nlog file = {}\n[bench]\n    path = {}\n    read only = no\n{ids}",
            dir.join("rsyncd.log").display(),
            module.display()
        );
        let conf_path = dir.join("rsyncd.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf_path.display()))
            .arg("--address=127.0.0.1")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("stderr.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the rsync daemon")?;
        let mut daemon = RsyncDaemon {
            child,
            url: format!("rsync://127.0.0.1:{port}/bench"),
            module,
        };
        wait_for_port(&mut daemon.child, port, "the rsync daemon", dir).await?;
        Ok(daemon)
    }

    /// Puts a copy of the image in the module under the upload's name, then sends the
    /// variant to it (timed). Not `--inplace`: in place, rsync cannot use blocks of the
    /// old file that lie before the point it is writing, and the insertion moves every
    /// later block of the variant 4 KiB past its place in the old file, so everything
    /// after it would be sent whole. No `-z`: the data is incompressible.
    async fn delta(&self, files: &Files) -> anyhow::Result<DeltaRun> {
        let target = self.module.join(IMAGE_NAME);
        std::fs::copy(&files.base, &target)
            .with_context(|| format!("copying the image to {}", target.display()))?;
        sync_fs(&self.module)?;
        let started = Instant::now();
        let output = Command::new("rsync")
            .args(["--stats", "--no-human-readable", "--no-whole-file"])
            .arg(&files.variant)
            .arg(format!("{}/{IMAGE_NAME}", self.url))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running rsync")?;
        let secs = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::ensure!(
            output.status.success(),
            "rsync to the daemon failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let stat = |label: &str| -> anyhow::Result<u64> {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(label)?.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("rsync --stats printed no {label:?}:\n{stdout}"))
        };
        let received_size = std::fs::metadata(&target)?.len();
        let variant_size = std::fs::metadata(&files.variant)?.len();
        anyhow::ensure!(
            received_size == variant_size,
            "after rsync the module's file has {received_size} bytes, not the variant's {variant_size}"
        );
        std::fs::remove_file(&target)?;
        Ok(DeltaRun {
            secs,
            sent: Some(stat("Total bytes sent")?),
            received: Some(stat("Total bytes received")?),
            stored: None,
            detail: format!(
                "literal data {}, matched {}; the daemon writes a new whole copy of the file",
                bytes(stat("Literal data")?),
                bytes(stat("Matched data")?)
            ),
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

// ---------------------------------------------------------------------------------
// A relay counting bytes.

/// A TCP relay on 127.0.0.1 counting the bytes it passes each way.
struct CountingRelay {
    url: String,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingRelay {
    async fn start(target_url: &str) -> anyhow::Result<Self> {
        let target = target_url.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (task_up, task_down) = (up.clone(), down.clone());
        let task = tokio::spawn(async move {
            // Aborting the accept loop drops the set, which aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                connections.spawn(pipe(in_read, out_write, task_up.clone()));
                connections.spawn(pipe(out_read, in_write, task_down.clone()));
            }
        });
        Ok(CountingRelay {
            url,
            up,
            down,
            task,
        })
    }

    fn reset(&self) {
        self.up.store(0, Ordering::Relaxed);
        self.down.store(0, Ordering::Relaxed);
    }

    /// Bytes client → server and server → client since the last reset.
    fn counts(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Helpers.

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Waits until `child` accepts connections on `port`; fails with what it logged in
/// `dir` if it exits or does not listen within 10 s.
async fn wait_for_port(child: &mut Child, port: u16, what: &str, dir: &Path) -> anyhow::Result<()> {
    let logs = || {
        ["stderr.log", "error.log", "rsyncd.log"]
            .iter()
            .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} did not start ({status}): {}", logs());
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > give_up {
            anyhow::bail!(
                "{what} did not listen on 127.0.0.1:{port} within 10 s: {}",
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes back everything dirty on the file system holding `dir`, so that one
/// trial's writeback does not land in the next one's time.
fn sync_fs(dir: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs(2) on a descriptor we hold open.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing the file system of {}", dir.display()));
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A byte count for the tables: MiB with two decimals, exact below 1 MiB.
fn bytes(n: u64) -> String {
    if n < MIB {
        format!("{n} B")
    } else {
        format!("{:.2} MiB", n as f64 / MIB as f64)
    }
}

/// Cores and CPU model, from the kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                Some(
                    line.strip_prefix("model name")?
                        .split_once(':')?
                        .1
                        .trim()
                        .to_owned(),
                )
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({model})")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_differs_where_planned_and_shifts_after_the_insertion() {
        let dir = tempfile::tempdir().unwrap();
        let (base, variant) = (dir.path().join("base"), dir.path().join("variant"));
        let edits = Edits::plan(64);
        assert_eq!(edits.rewritten.len(), 10);
        write_noise(&base, 64, 1).unwrap();
        write_variant(&base, &variant, &edits, 2).unwrap();
        let base = std::fs::read(base).unwrap();
        let variant = std::fs::read(variant).unwrap();
        assert_eq!(variant.len(), base.len() + INSERTED);
        let at = edits.insert_at as usize;
        let mib = MIB as usize;
        let mut n_rewritten = 0;
        for idx in 0..64 {
            let start = idx as usize * mib;
            let old = &base[start..start + mib];
            if (start..start + mib).contains(&at) {
                // The insertion: the piece's bytes are all there, around it.
                assert_eq!(variant[start..at], base[start..at]);
                assert_eq!(
                    variant[at + INSERTED..start + mib + INSERTED],
                    base[at..start + mib]
                );
                continue;
            }
            let shift = if start > at { INSERTED } else { 0 };
            let new = &variant[start + shift..start + shift + mib];
            if edits.rewritten.contains(&idx) {
                assert_ne!(new, old, "piece {idx} is rewritten");
                n_rewritten += 1;
            } else {
                assert_eq!(new, old, "piece {idx} is kept");
            }
        }
        assert_eq!(n_rewritten, 10);
    }
}
