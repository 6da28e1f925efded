//! Learning servers from masters: [`MasterConn`] (kiln-api) reads a master's list, and
//! [`ServerList`] keeps what the client serves now — its fixed servers (flags, the
//! seed's REDIRECTs) and the live servers the first answering master lists.
//!
//! The list is kept current by a long poll: the client sends back the membership
//! version of its last answer and the master answers when a server joins, returns or
//! drops off. A master that does not answer is replaced by the next; when none
//! answers the list stays as it was and the masters are asked again every `refresh`.

use kiln_api::{MasterConn, ServerConn};
use kiln_proto::api::ServerEntry;
use std::time::Duration;
use tokio::sync::watch;

/// How long one long poll of a master's list waits for a change.
const LIST_WAIT_SECS: u64 = 30;

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
            .and_then(|master| master.server_conn(url).ok())
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
            match master.server_conn(url) {
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
