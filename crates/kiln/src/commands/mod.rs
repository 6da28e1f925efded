//! One module per subcommand, each parsing its arguments into a library call and
//! printing what comes back; [`run`] dispatches.

mod bench;
mod build;
mod client;
mod clients;
pub mod completions;
mod credentials;
mod demo;
mod events;
mod logs;
pub mod manpages;
mod master;
pub mod openapi;
mod release;
mod server;
mod servers;
mod status;
mod submit;

use crate::cli::{Cli, Command, JobAction};
use crate::operator::split_job;
use anyhow::Context;
use std::process::ExitCode;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Server(args) => {
            init_tracing("info");
            server::run(*args).await
        }
        Command::Client(args) => {
            init_tracing("info");
            client::run(args).await
        }
        Command::Master(args) => {
            init_tracing("info");
            master::run(args).await
        }
        Command::Servers(args) => {
            init_tracing("warn");
            servers::run(args).await
        }
        Command::Submit(args) => {
            init_tracing("warn");
            submit::run(args).await
        }
        Command::Status(args) => {
            init_tracing("warn");
            status::status(args).await
        }
        Command::Wait(args) => {
            init_tracing("warn");
            status::wait(args).await
        }
        Command::Logs(args) => {
            init_tracing("warn");
            logs::run(args).await
        }
        Command::Events(args) => {
            init_tracing("warn");
            events::run(args).await
        }
        Command::Job(args) => {
            init_tracing("warn");
            let (name, opts, action) = match &args.action {
                JobAction::Restart { job, server } => (job, server, kiln_api::JobAction::Restart),
                JobAction::Cancel { job, server } => (job, server, kiln_api::JobAction::Cancel),
            };
            let (build, job) = split_job(name)?;
            let operator = crate::operator::operator(opts)?;
            let event = operator.job_action(&build, &job, action).await?;
            println!(
                "job {build}/{job}: {} -> {}",
                event.from.map_or("-".into(), |s| s.to_string()),
                event.to
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Build(args) => {
            init_tracing("warn");
            build::run(args).await
        }
        Command::Storage(args) => {
            init_tracing("warn");
            build::storage(args).await
        }
        Command::Clients(args) => {
            init_tracing("warn");
            clients::run(args).await
        }
        Command::Release(args) => {
            init_tracing("warn");
            release::run(args).await
        }
        Command::Demo(args) => {
            init_tracing("warn");
            demo::run(args).await
        }
        Command::Bench(args) => {
            init_tracing("warn");
            bench::run(args).await
        }
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => manpages::run(args),
        Command::Openapi(args) => openapi::run(args),
    }
}

/// Logs to stderr at `default` unless RUST_LOG says otherwise.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `--tls-cert` and `--tls-key` of `kiln server` and `kiln master`: both or neither.
pub(crate) fn server_tls(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Option<kiln_tls::ServerTls>> {
    let usage = |message: &str| crate::operator::Usage(message.to_owned());
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => {
            Err(usage("--tls-cert needs --tls-key FILE: the certificate's private key").into())
        }
        (None, Some(_)) => {
            Err(usage("--tls-key needs --tls-cert FILE: the certificate chain of the key").into())
        }
        (Some(cert), Some(key)) => Ok(Some(
            kiln_tls::ServerTls::from_pem_files(cert, key).context("setting up TLS")?,
        )),
    }
}

/// Warns that a listener without TLS on a reachable address sends secrets in clear.
pub(crate) fn warn_if_clear_text(addr: std::net::SocketAddr, tls: Option<&kiln_tls::ServerTls>) {
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address without TLS: credentials travel in clear text (pass --tls-cert and --tls-key)");
    }
}
