//! The operator commands' side of the CLI: an [`Operator`] from `--server`,
//! `--token-file` (or KILN_TOKEN) and `--ca-file`, usage errors found after argument
//! parsing, and the mapping of failures to exit codes.

use crate::cli::ServerOpts;
use anyhow::Context;
use kiln_api::{CallError, Endpoint, EndpointError, Operator, Secret};

/// A usage error found after argument parsing: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error: 2 for usage errors, bad URLs, a server that cannot be
/// reached and a wait that timed out; else 1.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    let unreachable = |call: Option<&CallError>| call.is_some_and(CallError::is_unreachable);
    let usage_or_connection = err.chain().any(|cause| {
        cause.is::<Usage>()
            || cause.is::<EndpointError>()
            || cause
                .downcast_ref::<kiln_server::offline::OfflineError>()
                .is_some_and(kiln_server::offline::OfflineError::is_usage)
            || unreachable(cause.downcast_ref::<CallError>())
            || unreachable(
                cause
                    .downcast_ref::<kiln_api::SubmitError>()
                    .and_then(kiln_api::SubmitError::call),
            )
            || cause
                .downcast_ref::<kiln_release::ReleaseError>()
                .is_some_and(|err| err.is_usage() || unreachable(err.call()))
            || cause
                .downcast_ref::<kiln_api::WaitError>()
                .is_some_and(|err| err.call().is_none_or(CallError::is_unreachable))
    });
    if usage_or_connection {
        2
    } else {
        1
    }
}

/// The credential of `--token-file`, else of KILN_TOKEN.
pub fn token_from(token_file: Option<&std::path::Path>) -> anyhow::Result<Option<Secret>> {
    Ok(match token_file {
        Some(path) => Some(Secret::trimmed(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?,
        )),
        None => std::env::var("KILN_TOKEN")
            .ok()
            .map(|token| Secret::trimmed(&token)),
    })
}

/// What the client trusts: the usual public CAs, and those of `ca_file` (`what`
/// names where it was given, for errors).
pub fn client_tls(
    ca_file: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<kiln_tls::ClientTls> {
    kiln_tls::ClientTls::from_ca_file(ca_file)
        .map_err(|err| Usage(format!("{what}: {}", kiln_proto::error_chain(&err))).into())
}

/// The operator of `--server` with `--token-file` (or KILN_TOKEN) and `--ca-file`.
pub fn operator(opts: &ServerOpts) -> anyhow::Result<Operator> {
    let token = token_from(opts.token_file.as_deref())?;
    let tls = client_tls(opts.ca_file.as_deref(), "--ca-file")?;
    let endpoint = Endpoint::new("server", &opts.server, &tls)?;
    Ok(Operator::new(endpoint, token)?)
}

/// Splits `BUILD/ID` into its parts.
pub fn split_job(name: &str) -> anyhow::Result<(String, String)> {
    match name.split_once('/') {
        Some((build, job)) if !build.is_empty() && !job.is_empty() && !job.contains('/') => {
            Ok((build.to_owned(), job.to_owned()))
        }
        _ => Err(Usage(format!("a job is named BUILD/ID, not {name:?}")).into()),
    }
}
