//! Bad submissions are refused with a message that says what is wrong, and nothing of
//! them is stored.

use crate::common::{run_kiln, write_build, Harness, Job, Server};
use serde_json::Value;

/// The builds `kiln status --json` lists.
fn listed_builds(harness: &Harness, server: &Server) -> Vec<Value> {
    let run = server.kiln(&["status", "--json"]);
    harness.check(run.code == 0, || {
        format!("kiln status --json failed: {run:?}")
    });
    match serde_json::from_str(&run.stdout) {
        Ok(Value::Array(builds)) => builds,
        _ => harness.fail(&format!(
            "kiln status --json did not print a JSON array: {run:?}"
        )),
    }
}

/// Whether `text` holds `prefix` followed by `LINE:COLUMN:` (two positive numbers).
fn line_and_column_after(text: &str, prefix: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let mut parts = rest.splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let column = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((line, column)).filter(|(line, column)| *line > 0 && *column > 0)
}

#[test]
fn malformed_manifest_is_refused_with_file_line_and_column_and_nothing_is_stored() {
    let harness = Harness::new("malformed");
    let server = harness.start_server("main", &[]);
    let dir = harness.mkdir("build");
    // TITLE on line 3 is never closed.
    let manifest = dir.join("relbuild.xml");
    std::fs::write(
        &manifest,
        "<SERVER>\n\
         \x20 <BUILDNUMBER>600</BUILDNUMBER>\n\
         \x20 <TITLE>Unclosed title\n\
         \x20 <JOBS>\n\
         \x20 </JOBS>\n\
         </SERVER>\n",
    )
    .expect("writing the manifest");
    std::fs::write(dir.join("install.sh"), "true\n").expect("writing a script");

    let run = server.kiln(&["submit", &manifest.display().to_string()]);
    assert_ne!(run.code, 0, "a malformed manifest is refused: {run:?}");
    let position = line_and_column_after(&run.stderr, &format!("{}:", manifest.display()));
    let (line, _column) = position.unwrap_or_else(|| {
        panic!(
            "stderr names the file as FILE:LINE:COLUMN: ({}): {:?}",
            manifest.display(),
            run.stderr
        )
    });
    assert!(
        line >= 3,
        "the mistake cannot be before the unclosed element on line 3: {:?}",
        run.stderr
    );

    let builds = listed_builds(&harness, &server);
    assert!(builds.is_empty(), "no build was stored: {builds:#?}");
}

#[test]
fn manifest_naming_a_missing_script_is_refused_naming_the_script() {
    let harness = Harness::new("missing-script");
    let server = harness.start_server("main", &[]);
    let dir = harness.mkdir("build");
    let manifest = write_build(&dir, "610", &[Job::new("one", "PRO")]);
    // The manifest names scripts/one-install.sh: take it away.
    std::fs::remove_file(dir.join("scripts/one-install.sh")).expect("removing the script");

    let run = server.kiln(&["submit", &manifest.display().to_string()]);
    assert_ne!(run.code, 0, "a build missing a script is refused: {run:?}");
    assert!(
        run.stderr.contains("scripts/one-install.sh"),
        "the refusal names the missing script: {:?}",
        run.stderr
    );
    let builds = listed_builds(&harness, &server);
    assert!(builds.is_empty(), "no build was stored: {builds:#?}");
}

#[test]
fn submitting_an_existing_build_number_again_is_refused_and_keeps_the_first() {
    let harness = Harness::new("duplicate");
    let server = harness.start_server("main", &[]);
    let first = write_build(&harness.mkdir("first"), "620", &[Job::new("one", "PRO")]);
    assert_eq!(server.submit(&first), "620");

    let second = write_build(
        &harness.mkdir("second"),
        "620",
        &[Job::new("other", "HOME"), Job::new("more", "HOME")],
    );
    let run = server.kiln(&["submit", &second.display().to_string()]);
    assert_ne!(run.code, 0, "the second build 620 is refused: {run:?}");
    assert!(
        run.stderr.contains("620") && run.stderr.contains("exists"),
        "the refusal says build 620 exists: {:?}",
        run.stderr
    );

    let builds = listed_builds(&harness, &server);
    assert_eq!(builds.len(), 1, "one build: {builds:#?}");
    let jobs = server.status_json("620");
    let ids: Vec<&str> = jobs.iter().filter_map(|job| job["id"].as_str()).collect();
    assert_eq!(ids, ["one"], "build 620 is still the first one");
}

#[test]
fn misspelled_job_element_is_refused_at_its_line_naming_it() {
    let harness = Harness::new("misspelled");
    let server = harness.start_server("main", &[]);
    let dir = harness.mkdir("build");
    let manifest = write_build(&dir, "630", &[Job::new("one", "PRO")]);
    let text = std::fs::read_to_string(&manifest).expect("reading the manifest");
    let misspelled = text.replace("TIMEOUT>", "TIMEOTU>");
    assert_ne!(text, misspelled);
    std::fs::write(&manifest, &misspelled).expect("writing the manifest");
    let line = misspelled
        .lines()
        .position(|line| line.contains("<TIMEOTU>"))
        .expect("the misspelled line")
        + 1;

    let run = server.kiln(&["submit", &manifest.display().to_string()]);
    assert_ne!(run.code, 0, "a misspelled element is refused: {run:?}");
    let position = line_and_column_after(&run.stderr, &format!("{}:", manifest.display()));
    assert_eq!(
        position.map(|(line, _)| line as usize),
        Some(line),
        "the refusal points at the misspelled element's line: {:?}",
        run.stderr
    );
    assert!(
        run.stderr.contains("TIMEOTU"),
        "it names the element: {:?}",
        run.stderr
    );
    let builds = listed_builds(&harness, &server);
    assert!(builds.is_empty(), "no build was stored: {builds:#?}");
}

#[test]
fn client_config_with_a_bad_value_is_refused_with_file_line_and_column() {
    let harness = Harness::new("bad-client-config");
    let config = harness.path().join("buildclient.xml");
    std::fs::write(
        &config,
        "<BUILDCLIENT ID=\"RACK01\">\n\
         \x20 <CONFIGINCLUDE>PRO</CONFIGINCLUDE>\n\
         \x20 <WAITTIME>soon</WAITTIME>\n\
         </BUILDCLIENT>\n",
    )
    .expect("writing the config");
    let work = harness.path().join("work");
    let run = run_kiln(
        harness.path(),
        &[
            "client",
            "--config",
            &config.display().to_string(),
            "--work",
            &work.display().to_string(),
        ],
        &[],
    );
    assert_ne!(run.code, 0, "the client refuses to start: {run:?}");
    let position = line_and_column_after(&run.stderr, &format!("{}:", config.display()));
    assert_eq!(
        position.map(|(line, _)| line),
        Some(3),
        "the refusal points at WAITTIME on line 3: {:?}",
        run.stderr
    );
    assert!(
        run.stderr.contains("WAITTIME"),
        "it names the element: {:?}",
        run.stderr
    );
}
