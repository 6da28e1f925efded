//! `kiln release` into a directory that already holds an earlier, similar release
//! downloads only the chunks that changed, and every file it writes still matches
//! SHA256SUMS and the server's hashes, even when a file it reuses from was altered
//! behind the cache's back.

use crate::common::{write_build, Harness, Job, Run, Server};
use kiln_blob::noise::noise;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Size of the images the jobs leave.
const IMAGE_BYTES: usize = 8 << 20;

/// `base` with `count` bytes at `at` rewritten and `inserted` bytes inserted at
/// `insert_at`.
fn edited(base: &[u8], at: usize, count: usize, insert_at: usize, inserted: &[u8]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for (offset, byte) in bytes[at..at + count].iter_mut().enumerate() {
        *byte = byte.wrapping_add(1 + offset as u8);
    }
    bytes.splice(insert_at..insert_at, inserted.iter().copied());
    bytes
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

/// A job whose image is a copy of the file at `source` (written by the test).
fn copying_job(id: &str, config_type: &str, source: &Path) -> Job {
    Job::new(id, config_type).image(&format!(
        "cat '{}' > \"$KILN_OUTPUT/disk.img\"\n",
        source.display()
    ))
}

/// Submits a build of `jobs`, waits for it to finish.
fn run_build(harness: &Harness, server: &Server, number: &str, jobs: &[Job]) {
    let build = server.submit(&write_build(
        &harness.mkdir(&format!("build-{number}")),
        number,
        jobs,
    ));
    assert_eq!(build, number);
    let waited = server.kiln(&["wait", number, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("build {number} should finish: {waited:?}")
    });
}

fn release(server: &Server, build: &str, to: &Path, json: bool) -> Run {
    let to = to.display().to_string();
    let mut args = vec!["release", build, "--to", &to];
    if json {
        args.push("--json");
    }
    server.kiln(&args)
}

/// The numbers `kiln release --json` printed.
fn json_numbers(harness: &Harness, run: &Run) -> Value {
    harness.check(run.code == 0, || format!("kiln release failed: {run:?}"));
    let lines: Vec<&str> = run.stdout.lines().collect();
    harness.check(lines.len() == 1, || {
        format!("--json prints one line on stdout: {run:?}")
    });
    serde_json::from_str(lines[0])
        .unwrap_or_else(|err| harness.fail(&format!("--json printed no JSON ({err}): {run:?}")))
}

fn number(numbers: &Value, field: &str) -> u64 {
    numbers[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {numbers:#}"))
}

/// Checks every file of the release of `build` under `to`: SHA256SUMS lists exactly
/// them with their SHA-256, and those are the server's size, SHA-256 and BLAKE3.
fn assert_release_verifies(harness: &Harness, server: &Server, build: &str, to: &Path) {
    let build_dir = to.join(build);
    let sums_text = std::fs::read_to_string(build_dir.join("SHA256SUMS"))
        .unwrap_or_else(|err| harness.fail(&format!("SHA256SUMS of {build}: {err}")));
    let sums: BTreeMap<String, String> = sums_text
        .lines()
        .map(|line| {
            let (hash, path) = line
                .split_once("  ")
                .unwrap_or_else(|| panic!("SHA256SUMS line is `HASH  PATH`: {line:?}"));
            (path.to_owned(), hash.to_owned())
        })
        .collect();
    let response = server.get(&format!("/v1/builds/{build}/images"));
    assert_eq!(response.status, 200, "{response:?}");
    let images: Vec<Value> = serde_json::from_str(&response.body).expect("the image list");
    assert_eq!(sums.len(), images.len(), "{sums:?} vs {images:#?}");
    for image in &images {
        let relative = format!(
            "{}/{}",
            image["config_type"].as_str().unwrap(),
            image["name"].as_str().unwrap()
        );
        let path = build_dir.join(&relative);
        let on_disk = sha256_hex(&path);
        assert_eq!(
            sums.get(&relative),
            Some(&on_disk),
            "SHA256SUMS for {relative}"
        );
        assert_eq!(
            image["sha256"],
            on_disk.as_str(),
            "the server's SHA-256 of {relative}"
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(image["size"], bytes.len() as u64, "{relative}");
        assert_eq!(
            image["blake3"],
            blake3::hash(&bytes).to_hex().as_str(),
            "the server's BLAKE3 of {relative}"
        );
    }
    let left_over: Vec<PathBuf> = walk(to)
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".kiln-part"))
        .collect();
    assert!(left_over.is_empty(), "temporary files left: {left_over:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Build 1: one image. Build 2: that image edited in two places, and a second image
/// that is the first edited once more: most of both is in build 1's release.
struct Builds {
    one: Vec<u8>,
    two_pro: Vec<u8>,
    two_home: Vec<u8>,
}

fn make_builds(harness: &Harness, server: &Server) -> Builds {
    let one = noise(IMAGE_BYTES, 1);
    let two_pro = edited(&one, 3 << 20, 200, 6 << 20, &noise(1000, 2));
    let two_home = edited(&two_pro, 1 << 20, 50, 7 << 20, b"home edition");
    let data = harness.mkdir("data");
    for (name, bytes) in [
        ("one", &one),
        ("two-pro", &two_pro),
        ("two-home", &two_home),
    ] {
        std::fs::write(data.join(name), bytes).expect("writing an image's source");
    }
    let _client = harness.start_client("runner", &[server], &["--include", "*"]);
    run_build(
        harness,
        server,
        "6100",
        &[copying_job("pro", "PRO", &data.join("one"))],
    );
    run_build(
        harness,
        server,
        "6200",
        &[
            copying_job("pro", "PRO", &data.join("two-pro")),
            copying_job("home", "HOME", &data.join("two-home")),
        ],
    );
    Builds {
        one,
        two_pro,
        two_home,
    }
}

#[test]
fn a_second_release_of_a_similar_build_fetches_only_what_changed() {
    let harness = Harness::new("release-reuse");
    let server = harness.start_server("main", &[]);
    let builds = make_builds(&harness, &server);
    let dir = harness.mkdir("release");

    // Into an empty directory: everything is fetched, and stdout is the directory.
    let first = release(&server, "6100", &dir, false);
    harness.check(first.code == 0, || format!("kiln release 6100: {first:?}"));
    assert_eq!(first.stdout.trim(), dir.join("6100").display().to_string());
    assert_eq!(
        std::fs::read(dir.join("6100/PRO/disk.img")).unwrap(),
        builds.one
    );
    assert_release_verifies(&harness, &server, "6100", &dir);
    assert!(
        dir.join(".kiln/chunks").read_dir().unwrap().count() > 0,
        "the release's chunk lists are cached"
    );

    let second = release(&server, "6200", &dir, true);
    let numbers = json_numbers(&harness, &second);
    eprintln!("second release: {numbers}");
    let total = number(&numbers, "bytes");
    let fetched = number(&numbers, "bytes_fetched");
    let reused = number(&numbers, "bytes_reused");
    assert_eq!(
        numbers["dir"],
        dir.join("6200").display().to_string().as_str()
    );
    assert_eq!(number(&numbers, "images"), 2);
    assert_eq!(total, (builds.two_pro.len() + builds.two_home.len()) as u64);
    assert_eq!(reused + fetched, total, "{numbers:#}");
    // Four edits, each costing a chunk or two of some 64 KiB, out of 16 MiB.
    assert!(
        fetched * 20 < total,
        "only the changed chunks are fetched: {numbers:#}"
    );
    assert!(number(&numbers, "chunks_fetched") <= 8, "{numbers:#}");
    assert!(number(&numbers, "chunks_fetched") > 0, "{numbers:#}");
    assert!(number(&numbers, "chunks_reused") > 100, "{numbers:#}");
    assert!(number(&numbers, "wire_bytes") >= fetched, "{numbers:#}");
    assert!(
        second.stderr.contains("released 2 images of build 6200"),
        "a summary on stderr: {second:?}"
    );
    assert_eq!(
        std::fs::read(dir.join("6200/PRO/disk.img")).unwrap(),
        builds.two_pro
    );
    assert_eq!(
        std::fs::read(dir.join("6200/HOME/disk.img")).unwrap(),
        builds.two_home
    );
    assert_release_verifies(&harness, &server, "6200", &dir);
    assert_release_verifies(&harness, &server, "6100", &dir);

    // Again, over itself: nothing to fetch at all.
    let again = release(&server, "6200", &dir, true);
    let numbers = json_numbers(&harness, &again);
    assert_eq!(number(&numbers, "bytes_fetched"), 0, "{numbers:#}");
    assert_eq!(number(&numbers, "wire_bytes"), 0, "{numbers:#}");
    assert_release_verifies(&harness, &server, "6200", &dir);
}

#[test]
fn a_local_file_altered_after_indexing_does_not_poison_the_release() {
    let harness = Harness::new("release-altered");
    let server = harness.start_server("main", &[]);
    let builds = make_builds(&harness, &server);
    let dir = harness.mkdir("release");
    let first = release(&server, "6100", &dir, true);
    let first_numbers = json_numbers(&harness, &first);
    assert_eq!(
        number(&first_numbers, "bytes_fetched"),
        builds.one.len() as u64,
        "nothing to reuse the first time: {first_numbers:#}"
    );

    // Alter the released file in place, keeping its size, inode and mtime: the cached
    // chunk list still looks valid, and only reading the bytes can tell.
    let released = dir.join("6100/PRO/disk.img");
    let before = std::fs::metadata(&released).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&released)
            .unwrap();
        file.write_all_at(&[0xAA; 4096], 2 << 20).unwrap();
        file.set_modified(before.modified().unwrap()).unwrap();
    }
    let after = std::fs::metadata(&released).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());

    let second = release(&server, "6200", &dir, true);
    let numbers = json_numbers(&harness, &second);
    eprintln!("release over an altered file: {numbers}");
    assert!(number(&numbers, "chunks_fetched") > 0, "{numbers:#}");
    // The altered file is dropped at its first bad chunk, so the rest of the first
    // image comes from the server; the second image still reuses the first.
    assert!(
        number(&numbers, "bytes_fetched") * 2 < number(&numbers, "bytes"),
        "{numbers:#}"
    );
    assert_eq!(
        number(&numbers, "bytes_reused") + number(&numbers, "bytes_fetched"),
        number(&numbers, "bytes"),
        "{numbers:#}"
    );
    assert_eq!(
        std::fs::read(dir.join("6200/PRO/disk.img")).unwrap(),
        builds.two_pro
    );
    assert_eq!(
        std::fs::read(dir.join("6200/HOME/disk.img")).unwrap(),
        builds.two_home
    );
    assert_release_verifies(&harness, &server, "6200", &dir);

    // The altered file was only read, never written; its next indexing cuts it again
    // and reuses what it still shares.
    let mut expected_altered = builds.one.clone();
    expected_altered[2 << 20..(2 << 20) + 4096].fill(0xAA);
    assert_eq!(std::fs::read(&released).unwrap(), expected_altered);
    std::fs::remove_dir_all(dir.join("6200")).unwrap();
    let third = release(&server, "6200", &dir, true);
    let numbers = json_numbers(&harness, &third);
    assert!(
        number(&numbers, "bytes_fetched") * 20 < number(&numbers, "bytes"),
        "{numbers:#}"
    );
    assert_release_verifies(&harness, &server, "6200", &dir);
}
