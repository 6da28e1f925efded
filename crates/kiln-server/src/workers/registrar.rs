//! Registration with masters: every `heartbeat_secs` the server posts its advertised
//! URL and its counts (builds, queued and running jobs) to each master, so that the
//! masters list it while it lives.

use super::{Worker, WorkerError};
use crate::domain::Farm;
use async_trait::async_trait;
use kiln_api::{CallError, Endpoint, MasterConn, Registration, Secret};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An unreachable master is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the server knows about one master.
struct MasterLink {
    url: String,
    conn: MasterConn,
    /// Whether the last post succeeded (starts true so the first failure warns).
    reachable: bool,
    last_warning: Option<Instant>,
}

/// Posts to every master, once at start and then every `heartbeat_secs`.
pub struct Registrar {
    farm: Arc<Farm>,
    advertise: String,
    links: Vec<MasterLink>,
    every: Duration,
    first: bool,
}

impl Registrar {
    /// The registrar of a server with masters; `None` without masters (or when it
    /// cannot be set up: said in the log).
    pub fn new(farm: Arc<Farm>) -> Option<Self> {
        let config = farm.config();
        let advertise = config.advertise.clone()?;
        if config.masters.is_empty() {
            return None;
        }
        let token = match &config.master_token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(token) => Some(Secret::trimmed(&token)),
                Err(err) => {
                    tracing::error!(path = %path.display(), cause = %err, "cannot read the master token file: not registering with masters");
                    return None;
                }
            },
            None => None,
        };
        let timeout = Duration::from_secs(config.heartbeat_secs.clamp(1, 10));
        let mut links = Vec::new();
        for url in &config.masters {
            let conn = Endpoint::new("master", url, &config.master_tls)
                .and_then(|endpoint| MasterConn::for_server(endpoint, token.clone(), timeout));
            match conn {
                Ok(conn) => links.push(MasterLink {
                    url: url.trim_end_matches('/').to_owned(),
                    conn,
                    reachable: true,
                    last_warning: None,
                }),
                Err(err) => {
                    tracing::error!(cause = %kiln_proto::error_chain(&err), "cannot build the HTTP client for masters");
                    return None;
                }
            }
        }
        let every = Duration::from_secs(config.heartbeat_secs.max(1));
        Some(Registrar {
            farm,
            advertise,
            links,
            every,
            first: true,
        })
    }
}

#[async_trait]
impl Worker for Registrar {
    fn name(&self) -> &'static str {
        "registrar"
    }

    async fn wait_for_work(&mut self) {
        if !std::mem::take(&mut self.first) {
            tokio::time::sleep(self.every).await;
        }
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        let counts = match self.farm.load_counts().await {
            Ok(counts) => counts,
            Err(err) => {
                tracing::warn!(cause = %err, "cannot count jobs for the masters");
                kiln_store::LoadCounts::default()
            }
        };
        let registration = Registration {
            url: self.advertise.clone(),
            builds: counts.builds,
            queued: counts.queued,
            running: counts.running,
        };
        let posts = self.links.iter().map(|link| {
            let registration = &registration;
            async move { link.conn.register(registration).await.map_err(cause) }
        });
        let results = futures::future::join_all(posts).await;
        let mut n_unreachable = 0;
        for (link, result) in self.links.iter_mut().zip(results) {
            match result {
                Ok(()) => {
                    if !link.reachable {
                        tracing::info!(master = %link.url, "registered with the master again");
                    }
                    link.reachable = true;
                }
                Err(cause) => {
                    n_unreachable += 1;
                    let quiet = link
                        .last_warning
                        .is_some_and(|at| at.elapsed() < WARN_EVERY);
                    if link.reachable || !quiet {
                        tracing::warn!(master = %link.url, %cause, "cannot register with the master");
                        link.last_warning = Some(Instant::now());
                    }
                    link.reachable = false;
                }
            }
        }
        // An unreachable master is warned about above, at most once a minute; the
        // round itself succeeded, so the runner does not back off the next one.
        tracing::trace!(n_unreachable, "registered with masters");
        Ok(())
    }
}

/// What a failed registration says in the log: the connection's error chain (and a
/// certificate's problem), or the master's status and answer.
fn cause(err: CallError) -> String {
    match err {
        CallError::Unreachable { source, .. } => format!(
            "{}{}",
            kiln_proto::error_chain(&source),
            kiln_tls::certificate_hint(&source)
        ),
        CallError::Refused { status, message } | CallError::ServerFailed { status, message } => {
            format!("HTTP {status}: {}", message.trim())
        }
        other => kiln_proto::error_chain(&other),
    }
}
