//! `kiln server`: binds, prints its URL, serves until SIGTERM or SIGINT.

use crate::cli::ServerArgs;
use anyhow::Context;
use kiln_server::{Server, ServerConfig};
use std::io::Write;
use std::process::ExitCode;

pub async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    if let Some(action) = args.action {
        return super::credentials::run(action).await;
    }
    kiln_server::keep_memory_flat();
    let data = args
        .data
        .clone()
        .ok_or_else(|| crate::operator::Usage("kiln server needs --data DIR".into()))?;
    let mut config = ServerConfig::new(data.clone());
    config.public_read = args.public_read;
    config.database = args.database;
    config.admin_token_file = args.admin_token_file;
    config.client_token_file = args.client_token_file;
    config.lease_secs = args.lease_secs.max(1);
    config.heartbeat_secs = args.heartbeat_secs.clamp(1, config.lease_secs);
    config.startup_grace_secs = args.startup_grace_secs.unwrap_or(config.lease_secs);
    config.hung_grace_secs = args.hung_grace_secs;
    config.default_accept_within_secs = args.accept_within_secs;
    config.default_max_attempts = args.max_attempts.max(1);
    config.max_log_bytes_per_job = args.max_log_bytes_per_job;
    config.max_jobs_per_build = args.max_jobs_per_build.max(1);
    config.max_uploads_per_client = args.max_uploads_per_client.max(1);
    config.tls = super::server_tls(args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    let scheme = kiln_tls::scheme(config.tls.as_ref());
    if args.master_ca_file.is_some() && args.masters.is_empty() {
        return Err(crate::operator::Usage(
            "--master-ca-file is only used with --master URL: name the masters to register with"
                .into(),
        )
        .into());
    }
    config.master_tls = kiln_tls::ClientTls::from_ca_file(args.master_ca_file.as_deref())
        .context("--master-ca-file")?;
    if args.advertise.is_some() && args.masters.is_empty() {
        return Err(crate::operator::Usage(
            "--advertise is only used with --master URL: name the masters to register with".into(),
        )
        .into());
    }
    if let Some(url) = &args.advertise {
        kiln_master::validate_server_url(url)
            .map_err(|message| crate::operator::Usage(format!("--advertise: {message}")))?;
    }
    if !args.masters.is_empty() {
        let Some(path) = &args.master_token_file else {
            return Err(crate::operator::Usage(
                "--master needs --master-token-file FILE: the masters' server credential".into(),
            )
            .into());
        };
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading --master-token-file {}", path.display()))?;
        anyhow::ensure!(
            !token.trim().is_empty(),
            "--master-token-file {} is empty",
            path.display()
        );
    }
    for url in &args.masters {
        kiln_master::validate_server_url(url)
            .map_err(|message| crate::operator::Usage(format!("--master: {message}")))?;
    }
    let listens_everywhere = args
        .listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|addr| addr.ip().is_unspecified());
    if !args.masters.is_empty() && args.advertise.is_none() && listens_everywhere {
        return Err(crate::operator::Usage(format!(
            "--master needs --advertise URL when listening on every address ({}): the URL \
             the master hands out for this server",
            args.listen
        ))
        .into());
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let advertise = match args.advertise {
        Some(url) => Some(url),
        None if args.masters.is_empty() => None,
        // Listening on one address (checked above): that address, with the port
        // actually bound, is where clients reach this server.
        None => Some(format!("{scheme}://{addr}")),
    };
    config.masters = args.masters;
    config.advertise = advertise;
    config.master_token_file = args.master_token_file;
    let server_tls = config.tls.clone();
    if let Some(url) = &args.images {
        let s3 = s3_config(
            url,
            args.s3_endpoint.as_deref().unwrap_or_default(),
            &args.s3_region,
            args.s3_credentials_file.as_deref(),
        )?;
        tracing::info!(bucket = %s3.bucket, prefix = %s3.prefix, endpoint = %s3.endpoint, "images in object storage");
        config.images = Some(s3);
    }
    let server = Server::open(config).await?;
    super::warn_if_clear_text(addr, server_tls.as_ref());
    // The URL is the one line on stdout, so that scripts and tests can read it.
    println!("kiln server listening on {scheme}://{addr}");
    std::io::stdout().flush().ok();
    tracing::info!(data = %data.display(), "admin token in admin.token, join token in client.token");
    if args.public_read {
        tracing::warn!(
            "--public-read: build status, events and images are served without a credential"
        );
    }
    server.run(listener, super::terminated()).await?;
    tracing::info!("server stopped");
    Ok(ExitCode::SUCCESS)
}

/// Where `--images` and the `--s3-*` flags say images rest, with the key from the
/// credentials file, else from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
fn s3_config(
    url: &str,
    endpoint: &str,
    region: &str,
    credentials_file: Option<&std::path::Path>,
) -> anyhow::Result<kiln_server::S3Config> {
    let mut s3 = kiln_server::S3Config::from_url(url, endpoint, region)
        .map_err(|msg| crate::operator::Usage(format!("--images: {msg}")))?;
    s3.credentials = match credentials_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(parse_credentials(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no aws_access_key_id and aws_secret_access_key lines",
                    path.display()
                )
            })?)
        }
        None => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(key), Ok(secret)) if !key.is_empty() => Some((key, secret)),
            _ => None,
        },
    };
    Ok(s3)
}

/// The first `aws_access_key_id` and `aws_secret_access_key` of an AWS credentials
/// file (`key = value` lines; sections and comments are skipped).
fn parse_credentials(text: &str) -> Option<(String, String)> {
    let mut key = None;
    let mut secret = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_owned();
        match name.trim() {
            "aws_access_key_id" if key.is_none() => key = Some(value),
            "aws_secret_access_key" if secret.is_none() => secret = Some(value),
            _ => {}
        }
    }
    key.zip(secret)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_credentials_file_gives_its_first_key_and_secret() {
        let text = "# kiln\n[default]\naws_access_key_id = AKID\naws_secret_access_key=s3cr3t\n\n[other]\naws_access_key_id = X\n";
        assert_eq!(
            super::parse_credentials(text),
            Some(("AKID".to_owned(), "s3cr3t".to_owned()))
        );
        assert_eq!(super::parse_credentials("[default]\n"), None);
    }
}
