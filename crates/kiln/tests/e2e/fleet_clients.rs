//! Clients in a fleet: clients that know only their masters serve every server the
//! masters list, keep working when a master dies, pick up a server started after them
//! and drop one that stopped; a client serving two servers takes the best job across
//! both (priority, then age) and never runs more jobs than its slots.

use crate::common;

use crate::common::{write_build, Client, Harness, Job, Master, Server};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Long enough for a list change to reach every client (a heartbeat, a master
/// timeout, a client refresh), well short of the harness's general deadline.
const WITHIN: Duration = Duration::from_secs(20);

/// The secrets a fleet shares: masters and servers accept one client credential, and
/// masters one server credential.
struct Secrets {
    client: PathBuf,
    server: PathBuf,
}

impl Secrets {
    fn new(harness: &Harness) -> Self {
        let client = harness.path().join("client.secret");
        let server = harness.path().join("server.secret");
        std::fs::write(&client, "fleet-client-secret\n").expect("writing a token");
        std::fs::write(&server, "fleet-server-secret\n").expect("writing a token");
        Secrets { client, server }
    }

    fn master(&self, harness: &Harness, name: &str) -> Master {
        let (client, server) = (
            self.client.display().to_string(),
            self.server.display().to_string(),
        );
        harness.start_master(
            name,
            &[
                "--heartbeat-timeout-secs",
                "2",
                "--client-token-file",
                &client,
                "--server-token-file",
                &server,
            ],
        )
    }

    /// A server on a port of its own that registers with `masters` (advertising the
    /// address it listens on) every second.
    fn server(&self, harness: &Harness, name: &str, masters: &[&Master]) -> Server {
        let server_token = self.server.display().to_string();
        let mut args = vec![
            "--heartbeat-secs",
            "1",
            "--master-token-file",
            &server_token,
        ];
        for master in masters {
            args.extend(["--master", &master.url]);
        }
        let data = harness.path().join(format!("{name}-data"));
        harness.start_server_at(name, "127.0.0.1:0", &data, Some(&self.client), &args)
    }

    /// A client that knows only `masters`.
    fn client(&self, harness: &Harness, id: &str, masters: &[&Master], slots: u32) -> Client {
        let mut args: Vec<String> = vec!["client".into(), "--id".into(), id.into()];
        for master in masters {
            args.extend(["--master".into(), master.url.clone()]);
        }
        args.extend(
            [
                "--token-file",
                &self.client.display().to_string(),
                "--include",
                "*",
                "--slots",
                &slots.to_string(),
                "--refresh-secs",
                "1",
                "--wait-secs",
                "5",
            ]
            .map(str::to_owned),
        );
        harness.start_client_with_args(id, &args)
    }
}

fn client_log(harness: &Harness, id: &str) -> String {
    std::fs::read_to_string(harness.path().join(format!("client-{id}.log"))).unwrap_or_default()
}

/// Waits until every client's log has a line with both `message` and `url`.
fn wait_for_client_logs(harness: &Harness, clients: &[Client], message: &str, url: &str) {
    let lacking = || -> Vec<&str> {
        clients
            .iter()
            .filter(|client| {
                !client_log(harness, &client.id)
                    .lines()
                    .any(|line| line.contains(message) && line.contains(url))
            })
            .map(|client| client.id.as_str())
            .collect()
    };
    common::wait_until_within(
        harness.path(),
        &format!("every client to log {message:?} for {url}"),
        WITHIN,
        || lacking().is_empty().then_some(()),
        || format!("clients without it: {:?}", lacking()),
    );
}

/// Submits `n` quick jobs as `number` and waits until they all finish; returns the ids
/// of the clients that ran them.
fn run_build(harness: &Harness, server: &Server, number: &str, n: usize) -> Vec<String> {
    let jobs: Vec<Job> = (0..n)
        .map(|i| Job::new(&format!("j{i}"), "PRO").install("sleep 0.2\n"))
        .collect();
    let build = server.submit(&write_build(&harness.mkdir(number), number, &jobs));
    let jobs = server.wait_for_build_end(&build);
    for job in &jobs {
        assert_eq!(job["state"], "finished", "on {}: {job:#}", server.name);
    }
    jobs.iter()
        .filter_map(|job| job["client_id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn clients_that_know_only_masters_serve_every_listed_server_through_master_loss_and_server_changes()
{
    let harness = Harness::new("fleet-clients");
    let secrets = Secrets::new(&harness);
    let mut master_one = secrets.master(&harness, "m1");
    let master_two = secrets.master(&harness, "m2");
    let mut server_one = secrets.server(&harness, "s1", &[&master_one, &master_two]);
    let server_two = secrets.server(&harness, "s2", &[&master_one, &master_two]);
    let clients: Vec<Client> = (1..=4)
        .map(|i| {
            secrets.client(
                &harness,
                &format!("c{i}"),
                &[&master_one, &master_two],
                1 + (i % 2),
            )
        })
        .collect();
    for server in [&server_one, &server_two] {
        wait_for_client_logs(&harness, &clients, "serving a new server", &server.url);
    }

    // Jobs posted on each server finish, run by the clients.
    let mut ran_on = Vec::new();
    ran_on.extend(run_build(&harness, &server_one, "100", 6));
    ran_on.extend(run_build(&harness, &server_two, "200", 6));
    ran_on.sort();
    ran_on.dedup();
    assert!(
        ran_on.len() >= 2,
        "twelve jobs on two servers were run by several clients, not only {ran_on:?}"
    );

    // The first master dies: the clients read the list from the second, so a server
    // started now (registering with both; only the second answers) is served.
    master_one.process.kill();
    let server_three = secrets.server(&harness, "s3", &[&master_one, &master_two]);
    wait_for_client_logs(
        &harness,
        &clients,
        "serving a new server",
        &server_three.url,
    );
    run_build(&harness, &server_three, "300", 4);
    for client in &clients {
        assert!(
            client_log(&harness, &client.id).contains("server list now read from this master"),
            "client {} switched to the second master:\n{}",
            client.id,
            client_log(&harness, &client.id)
        );
    }

    // A server that stops drops off the second master's list after its timeout, and
    // so off every client's; the others are still served.
    server_one.process.kill();
    wait_for_client_logs(
        &harness,
        &clients,
        "server dropped off the list",
        &server_one.url,
    );
    run_build(&harness, &server_two, "201", 2);
    run_build(&harness, &server_three, "301", 2);
}

/// An install script that appends the job's id to `order`.
fn record_order(order: &Path) -> String {
    format!("echo \"$KILN_JOB_ID\" >> '{}'\n", order.display())
}

#[test]
fn a_client_serving_two_servers_takes_the_best_job_across_both_and_never_exceeds_its_slots() {
    let harness = Harness::new("fleet-best");
    let shared_token = harness.path().join("client.secret");
    std::fs::write(&shared_token, "shared-client-secret-for-the-test\n").expect("writing a token");
    let server_a = harness.start_server_with_client_token("a", Some(&shared_token), &[]);
    let server_b = harness.start_server_with_client_token("b", Some(&shared_token), &[]);

    // A's build is older; B's holds the highest and the lowest priority.
    let order = harness.path().join("order");
    let job = |id: &str, priority: i64| {
        Job::new(id, "PRO")
            .priority(priority)
            .install(&record_order(&order))
    };
    let build_a = server_a.submit(&write_build(
        &harness.mkdir("a1"),
        "500",
        &[job("a1", 1), job("a2", 1)],
    ));
    std::thread::sleep(Duration::from_millis(20));
    let build_b = server_b.submit(&write_build(
        &harness.mkdir("b1"),
        "600",
        &[job("b1", 5), job("b2", 1), job("b3", 0)],
    ));
    let client = harness.start_client(
        "picky",
        &[&server_a, &server_b],
        &["--include", "*", "--slots", "1", "--wait-secs", "5"],
    );
    server_a.wait_for_build_end(&build_a);
    server_b.wait_for_build_end(&build_b);
    let ran: Vec<String> = std::fs::read_to_string(&order)
        .expect("reading the order file")
        .lines()
        .map(str::to_owned)
        .collect();
    // b1 has the highest priority; a1 and a2 share priority 1 with b2 but their build
    // is older; b3 has the lowest.
    assert_eq!(ran, ["b1", "a1", "a2", "b2", "b3"], "order of runs");
    drop(client);

    // Two slots, two servers with four jobs each: never more than two at once.
    let running = harness.mkdir("running");
    let counts = harness.path().join("counts");
    let counted = |id: &str| {
        Job::new(id, "PRO").install(&format!(
            "mkdir '{running}/{id}'\nls '{running}' | wc -l >> '{counts}'\nsleep 1\nrmdir '{running}/{id}'\n",
            running = running.display(),
            counts = counts.display(),
        ))
    };
    let build_a = server_a.submit(&write_build(
        &harness.mkdir("a2"),
        "501",
        &["w1", "w2", "w3", "w4"].map(|id| counted(&format!("a{id}"))),
    ));
    let build_b = server_b.submit(&write_build(
        &harness.mkdir("b2"),
        "601",
        &["w1", "w2", "w3", "w4"].map(|id| counted(&format!("b{id}"))),
    ));
    let _client = harness.start_client(
        "two-slots",
        &[&server_a, &server_b],
        &["--include", "*", "--slots", "2", "--wait-secs", "5"],
    );
    let mut jobs = server_a.wait_for_build_end(&build_a);
    jobs.extend(server_b.wait_for_build_end(&build_b));
    for job in &jobs {
        assert_eq!(job["state"], "finished", "{job:#}");
        assert_eq!(job["attempt"], 1, "no job was taken back: {job:#}");
    }
    let seen: Vec<u32> = std::fs::read_to_string(&counts)
        .expect("reading the counts")
        .split_whitespace()
        .map(|n| n.parse().expect("a count"))
        .collect();
    assert_eq!(
        seen.len(),
        8,
        "every job counted the jobs running: {seen:?}"
    );
    assert_eq!(
        seen.iter().max(),
        Some(&2),
        "two jobs ran at once, never more: {seen:?}"
    );
}
