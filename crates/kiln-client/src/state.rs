//! [`LocalState`]: the client's small state file, `WORK/state.jsonl`: which jobs it
//! holds, under which lease, and the process group running each, kept crash-safely so
//! that a restarted client knows what it held.
//!
//! Every change appends the whole state as one line of JSON and syncs it; the last
//! complete line is the state. A line cut short by a crash does not parse and is
//! passed over. Appending to the one file creates no file: writing a new file and
//! renaming it over the old, four times a job, was a third of the files a job made,
//! and creating files is what a busy file system spends its time on. When the file
//! passes [`COMPACT_AT`] bytes (and when a client starts) it is replaced, crash-safely,
//! by one line. A `WORK/state.json` of an older client (one JSON document) is read
//! once and replaced.

use kiln_proto::api::Claim;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The state file's name in the work directory.
pub const STATE_FILE: &str = "state.jsonl";

/// The state file of clients before it was appended to: one JSON document.
const OLD_STATE_FILE: &str = "state.json";

/// The size past which the state file is rewritten as one line.
const COMPACT_AT: u64 = 64 * 1024;

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
    inner: Mutex<Inner>,
}

struct Inner {
    state: StateFile,
    /// The state file, open for appending.
    log: File,
    /// Its length.
    len: u64,
}

/// The state in the text of a state file: its last line that parses, or `None`.
pub fn parse_state_lines(text: &str) -> Option<serde_json::Value> {
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(serde_json::Value::is_object)
}

impl LocalState {
    /// Reads `WORK/state.jsonl` (or an older client's `WORK/state.json`), or starts
    /// empty, and leaves the file as one line.
    pub fn open(work_dir: &Path) -> std::io::Result<Self> {
        let path = work_dir.join(STATE_FILE);
        let old = work_dir.join(OLD_STATE_FILE);
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => last_state(&text).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "no complete state in the state file; starting afresh");
                StateFile::default()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::read(&old) {
                    Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                        tracing::warn!(cause = %err, path = %old.display(), "unreadable state file; starting afresh");
                        StateFile::default()
                    }),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
                    Err(err) => return Err(err),
                }
            }
            Err(err) => return Err(err),
        };
        let (log, len) = rewrite(&path, &state)?;
        // The new file holds what the old one did, durably: the old one can go.
        match std::fs::remove_file(&old) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(LocalState {
            path,
            inner: Mutex::new(Inner { state, log, len }),
        })
    }

    /// The jobs the file says are held (by this run or one that died).
    pub fn held(&self) -> Vec<HeldJob> {
        self.inner
            .lock()
            .expect("state poisoned")
            .state
            .jobs
            .clone()
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
        let mut inner = self.inner.lock().expect("state poisoned");
        change(&mut inner.state);
        if let Err(err) = inner.save(&self.path) {
            tracing::error!(cause = %err, path = %self.path.display(), "cannot write the state file");
        }
    }
}

impl Inner {
    /// Appends the state as a line and syncs it, or rewrites the file as that one
    /// line once it has grown past [`COMPACT_AT`].
    fn save(&mut self, path: &Path) -> std::io::Result<()> {
        // Another process (`kiln client reset`) may have replaced the file: appending
        // to the one this handle holds would then write where nobody reads.
        if self.len >= COMPACT_AT || !still_at(&self.log, path) {
            (self.log, self.len) = rewrite(path, &self.state)?;
            return Ok(());
        }
        let line = line_of(&self.state)?;
        let appended = self
            .log
            .write_all(&line)
            .and_then(|()| self.log.sync_data());
        if appended.is_err() {
            // A part of the line may be in the file, and the next line would follow it
            // on the same line: the next change rewrites the file instead.
            self.len = COMPACT_AT;
        }
        appended?;
        self.len += line.len() as u64;
        Ok(())
    }
}

/// Whether `file` is the file at `path`.
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

fn line_of(state: &StateFile) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// The state of the last line of `text` that parses as one.
fn last_state(text: &str) -> Option<StateFile> {
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
}

/// Replaces the state file crash-safely with `state` as its one line; returns it open
/// for appending, and its length.
fn rewrite(path: &Path, state: &StateFile) -> std::io::Result<(File, u64)> {
    let line = line_of(state)?;
    kiln_common::fs::write_atomic(path, &line)?;
    let log = std::fs::OpenOptions::new().append(true).open(path)?;
    Ok((log, line.len() as u64))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(job: &str) -> Claim {
        serde_json::from_value(serde_json::json!({
            "build": "b1",
            "job_id": job,
            "lease": format!("lease-{job}"),
            "attempt": 1,
            "title": "",
            "config_type": "PRO",
            "install_script": "install.sh",
            "image_script": "image.sh",
            "timeout_secs": 60,
            "lease_secs": 30,
            "heartbeat_secs": 10,
        }))
        .unwrap()
    }

    /// Whether the state file is all there is in `dir` (no temporary or old file).
    fn only_the_state_file_in(dir: &Path) -> bool {
        dir.join(STATE_FILE).is_file() && std::fs::read_dir(dir).unwrap().count() == 1
    }

    fn jobs(state: &LocalState) -> Vec<String> {
        state.held().into_iter().map(|held| held.job).collect()
    }

    #[test]
    fn changes_are_appended_to_one_file_and_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let file = dir.path().join(STATE_FILE);
        let ino =
            |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let first = ino(&file);
        state.hold("http://a", &claim("j1"));
        state.hold("http://a", &claim("j2"));
        state.record_pgid(&claim("j2"), 4242);
        state.forget(&claim("j1"));
        assert_eq!(ino(&file), first, "appending, not replacing");
        assert!(only_the_state_file_in(dir.path()));
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 5);
        drop(state);

        let state = LocalState::open(dir.path()).unwrap();
        assert_eq!(jobs(&state), ["j2"]);
        assert_eq!(state.held()[0].pgid, Some(4242));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().lines().count(),
            1,
            "a start leaves one line"
        );
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        state.hold("http://a", &claim("j1"));
        drop(state);
        let file = dir.path().join(STATE_FILE);
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"jobs\":[{\"server\":\"http://a\",\"bu");
        std::fs::write(&file, text).unwrap();

        let state = LocalState::open(dir.path()).unwrap();
        assert_eq!(jobs(&state), ["j1"]);
        state.hold("http://a", &claim("j3"));
        drop(state);
        assert_eq!(jobs(&LocalState::open(dir.path()).unwrap()), ["j1", "j3"]);
    }

    #[test]
    fn an_older_clients_state_json_is_read_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let old = serde_json::json!({"jobs": [{
            "server": "http://a", "build": "b1", "job": "j7", "lease": "l7",
            "attempt": 2, "pgid": 99,
        }]});
        std::fs::write(
            dir.path().join(OLD_STATE_FILE),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        assert_eq!(jobs(&state), ["j7"]);
        assert_eq!(state.held()[0].attempt, 2);
        assert!(only_the_state_file_in(dir.path()));
        drop(state);
        assert_eq!(jobs(&LocalState::open(dir.path()).unwrap()), ["j7"]);
    }

    #[test]
    fn the_file_is_rewritten_as_one_line_once_it_grows_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let file = dir.path().join(STATE_FILE);
        let mut largest = 0;
        for n in 0..2_000 {
            state.hold("http://a", &claim(&format!("j{n}")));
            largest = largest.max(std::fs::metadata(&file).unwrap().len());
            state.forget(&claim(&format!("j{n}")));
            largest = largest.max(std::fs::metadata(&file).unwrap().len());
        }
        state.hold("http://a", &claim("last"));
        assert!(
            largest >= COMPACT_AT,
            "the run reached the limit ({largest} bytes)"
        );
        assert!(
            largest < COMPACT_AT + 1024,
            "and was cut back to a line ({largest} bytes)"
        );
        drop(state);
        assert_eq!(jobs(&LocalState::open(dir.path()).unwrap()), ["last"]);
    }

    #[test]
    fn a_change_that_could_not_be_appended_is_written_whole_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        state.hold("http://a", &claim("j1"));
        // A handle that cannot write: the append fails, as on a full disk.
        let path = dir.path().join(STATE_FILE);
        state.inner.lock().unwrap().log = File::open(&path).unwrap();
        state.hold("http://a", &claim("j2"));
        // Read without opening: opening would replace the file, and that alone makes
        // the next change rewrite it.
        let on_disk = |path: &Path| -> Vec<String> {
            let text = std::fs::read_to_string(path).unwrap();
            last_state(&text)
                .unwrap()
                .jobs
                .into_iter()
                .map(|held| held.job)
                .collect()
        };
        assert_eq!(on_disk(&path), ["j1"]);
        state.hold("http://a", &claim("j3"));
        assert_eq!(on_disk(&path), ["j1", "j2", "j3"]);
        assert_eq!(
            jobs(&LocalState::open(dir.path()).unwrap()),
            ["j1", "j2", "j3"]
        );
    }

    #[test]
    fn a_file_replaced_by_another_process_is_written_afresh_not_appended_to_its_old_copy() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        state.hold("http://a", &claim("j1"));
        // `kiln client reset` run beside a live client: it rewrites the file.
        LocalState::open(dir.path()).unwrap().clear();
        state.hold("http://a", &claim("j2"));
        assert_eq!(
            jobs(&LocalState::open(dir.path()).unwrap()),
            ["j1", "j2"],
            "the live client's state is on the path again"
        );
    }
}
