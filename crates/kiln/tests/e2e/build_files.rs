//! A build's files travel to a client once: the client's later jobs of the build ask
//! with `If-None-Match`, get 304, and unpack the copy it kept; a build with other
//! files is downloaded afresh; and kept copies removed behind the client's back are
//! downloaded again. Every job checks that its workspace holds its own build's files.

use crate::common::{logs_report, write_build, Harness, Job, Server};

const KEPT_LINE: &str = "unpacking the kept copy";

/// A job that succeeds only when the workspace's `data/payload.txt` says `payload`.
fn checking_job(id: &str, payload: &str) -> Job {
    Job::new(id, "PRO").image(&format!(
        "grep -qx '{payload}' data/payload.txt || {{ echo \"payload: $(cat data/payload.txt)\" >&2; exit 1; }}\n\
         echo ok > \"$KILN_OUTPUT/ok.img\"\n"
    ))
}

/// Submits build `number` of `n_jobs` jobs whose files hold `payload`; waits for it.
fn run_build(harness: &Harness, server: &Server, number: &str, payload: &str, n_jobs: usize) {
    let dir = harness.mkdir(&format!("build-{number}"));
    let jobs: Vec<Job> = (0..n_jobs)
        .map(|idx| checking_job(&format!("j{idx}"), payload))
        .collect();
    let manifest = write_build(&dir, number, &jobs);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/payload.txt"), format!("{payload}\n")).unwrap();
    assert_eq!(server.submit(&manifest), number);
    let waited = server.kiln(&["wait", number, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("build {number} should finish with every job: {waited:?}")
    });
}

fn kept_lines(harness: &Harness) -> usize {
    std::fs::read_to_string(harness.path().join("client-one.log"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(KEPT_LINE))
        .count()
}

fn kept_archives(harness: &Harness) -> Vec<std::path::PathBuf> {
    let mut kept: Vec<_> = std::fs::read_dir(harness.path().join("one-work/build-files"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "tar"))
        .collect();
    kept.sort();
    kept
}

#[test]
fn a_client_fetches_a_build_s_files_once_and_unpacks_its_kept_copy_for_later_jobs() {
    let harness = Harness::new("build-files");
    let server = harness.start_server("main", &[]);
    // One slot: the build's jobs run one after the other on this client.
    let _client = harness.start_client("one", &[&server], &["--include", "PRO", "--slots", "1"]);

    run_build(&harness, &server, "7100", "payload A", 3);
    // The first job downloads; the two after it unpack the kept copy.
    assert_eq!(kept_lines(&harness), 2, "{}", logs_report(harness.path()));
    assert_eq!(kept_archives(&harness).len(), 1);

    // Other files: downloaded, not taken from the first build's copy.
    run_build(&harness, &server, "7200", "payload B", 2);
    assert_eq!(kept_lines(&harness), 3, "{}", logs_report(harness.path()));
    assert_eq!(kept_archives(&harness).len(), 2);

    // Kept copies removed behind the client's back: the next build's first job
    // downloads, and the one after it uses that download.
    for archive in kept_archives(&harness) {
        std::fs::remove_file(archive).unwrap();
    }
    run_build(&harness, &server, "7300", "payload C", 2);
    assert_eq!(kept_lines(&harness), 4, "{}", logs_report(harness.path()));
}
