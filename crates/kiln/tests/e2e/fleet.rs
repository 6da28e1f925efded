//! Masters: servers register with several masters and heartbeat their counts; a server
//! that stops heartbeating drops off and comes back when it returns; a restarted master
//! lists its servers at once from its saved list; registration needs the server
//! credential.

use crate::common;

use crate::common::{
    free_loopback_addr, http, run_kiln, wait_until_within, write_build, Harness, Job, Master,
};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Masters drop a server after 2 s without a heartbeat; servers heartbeat every 1 s.
const MASTER_ARGS: [&str; 2] = ["--heartbeat-timeout-secs", "2"];
/// Long enough for a drop or a return (a few heartbeats and timeouts), well short of
/// the harness's general deadline.
const WITHIN: Duration = Duration::from_secs(15);

/// A server's flags to register with `masters` as `advertise`.
fn server_args(masters: &[&Master], advertise: &str, token: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--heartbeat-secs",
        "1",
        "--advertise",
        advertise,
        "--master-token-file",
        token,
    ]
    .map(str::to_owned)
    .to_vec();
    for master in masters {
        args.extend(["--master".to_owned(), master.url.clone()]);
    }
    args
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn entry<'a>(servers: &'a [Value], url: &str) -> Option<&'a Value> {
    servers.iter().find(|server| server["url"] == url)
}

fn wait_for_list(harness: &Harness, master: &Master, what: &str, check: impl Fn(&[Value]) -> bool) {
    wait_until_within(
        harness.path(),
        &format!("master {}: {what}", master.name),
        WITHIN,
        || check(&master.servers(true)).then_some(()),
        || format!("{:?}", master.servers(true)),
    );
}

#[test]
fn two_masters_list_three_servers_with_their_counts_drop_a_killed_one_and_survive_a_restart() {
    let harness = Harness::new("fleet");
    let secret = harness.path().join("server.secret");
    std::fs::write(&secret, "server-secret-shared-by-both-masters\n").expect("writing a token");
    let secret_arg = secret.display().to_string();
    let mut master_args = MASTER_ARGS.to_vec();
    master_args.extend(["--server-token-file", &secret_arg]);
    let master_one = harness.start_master("m1", &master_args);
    let master_two = harness.start_master("m2", &master_args);

    let addrs: Vec<String> = (0..3).map(|_| free_loopback_addr()).collect();
    let urls: Vec<String> = addrs.iter().map(|addr| format!("http://{addr}")).collect();
    let mut servers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let name = format!("s{i}");
        let data = harness.path().join(format!("{name}-data"));
        let args = server_args(&[&master_one, &master_two], &urls[i], &secret_arg);
        servers.push(harness.start_server_at(&name, addr, &data, None, &as_strs(&args)));
    }

    let mut sorted = urls.clone();
    sorted.sort();
    for master in [&master_one, &master_two] {
        wait_for_list(&harness, master, "all three servers live", |list| {
            urls.iter()
                .all(|url| entry(list, url).is_some_and(|e| e["live"] == true))
        });
    }

    // Two queued jobs (no client runs them) on the first server.
    let build = servers[0].submit(&write_build(
        &harness.mkdir("b"),
        "100",
        &[Job::new("a", "PRO"), Job::new("b", "PRO")],
    ));
    assert_eq!(build, "100");
    for master in [&master_one, &master_two] {
        wait_for_list(
            &harness,
            master,
            "the first server's two queued jobs",
            |list| {
                let counts = |url: &str| {
                    entry(list, url).map(|e| {
                        (
                            e["builds"].as_u64(),
                            e["queued"].as_u64(),
                            e["running"].as_u64(),
                        )
                    })
                };
                counts(&urls[0]) == Some((Some(1), Some(2), Some(0)))
                    && counts(&urls[1]) == Some((Some(0), Some(0), Some(0)))
                    && counts(&urls[2]) == Some((Some(0), Some(0), Some(0)))
            },
        );
        assert_eq!(master.live_urls(), sorted);
    }

    // The CLI shows the same, as JSON and as a table.
    let client_token = master_one.client_token_file.display().to_string();
    let listed = run_kiln(
        harness.path(),
        &[
            "servers",
            "--master",
            &master_one.url,
            "--token-file",
            &client_token,
            "--json",
        ],
        &[],
    );
    harness.check(listed.code == 0, || {
        format!("kiln servers --json: {listed:?}")
    });
    let json: Vec<Value> =
        serde_json::from_str(&listed.stdout).expect("kiln servers --json prints JSON");
    assert_eq!(
        entry(&json, &urls[0]).expect("first server listed")["queued"],
        2
    );
    let table = run_kiln(
        harness.path(),
        &[
            "servers",
            "--master",
            &master_one.url,
            "--token-file",
            &client_token,
        ],
        &[],
    );
    harness.check(
        table.code == 0
            && table.stdout.starts_with("URL")
            && urls.iter().all(|url| table.stdout.contains(url.as_str())),
        || format!("kiln servers table: {table:?}"),
    );

    // A SIGKILLed server drops off both lists after the timeout...
    servers[1].process.kill();
    for master in [&master_one, &master_two] {
        wait_for_list(&harness, master, "the killed server dropped off", |list| {
            entry(list, &urls[1]).is_some_and(|e| e["live"] == false)
        });
        assert!(!master.live_urls().contains(&urls[1]));
        assert_eq!(master.live_urls().len(), 2);
    }
    // ...and comes back when restarted.
    let data = servers[1].data.clone();
    let args = server_args(&[&master_one, &master_two], &urls[1], &secret_arg);
    servers[1] = harness.start_server_at("s1", &addrs[1], &data, None, &as_strs(&args));
    for master in [&master_one, &master_two] {
        wait_for_list(&harness, master, "the restarted server back", |list| {
            entry(list, &urls[1]).is_some_and(|e| e["live"] == true)
        });
    }

    // A master SIGKILLed and restarted lists its servers at once, from its saved list:
    // stop the servers first, so that none of them can have registered again.
    let first_seen =
        entry(&master_one.servers(false), &urls[0]).expect("listed")["first_seen"].clone();
    for server in &mut servers {
        server.process.kill();
    }
    let mut master_one = master_one;
    master_one.process.kill();
    let addr = master_one.url.trim_start_matches("http://").to_owned();
    let master_data = master_one.data.clone();
    let restarted = harness.start_master_at("m1", &addr, &master_data, &master_args);
    let after = restarted.servers(false);
    assert_eq!(
        restarted.live_urls(),
        sorted,
        "the restarted master's list: {after:?}"
    );
    assert_eq!(
        entry(&after, &urls[0]).expect("listed")["first_seen"],
        first_seen
    );
    assert_eq!(entry(&after, &urls[0]).expect("listed")["queued"], 2);
    // With no server heartbeating, they drop off one timeout later.
    wait_for_list(
        &harness,
        &restarted,
        "the stopped servers dropped off",
        |list| list.len() == 3 && list.iter().all(|e| e["live"] == false),
    );
}

fn post(master: &Master, token: &str, body: &str) -> common::HttpResponse {
    let auth = format!("Bearer {token}");
    http(
        &master.url,
        "POST",
        "/v1/servers",
        &[("Authorization", &auth)],
        Some(body),
    )
    .unwrap_or_else(|err| master.fail(&format!("POST /v1/servers: {err}")))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("reading a token")
        .trim()
        .to_owned()
}

#[test]
fn registration_needs_the_server_credential_and_a_plain_http_url() {
    let harness = Harness::new("fleet-auth");
    let master = harness.start_master("m", &MASTER_ARGS);
    let body = r#"{"url":"http://127.0.0.1:9","builds":0,"queued":0,"running":0}"#;

    let wrong = post(&master, "not-the-secret", body);
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(
        wrong.body.contains("\"code\":\"unauthorized\""),
        "{}",
        wrong.body
    );
    let as_client = post(&master, &read(&master.client_token_file), body);
    assert_eq!(as_client.status, 403, "{}", as_client.body);
    assert!(
        master.servers(true).is_empty(),
        "a refused registration is not listed"
    );

    let server_token = read(&master.server_token_file);
    for (bad, code) in [
        (r#"{"url":"ftp://127.0.0.1:9"}"#, "invalid_url"),
        (r#"{"url":"http://user:pw@127.0.0.1:9"}"#, "invalid_url"),
        (r#"{"url":"not a url"}"#, "invalid_url"),
        (r#"{"nope":1}"#, "invalid_registration"),
    ] {
        let refused = post(&master, &server_token, bad);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.body);
        assert!(refused.body.contains(code), "{bad}: {}", refused.body);
    }
    assert!(master.servers(true).is_empty());

    let accepted = post(&master, &server_token, body);
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    assert_eq!(master.live_urls(), vec!["http://127.0.0.1:9".to_owned()]);
    // The server credential does not read the list.
    let auth = format!("Bearer {server_token}");
    let read_as_server = http(
        &master.url,
        "GET",
        "/v1/servers",
        &[("Authorization", &auth)],
        None,
    )
    .expect("GET");
    assert_eq!(read_as_server.status, 403);

    // --master without --advertise while listening on every address is a usage error
    // naming both flags (refused before anything is bound).
    let data = harness.path().join("lonely-data");
    let run = run_kiln(
        harness.path(),
        &[
            "server",
            "--listen",
            "0.0.0.0:0",
            "--data",
            &data.display().to_string(),
            "--master",
            &master.url,
            "--master-token-file",
            &master.server_token_file.display().to_string(),
        ],
        &[],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--master") && run.stderr.contains("--advertise"),
        "{run:?}"
    );
}
