//! What the farm is now, in figures: jobs by state, the queue per config type (how
//! deep, how old, how many live clients take it), storage, the data directory's disk,
//! and the clients connected and waiting. Metrics read them at each scrape.

use super::{Farm, FarmResult};
use kiln_proto::state::JobState;
use kiln_proto::transfer::StorageStats;
use std::collections::BTreeMap;
use std::path::Path;

/// A client heard from within this long counts as live for its config types.
const LIVE_CLIENT_MICROS: i64 = 5 * 60 * 1_000_000;

/// The queue of one config type.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QueueFigures {
    /// Jobs queued.
    pub queued: u64,
    /// Jobs running.
    pub running: u64,
    /// How long the job queued longest has waited, in seconds (0 with none queued).
    pub oldest_age_secs: f64,
    /// Clients heard from in the last five minutes that take this type.
    pub live_clients: u64,
}

/// The farm now.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Jobs by state, every state listed.
    pub jobs: Vec<(JobState, u64)>,
    /// Per config type that has jobs queued or running.
    pub queues: BTreeMap<String, QueueFigures>,
    pub storage: StorageStats,
    /// The data directory's file system: bytes free (to unprivileged users) and in all.
    pub disk_free_bytes: Option<u64>,
    pub disk_size_bytes: Option<u64>,
    pub clients_connected: usize,
    pub clients_waiting: usize,
    /// Store calls answered by a batch of several (PostgreSQL), if the store batches.
    pub calls_batched: Option<u64>,
}

/// Jobs by state and the queue per config type.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueState {
    /// Jobs by state, every state listed.
    pub jobs: Vec<(JobState, u64)>,
    /// Per config type that has jobs queued or running.
    pub queues: BTreeMap<String, QueueFigures>,
}

impl Farm {
    /// The farm's figures now.
    pub async fn figures(&self) -> FarmResult<Figures> {
        let QueueState { jobs, queues } = self.queue_state().await?;
        let storage = self.storage_stats().await?;
        let (disk_free_bytes, disk_size_bytes) = match disk_space(&self.config.data_dir) {
            Some((free, size)) => (Some(free), Some(size)),
            None => (None, None),
        };
        let (clients_connected, clients_waiting) = self.client_counts();
        Ok(Figures {
            jobs,
            queues,
            storage,
            disk_free_bytes,
            disk_size_bytes,
            clients_connected,
            clients_waiting,
            calls_batched: self.store.calls_batched(),
        })
    }

    /// Jobs by state and the queue per config type, now.
    pub async fn queue_state(&self) -> FarmResult<QueueState> {
        let counts = self.store.job_counts().await?;
        let now = kiln_common::now_micros();
        let mut jobs: Vec<(JobState, u64)> =
            JobState::ALL.iter().map(|state| (*state, 0)).collect();
        let mut queues: BTreeMap<String, QueueFigures> = BTreeMap::new();
        for count in &counts {
            if let Some(entry) = jobs.iter_mut().find(|(state, _)| *state == count.state) {
                entry.1 += count.jobs;
            }
            let queue = match count.state {
                JobState::Queued | JobState::Running => {
                    queues.entry(count.config_type.clone()).or_default()
                }
                _ => continue,
            };
            if count.state == JobState::Queued {
                queue.queued += count.jobs;
                if let Some(since) = count.oldest_since {
                    queue.oldest_age_secs = (now - since).max(0) as f64 / 1e6;
                }
            } else {
                queue.running += count.jobs;
            }
        }
        let contacts = self.contacts.snapshot();
        for (config_type, queue) in queues.iter_mut() {
            queue.live_clients = contacts
                .values()
                .filter(|contact| now - contact.at < LIVE_CLIENT_MICROS)
                .filter(|contact| {
                    contact.announced.as_ref().is_some_and(|announced| {
                        announced
                            .include
                            .iter()
                            .any(|include| include == "*" || include == config_type)
                    })
                })
                .count() as u64;
        }
        Ok(QueueState { jobs, queues })
    }
}

/// Bytes free (to unprivileged users) and in all on the file system holding `path`.
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value, and the call only
    // writes into it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    let unit = stat.f_frsize as u64;
    Some((stat.f_bavail as u64 * unit, stat.f_blocks as u64 * unit))
}
