//! kiln-release: a build's images collected into a release directory,
//! `DIR/BUILD/CONFIGTYPE/FILE`, each verified against the server's size, SHA-256 and
//! BLAKE3, then `SHA256SUMS` (`sha256sum -c` format) and `manifest.json`: what
//! `kiln release BUILD --to DIR` does ([`release`], returning [`Released`]).
//!
//! Images travel as chunks (see docs/transfer.md): every file already under DIR (an
//! earlier release, a build copied there) is indexed by chunk, with its chunk list
//! cached on disk ([`local::LocalChunks`]), and each image is put together from the
//! chunks DIR has and the ones fetched from the server ([`assemble::assemble`], over a
//! [`assemble::ChunkSource`]). A server without chunk indexes gets the whole files
//! downloaded. Progress shows on stderr while it runs (bars on a terminal only), and
//! one line says what the release wrote when it is done.

pub mod assemble;
pub mod local;

use assemble::{ChunkSource, Counts, Expected, FetchError, Pieces};
use kiln_api::{CallError, Download, Operator};
use kiln_blob::chunking::ChunkParams;
use kiln_blob::{ChunkHash, ImageHasher};
use kiln_proto::api::ImageInfo;
use kiln_proto::transfer::ImageIndex;
use local::LocalChunks;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a release did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The build number is not a name the server could hold.
    #[error("{0}")]
    BadBuild(String),
    /// A call to the server failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The chunk index of an image could not be read.
    #[error("reading the chunk index of image {label}")]
    Index {
        label: String,
        #[source]
        source: CallError,
    },
    /// The chunk index does not describe the image the build's image list names.
    #[error("{0}")]
    IndexMismatch(Box<IndexMismatch>),
    /// Asking the server for chunks failed.
    #[error("fetching chunks of image {label}")]
    Fetch {
        label: String,
        #[source]
        source: CallError,
    },
    /// The server's answer with the chunks was not the chunks asked for.
    #[error("fetching chunks of image {label} from the server")]
    Chunks {
        label: String,
        #[source]
        source: FetchError,
    },
    /// What was written is not the image the server recorded; nothing was kept.
    #[error("{0}")]
    Mismatch(Box<Mismatch>),
    /// The files already in the release directory could not be indexed.
    #[error("looking for chunks already in {}", dir.display())]
    Scan {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The thread that writes the files stopped without an answer.
    #[error("the release's writer stopped")]
    Writer(#[source] tokio::task::JoinError),
}

/// A chunk index that does not describe the image the build's image list names.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server's chunk index of image {label} does not match its image list: \
     size {index_size} (chunks adding up to {chunk_bytes}) vs {size}, sha256 {index_sha256} vs {sha256}, blake3 {index_blake3} vs {blake3}"
)]
pub struct IndexMismatch {
    pub label: String,
    pub index_size: u64,
    pub chunk_bytes: u64,
    pub size: u64,
    pub index_sha256: String,
    pub sha256: String,
    pub index_blake3: String,
    pub blake3: String,
}

/// An image whose bytes are not what the server recorded.
#[derive(Debug, thiserror::Error)]
#[error(
    "image {label} ({}) does not match what the server recorded: size {size} vs {expected_size}, \
     sha256 {sha256} vs {expected_sha256}, blake3 {blake3} vs {expected_blake3}; nothing was written",
    path.display()
)]
pub struct Mismatch {
    pub label: String,
    pub path: PathBuf,
    pub size: u64,
    pub expected_size: u64,
    pub sha256: String,
    pub expected_sha256: String,
    pub blake3: String,
    pub expected_blake3: String,
}

impl ReleaseError {
    /// A file error, saying what was being done.
    pub(crate) fn io(what: String) -> impl FnOnce(std::io::Error) -> ReleaseError {
        move |source| ReleaseError::Io { what, source }
    }

    /// The call to the server that failed, if one did.
    pub fn call(&self) -> Option<&CallError> {
        match self {
            ReleaseError::Call(err)
            | ReleaseError::Index { source: err, .. }
            | ReleaseError::Fetch { source: err, .. }
            | ReleaseError::Chunks {
                source: FetchError::Call(err),
                ..
            } => Some(err),
            _ => None,
        }
    }

    /// Whether the release was asked for wrongly (a bad build number).
    pub fn is_usage(&self) -> bool {
        matches!(self, ReleaseError::BadBuild(_))
    }
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
pub async fn release(
    operator: &Operator,
    build: &str,
    to: &Path,
) -> Result<Released, ReleaseError> {
    kiln_proto::names::check_name("build number", build).map_err(ReleaseError::BadBuild)?;
    let summary = operator.build(build).await?;
    let images = operator.images(build).await?;
    let complete = summary.n_finished == summary.n_jobs;
    if !complete {
        eprintln!(
            "warning: build {build} has {} of {} jobs finished; releasing the images of those",
            summary.n_finished, summary.n_jobs
        );
    }
    let dir = to.join(build);
    std::fs::create_dir_all(&dir)
        .map_err(ReleaseError::io(format!("creating {}", dir.display())))?;
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
            .map_err(ReleaseError::Writer)??
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
    let manifest = serde_json::to_string_pretty(&manifest).expect("JSON values serialize");
    write_file(&dir.join("manifest.json"), manifest.as_bytes())?;
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
pub fn summary_line(build: &str, released: &Released) -> String {
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
) -> Result<(Vec<(PathBuf, ImageInfo)>, Counts), ReleaseError> {
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
        match handle.block_on(operator.image_index(&image)) {
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
            Err(err) if err.refused_status() == Some(kiln_api::StatusCode::NOT_FOUND) => {
                let wire_bytes =
                    handle.block_on(download_verified(operator, &image, &path, &bar))?;
                counts.bytes_fetched += image.size;
                counts.wire_bytes += wire_bytes;
            }
            Err(source) => return Err(ReleaseError::Index { label, source }),
        }
        written.push((relative, image));
    }
    bar.finish_and_clear();
    Ok((written, counts))
}

/// Indexes the chunks of the files already in the release directory `to`, with a
/// progress bar among `bars` while files are cut.
fn scan(to: &Path, bars: &indicatif::MultiProgress) -> Result<LocalChunks, ReleaseError> {
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
    .map_err(|source| ReleaseError::Scan {
        dir: to.to_owned(),
        source,
    })?;
    bar.finish_and_clear();
    Ok(index)
}

/// Refuses a chunk index that does not describe the image the build's image list names.
fn check_index(label: &str, image: &ImageInfo, index: &ImageIndex) -> Result<(), ReleaseError> {
    let chunk_bytes: u64 = index.chunks.iter().map(|entry| u64::from(entry.len)).sum();
    if index.size != image.size
        || index.blake3 != image.blake3
        || index.sha256 != image.sha256
        || chunk_bytes != image.size
    {
        return Err(ReleaseError::IndexMismatch(Box::new(IndexMismatch {
            label: label.to_owned(),
            index_size: index.size,
            chunk_bytes,
            size: image.size,
            index_sha256: index.sha256.clone(),
            sha256: image.sha256.clone(),
            index_blake3: index.blake3.clone(),
            blake3: image.blake3.clone(),
        })));
    }
    Ok(())
}

/// Chunks from the server: `POST /v1/chunks/fetch`, the response read as it arrives.
struct HttpChunks {
    handle: tokio::runtime::Handle,
    operator: Operator,
}

impl ChunkSource for HttpChunks {
    fn fetch(&mut self, hashes: &[ChunkHash]) -> Result<Pieces, CallError> {
        let download = self.handle.block_on(self.operator.fetch_chunks(hashes))?;
        Ok(Box::new(DownloadPieces {
            handle: self.handle.clone(),
            download: Some(download),
        }))
    }
}

/// The body of an answer, piece by piece, read on a runtime from a blocking thread.
struct DownloadPieces {
    handle: tokio::runtime::Handle,
    /// `None` once the body ended or failed.
    download: Option<Download>,
}

impl Iterator for DownloadPieces {
    type Item = Result<bytes::Bytes, CallError>;

    fn next(&mut self) -> Option<Self::Item> {
        let download = self.download.as_mut()?;
        match self.handle.block_on(download.chunk()) {
            Ok(Some(piece)) => Some(Ok(piece)),
            Ok(None) => {
                self.download = None;
                None
            }
            Err(err) => {
                self.download = None;
                Some(Err(err))
            }
        }
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    let temp = assemble::part_path(path);
    let written = std::fs::File::create(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(ReleaseError::io(format!("writing {}", path.display()))(err));
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
) -> Result<u64, ReleaseError> {
    use tokio::io::AsyncWriteExt;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(ReleaseError::io(format!("creating {}", parent.display())))?;
    }
    let mut download = operator.download_image(image).await?;
    let temp = assemble::part_path(path);
    let mut file = tokio::fs::File::create(&temp)
        .await
        .map_err(ReleaseError::io(format!("creating {}", temp.display())))?;
    let writing = || ReleaseError::io(format!("writing {}", temp.display()));
    let downloaded = async {
        let mut hasher = ImageHasher::new();
        while let Some(chunk) = download.chunk().await? {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(writing())?;
            bar.inc(chunk.len() as u64);
        }
        file.sync_all().await.map_err(writing())?;
        Ok::<_, ReleaseError>(hasher.finish())
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
        return Err(ReleaseError::Mismatch(Box::new(Mismatch {
            label: format!("{}/{}/{}", image.build, image.job_id, image.name),
            path: path.to_owned(),
            size: digests.size,
            expected_size: image.size,
            sha256: digests.sha256,
            expected_sha256: image.sha256.clone(),
            blake3: digests.blake3,
            expected_blake3: image.blake3.clone(),
        })));
    }
    tokio::fs::rename(&temp, path)
        .await
        .map_err(ReleaseError::io(format!("writing {}", path.display())))?;
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
