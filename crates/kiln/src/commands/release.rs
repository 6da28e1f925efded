//! `kiln release BUILD --to DIR`: every image of the build into
//! `DIR/BUILD/CONFIGTYPE/FILE`, each verified against the server's size, SHA-256 and
//! BLAKE3, then `SHA256SUMS` (`sha256sum -c` format) and `manifest.json`.
//!
//! Images travel as chunks (see docs/transfer.md): every file already under DIR (an
//! earlier release, a build copied there) is indexed by chunk ([`local`]), and each
//! image is put together from the chunks DIR has and the ones fetched from the server
//! ([`assemble`]). A server without chunk indexes gets the whole files downloaded.

mod assemble;
mod local;

use crate::cli::ReleaseArgs;
use crate::operator::{Operator, Refused, Unreachable};
use anyhow::Context;
use assemble::{ChunkSource, Counts, Expected, Pieces};
use kiln_blob::chunking::ChunkParams;
use kiln_blob::{ChunkHash, ImageHasher};
use kiln_proto::api::{BuildSummary, ImageInfo};
use kiln_proto::transfer::{FetchRequest, ImageIndex};
use local::LocalChunks;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub async fn run(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let operator = Operator::new(&args.server)?;
    let released = release(&operator, &args.build, &args.to).await?;
    if args.json {
        let counts = &released.counts;
        let numbers = serde_json::json!({
            "dir": released.dir.display().to_string(),
            "images": released.images.len(),
            "bytes": released.bytes(),
            "bytes_reused": counts.bytes_reused,
            "bytes_fetched": counts.bytes_fetched,
            "wire_bytes": counts.wire_bytes,
            "chunks_reused": counts.chunks_reused,
            "chunks_fetched": counts.chunks_fetched,
        });
        println!("{numbers}");
    } else {
        println!("{}", released.dir.display());
    }
    Ok(if released.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What a release wrote.
pub struct Released {
    pub dir: PathBuf,
    pub images: Vec<(PathBuf, ImageInfo)>,
    /// Every job of the build finished (else only the finished ones were released).
    pub complete: bool,
    /// What was copied from files already there and what was downloaded.
    pub counts: Counts,
}

impl Released {
    /// Bytes of all the images released.
    pub fn bytes(&self) -> u64 {
        self.images.iter().map(|(_, image)| image.size).sum()
    }
}

/// Where each image goes under the build's directory: `CONFIGTYPE/FILE`, or
/// `CONFIGTYPE/JOB/FILE` when two jobs of one config type left files of one name.
fn layout(images: &[ImageInfo]) -> Vec<PathBuf> {
    let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
    for image in images {
        *counts.entry((&image.config_type, &image.name)).or_default() += 1;
    }
    images
        .iter()
        .map(|image| {
            if counts[&(image.config_type.as_str(), image.name.as_str())] > 1 {
                Path::new(&image.config_type)
                    .join(&image.job_id)
                    .join(&image.name)
            } else {
                Path::new(&image.config_type).join(&image.name)
            }
        })
        .collect()
}

/// Downloads and verifies every image of `build` into `to/BUILD`.
pub async fn release(operator: &Operator, build: &str, to: &Path) -> anyhow::Result<Released> {
    kiln_proto::names::check_name("build number", build).map_err(crate::operator::Usage)?;
    let summary: BuildSummary = operator.get_json(&format!("/v1/builds/{build}")).await?;
    let images: Vec<ImageInfo> = operator
        .get_json(&format!("/v1/builds/{build}/images"))
        .await?;
    let complete = summary.n_finished == summary.n_jobs;
    if !complete {
        eprintln!(
            "warning: build {build} has {} of {} jobs finished; releasing the images of those",
            summary.n_finished, summary.n_jobs
        );
    }
    let dir = to.join(build);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let placed: Vec<(PathBuf, ImageInfo)> = layout(&images).into_iter().zip(images).collect();
    // Files are read, written and hashed on a thread of their own; the HTTP calls it
    // makes run on this runtime.
    let handle = tokio::runtime::Handle::current();
    let (written, counts) = {
        let operator = operator.clone();
        let to = to.to_owned();
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || write_images(&handle, &operator, &to, &dir, placed))
            .await
            .context("the release's writer stopped")??
    };
    // Every file is verified: only now say what the release holds.
    let mut sums = String::new();
    for (relative, image) in &written {
        sums.push_str(&format!("{}  {}\n", image.sha256, relative.display()));
    }
    write_file(&dir.join("SHA256SUMS"), sums.as_bytes())?;
    let manifest = serde_json::json!({
        "build": summary.number,
        "title": summary.title,
        "build_time": summary.build_time,
        "complete": complete,
        "images": written.iter().map(|(relative, image)| serde_json::json!({
            "path": relative.display().to_string(),
            "job": image.job_id,
            "config_type": image.config_type,
            "name": image.name,
            "size": image.size,
            "sha256": image.sha256,
            "blake3": image.blake3,
        })).collect::<Vec<_>>(),
    });
    write_file(
        &dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    let released = Released {
        dir,
        images: written
            .into_iter()
            .map(|(rel, image)| (to.join(build).join(rel), image))
            .collect(),
        complete,
        counts,
    };
    eprintln!("{}", summary_line(build, &released));
    Ok(released)
}

/// One line saying what a release wrote and where its bytes came from.
fn summary_line(build: &str, released: &Released) -> String {
    use indicatif::HumanBytes;
    let counts = &released.counts;
    let mut line = format!(
        "released {} images of build {build} into {}: {}",
        released.images.len(),
        released.dir.display(),
        HumanBytes(released.bytes()),
    );
    if counts.chunks_reused > 0 || counts.chunks_fetched > 0 {
        line.push_str(&format!(
            ", {} reused from files already there ({} chunks), {} fetched ({} chunks, {} on the wire)",
            HumanBytes(counts.bytes_reused),
            counts.chunks_reused,
            HumanBytes(counts.bytes_fetched),
            counts.chunks_fetched,
            HumanBytes(counts.wire_bytes),
        ));
    } else {
        line.push_str(&format!(
            ", {} fetched ({} on the wire)",
            HumanBytes(counts.bytes_fetched),
            HumanBytes(counts.wire_bytes),
        ));
    }
    line
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
fn progress_bar(label: &str, total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label:<7} {{bytes:>10}}/{{total_bytes:10}} [{{bar:30}}] {{msg}}"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Writes every image under `dir` (inside the release directory `to`), verified;
/// returns what was written and the counts. Runs on a blocking thread: file work is
/// done here, HTTP calls on `handle`'s runtime.
fn write_images(
    handle: &tokio::runtime::Handle,
    operator: &Operator,
    to: &Path,
    dir: &Path,
    placed: Vec<(PathBuf, ImageInfo)>,
) -> anyhow::Result<(Vec<(PathBuf, ImageInfo)>, Counts)> {
    let total: u64 = placed.iter().map(|(_, image)| image.size).sum();
    let bars = indicatif::MultiProgress::new();
    let bar = bars.add(progress_bar("release", total));
    let mut source = HttpChunks {
        handle: handle.clone(),
        operator: operator.clone(),
    };
    let mut counts = Counts::default();
    let mut written = Vec::new();
    // Made at the first chunk index: a server without them gets no scan.
    let mut index: Option<LocalChunks> = None;
    for (relative, image) in placed {
        bar.set_message(relative.display().to_string());
        let path = dir.join(&relative);
        let label = format!("{}/{}/{}", image.build, image.job_id, image.name);
        let index_url = format!(
            "/v1/jobs/{}/{}/images/{}/index",
            image.build, image.job_id, image.name
        );
        match handle.block_on(operator.get_json::<ImageIndex>(&index_url)) {
            Ok(image_index) => {
                check_index(&label, &image, &image_index)?;
                let index = match &mut index {
                    Some(index) => index,
                    None => index.insert(scan(to, &bars)?),
                };
                let expected = Expected {
                    label: &label,
                    size: image.size,
                    blake3: &image.blake3,
                    sha256: &image.sha256,
                };
                assemble::assemble(
                    index,
                    &mut source,
                    &image_index.chunks,
                    &expected,
                    &path,
                    &mut counts,
                    &|n_bytes| bar.inc(n_bytes),
                )?;
            }
            // A server from before chunked transfer: the whole file.
            Err(err) if is_not_found(&err) => {
                let wire_bytes =
                    handle.block_on(download_verified(operator, &image, &path, &bar))?;
                counts.bytes_fetched += image.size;
                counts.wire_bytes += wire_bytes;
            }
            Err(err) => {
                return Err(err.context(format!("reading the chunk index of image {label}")))
            }
        }
        written.push((relative, image));
    }
    bar.finish_and_clear();
    Ok((written, counts))
}

/// Indexes the chunks of the files already in the release directory `to`, with a
/// progress bar among `bars` while files are cut.
fn scan(to: &Path, bars: &indicatif::MultiProgress) -> anyhow::Result<LocalChunks> {
    let bar = progress_bar("index", 0);
    // Shown only once there is something to cut.
    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    bar.set_message(to.display().to_string());
    let (index, _) = LocalChunks::scan(
        to,
        ChunkParams::default(),
        &|total| {
            bar.set_length(total);
            bars.insert(0, bar.clone());
        },
        &|n_bytes| bar.inc(n_bytes),
    )
    .with_context(|| format!("looking for chunks already in {}", to.display()))?;
    bar.finish_and_clear();
    Ok(index)
}

/// Whether the server answered 404.
fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Refused>()
        .is_some_and(|refused| refused.status == reqwest::StatusCode::NOT_FOUND)
}

/// Refuses a chunk index that does not describe the image the build's image list names.
fn check_index(label: &str, image: &ImageInfo, index: &ImageIndex) -> anyhow::Result<()> {
    let chunk_bytes: u64 = index.chunks.iter().map(|entry| u64::from(entry.len)).sum();
    if index.size != image.size
        || index.blake3 != image.blake3
        || index.sha256 != image.sha256
        || chunk_bytes != image.size
    {
        anyhow::bail!(
            "the server's chunk index of image {label} does not match its image list: \
             size {} (chunks adding up to {chunk_bytes}) vs {}, sha256 {} vs {}, blake3 {} vs {}",
            index.size,
            image.size,
            index.sha256,
            image.sha256,
            index.blake3,
            image.blake3,
        );
    }
    Ok(())
}

/// Chunks from the server: `POST /v1/chunks/fetch`, the response read as it arrives.
struct HttpChunks {
    handle: tokio::runtime::Handle,
    operator: Operator,
}

impl ChunkSource for HttpChunks {
    fn fetch(&mut self, hashes: &[ChunkHash]) -> anyhow::Result<Pieces> {
        let body = FetchRequest {
            chunks: hashes.to_vec(),
        };
        let request = self
            .operator
            .request(reqwest::Method::POST, "/v1/chunks/fetch")
            .json(&body);
        let response = self.handle.block_on(self.operator.send(request))?;
        Ok(Box::new(ResponsePieces {
            handle: self.handle.clone(),
            url: self.operator.url().to_owned(),
            response: Some(response),
        }))
    }
}

/// The body of a response, piece by piece, read on a runtime from a blocking thread.
struct ResponsePieces {
    handle: tokio::runtime::Handle,
    url: String,
    /// `None` once the body ended or failed.
    response: Option<reqwest::Response>,
}

impl Iterator for ResponsePieces {
    type Item = anyhow::Result<bytes::Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        let response = self.response.as_mut()?;
        match self.handle.block_on(response.chunk()) {
            Ok(Some(piece)) => Some(Ok(piece)),
            Ok(None) => {
                self.response = None;
                None
            }
            Err(source) => {
                self.response = None;
                Some(Err(Unreachable {
                    url: self.url.clone(),
                    source,
                }
                .into()))
            }
        }
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = assemble::part_path(path);
    let written = std::fs::File::create(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(err).with_context(|| format!("writing {}", path.display()));
    }
    assemble::sync_parent(path);
    Ok(())
}

/// Downloads one image whole to `path` (through a temporary file), refusing it unless
/// its size, SHA-256 and BLAKE3 are the server's; returns the bytes received.
async fn download_verified(
    operator: &Operator,
    image: &ImageInfo,
    path: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let url = format!(
        "/v1/jobs/{}/{}/images/{}",
        image.build, image.job_id, image.name
    );
    let mut response = operator
        .send(operator.request(reqwest::Method::GET, &url))
        .await?;
    let temp = assemble::part_path(path);
    let mut file = tokio::fs::File::create(&temp)
        .await
        .with_context(|| format!("creating {}", temp.display()))?;
    let downloaded = async {
        let mut hasher = ImageHasher::new();
        while let Some(chunk) = response.chunk().await.map_err(|source| Unreachable {
            url: operator.url().to_owned(),
            source,
        })? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", temp.display()))?;
            bar.inc(chunk.len() as u64);
        }
        file.sync_all()
            .await
            .with_context(|| format!("writing {}", temp.display()))?;
        anyhow::Ok(hasher.finish())
    }
    .await;
    drop(file);
    let digests = match downloaded {
        Ok(digests) => digests,
        Err(err) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(err);
        }
    };
    if digests.size != image.size
        || digests.sha256 != image.sha256
        || digests.blake3 != image.blake3
    {
        let _ = tokio::fs::remove_file(&temp).await;
        anyhow::bail!(
            "image {}/{}/{} ({}) does not match what the server recorded: size {} vs {}, \
             sha256 {} vs {}, blake3 {} vs {}; nothing was written",
            image.build,
            image.job_id,
            image.name,
            path.display(),
            digests.size,
            image.size,
            digests.sha256,
            image.sha256,
            digests.blake3,
            image.blake3,
        );
    }
    tokio::fs::rename(&temp, path)
        .await
        .with_context(|| format!("writing {}", path.display()))?;
    assemble::sync_parent(path);
    Ok(digests.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(job: &str, config: &str, name: &str) -> ImageInfo {
        ImageInfo {
            build: "1".into(),
            job_id: job.into(),
            config_type: config.into(),
            name: name.into(),
            size: 0,
            blake3: String::new(),
            sha256: String::new(),
            created_at: 0,
        }
    }

    /// A server from before chunked transfer, on loopback: it knows build 9 and its
    /// one image, answers 404 for anything else (chunk indexes included), and serves
    /// `served` as the image's bytes.
    fn older_server(image: &ImageInfo, served: Vec<u8>) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let summary = serde_json::json!({
            "number": "9", "title": "Build 9", "build_time": null, "submitted_at": 0,
            "n_jobs": 1, "n_queued": 0, "n_running": 0, "n_finished": 1,
            "n_failed": 0, "n_expired": 0, "n_cancelled": 0,
        })
        .to_string()
        .into_bytes();
        let images = serde_json::to_vec(&[image]).unwrap();
        let image_path = format!("/v1/jobs/9/{}/images/{}", image.job_id, image.name);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                        break;
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let (status, body): (&str, &[u8]) = match path {
                    "/v1/builds/9" => ("200 OK", &summary),
                    "/v1/builds/9/images" => ("200 OK", &images),
                    path if path == image_path => ("200 OK", &served),
                    _ => (
                        "404 Not Found",
                        br#"{"code":"not_found","error":"no route"}"#,
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        url
    }

    fn image_of(bytes: &[u8]) -> ImageInfo {
        let mut hasher = ImageHasher::new();
        hasher.update(bytes);
        let digests = hasher.finish();
        ImageInfo {
            size: digests.size,
            blake3: digests.blake3,
            sha256: digests.sha256,
            ..image("j", "PRO", "disk.img")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_server_gets_whole_files_downloaded_and_checked() {
        let bytes: Vec<u8> = (0..300_000u32).map(|n| (n * 7 % 251) as u8).collect();
        let image = ImageInfo {
            build: "9".into(),
            ..image_of(&bytes)
        };
        let operator = Operator::with_token(&older_server(&image, bytes.clone()), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let released = release(&operator, "9", dir.path()).await.unwrap();
        assert!(released.complete);
        assert_eq!(
            std::fs::read(dir.path().join("9/PRO/disk.img")).unwrap(),
            bytes
        );
        assert_eq!(
            released.counts,
            Counts {
                bytes_fetched: bytes.len() as u64,
                wire_bytes: bytes.len() as u64,
                ..Counts::default()
            }
        );
        let sums = std::fs::read_to_string(dir.path().join("9/SHA256SUMS")).unwrap();
        assert_eq!(sums, format!("{}  PRO/disk.img\n", image.sha256));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_whole_file_that_does_not_match_is_refused() {
        let bytes = vec![5u8; 100_000];
        let image = ImageInfo {
            build: "9".into(),
            ..image_of(&bytes)
        };
        let mut damaged = bytes.clone();
        damaged[50_000] = 6;
        let operator = Operator::with_token(&older_server(&image, damaged), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = release(&operator, "9", dir.path()).await.err().unwrap();
        let message = format!("{err:#}");
        assert!(message.contains("9/j/disk.img"), "{message}");
        assert!(message.contains(&image.sha256), "{message}");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("9/PRO"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "nothing is left: {left:?}");
        assert!(!dir.path().join("9/SHA256SUMS").exists());
    }

    #[test]
    fn colliding_names_get_a_job_directory() {
        let images = [
            image("a", "PRO", "disk.raw"),
            image("b", "PRO", "disk.raw"),
            image("c", "HOME", "disk.raw"),
        ];
        let paths = layout(&images);
        assert_eq!(paths[0], Path::new("PRO/a/disk.raw"));
        assert_eq!(paths[1], Path::new("PRO/b/disk.raw"));
        assert_eq!(paths[2], Path::new("HOME/disk.raw"));
    }
}
