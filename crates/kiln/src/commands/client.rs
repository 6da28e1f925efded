//! `kiln client`: the imaging agent, configured by flags, buildclient.xml or TOML.

use crate::cli::{ClientAction, ClientArgs};
use crate::operator::{client_tls, token_from, Usage};
use anyhow::Context;
use kiln_api::{Given, MasterConn, Secret, ServerConn};
use kiln_client::{Agent, ClientOptions, Stop};
use kiln_proto::client_config::ClientConfig;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    if let Some(ClientAction::Reset {
        work,
        token_file,
        ca_file,
    }) = &args.action
    {
        return reset(work, token_file.as_deref(), ca_file.as_deref()).await;
    }
    let options = options_from(args)?;
    let agent = Agent::new(options.clone())?;
    tracing::info!(
        id = %options.client_id,
        include = %options.include.join(","),
        slots = options.slots,
        cache = %options.cache_dir.display(),
        cache_max_bytes = options.cache_max_bytes,
        servers = %options.servers.iter().map(|s| s.url().to_owned()).collect::<Vec<_>>().join(" "),
        masters = %options.masters.iter().map(|m| m.url().to_owned()).collect::<Vec<_>>().join(" "),
        "client started"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Stop::Run);
    tokio::spawn(async move {
        super::terminated().await;
        tracing::info!(
            "stopping: finishing held jobs, taking no new one (signal again to give them back)"
        );
        let _ = stop_tx.send(Stop::Drain);
        super::terminated().await;
        tracing::info!("stopping now: giving held jobs back");
        let _ = stop_tx.send(Stop::Abandon);
    });
    let report = agent.run(stop_rx).await;
    tracing::info!(
        n_finished = report.n_finished,
        n_failed = report.n_failed,
        n_lost = report.n_lost,
        "client stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// `kiln client reset --work DIR`: gives the held jobs back and clears the state.
async fn reset(
    work: &std::path::Path,
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let tls = client_tls(ca_file, "--ca-file")?;
    let local_state = kiln_client::state::LocalState::open(work)
        .with_context(|| format!("reading the state file in {}", work.display()))?;
    let held = local_state.held();
    let token = token_from(token_file)?;
    let mut servers: Vec<ServerConn> = Vec::new();
    for job in &held {
        if servers
            .iter()
            .any(|conn| conn.url() == job.server.trim_end_matches('/'))
        {
            continue;
        }
        match &token {
            Some(token) => {
                let conn = ServerConn::with_tls(&job.server, token.expose(), &tls)?;
                // The jobs are given back as the client that held them.
                let keep_dir = work.join("credentials");
                servers.push(
                    match kiln_api::kept_client_id(&keep_dir, &job.server) {
                        Some(id) => conn.for_client(&id, Some(&keep_dir)),
                        None => conn,
                    },
                );
            }
            None => eprintln!(
                "warning: no client credential (--token-file or KILN_TOKEN): {} is not told; its job's lease will lapse",
                job.server
            ),
        }
    }
    kiln_client::recover_held_jobs(&local_state, &servers, work).await;
    for job in &held {
        eprintln!("gave up {}/{} on {}", job.build, job.job, job.server);
    }
    eprintln!(
        "client state in {} cleared ({} jobs given up)",
        work.display(),
        held.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Merges the config file (if any) with the flags; flags win.
fn options_from(args: ClientArgs) -> anyhow::Result<ClientOptions> {
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.display().to_string();
            Some(ClientConfig::parse(&name, &text)?)
        }
        None => None,
    };
    // The config's ca_file is relative to the config file, as written beside it.
    let config_ca_file = args.config.as_ref().and_then(|path| {
        let ca_file = config.as_ref()?.ca_file.as_ref()?;
        let dir = path.parent().unwrap_or(std::path::Path::new(""));
        Some(dir.join(ca_file))
    });
    let tls = match (&args.ca_file, &config_ca_file) {
        (Some(path), _) => client_tls(Some(path), "--ca-file")?,
        (None, Some(path)) => client_tls(Some(path), "ca_file")?,
        (None, None) => kiln_tls::ClientTls::default(),
    };
    let flag_token = token_from(args.token_file.as_deref())?;
    let mut servers = Vec::new();
    for url in &args.servers {
        let token = flag_token.clone().ok_or_else(|| {
            Usage(format!(
                "no client credential for {url}: pass --token-file FILE or set KILN_TOKEN"
            ))
        })?;
        servers.push(ServerConn::with_tls(url, token.expose(), &tls)?);
    }
    if args.servers.is_empty() {
        for entry in config.iter().flat_map(|config| config.servers.iter()) {
            // USERNAME and PASSWORD: the client's own id and secret, or any name with
            // the join token; the server tells which.
            let given = match (&flag_token, &entry.username, &entry.password) {
                (Some(token), _, _) => Given::Token(token.clone()),
                (None, Some(user), Some(password)) if !user.is_empty() => Given::Basic {
                    user: user.clone(),
                    password: Secret::new(password),
                },
                (None, _, Some(password)) => Given::Token(Secret::new(password)),
                (None, _, None) => {
                    return Err(Usage(format!(
                        "no client credential for {}: give PASSWORD, --token-file or KILN_TOKEN",
                        entry.url
                    ))
                    .into())
                }
            };
            servers.push(
                ServerConn::with_given(&entry.url, given, &tls)
                    .map_err(|err| Usage(format!("CONFIGLOC: {err}")))?,
            );
        }
    }
    let mut masters = Vec::new();
    for url in &args.masters {
        let token = flag_token.clone().ok_or_else(|| {
            Usage(format!(
                "no client credential for master {url}: pass --token-file FILE or set KILN_TOKEN"
            ))
        })?;
        masters.push(MasterConn::with_tls(url, token.expose(), &tls)?);
    }
    if args.masters.is_empty() {
        for entry in config.iter().flat_map(|config| config.masters.iter()) {
            let token = flag_token
                .clone()
                .or_else(|| entry.password.as_deref().map(Secret::new))
                .ok_or_else(|| {
                    Usage(format!(
                        "no client credential for master {}: give its password, --token-file or KILN_TOKEN",
                        entry.url
                    ))
                })?;
            masters.push(MasterConn::with_tls(&entry.url, token.expose(), &tls)?);
        }
    }
    if servers.is_empty() && masters.is_empty() {
        if let Ok(url) = std::env::var("KILN_SERVER") {
            let token = flag_token.clone().ok_or_else(|| {
                Usage(format!(
                    "no client credential for {url} (KILN_SERVER): pass --token-file FILE or set KILN_TOKEN"
                ))
            })?;
            servers.push(ServerConn::with_tls(&url, token.expose(), &tls)?);
        }
    }
    if servers.is_empty() && masters.is_empty() {
        return Err(Usage(
            "no server to serve: pass --server URL or --master URL, set KILN_SERVER, or give a --config naming one"
                .into(),
        )
        .into());
    }
    let client_id = args
        .id
        .or_else(|| config.as_ref().map(|config| config.id.clone()))
        .ok_or_else(|| Usage("the client needs an id: pass --id or a --config with one".into()))?;
    kiln_proto::names::check_name("client id", &client_id).map_err(Usage)?;
    let include: Vec<String> = match args.include {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        None => config
            .as_ref()
            .map(|config| config.include.clone())
            .unwrap_or_default(),
    };
    if include.is_empty() {
        return Err(
            Usage("the client takes no config type: pass --include TYPES (or '*')".into()).into(),
        );
    }
    let work_dir = args
        .work
        .or_else(|| {
            config
                .as_ref()
                .and_then(|config| config.work_dir.clone())
                .map(Into::into)
        })
        .ok_or_else(|| Usage("the client needs a work directory: pass --work DIR".into()))?;
    // Each server knows this client by its id and its own secret, enrolled with the
    // join token at the first claim and kept here.
    let keep_dir = work_dir.join("credentials");
    let servers = servers
        .into_iter()
        .map(|conn| conn.for_client(&client_id, Some(&keep_dir)))
        .collect();
    let masters = masters
        .into_iter()
        .map(|conn| conn.for_client(&client_id, Some(&keep_dir)))
        .collect();
    let slots = args
        .slots
        .or_else(|| config.as_ref().and_then(|config| config.slots))
        .unwrap_or(1);
    let wait_secs = args
        .wait_secs
        .or_else(|| config.as_ref().map(|config| config.wait_secs))
        .unwrap_or(60);
    // The server holds a long poll open for at most 120 s; a longer WAITTIME would only
    // make the client look idle for longer, not wait longer.
    if wait_secs > 120 {
        tracing::warn!(
            wait_secs,
            "WAITTIME is above 120 s, the longest a long poll lasts; using 120 s"
        );
    }
    let wait_secs = wait_secs.clamp(1, 120);
    let cache_dir = args
        .cache
        .or_else(|| {
            config
                .as_ref()
                .and_then(|config| config.cache_dir.clone())
                .map(Into::into)
        })
        .unwrap_or_else(|| work_dir.join("cache"));
    let cache_max_bytes = args
        .cache_max_bytes
        .or_else(|| config.as_ref().and_then(|config| config.cache_max_bytes))
        .unwrap_or(kiln_client::cache::DEFAULT_CACHE_MAX_BYTES);
    Ok(ClientOptions {
        client_id,
        include,
        servers,
        masters,
        refresh: Duration::from_secs(args.refresh_secs.max(1)),
        work_dir,
        slots,
        wait_secs,
        kill_grace: Duration::from_secs(args.kill_grace_secs),
        cache_dir,
        cache_max_bytes,
    })
}
