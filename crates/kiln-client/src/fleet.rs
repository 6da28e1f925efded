//! Learning servers from masters: [`MasterConn`] reads a master's list, and
//! [`ServerList`] keeps what the client serves now — its fixed servers (flags, the
//! seed's REDIRECTs) and the live servers the first answering master lists.
//!
//! The list is kept current by a long poll: the client sends back the membership
//! version of its last answer and the master answers when a server joins, returns or
//! drops off. A master that does not answer is replaced by the next; when none
//! answers the list stays as it was and the masters are asked again every `refresh`.

use crate::conn::{CallError, ServerConn};
use kiln_proto::api::ServerEntry;
use std::time::Duration;
use tokio::sync::watch;

/// The header a master's list answer carries its membership version in.
const LIST_VERSION_HEADER: &str = "x-kiln-list-version";
/// How long one long poll of a master's list waits for a change.
const LIST_WAIT_SECS: u64 = 30;

/// One master as the client talks to it. Servers learned from it are called with the
/// same client credential.
#[derive(Clone)]
pub struct MasterConn {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The client id servers learned from this master are called as, and where
    /// enrolled secrets are kept.
    client: Option<(String, Option<std::path::PathBuf>)>,
    /// What the master's certificate and its servers' are checked against.
    tls: kiln_tls::ClientTls,
}

impl std::fmt::Debug for MasterConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("MasterConn")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl MasterConn {
    /// A connection to the master at `url` with the client credential `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, String> {
        Self::with_tls(url, token, &kiln_tls::ClientTls::default())
    }

    /// As [`MasterConn::new`], trusting the certificates of the master and of the
    /// servers it lists as `tls` says.
    pub fn with_tls(url: &str, token: &str, tls: &kiln_tls::ClientTls) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| format!("master URL {url:?} is not a URL: {err}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "master URL {url:?} is not an http:// or https:// URL"
            ));
        }
        let http = tls
            .client_builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|err| format!("cannot set up HTTP: {err}"))?;
        Ok(MasterConn {
            base: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
            client: None,
            tls: tls.clone(),
        })
    }

    /// Servers learned from this master are called as client `client_id` (see
    /// [`ServerConn::for_client`]).
    pub fn for_client(mut self, client_id: &str, keep_dir: Option<&std::path::Path>) -> Self {
        self.client = Some((client_id.to_owned(), keep_dir.map(ToOwned::to_owned)));
        self
    }

    /// The master's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The live servers the master lists, and the list's membership version. With
    /// `seen`, the master answers once its version differs from it, or after
    /// `wait_secs`.
    pub async fn servers(
        &self,
        seen: Option<u64>,
        wait_secs: u64,
    ) -> Result<(Vec<ServerEntry>, Option<u64>), CallError> {
        let mut request = self
            .http
            .get(format!("{}/v1/servers", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(wait_secs + 15));
        if let Some(seen) = seen {
            request = request.query(&[("version", seen), ("wait_secs", wait_secs)]);
        }
        let response = request.send().await.map_err(CallError::Transport)?;
        let status = response.status();
        if !status.is_success() {
            let message = response.text().await.unwrap_or_default();
            return Err(if status.is_server_error() {
                CallError::ServerFailed { status, message }
            } else {
                CallError::Refused { status, message }
            });
        }
        let version = response
            .headers()
            .get(LIST_VERSION_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        let entries = response.json().await.map_err(CallError::Transport)?;
        Ok((entries, version))
    }

    /// A connection to a server this master listed, with the same credential.
    fn server(&self, url: &str) -> Result<ServerConn, String> {
        let conn = ServerConn::with_tls(url, &self.token, &self.tls)?;
        Ok(match &self.client {
            Some((id, keep_dir)) => conn.for_client(id, keep_dir.as_deref()),
            None => conn,
        })
    }
}

/// The servers the client serves now, kept current from its masters.
pub struct ServerList {
    fixed: Vec<ServerConn>,
    masters: Vec<MasterConn>,
    /// The master that answered last: asked first next time.
    preferred: std::sync::atomic::AtomicUsize,
    current: watch::Sender<Vec<ServerConn>>,
}

impl ServerList {
    /// A list of `fixed` servers plus those `masters` list.
    pub fn new(fixed: Vec<ServerConn>, masters: Vec<MasterConn>) -> Self {
        let (current, _) = watch::channel(fixed.clone());
        ServerList {
            fixed,
            masters,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            current,
        }
    }

    /// Whether servers are learned from masters (else the list never changes).
    pub fn has_masters(&self) -> bool {
        !self.masters.is_empty()
    }

    /// The servers served now.
    pub fn now(&self) -> Vec<ServerConn> {
        self.current.borrow().clone()
    }

    /// Follows the list as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ServerConn>> {
        self.current.subscribe()
    }

    /// A connection to `url` with the credential the client would use for it: a fixed
    /// server's own, else the masters' (for a server learned from a master).
    pub fn conn_for(&self, url: &str) -> Option<ServerConn> {
        let url = url.trim_end_matches('/');
        if let Some(conn) = self.now().into_iter().find(|conn| conn.url() == url) {
            return Some(conn);
        }
        if let Some(conn) = self.fixed.iter().find(|conn| conn.url() == url) {
            return Some(conn.clone());
        }
        self.masters
            .first()
            .and_then(|master| master.server(url).ok())
    }

    /// Asks the masters, the one that answered last first, then the others in order;
    /// the first that answers sets the list. Returns whether one answered.
    pub async fn refresh(&self) -> bool {
        self.read_masters().await.is_some()
    }

    /// As [`ServerList::refresh`]; returns which master answered and the version of
    /// its list.
    async fn read_masters(&self) -> Option<(usize, Option<u64>)> {
        use std::sync::atomic::Ordering;
        if self.masters.is_empty() {
            return None;
        }
        let first = self.preferred.load(Ordering::Relaxed) % self.masters.len();
        let order = (0..self.masters.len()).map(|i| (first + i) % self.masters.len());
        for idx in order {
            let master = &self.masters[idx];
            match master.servers(None, 0).await {
                Ok((entries, version)) => {
                    if idx != first {
                        tracing::info!(master = %master.url(), "server list now read from this master");
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    self.set_learned(master, &entries);
                    return Some((idx, version));
                }
                Err(err) => {
                    tracing::warn!(cause = %kiln_proto::error_chain(&err), master = %master.url(), "cannot read the server list from a master")
                }
            }
        }
        None
    }

    fn set_learned(&self, master: &MasterConn, entries: &[ServerEntry]) {
        let mut next = self.fixed.clone();
        for entry in entries {
            if entry.live == Some(false) {
                continue;
            }
            let url = entry.url.trim_end_matches('/');
            if next.iter().any(|conn| conn.url() == url) {
                continue;
            }
            match master.server(url) {
                Ok(conn) => next.push(conn),
                Err(err) => {
                    tracing::warn!(master = %master.url(), %err, "master lists a server with a bad URL; skipped")
                }
            }
        }
        self.current.send_if_modified(|current| {
            let urls =
                |list: &[ServerConn]| list.iter().map(|c| c.url().to_owned()).collect::<Vec<_>>();
            let (before, after) = (urls(current), urls(&next));
            if before == after {
                return false;
            }
            for url in after.iter().filter(|url| !before.contains(url)) {
                tracing::info!(server = %url, "serving a new server");
            }
            for url in before.iter().filter(|url| !after.contains(url)) {
                tracing::info!(server = %url, "server dropped off the list; no longer served");
            }
            *current = next;
            true
        });
    }

    /// Keeps the list current for as long as the task runs: long-polls the master
    /// that answered last for changes; when it fails, reads the list from the first
    /// master that answers; when none answers (or a master gives no version), asks
    /// again after `every`. A failed read keeps the list as it was.
    pub async fn keep_fresh(&self, every: Duration) {
        if self.masters.is_empty() {
            return;
        }
        let mut watching: Option<(usize, u64)> = None;
        loop {
            if let Some((idx, seen)) = watching {
                let master = &self.masters[idx];
                match master.servers(Some(seen), LIST_WAIT_SECS).await {
                    Ok((entries, version)) => {
                        self.set_learned(master, &entries);
                        watching = version.map(|version| (idx, version));
                        if watching.is_none() {
                            tokio::time::sleep(every).await;
                        }
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(cause = %kiln_proto::error_chain(&err), master = %master.url(), "lost the master's server list; asking the masters again");
                    }
                }
            }
            watching = match self.read_masters().await {
                Some((idx, Some(version))) => Some((idx, version)),
                _ => {
                    tokio::time::sleep(every).await;
                    None
                }
            };
        }
    }
}
