//! A data directory from before images were kept as chunks: its whole-file images are
//! converted when the server opens it, and read back byte for byte.

use kiln_proto::manifest::{BuildManifest, JobSpec};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Images, NewBuild, NewImage, Queue, SqliteStore};

#[tokio::test]
async fn whole_file_images_are_converted_to_chunks_at_open() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_owned();
    let image = kiln_blob::noise::noise(3 << 20, 7);
    let digests = kiln_blob::chunking::chunk_reader(&image[..], &Default::default())?.digests;

    // What an older server left: the image as one blob under its BLAKE3 (in the blob
    // directory's layout of then and now), and an image row without a chunk list.
    let blob_path = data
        .join("blobs/objects")
        .join(&digests.blake3[..2])
        .join(&digests.blake3);
    std::fs::create_dir_all(blob_path.parent().expect("a parent"))?;
    std::fs::write(&blob_path, &image)?;
    {
        let store = SqliteStore::open(&data.join("kiln.db")).await?;
        store
            .insert_build(&NewBuild {
                manifest: BuildManifest {
                    number: "7".into(),
                    title: "old".into(),
                    build_time: None,
                    log_file: None,
                    notify: vec![],
                    jobs: vec![JobSpec {
                        id: "j".into(),
                        title: "j".into(),
                        config_type: "PRO".into(),
                        install_script: "i.sh".into(),
                        configure_script: None,
                        image_script: "i.sh".into(),
                        verify_script: None,
                        timeout_secs: 60,
                        priority: None,
                        accept_within_secs: None,
                        assigned_to: None,
                        max_attempts: None,
                        retries: None,
                    }],
                },
                files_key: "0".repeat(64),
                files_size: 0,
                submitted_at: 1,
                default_accept_within_secs: None,
                default_max_attempts: 3,
            })
            .await?;
        let claimed = store
            .claim(
                "7",
                "j",
                &kiln_store::ClaimingClient::with_id("old-client"),
                i64::MAX / 2,
                2,
            )
            .await?
            .expect("claimable");
        store
            .add_image(
                "7",
                "j",
                &claimed.lease,
                &NewImage {
                    name: "disk.img".into(),
                    size: digests.size,
                    blake3: digests.blake3.clone(),
                    sha256: digests.sha256.clone(),
                    blob_key: digests.blake3.clone(),
                    created_at: 3,
                    chunk_list: Vec::new(),
                },
            )
            .await?;
        store
            .finish("7", "j", &claimed.lease, &["disk.img".into()], 4)
            .await?;
    }
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("kiln.db"));
        let pool = sqlx::SqlitePool::connect_with(options).await?;
        sqlx::query("UPDATE images SET chunk_list = NULL")
            .execute(&pool)
            .await?;
        pool.close().await;
    }

    let server = Server::open(ServerConfig::new(data.clone())).await?;
    assert!(
        !blob_path.exists(),
        "the whole-file blob is gone once converted"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(listener, async {
        let _ = stopped.await;
    }));
    let admin = std::fs::read_to_string(data.join("admin.token"))?;
    let response = reqwest::Client::new()
        .get(format!("{url}/v1/jobs/7/j/images/disk.img"))
        .bearer_auth(admin.trim())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await?;
    assert!(
        body[..] == image[..],
        "the converted image reads back whole"
    );
    let _ = stop.send(());
    serving.await??;

    let store = SqliteStore::open(&data.join("kiln.db")).await?;
    assert!(store.legacy_images().await?.is_empty());
    assert!(store
        .get_image("7", "j", "disk.img")
        .await?
        .chunk_list
        .is_some());
    Ok(())
}
