//! `kiln release BUILD --to DIR`: every image of the build into
//! `DIR/BUILD/CONFIGTYPE/FILE`, each verified against the server's SHA-256 and BLAKE3,
//! then `SHA256SUMS` (`sha256sum -c` format) and `manifest.json`.

use crate::cli::ReleaseArgs;
use crate::operator::Operator;
use anyhow::Context;
use kiln_blob::ImageHasher;
use kiln_proto::api::{BuildSummary, ImageInfo};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub async fn run(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let operator = Operator::new(&args.server)?;
    let released = release(&operator, &args.build, &args.to).await?;
    println!("{}", released.dir.display());
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
    let total: u64 = images.iter().map(|image| image.size).sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "release {bytes:>10}/{total_bytes:10} [{bar:30}] {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut written = Vec::new();
    for (relative, image) in layout(&images).into_iter().zip(images) {
        bar.set_message(relative.display().to_string());
        let path = dir.join(&relative);
        download_verified(operator, &image, &path, &bar).await?;
        written.push((relative, image));
    }
    bar.finish_and_clear();
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
    eprintln!(
        "released {} images of build {build} into {}",
        written.len(),
        dir.display()
    );
    Ok(Released {
        dir,
        images: written
            .into_iter()
            .map(|(rel, image)| (to.join(build).join(rel), image))
            .collect(),
        complete,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = path.with_extension("part");
    let mut file =
        std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Downloads one image to `path` (through a temporary file), refusing it unless its
/// size, SHA-256 and BLAKE3 are the server's.
async fn download_verified(
    operator: &Operator,
    image: &ImageInfo,
    path: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
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
    let temp = path.with_extension("kiln-part");
    let mut file = tokio::fs::File::create(&temp)
        .await
        .with_context(|| format!("creating {}", temp.display()))?;
    let mut hasher = ImageHasher::new();
    while let Some(chunk) =
        response
            .chunk()
            .await
            .map_err(|source| crate::operator::Unreachable {
                url: operator.url().to_owned(),
                source,
            })?
    {
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    file.sync_all().await?;
    drop(file);
    let digests = hasher.finish();
    if digests.size != image.size
        || digests.sha256 != image.sha256
        || digests.blake3 != image.blake3
    {
        let _ = tokio::fs::remove_file(&temp).await;
        anyhow::bail!(
            "image {}/{}/{} does not match what the server recorded (size {} vs {}, sha256 {} vs {}); nothing was written",
            image.build,
            image.job_id,
            image.name,
            digests.size,
            image.size,
            digests.sha256,
            image.sha256
        );
    }
    tokio::fs::rename(&temp, path)
        .await
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
