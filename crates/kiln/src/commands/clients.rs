//! `kiln clients [--json]`: the server's clients, as a table or as the server's JSON.
//! A client whose jobs failed or were lost is marked, so that a bad machine stands out.

use crate::cli::ClientsArgs;
use crate::commands::build::human_bytes;
use crate::commands::status::table;
use crate::operator::operator;
use kiln_proto::api::ClientInfo;
use std::process::ExitCode;

/// Marks a client with failed or lost jobs in the table's last column.
const MARK: &str = "!";

pub async fn run(args: ClientsArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    let clients = operator.clients().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&clients)?);
        return Ok(ExitCode::SUCCESS);
    }
    if clients.is_empty() {
        eprintln!("no client has been heard from");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", clients_table(&clients, kiln_common::now_micros()));
    if clients.iter().any(has_trouble) {
        println!(
            "{MARK} marks a client whose jobs failed or were lost: `kiln events BUILD` says why"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn has_trouble(client: &ClientInfo) -> bool {
    client.n_failed > 0 || client.n_lost > 0
}

/// One row per client; `now` (unix microseconds) makes the last contact an age.
fn clients_table(clients: &[ClientInfo], now: i64) -> String {
    let or_dash = |text: Option<String>| text.unwrap_or_else(|| "-".to_owned());
    let rows: Vec<Vec<String>> = clients
        .iter()
        .map(|client| {
            let held = if client.held.is_empty() {
                "0".to_owned()
            } else {
                let names: Vec<String> = client
                    .held
                    .iter()
                    .map(|held| format!("{}/{}", held.build, held.job))
                    .collect();
                format!("{}: {}", client.held.len(), names.join(", "))
            };
            vec![
                client.id.clone(),
                if client.include.is_empty() {
                    "-".to_owned()
                } else {
                    client.include.join(",")
                },
                or_dash(client.slots.map(|slots| slots.to_string())),
                held,
                age(now - client.last_contact),
                if client.session_open { "open" } else { "-" }.to_owned(),
                or_dash(client.version.clone()),
                or_dash(client.address.clone()),
                client.n_finished.to_string(),
                client.n_failed.to_string(),
                client.n_lost.to_string(),
                human_bytes(client.image_bytes),
                if has_trouble(client) { MARK } else { "" }.to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "CLIENT",
            "TYPES",
            "SLOTS",
            "HELD",
            "LAST CONTACT",
            "SESSION",
            "VERSION",
            "ADDRESS",
            "FINISHED",
            "FAILED",
            "LOST",
            "IMAGES",
            "",
        ],
        &rows,
    )
}

/// How long ago, for people: `3s ago`, `12m ago`, `5h ago`, `2d ago`.
fn age(micros: i64) -> String {
    let secs = micros.max(0) / 1_000_000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::api::HeldJob;

    const SEC: i64 = 1_000_000;

    #[test]
    fn ages_read_as_people_read_them() {
        assert_eq!(age(-5 * SEC), "0s ago");
        assert_eq!(age(3 * SEC + 900_000), "3s ago");
        assert_eq!(age(59 * SEC), "59s ago");
        assert_eq!(age(60 * SEC), "1m ago");
        assert_eq!(age(7200 * SEC), "2h ago");
        assert_eq!(age(3 * 86400 * SEC), "3d ago");
    }

    fn client(id: &str) -> ClientInfo {
        ClientInfo {
            id: id.to_owned(),
            include: vec!["PRO".to_owned(), "HOME".to_owned()],
            slots: Some(2),
            version: Some("0.1.0".to_owned()),
            address: Some("10.0.0.7".to_owned()),
            first_seen: 0,
            last_contact: 100 * SEC,
            session_open: true,
            held: Vec::new(),
            n_claimed: 0,
            n_finished: 0,
            n_failed: 0,
            n_lost: 0,
            image_bytes: 0,
        }
    }

    #[test]
    fn a_client_that_failed_or_lost_jobs_is_marked_and_an_older_client_shows_dashes() {
        let busy = ClientInfo {
            held: vec![
                HeldJob {
                    build: "700".to_owned(),
                    job: "a".to_owned(),
                    percent: Some(40),
                    major: None,
                },
                HeldJob {
                    build: "700".to_owned(),
                    job: "b".to_owned(),
                    percent: None,
                    major: None,
                },
            ],
            n_claimed: 5,
            n_finished: 3,
            image_bytes: 3 << 30,
            ..client("busy")
        };
        let flaky = ClientInfo {
            n_claimed: 3,
            n_finished: 1,
            n_failed: 1,
            n_lost: 1,
            image_bytes: 1536,
            session_open: false,
            last_contact: 40 * SEC,
            ..client("flaky")
        };
        let older = ClientInfo {
            include: Vec::new(),
            slots: None,
            version: None,
            address: None,
            ..client("older")
        };
        let text = clients_table(&[busy, flaky, older], 103 * SEC);
        let expected = "\
CLIENT  TYPES     SLOTS  HELD             LAST CONTACT  SESSION  VERSION  ADDRESS   FINISHED  FAILED  LOST  IMAGES
busy    PRO,HOME  2      2: 700/a, 700/b  3s ago        open     0.1.0    10.0.0.7  3         0       0     3.0 GiB
flaky   PRO,HOME  2      0                1m ago        -        0.1.0    10.0.0.7  1         1       1     1.5 KiB  !
older   -         -      0                3s ago        open     -        -         0         0       0     0 B
";
        assert_eq!(text, expected);
    }
}
