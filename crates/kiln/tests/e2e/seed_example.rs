//! The seed's own example, end to end: its relbuild.xml submitted as shipped, its
//! buildclient.xml pointed at the test's server, the job's status served in the seed's
//! JOBSTATUS XML, and the release written with matching checksums.

use crate::common::{Harness, SEED_DIR};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The text between `<TAG>` and `</TAG>` in `xml`, if both are there.
fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(xml[start..end].trim())
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

#[test]
fn seed_build_3700_runs_on_the_seed_client_and_releases_with_matching_sums() {
    let harness = Harness::new("seed");
    let server = harness.start_server("main", &[]);

    let submitted = server.submit(&Path::new(SEED_DIR).join("relbuild.xml"));
    assert_eq!(
        submitted, "3700",
        "kiln submit printed the build number last"
    );

    // The seed's buildclient.xml with only its location and password made real.
    let seed_config = std::fs::read_to_string(Path::new(SEED_DIR).join("buildclient.xml"))
        .expect("reading the seed's buildclient.xml");
    let seed_location = r"\\ntre101\bvt$";
    let seed_password = "bvtpassword";
    assert!(
        seed_config.contains(seed_location) && seed_config.contains(seed_password),
        "the seed's buildclient.xml changed: {seed_config}"
    );
    let config = seed_config
        .replace(seed_location, &server.url)
        .replace(seed_password, &server.client_token());
    let config_path = harness.path().join("buildclient.xml");
    std::fs::write(&config_path, config).expect("writing buildclient.xml");
    let _client = harness.start_client_with_args(
        "RACK05_MACHINE10",
        &[
            "client".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
    );

    let waited = server.kiln(&["wait", "3700", "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("kiln wait 3700 should exit 0 (all finished): {waited:?}")
    });

    let status_xml = server.get("/v1/jobs/3700/1/status.xml");
    harness.check(status_xml.status == 200, || {
        format!("GET status.xml: {status_xml:?}")
    });
    let xml = &status_xml.body;
    assert!(
        xml.contains("<CLIENTID>RACK05_MACHINE10</CLIENTID>"),
        "status.xml names the seed's client: {xml}"
    );
    assert!(
        xml.contains("<MAJORSTATE>FINISHED</MAJORSTATE>"),
        "a finished job's MAJORSTATE is the seed's FINISHED: {xml}"
    );
    for tag in ["TIMESTART", "TIMECOMPLETE"] {
        let value = element_text(xml, tag);
        assert!(
            value.is_some_and(|value| !value.is_empty()),
            "status.xml has a non-empty {tag}: {xml}"
        );
    }

    let release_dir = harness.mkdir("release");
    let released = server.kiln(&[
        "release",
        "3700",
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(released.code == 0, || {
        format!("kiln release 3700 failed: {released:?}")
    });
    let build_dir = release_dir.join("3700");
    let images: Vec<_> = std::fs::read_dir(build_dir.join("PRO"))
        .expect("the release has a PRO directory")
        .map(|entry| entry.expect("reading the PRO directory").path())
        .collect();
    assert!(!images.is_empty(), "the release holds a PRO image");
    assert!(
        images.iter().all(|path| path.is_file()),
        "PRO holds only image files: {images:?}"
    );

    let sums_text =
        std::fs::read_to_string(build_dir.join("SHA256SUMS")).expect("the release has SHA256SUMS");
    let sums: BTreeMap<String, String> = sums_text
        .lines()
        .map(|line| {
            let (hash, path) = line
                .split_once("  ")
                .unwrap_or_else(|| panic!("SHA256SUMS line is `HASH  PATH`: {line:?}"));
            (path.to_owned(), hash.to_owned())
        })
        .collect();
    let on_disk: BTreeMap<String, String> = images
        .iter()
        .map(|path| {
            let name = path.file_name().expect("a file name").to_string_lossy();
            (format!("PRO/{name}"), sha256_hex(path))
        })
        .collect();
    assert_eq!(
        sums, on_disk,
        "SHA256SUMS lists exactly the released files with their SHA-256"
    );

    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(build_dir.join("manifest.json"))
            .expect("the release has manifest.json"),
    )
    .expect("manifest.json is JSON");
    assert_eq!(manifest["build"], "3700", "manifest.json: {manifest:#}");
}
