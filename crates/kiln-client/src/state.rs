//! [`LocalState`]: the client's small state file, `WORK/state.json`: which jobs it
//! holds, under which lease, and the process group running each. It is rewritten
//! crash-safely on every change, so that a restarted client knows what it held.

use kiln_proto::api::Claim;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One job the client holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    pub server: String,
    pub build: String,
    pub job: String,
    pub lease: String,
    pub attempt: u32,
    /// The process group of the step running now, if any.
    pub pgid: Option<u32>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    jobs: Vec<HeldJob>,
}

/// The client's state file and its contents.
pub struct LocalState {
    path: PathBuf,
    file: Mutex<StateFile>,
}

impl LocalState {
    /// Reads `WORK/state.json`, or starts empty.
    pub fn open(work_dir: &Path) -> std::io::Result<Self> {
        let path = work_dir.join("state.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::warn!(cause = %err, path = %path.display(), "unreadable state file; starting afresh");
                StateFile::default()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(err) => return Err(err),
        };
        Ok(LocalState {
            path,
            file: Mutex::new(file),
        })
    }

    /// The jobs the file says are held (by this run or one that died).
    pub fn held(&self) -> Vec<HeldJob> {
        self.file.lock().expect("state poisoned").jobs.clone()
    }

    /// Records a newly claimed job.
    pub fn hold(&self, server: &str, claim: &Claim) {
        self.update(|file| {
            file.jobs.push(HeldJob {
                server: server.to_owned(),
                build: claim.build.clone(),
                job: claim.job_id.clone(),
                lease: claim.lease.clone(),
                attempt: claim.attempt,
                pgid: None,
            })
        });
    }

    /// Records the process group of the job's running step.
    pub fn record_pgid(&self, claim: &Claim, pgid: u32) {
        self.update(|file| {
            for held in file
                .jobs
                .iter_mut()
                .filter(|held| held.lease == claim.lease)
            {
                held.pgid = Some(pgid);
            }
        });
    }

    /// Forgets a job that ended.
    pub fn forget(&self, claim: &Claim) {
        self.update(|file| file.jobs.retain(|held| held.lease != claim.lease));
    }

    /// Forgets every job.
    pub fn clear(&self) {
        self.update(|file| file.jobs.clear());
    }

    fn update(&self, change: impl FnOnce(&mut StateFile)) {
        let mut file = self.file.lock().expect("state poisoned");
        change(&mut file);
        if let Err(err) = write_atomically(&self.path, &file) {
            tracing::error!(cause = %err, path = %self.path.display(), "cannot write the state file");
        }
    }
}

/// Whether some process of group `pgid` runs step of job `build`/`job` (its
/// environment names them), so that a recorded group id that the system has since
/// reused for something else is never killed.
pub fn group_runs_job(pgid: u32, build: &str, job: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    let want_build = format!("KILN_BUILD={build}");
    let want_job = format!("KILN_JOB_ID={job}");
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_group_of(*pid) == Some(pgid))
        .any(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                let vars: Vec<&[u8]> = environ.split(|byte| *byte == 0).collect();
                vars.contains(&want_build.as_bytes()) && vars.contains(&want_job.as_bytes())
            })
        })
}

/// The process group of `pid`, from `/proc/PID/stat`.
fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // after its closing parenthesis. Then: state, ppid, pgrp.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn write_atomically(path: &Path, file: &StateFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    kiln_common::fs::write_atomic(path, &bytes)
}
