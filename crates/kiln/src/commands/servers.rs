//! `kiln servers`: the servers a master lists, as a table or as the master's JSON.

use crate::cli::{ServerOpts, ServersArgs};
use crate::operator::operator;
use std::process::ExitCode;

pub async fn run(args: ServersArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&ServerOpts {
        server: args.master.clone(),
        token_file: args.token_file.clone(),
        ca_file: args.ca_file.clone(),
    })?;
    let servers = operator.servers(args.all).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&servers)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = kiln_common::now_micros();
    let url_width = servers
        .iter()
        .map(|server| server.url.len())
        .max()
        .unwrap_or(0)
        .max(3);
    println!(
        "{:<url_width$}  {:>6}  {:>6}  {:>7}  {:>14}{}",
        "URL",
        "BUILDS",
        "QUEUED",
        "RUNNING",
        "LAST HEARTBEAT",
        if args.all { "  LIVE" } else { "" }
    );
    for server in &servers {
        let age_secs = (now - server.last_heartbeat).max(0) as f64 / 1e6;
        let live = match server.live {
            Some(true) => "  yes",
            Some(false) => "  no",
            None => "",
        };
        println!(
            "{:<url_width$}  {:>6}  {:>6}  {:>7}  {:>13.1}s{live}",
            server.url, server.builds, server.queued, server.running, age_secs,
        );
    }
    if servers.is_empty() {
        eprintln!("no servers are listed");
    }
    Ok(ExitCode::SUCCESS)
}
