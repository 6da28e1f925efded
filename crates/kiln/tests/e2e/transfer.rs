//! Chunked image transfer against a real server process: only missing chunks travel,
//! bad chunks and wrong hashes are refused with nothing kept, downloads honour Range
//! and ETag, and deleting a build frees only the chunks no other image uses.
//!
//! The test plays the client itself (claims jobs through `ServerConn` and uploads with
//! the client's `ChunkedUploader`), so that it can count what travels and forge what a
//! broken or hostile client would send.

use crate::common::{raw_http, text, wait_until, write_build, Harness, Job, Server, TcpProxy};
use kiln_api::{CallError, ServerConn};
use kiln_blob::noise::noise;
use kiln_blob::{ChunkEntry, ChunkHash, Frame};
use kiln_client::upload::{ChunkedUploader, ImageUploader};
use kiln_proto::api::{Claim, ClaimRequest};
use kiln_proto::transfer::{FetchRequest, ImageIndex, StorageStats};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// `base` with a few regions rewritten and 4 KiB inserted (every later byte shifts).
fn variant_of(base: &[u8]) -> Vec<u8> {
    let mut variant = base.to_vec();
    for (i, offset) in [1usize << 20, 3 << 20, 6 << 20].into_iter().enumerate() {
        variant[offset..offset + 4096].copy_from_slice(&noise(4096, 100 + i as u64));
    }
    let middle = variant.len() / 2;
    variant.splice(middle..middle, noise(4096, 200));
    variant
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A server with one build of `n_jobs` jobs (config type IMG) that nobody else
/// claims, and a connection to it with the client credential.
fn farm(harness: &Harness, build: &str, n_jobs: usize) -> (Server, ServerConn) {
    let server = harness.start_server("server", &[]);
    let jobs: Vec<Job> = (0..n_jobs)
        .map(|n| Job::new(&format!("j{n}"), "IMG"))
        .collect();
    server.submit(&write_build(
        &harness.mkdir(&format!("build-{build}")),
        build,
        &jobs,
    ));
    let conn = ServerConn::new(&server.url, &server.client_token()).expect("a connection");
    (server, conn)
}

async fn claim(conn: &ServerConn) -> Claim {
    conn.claim(&ClaimRequest {
        client_id: "tester".into(),
        include: vec!["IMG".into()],
        wait_secs: 5,
        slots: None,
        version: None,
    })
    .await
    .expect("claim")
    .expect("a job to claim")
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("writing a test image");
    path
}

fn storage(server: &Server) -> StorageStats {
    let response = server.get("/v1/storage");
    assert_eq!(response.status, 200, "{}", response.body);
    serde_json::from_str(&response.body).expect("storage counters")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// GET with the admin credential, returning status, headers and raw body.
async fn get_raw(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", server.url))
        .bearer_auth(server.admin_token());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("GET");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("a body").to_vec();
    (status, headers, body)
}

#[test]
fn a_similar_image_sends_only_the_chunks_that_differ() {
    let harness = Harness::new("transfer-dedup");
    let (server, conn) = farm(&harness, "300", 3);
    let base = noise(8 << 20, 1);
    let variant = variant_of(&base);
    let base_path = write_file(harness.path(), "base.img", &base);
    let variant_path = write_file(harness.path(), "variant.img", &variant);
    let zeros_path = harness.path().join("zeros.img");
    std::fs::File::create(&zeros_path)
        .and_then(|file| file.set_len(32 << 20))
        .expect("a sparse image");
    let uploader = ChunkedUploader::new();
    runtime().block_on(async {
        let first = claim(&conn).await;
        let report = uploader
            .upload(&conn, &first, "disk.img", &base_path, &|_, _| {})
            .await
            .expect("first upload");
        assert_eq!(report.size, 8 << 20);
        assert_eq!(
            report.chunks_sent, report.chunks,
            "a new image is sent whole"
        );
        assert!(
            report.wire_bytes_sent >= 8 << 20,
            "noise does not compress: {report:?}"
        );
        let before = storage(&server);

        let second = claim(&conn).await;
        let report = uploader
            .upload(&conn, &second, "disk.img", &variant_path, &|_, _| {})
            .await
            .expect("second upload");
        let after = storage(&server);
        let received = after.bytes_received - before.bytes_received;
        assert_eq!(received, report.wire_bytes_sent, "{report:?}");
        // Three rewritten 4 KiB regions and one insertion touch a few chunks each
        // (at most 256 KiB a chunk): well under 2 MiB of an 8 MiB image.
        assert!(
            received < 2 << 20 && report.chunks_sent < report.chunks / 4,
            "{received} bytes sent for a variant: {report:?}"
        );
        assert!(
            after.bytes_stored - before.bytes_stored <= received,
            "{before:?} -> {after:?}"
        );
        assert!(after.bytes_deduplicated > before.bytes_deduplicated);

        // 32 MiB of zeros: one distinct chunk, sent once and compressed.
        let third = claim(&conn).await;
        let report = uploader
            .upload(&conn, &third, "zeros.img", &zeros_path, &|_, _| {})
            .await
            .expect("zeros upload");
        assert_eq!(report.chunks_sent, 1, "{report:?}");
        assert!(report.wire_bytes_sent < 4096, "{report:?}");
        for (claim, name) in [
            (first, "disk.img"),
            (second, "disk.img"),
            (third, "zeros.img"),
        ] {
            conn.finish(&claim, vec![name.into()])
                .await
                .expect("finish");
        }
    });
    // Everything reads back byte for byte.
    let images = server.get("/v1/builds/300/images");
    let images: serde_json::Value = serde_json::from_str(&images.body).expect("image list");
    let expected = [
        sha256_hex(&base),
        sha256_hex(&variant),
        sha256_hex(&vec![0u8; 32 << 20]),
    ];
    for (image, sha256) in images.as_array().expect("a list").iter().zip(expected) {
        assert_eq!(image["sha256"], sha256.as_str(), "{image:#}");
    }
    runtime().block_on(async {
        let (status, _, body) = get_raw(&server, "/v1/jobs/300/j1/images/disk.img", &[]).await;
        assert_eq!(status, 200);
        assert!(body == variant, "the variant reads back whole");
    });
}

#[test]
fn an_upload_resumes_with_what_the_server_still_lacks() {
    let harness = Harness::new("transfer-resume");
    let (server, conn) = farm(&harness, "310", 1);
    let image = noise(6 << 20, 2);
    let path = write_file(harness.path(), "disk.img", &image);
    runtime().block_on(async {
        let claim = claim(&conn).await;
        // Half the chunks reach the server, then the upload "dies".
        let chunked = kiln_blob::chunking::chunk_file(&path, &Default::default()).unwrap();
        let half = chunked.chunks.len() / 2;
        let mut body = Vec::new();
        for chunk in &chunked.chunks[..half] {
            let start = chunk.offset as usize;
            Frame::encode(&image[start..start + chunk.len as usize]).write_to(&mut body);
        }
        conn.put_chunks(&claim, body).await.expect("first half");
        let report = ChunkedUploader::new()
            .upload(&conn, &claim, "disk.img", &path, &|_, _| {})
            .await
            .expect("the resumed upload");
        assert_eq!(
            report.chunks_sent as usize,
            chunked.chunks.len() - half,
            "only the chunks the server lacked were sent: {report:?}"
        );
        conn.finish(&claim, vec!["disk.img".into()])
            .await
            .expect("finish");
    });
    let job = server.job("310", "j0");
    assert_eq!(job["state"], "finished", "{job:#}");
}

#[test]
fn bad_chunks_wrong_hashes_and_foreign_leases_are_refused_and_nothing_is_kept() {
    let harness = Harness::new("transfer-refusals");
    let (server, conn) = farm(&harness, "320", 1);
    let image = noise(1 << 20, 3);
    let path = write_file(harness.path(), "disk.img", &image);
    let chunked = kiln_blob::chunking::chunk_file(&path, &Default::default()).unwrap();
    let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
    let frames: Vec<Frame> = chunked
        .chunks
        .iter()
        .map(|chunk| {
            let start = chunk.offset as usize;
            Frame::encode(&image[start..start + chunk.len as usize])
        })
        .collect();
    runtime().block_on(async {
        let claim = claim(&conn).await;

        // A chunk whose bytes do not match its name.
        let mut bad = frames[0].clone();
        let mut data = bad.data.to_vec();
        data[10] ^= 0x40;
        bad.data = data.into();
        let mut body = Vec::new();
        bad.write_to(&mut body);
        match conn.put_chunks(&claim, body).await {
            Err(CallError::Refused { status, message }) => {
                assert_eq!(status.as_u16(), 422, "{message}");
                assert!(message.contains(&entries[0].hash.to_hex()), "{message}");
            }
            other => panic!("a corrupted chunk was not refused: {other:?}"),
        }
        let missing = conn
            .missing_chunks(&claim, None, vec![entries[0]])
            .await
            .unwrap();
        assert_eq!(missing, vec![entries[0].hash], "the bad chunk was not kept");

        // A body cut off inside a frame: refused, but the whole frame before the cut
        // was checked and kept.
        let mut body = Vec::new();
        frames[1].write_to(&mut body);
        frames[0].write_to(&mut body);
        body.truncate(body.len() - 1);
        assert!(matches!(
            conn.put_chunks(&claim, body).await,
            Err(CallError::Refused { .. })
        ));
        let missing = conn
            .missing_chunks(&claim, None, vec![entries[0], entries[1]])
            .await
            .unwrap();
        assert_eq!(missing, vec![entries[0].hash]);

        // The good chunks, but for the last.
        let mut body = Vec::new();
        for frame in &frames[..frames.len() - 1] {
            frame.write_to(&mut body);
        }
        conn.put_chunks(&claim, body).await.expect("good chunks");
        let commit = kiln_proto::transfer::CommitRequest {
            size: chunked.digests.size,
            blake3: chunked.digests.blake3.clone(),
            sha256: chunked.digests.sha256.clone(),
            chunks: entries.clone(),
            announced_chunks: None,
        };
        match conn.commit_image(&claim, "disk.img", &commit).await {
            Err(CallError::MissingChunks(missing)) => {
                assert_eq!(missing, vec![entries.last().unwrap().hash])
            }
            other => panic!("a commit with a chunk missing went through: {other:?}"),
        }
        let mut body = Vec::new();
        frames.last().unwrap().write_to(&mut body);
        conn.put_chunks(&claim, body).await.expect("the last chunk");

        // Wrong whole-file hashes, a wrong size, chunks out of order.
        let wrong_blake3 = kiln_proto::transfer::CommitRequest {
            blake3: ChunkHash::of(b"something else").to_hex(),
            ..commit.clone()
        };
        let wrong_sha256 = kiln_proto::transfer::CommitRequest {
            sha256: sha256_hex(b"something else"),
            ..commit.clone()
        };
        let wrong_size = kiln_proto::transfer::CommitRequest {
            size: commit.size + 1,
            ..commit.clone()
        };
        let mut reordered = commit.clone();
        reordered.chunks.swap(0, 1);
        for (what, request, code) in [
            ("wrong BLAKE3", wrong_blake3, "hash_mismatch"),
            ("wrong SHA-256", wrong_sha256, "hash_mismatch"),
            ("wrong size", wrong_size, "size_mismatch"),
            ("reordered chunks", reordered, "hash_mismatch"),
        ] {
            match conn.commit_image(&claim, "disk.img", &request).await {
                Err(CallError::Refused { status, message }) => {
                    assert_eq!(status.as_u16(), 422, "{what}: {message}");
                    assert!(message.contains("nothing was stored"), "{what}: {message}");
                    let _ = code;
                }
                other => panic!("{what} was not refused: {other:?}"),
            }
        }
        assert!(
            conn.finish(&claim, vec!["disk.img".into()]).await.is_err(),
            "no image was recorded, so the job cannot finish"
        );

        // Someone else's lease.
        let mut foreign = claim.clone();
        foreign.lease = "0123456789abcdef0123456789abcdef".into();
        assert!(matches!(
            conn.commit_image(&foreign, "disk.img", &commit).await,
            Err(CallError::Stale(_))
        ));
        assert!(matches!(
            conn.missing_chunks(&foreign, None, entries.clone()).await,
            Err(CallError::Stale(_))
        ));

        conn.commit_image(&claim, "disk.img", &commit)
            .await
            .expect("the right commit");
        conn.finish(&claim, vec!["disk.img".into()])
            .await
            .expect("finish");
    });
    let images = server.get("/v1/builds/320/images");
    let images: serde_json::Value = serde_json::from_str(&images.body).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1, "{images:#}");
    assert_eq!(images[0]["sha256"], sha256_hex(&image).as_str());
}

#[test]
fn downloads_honour_ranges_and_etags_and_the_index_lists_the_chunks() {
    let harness = Harness::new("transfer-ranges");
    let (server, conn) = farm(&harness, "330", 1);
    let mut image = noise(3 << 20, 4);
    image.extend(vec![0u8; 1 << 20]);
    let path = write_file(harness.path(), "disk.img", &image);
    let size = image.len();
    runtime().block_on(async {
        let claim = claim(&conn).await;
        ChunkedUploader::new()
            .upload(&conn, &claim, "disk.img", &path, &|_, _| {})
            .await
            .expect("upload");
        conn.finish(&claim, vec!["disk.img".into()]).await.unwrap();

        let url = "/v1/jobs/330/j0/images/disk.img";
        let (status, headers, body) = get_raw(&server, url, &[]).await;
        assert_eq!(status, 200);
        assert!(body == image);
        assert_eq!(headers["content-length"], size.to_string().as_str());
        assert_eq!(headers["accept-ranges"], "bytes");
        let etag = headers["etag"].to_str().unwrap().to_owned();
        let blake3 = kiln_blob::chunking::chunk_reader(&image[..], &Default::default())
            .unwrap()
            .digests
            .blake3;
        assert_eq!(etag, format!("\"{blake3}\""));

        // Ranges inside one chunk, across many, at the end, and from the end.
        for (range, start, end) in [
            ("bytes=100-199", 100, 200),
            ("bytes=60000-1500000", 60_000, 1_500_001),
            ("bytes=4000000-", 4_000_000, size),
            ("bytes=-4096", size - 4096, size),
            ("bytes=0-99999999", 0, size),
        ] {
            let (status, headers, body) = get_raw(&server, url, &[("Range", range)]).await;
            assert_eq!(status, 206, "{range}");
            assert!(body == image[start..end], "{range}: wrong bytes");
            assert_eq!(
                headers["content-range"],
                format!("bytes {start}-{}/{size}", end - 1).as_str(),
                "{range}"
            );
        }
        let (status, headers, _) =
            get_raw(&server, url, &[("Range", &format!("bytes={size}-"))]).await;
        assert_eq!(status, 416);
        assert_eq!(headers["content-range"], format!("bytes */{size}").as_str());
        let (status, _, body) = get_raw(&server, url, &[("If-None-Match", &etag)]).await;
        assert_eq!((status, body.len()), (304, 0));
        let (status, _, body) = get_raw(&server, url, &[("Range", "bytes=0-1,5-6")]).await;
        assert_eq!(
            (status, body.len()),
            (200, size),
            "several ranges: the whole file"
        );

        let (status, _, body) = get_raw(&server, &format!("{url}/index"), &[]).await;
        assert_eq!(status, 200);
        let index: ImageIndex = serde_json::from_slice(&body).unwrap();
        assert_eq!(index.size, size as u64);
        assert_eq!(index.blake3, blake3);
        let mut offset = 0usize;
        for entry in &index.chunks {
            let bytes = &image[offset..offset + entry.len as usize];
            assert_eq!(ChunkHash::of(bytes), entry.hash);
            offset += entry.len as usize;
        }
        assert_eq!(offset, size);

        // The chunks themselves, as frames.
        let wanted: Vec<ChunkHash> = index.chunks.iter().take(5).map(|e| e.hash).collect();
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chunks/fetch", server.url))
            .bearer_auth(server.admin_token())
            .json(&FetchRequest {
                chunks: wanted.clone(),
            })
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut reader = kiln_blob::frames::FrameReader::new();
        reader.push(&response.bytes().await.unwrap());
        let mut got = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            frame.decode().expect("a frame that checks out");
            got.push(frame.hash);
        }
        reader.finish().unwrap();
        assert_eq!(got, wanted);
    });
}

#[test]
fn deleting_a_build_frees_only_chunks_no_other_image_uses() {
    let harness = Harness::new("transfer-gc");
    let server = harness.start_server("server", &[]);
    for (build, n_jobs) in [("400", 1), ("401", 2)] {
        let jobs: Vec<Job> = (0..n_jobs)
            .map(|n| Job::new(&format!("j{n}"), "IMG"))
            .collect();
        server.submit(&write_build(
            &harness.mkdir(&format!("b{build}")),
            build,
            &jobs,
        ));
    }
    let conn = ServerConn::new(&server.url, &server.client_token()).unwrap();
    let base = noise(8 << 20, 5);
    let variant = variant_of(&base);
    let base_path = write_file(harness.path(), "base.img", &base);
    let variant_path = write_file(harness.path(), "variant.img", &variant);
    let uploader = ChunkedUploader::new();
    runtime().block_on(async {
        // Build 400 has the base image; build 401 the variant, and one job running.
        for (path, name) in [(&base_path, "base.img"), (&variant_path, "variant.img")] {
            let claim = claim(&conn).await;
            uploader
                .upload(&conn, &claim, name, path, &|_, _| {})
                .await
                .unwrap();
            conn.finish(&claim, vec![name.into()]).await.unwrap();
        }
        let running = claim(&conn).await;
        assert_eq!(running.build, "401");

        let refused = server.kiln(&["build", "delete", "401"]);
        assert_ne!(refused.code, 0, "{refused:?}");
        assert!(refused.stderr.contains("j1"), "{}", refused.stderr);

        let before = storage(&server);
        let deleted = server.kiln(&["build", "delete", "400", "--json"]);
        assert_eq!(deleted.code, 0, "{deleted:?}");
        let report: kiln_proto::transfer::DeleteReport =
            serde_json::from_str(deleted.last_line()).unwrap();
        assert_eq!((report.jobs, report.images), (1, 1));
        // Only the chunks of the base that the variant does not share went.
        assert!(report.chunks_freed > 0, "{report:?}");
        assert!(report.bytes_freed < 2 << 20, "{report:?}");
        let after = storage(&server);
        assert_eq!(after.bytes_stored, before.bytes_stored - report.bytes_freed);
        assert_eq!(after.images, before.images - 1);
        assert_eq!(server.get("/v1/builds/400").status, 404);

        // The variant still reads back whole, and every chunk it lists is there.
        let (status, _, body) = get_raw(&server, "/v1/jobs/401/j0/images/variant.img", &[]).await;
        assert_eq!(status, 200);
        assert!(body == variant, "the surviving image is intact");
        let (_, _, index) = get_raw(&server, "/v1/jobs/401/j0/images/variant.img/index", &[]).await;
        let index: ImageIndex = serde_json::from_slice(&index).unwrap();
        // Every chunk it lists is there: it was read back whole above, each chunk
        // checked against its name.
        assert!(!index.chunks.is_empty());

        // --force cancels the running job, then deletes.
        let forced = server.kiln(&["build", "delete", "401", "--force"]);
        assert_eq!(forced.code, 0, "{forced:?}");
        let empty = storage(&server);
        assert_eq!(
            (empty.images, empty.chunks_stored, empty.bytes_stored),
            (0, 0, 0)
        );
        let _ = running;
    });
}

#[test]
fn a_slow_upload_longer_than_the_lease_keeps_its_job_and_shows_its_progress() {
    let harness = Harness::new("transfer-slow");
    // A 3 s lease, and an upload of 64 MiB of noise at 8 MiB/s: about 8 s, in four
    // bodies of 16 MiB.
    let server = harness.start_server("server", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "340",
        &[Job::new("slow", "IMG")
            .image("head -c 67108864 /dev/urandom > \"$KILN_OUTPUT/disk.img\"")],
    ));
    let proxy = TcpProxy::start(&server.url);
    proxy.limit_rate(8 << 20);
    let args: Vec<String> = [
        "client",
        "--server",
        &proxy.url,
        "--id",
        "slow-link",
        "--include",
        "IMG",
        "--token-file",
        &server.client_token_file.display().to_string(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let _client = harness.start_client_with_args("slow-link", &args);
    let progress = wait_until(
        harness.path(),
        "the job to report its upload's progress",
        || {
            let job = server.job(&build, "slow");
            let percent = job["percent"].as_u64()?;
            (job["major_state"] == "upload"
                && job["minor_state"] == "disk.img"
                && percent > 0
                && percent < 100)
                .then(|| job.clone())
        },
        || format!("{:#}", server.job(&build, "slow")),
    );
    let job = server.wait_for_job(&build, "slow", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(
        text(&job, "state"),
        "finished",
        "{job:#}\nseen while uploading: {progress:#}"
    );
    assert_eq!(
        job["attempt"], 1,
        "the lease held through the upload: {job:#}"
    );
}

#[test]
fn an_image_put_whole_is_stored_as_chunks_and_reads_back() {
    let harness = Harness::new("transfer-put");
    let (server, conn) = farm(&harness, "350", 1);
    let image = noise(2 << 20, 9);
    let path = write_file(harness.path(), "disk.img", &image);
    runtime().block_on(async {
        let claim = claim(&conn).await;
        let report = kiln_client::upload::WholeFileUploader
            .upload(&conn, &claim, "disk.img", &path, &|_, _| {})
            .await
            .expect("a whole-file upload");
        assert_eq!(report.size, image.len() as u64);
        conn.finish(&claim, vec!["disk.img".into()]).await.unwrap();
        let url = "/v1/jobs/350/j0/images/disk.img";
        let (_, _, index) = get_raw(&server, &format!("{url}/index"), &[]).await;
        let index: ImageIndex = serde_json::from_slice(&index).unwrap();
        assert!(
            index.chunks.len() > 5,
            "cut into chunks: {}",
            index.chunks.len()
        );
        assert_eq!(index.sha256, sha256_hex(&image));
        let (status, _, body) = get_raw(&server, url, &[]).await;
        assert_eq!(status, 200);
        assert!(body == image);
    });
    assert_eq!(storage(&server).bytes_received, image.len() as u64);
}

#[test]
fn a_commit_naming_the_announced_chunks_needs_the_list_again_after_a_server_restart() {
    let harness = Harness::new("transfer-announced");
    let (server, conn) = farm(&harness, "330", 1);
    let image = noise(2 << 20, 5);
    let path = write_file(harness.path(), "disk.img", &image);
    let chunked = kiln_blob::chunking::chunk_file(&path, &Default::default()).unwrap();
    let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
    let mut body = Vec::new();
    for chunk in &chunked.chunks {
        let start = chunk.offset as usize;
        Frame::encode(&image[start..start + chunk.len as usize]).write_to(&mut body);
    }
    let commit = kiln_proto::transfer::CommitRequest {
        size: chunked.digests.size,
        blake3: chunked.digests.blake3.clone(),
        sha256: chunked.digests.sha256.clone(),
        chunks: Vec::new(),
        announced_chunks: Some(entries.len() as u64),
    };
    let claim = runtime().block_on(async {
        let claim = claim(&conn).await;
        let missing = conn
            .missing_chunks(&claim, Some(("disk.img", 0)), entries.clone())
            .await
            .expect("the packed question");
        assert_eq!(
            missing.len(),
            entries.len(),
            "a fresh server lacks them all"
        );
        conn.put_chunks(&claim, body).await.expect("the chunks");
        claim
    });

    let listen = server.url.trim_start_matches("http://").to_owned();
    let (data, client_token_file) = (server.data.clone(), server.client_token_file.clone());
    drop(server); // SIGKILL: the announced list was only in the server's memory.
    let server =
        harness.start_server_at("restarted", &listen, &data, Some(&client_token_file), &[]);

    runtime().block_on(async {
        match conn.commit_image(&claim, "disk.img", &commit).await {
            Err(CallError::Refused { status, message }) => {
                assert_eq!(status.as_u16(), 409, "{message}");
                assert!(
                    message.contains("commit again with the chunk list"),
                    "{message}"
                );
            }
            other => panic!("a commit naming a list the server lost went through: {other:?}"),
        }
        let with_list = kiln_proto::transfer::CommitRequest {
            chunks: entries.clone(),
            announced_chunks: None,
            ..commit.clone()
        };
        conn.commit_image(&claim, "disk.img", &with_list)
            .await
            .expect("the commit with the list");
        conn.finish(&claim, vec!["disk.img".into()])
            .await
            .expect("finish");
    });
    let index = server.get("/v1/jobs/330/j0/images/disk.img/index");
    assert_eq!(index.status, 200, "{}", index.body);
    let index: ImageIndex = serde_json::from_str(&index.body).expect("the index");
    assert_eq!(index.chunks, entries);
    assert_eq!(index.sha256, sha256_hex(&image));
}

#[test]
fn a_json_question_from_an_older_client_is_still_answered() {
    let harness = Harness::new("transfer-json-question");
    let (server, _conn) = farm(&harness, "340", 1);
    let image = noise(1 << 20, 6);
    let chunked = kiln_blob::chunking::chunk_reader(&image[..], &Default::default()).unwrap();
    let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
    // An older client: it claims, then asks in JSON.
    let auth = server.enroll("older");
    let json = ("Content-Type", "application/json");
    let claimed = raw_http(
        &server.url,
        "POST",
        "/v1/claim",
        &[("Authorization", &auth), json],
        br#"{"client_id":"older","include":["IMG"],"wait_secs":5}"#,
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let claim: Claim = serde_json::from_str(&claimed.body).expect("a claim");
    let question = kiln_proto::transfer::MissingRequest {
        chunks: entries.clone(),
        image: Some("disk.img".into()),
        offset: 0,
    };
    let held = [
        ("Authorization", auth.as_str()),
        (kiln_proto::LEASE_HEADER, claim.lease.as_str()),
    ];
    let answer = raw_http(
        &server.url,
        "POST",
        "/v1/jobs/340/j0/chunks/missing",
        &[held[0], held[1], json],
        serde_json::to_string(&question).unwrap().as_bytes(),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer: kiln_proto::transfer::MissingResponse =
        serde_json::from_str(&answer.body).expect("the answer");
    let expected: Vec<ChunkHash> = entries.iter().map(|entry| entry.hash).collect();
    assert_eq!(answer.missing, expected);

    // A packed list that is not a whole number of entries is refused, naming why.
    let packed = (
        "Content-Type",
        kiln_proto::transfer::CHUNK_LIST_CONTENT_TYPE,
    );
    let broken = raw_http(
        &server.url,
        "POST",
        "/v1/jobs/340/j0/chunks/missing?image=disk.img&offset=0",
        &[held[0], held[1], packed],
        &[0u8; 35],
    );
    assert_eq!(broken.status, 400, "{}", broken.body);
    assert!(broken.body.contains("bad_chunk_list"), "{}", broken.body);
}
