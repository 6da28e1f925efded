//! Jobs that go wrong, and jobs reporting progress: a hung step is killed with every
//! process it started, a failing step fails the job with its status and log, and
//! progress lines show in `kiln status`.

use crate::common::{
    read_pid_file, text, wait_for_gate, wait_until_gone, write_build, Harness, Job, PidFilesGuard,
};

#[test]
fn timed_out_job_fails_with_timeout_and_its_processes_and_background_children_are_killed() {
    let harness = Harness::new("timeout");
    let server = harness.start_server("main", &[]);
    let script_pid_file = harness.path().join("script.pid");
    let background_pid_file = harness.path().join("background.pid");
    let _sleepers = PidFilesGuard(vec![script_pid_file.clone(), background_pid_file.clone()]);
    // The script and its children ignore SIGTERM, so that only SIGKILL after the grace
    // period ends them; the background sleep is a grandchild of the client.
    let install = format!(
        "trap '' TERM\n\
         sleep 1000 &\n\
         echo $! > '{background}'\n\
         echo $$ > '{script}'\n\
         sleep 1000\n",
        background = background_pid_file.display(),
        script = script_pid_file.display(),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "500",
        &[Job::new("hang", "PRO").install(&install).timeout(2)],
    ));
    let _client = harness.start_client(
        "runner",
        &[&server],
        &["--include", "*", "--kill-grace-secs", "1"],
    );

    let script_pid = read_pid_file(harness.path(), &script_pid_file);
    let background_pid = read_pid_file(harness.path(), &background_pid_file);
    let job = server.wait_for_job(&build, "hang", "to end", |job| {
        text(job, "state") != "queued" && text(job, "state") != "running"
    });
    assert_eq!(text(&job, "state"), "failed", "{job:#}");
    assert!(
        text(&job, "error").starts_with("timeout"),
        "the error says timeout: {job:#}"
    );
    wait_until_gone(harness.path(), "the install script", script_pid);
    wait_until_gone(harness.path(), "its background sleep", background_pid);
}

#[test]
fn step_exiting_1_fails_the_job_with_its_status_and_the_log_keeps_its_output() {
    let harness = Harness::new("exit1");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "510",
        &[Job::new("broken", "PRO").install(
            "echo 'installing the broken product'\necho 'last words: disk 7 missing'\nexit 1\n",
        )],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);

    let job = server.wait_for_job(&build, "broken", "to end", |job| {
        text(job, "state") != "queued" && text(job, "state") != "running"
    });
    assert_eq!(text(&job, "state"), "failed", "{job:#}");
    let error = text(&job, "error");
    assert!(
        error.starts_with("exit: step install (") && error.contains("exited with status 1"),
        "the error names the step and status 1: {error:?}"
    );

    let logs = server.kiln(&["logs", &format!("{build}/broken")]);
    harness.check(logs.code == 0, || format!("kiln logs failed: {logs:?}"));
    assert!(
        logs.stdout
            .lines()
            .any(|line| line == "last words: disk 7 missing"),
        "kiln logs shows the script's last line: {:?}",
        logs.stdout
    );
}

#[test]
fn verify_step_runs_after_image_and_its_failure_fails_the_job_with_its_log() {
    let harness = Harness::new("verify");
    let server = harness.start_server("main", &[]);
    // The verify step sees the image the image step left, and the job's variables.
    let checks =
        "[ -s \"$KILN_OUTPUT/$KILN_JOB_ID.img\" ] || { echo 'no image to verify'; exit 3; }\n\
                  echo \"verified $KILN_JOB_ID on $KILN_CLIENT_ID\"\n";
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "515",
        &[
            Job::new("good", "PRO").verify(checks),
            Job::new("bad", "PRO").verify(&format!(
                "{checks}echo 'boot check: no login prompt within 5 s'\nexit 1\n"
            )),
        ],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);

    let good = server.wait_for_job(&build, "good", "to end", |job| {
        text(job, "state") != "queued" && text(job, "state") != "running"
    });
    assert_eq!(text(&good, "state"), "finished", "{good:#}");
    let logs = server.kiln(&["logs", &format!("{build}/good")]);
    harness.check(logs.code == 0, || format!("kiln logs failed: {logs:?}"));
    let lines: Vec<&str> = logs.stdout.lines().collect();
    let image_step = lines.iter().position(|line| line.contains("step image: "));
    let verify_step = lines.iter().position(|line| line.contains("step verify: "));
    assert!(
        matches!((image_step, verify_step), (Some(image), Some(verify)) if image < verify),
        "the verify step runs after the image step: {lines:?}"
    );
    assert!(
        lines.contains(&"verified good on runner"),
        "the verify step's output is in the log: {lines:?}"
    );
    let images = server.get(&format!("/v1/builds/{build}/images"));
    assert!(
        images.status == 200 && images.body.contains("good.img"),
        "the verified job's image was uploaded: {images:?}"
    );

    let bad = server.wait_for_job(&build, "bad", "to end", |job| {
        text(job, "state") != "queued" && text(job, "state") != "running"
    });
    assert_eq!(text(&bad, "state"), "failed", "{bad:#}");
    let error = text(&bad, "error");
    assert!(
        error.starts_with("exit: step verify (scripts/bad-verify.sh) exited with status 1")
            && error.contains("boot check: no login prompt within 5 s"),
        "the error names the verify step, its status and its last lines: {error:?}"
    );
}

#[test]
fn progress_line_shows_in_status_table_and_json_while_the_job_runs() {
    let harness = Harness::new("progress");
    // Heartbeats every second, so that progress is not held back by a slow beat.
    let server = harness.start_server("main", &["--heartbeat-secs", "1"]);
    // The job holds in its step until the test has seen its progress, so that what is
    // checked does not depend on how fast the test polls.
    let gate = harness.path().join("gate");
    let install = format!(
        "echo '##kiln[progress major=install minor=format percent=40]'\n{}",
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "520",
        &[Job::new("slow", "PRO").install(&install)],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);

    server.wait_for_job(&build, "slow", "running at 40 %", |job| {
        text(job, "state") == "running" && job["percent"] == 40
    });

    let job = server.status_of(&build, "slow");
    assert_eq!(text(&job, "state"), "running", "{job:#}");
    assert_eq!(text(&job, "major_state"), "install", "{job:#}");
    assert_eq!(text(&job, "minor_state"), "format", "{job:#}");
    assert_eq!(job["percent"], 40, "{job:#}");

    let table = server.kiln(&["status", &build]);
    harness.check(table.code == 0, || format!("kiln status failed: {table:?}"));
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "CONFIG", "STATE", "CLIENT", "MAJOR", "MINOR", "PERCENT", "ETA"],
        "{}",
        table.stdout
    );
    let row: Vec<&str> = lines
        .find(|line| line.split_whitespace().next() == Some("slow"))
        .unwrap_or_else(|| panic!("no row for the job: {}", table.stdout))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..7],
        ["slow", "PRO", "running", "runner", "install", "format", "40%"],
        "{}",
        table.stdout
    );

    std::fs::write(&gate, "").expect("opening the gate");
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the job finishes once let go: {waited:?}")
    });
}

#[test]
fn job_that_leaves_no_image_fails_with_no_images() {
    let harness = Harness::new("no-images");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "530",
        &[Job::new("empty", "PRO").image("echo 'made nothing'\n")],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);

    let job = server.wait_for_job(&build, "empty", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "failed", "{job:#}");
    assert!(
        text(&job, "error").starts_with("no_images"),
        "the error says no_images: {job:#}"
    );
}

#[test]
fn background_process_left_by_a_finished_step_is_killed_and_does_not_hold_the_job() {
    let harness = Harness::new("leftover");
    let server = harness.start_server("main", &[]);
    let background_pid_file = harness.path().join("background.pid");
    let _sleepers = PidFilesGuard(vec![background_pid_file.clone()]);
    // The background sleep keeps the step's stdout and stderr open after the step ends.
    let install = format!(
        "sleep 1000 &\necho $! > '{}'\necho 'install done'\n",
        background_pid_file.display()
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "540",
        &[Job::new("leaves-one", "PRO").install(&install)],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);

    let background_pid = read_pid_file(harness.path(), &background_pid_file);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the job finishes although its step left a process: {waited:?}")
    });
    wait_until_gone(
        harness.path(),
        "the background sleep the step left",
        background_pid,
    );
}

#[test]
fn every_line_of_a_step_that_floods_its_output_reaches_the_log_in_order() {
    let harness = Harness::new("flood");
    let server = harness.start_server("main", &[]);
    let n_lines = 20_000;
    let install =
        format!("i=1\nwhile [ $i -le {n_lines} ]; do echo \"flood line $i\"; i=$((i+1)); done\n");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "550",
        &[Job::new("flood", "PRO").install(&install)],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || format!("the job finishes: {waited:?}"));

    let logs = server.kiln(&["logs", &format!("{build}/flood")]);
    harness.check(logs.code == 0, || {
        format!("kiln logs failed: {:?}", logs.stderr)
    });
    let flood: Vec<&str> = logs
        .stdout
        .lines()
        .filter(|line| line.starts_with("flood line "))
        .collect();
    let expected: Vec<String> = (1..=n_lines).map(|i| format!("flood line {i}")).collect();
    assert_eq!(flood.len(), expected.len(), "every line is in the log");
    assert!(flood == expected, "the lines are in order, none garbled");
}

#[test]
fn steps_run_in_the_workspace_with_the_kiln_variables_and_stdin_closed() {
    let harness = Harness::new("contract");
    let server = harness.start_server("main", &[]);
    let install = "{\n\
         echo \"build=$KILN_BUILD\"\n\
         echo \"job=$KILN_JOB_ID\"\n\
         echo \"type=$KILN_CONFIG_TYPE\"\n\
         echo \"client=$KILN_CLIENT_ID\"\n\
         [ \"$(pwd -P)\" = \"$(cd \"$KILN_WORKSPACE\" && pwd -P)\" ] && echo 'cwd=workspace'\n\
         [ -f \"$KILN_WORKSPACE/scripts/env-install.sh\" ] && echo 'files=present'\n\
         [ -d \"$KILN_OUTPUT\" ] && echo 'output=dir'\n\
         if read -r line; then echo \"stdin=open:$line\"; else echo 'stdin=eof'; fi\n\
         } > \"$KILN_OUTPUT/env.img\"\n";
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "560",
        &[Job::new("env", "HOME")
            .install(install)
            .image("echo 'image step: nothing more'\n")],
    ));
    let _client = harness.start_client("contract-client", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || format!("the job finishes: {waited:?}"));

    let release_dir = harness.mkdir("release");
    let released = server.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(released.code == 0, || {
        format!("kiln release failed: {released:?}")
    });
    let image = std::fs::read_to_string(release_dir.join(&build).join("HOME/env.img"))
        .expect("the released image");
    let lines: Vec<&str> = image.lines().collect();
    assert_eq!(
        lines,
        [
            "build=560",
            "job=env",
            "type=HOME",
            "client=contract-client",
            "cwd=workspace",
            "files=present",
            "output=dir",
            "stdin=eof",
        ],
        "what the step saw"
    );
}
