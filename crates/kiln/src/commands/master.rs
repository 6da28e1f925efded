//! `kiln master`: binds, prints its URL, keeps the server list until SIGTERM or SIGINT.

use crate::cli::MasterArgs;
use anyhow::Context;
use kiln_master::{Master, MasterConfig};
use std::io::Write;
use std::process::ExitCode;

pub async fn run(args: MasterArgs) -> anyhow::Result<ExitCode> {
    let mut config = MasterConfig::new(args.data.clone());
    config.heartbeat_timeout_secs = args.heartbeat_timeout_secs.max(1);
    config.admin_token_file = args.admin_token_file;
    config.server_token_file = args.server_token_file;
    config.client_token_file = args.client_token_file;
    config.tls = super::server_tls(args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    let scheme = kiln_tls::scheme(config.tls.as_ref());
    let tls = config.tls.clone();
    let master = Master::open(config)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    super::warn_if_clear_text(addr, tls.as_ref());
    // The URL is the one line on stdout, so that scripts and tests can read it.
    println!("kiln master listening on {scheme}://{addr}");
    std::io::stdout().flush().ok();
    tracing::info!(data = %args.data.display(), "server token in server.token, client token in client.token, admin token in admin.token");
    master.run(listener, super::terminated()).await?;
    tracing::info!("master stopped");
    Ok(ExitCode::SUCCESS)
}
