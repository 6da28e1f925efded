//! The chaos test: a 42-job build (7 products × 6 configurations) on 6 clients while
//! clients are SIGKILLed 10 times and the server 3 times, each restarted; and the same
//! build on two replicas sharing a PostgreSQL and a SeaweedFS, while clients are
//! SIGKILLed 8 times, a random replica 4 times, and PostgreSQL once. `kiln bench chaos`
//! drives it and checks the invariants (every job finished once, every image's SHA-256
//! equals the value computed independently for its job, no two live leases in the
//! event log, no webhook notice received twice); this test runs it and shows its
//! figures.

use std::process::Command;

/// Runs `kiln bench chaos ARGS`; checks that every check passed and that the table's
/// row starts with `row`.
fn chaos(args: &[&str], row: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "chaos"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("kiln bench chaos runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let chaos_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("chaos:"))
        .collect();
    println!("{}\n{stdout}", chaos_lines.join("\n"));
    assert!(
        output.status.success() && stdout.contains("chaos: all checks passed"),
        "chaos run failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains(row), "{stdout}");
}

#[test]
fn chaos_of_client_and_server_kills_loses_nothing_and_runs_nothing_twice() {
    chaos(
        &["--client-kills", "10", "--server-kills", "3"],
        "| 42/42 | 10 | 3 | 0 |",
    );
}

#[test]
fn chaos_of_client_replica_and_postgresql_kills_loses_nothing_and_runs_nothing_twice() {
    chaos(
        &[
            "--replicas",
            "2",
            "--client-kills",
            "8",
            "--server-kills",
            "4",
            "--database-restarts",
            "1",
        ],
        "| 42/42 | 8 | 4 | 1 |",
    );
}
