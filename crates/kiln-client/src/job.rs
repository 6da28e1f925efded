//! Running one claimed job: workspace, steps, log shipping, heartbeats, images, report.
//!
//! [`run_job`] follows DESIGN.md "Running a job on the client": a fresh workspace with
//! the build's files, install → configure → image → verify as process groups under one
//! timeout, every output line to the server's log, `##kiln[progress ...]` lines to the
//! job's status, every regular file left in `KILN_OUTPUT` uploaded as an image, then
//! finished or failed with a reason. A 409 from any call means the lease is gone: the job's
//! processes are killed and its output discarded.

use crate::cache::JobCache;
use crate::files::KeptFiles;
use crate::runner::{run_step, OutputLine, StepOutcome, StepSpec, Stream};
use crate::state::LocalState;
use crate::upload::ImageUploader;
use kiln_api::{CallError, ServerConn};
use kiln_proto::api::{Claim, Fail, LogBatch, NewLogLine};
use kiln_proto::progress::{parse_progress_line, Progress};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How many of the last output lines a failure report quotes.
const TAIL_LINES: usize = 20;
/// How long lines gather before they are sent.
const LOG_FLUSH: Duration = Duration::from_millis(250);
/// The most lines one log call carries.
const LOG_BATCH: usize = 1000;
/// The most lines held while the server cannot be reached.
const LOG_BUFFER: usize = 100_000;

/// Everything one job run needs.
pub struct JobRun {
    pub conn: ServerConn,
    pub claim: Claim,
    pub client_id: String,
    /// The job's own directory under the client's work directory.
    pub job_dir: PathBuf,
    pub kill_grace: Duration,
    pub uploader: Arc<dyn ImageUploader>,
    pub local_state: Arc<LocalState>,
    /// Becomes true when the client gives up its jobs (second SIGTERM).
    pub abandon: watch::Receiver<bool>,
    /// The client's job cache, `KILN_CACHE` to the steps.
    pub cache: JobCache,
    /// The build files archives the client keeps.
    pub kept_files: KeptFiles,
}

/// How a job run ended, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Reported finished; the server accepted it.
    Finished,
    /// Reported failed with this reason.
    Failed(String),
    /// The lease was lost (409): processes killed, output discarded.
    LeaseLost,
    /// Given back to the server unfinished (the client is stopping).
    Abandoned,
}

/// What the job's steps printed lately, and their latest progress.
#[derive(Default)]
struct Shared {
    progress: Option<Progress>,
    progress_dirty: bool,
    tail: VecDeque<String>,
}

fn merge_progress(into: &mut Option<Progress>, update: Progress) {
    let current = into.get_or_insert_with(Progress::default);
    if update.major.is_some() {
        // A new major phase starts its minor state afresh.
        current.minor = None;
        current.major = update.major;
    }
    if update.minor.is_some() {
        current.minor = update.minor;
    }
    if update.percent.is_some() {
        current.percent = update.percent;
    }
}

/// Runs the job to its end and reports it.
pub async fn run_job(run: JobRun) -> JobEnd {
    let JobRun {
        conn,
        claim,
        client_id,
        job_dir,
        kill_grace,
        uploader,
        local_state,
        mut abandon,
        cache,
        kept_files,
    } = run;
    // No eviction while this job's steps may use the cache.
    let cache_in_use = cache.in_use().await;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let cancel_tx = Arc::new(cancel_tx);
    let (log_tx, log_rx) = mpsc::channel::<NewLogLine>(4096);

    let heartbeat = tokio::spawn(heartbeat_loop(
        conn.clone(),
        claim.clone(),
        shared.clone(),
        cancel_tx.clone(),
    ));
    let shipper = tokio::spawn(ship_logs(
        conn.clone(),
        claim.clone(),
        shared.clone(),
        log_rx,
        cancel_tx.clone(),
    ));
    // The client stopping for good cancels the job like a lost lease does, but gives
    // the job back instead of leaving it to lapse.
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let abandon_watch = {
        let cancel_tx = cancel_tx.clone();
        let abandoned = abandoned.clone();
        tokio::spawn(async move {
            loop {
                if *abandon.borrow_and_update() {
                    abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = cancel_tx.send(true);
                    return;
                }
                if abandon.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    let outcome = execute(
        &conn,
        &claim,
        &client_id,
        &job_dir,
        kill_grace,
        &shared,
        &log_tx,
        cancel_rx.clone(),
        &local_state,
        cache.dir(),
        &kept_files,
    )
    .await;
    drop(cache_in_use);
    drop(log_tx);
    // Send every line before the report, so that the log is whole when the job ends.
    let _ = tokio::time::timeout(Duration::from_secs(60), shipper).await;
    // Heartbeats go on through the upload: a long one must not lose the lease.
    abandon_watch.abort();
    let abandoned = abandoned.load(std::sync::atomic::Ordering::SeqCst);

    let end = match outcome {
        Outcome::Cancelled if abandoned => {
            let reason = "the client stopped and gave the job back";
            if let Err(err) = conn
                .give_up(&claim.build, &claim.job_id, &claim.lease, reason)
                .await
            {
                tracing::warn!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "cannot give the job back; its lease will lapse");
            }
            JobEnd::Abandoned
        }
        Outcome::Cancelled => JobEnd::LeaseLost,
        Outcome::Failed {
            reason,
            message,
            exit_status,
        } => report_failure(&conn, &claim, &reason, message, exit_status, &shared).await,
        Outcome::Succeeded => {
            upload_and_finish(
                &conn,
                &claim,
                &job_dir.join("out"),
                uploader.as_ref(),
                &shared,
            )
            .await
        }
    };
    heartbeat.abort();
    local_state.forget(&claim);
    if let Err(err) = tokio::fs::remove_dir_all(&job_dir).await {
        tracing::warn!(cause = %kiln_proto::error_chain(&err), dir = %job_dir.display(), "cannot remove job directory");
    }
    end
}

enum Outcome {
    Succeeded,
    Failed {
        reason: String,
        message: String,
        exit_status: Option<i32>,
    },
    Cancelled,
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    conn: &ServerConn,
    claim: &Claim,
    client_id: &str,
    job_dir: &Path,
    kill_grace: Duration,
    shared: &Arc<Mutex<Shared>>,
    log_tx: &mpsc::Sender<NewLogLine>,
    cancel: watch::Receiver<bool>,
    local_state: &LocalState,
    cache_dir: &Path,
    kept_files: &KeptFiles,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(claim.timeout_secs);
    let workspace = job_dir.join("ws");
    let output = job_dir.join("out");
    if let Err(message) = prepare(conn, claim, job_dir, &workspace, &output, kept_files).await {
        return Outcome::Failed {
            reason: "setup".into(),
            message,
            exit_status: None,
        };
    }
    let note = |text: String| NewLogLine {
        stream: "kiln".into(),
        text,
    };
    let env = vec![
        ("KILN_BUILD".to_owned(), claim.build.clone()),
        ("KILN_JOB_ID".to_owned(), claim.job_id.clone()),
        ("KILN_CONFIG_TYPE".to_owned(), claim.config_type.clone()),
        ("KILN_CLIENT_ID".to_owned(), client_id.to_owned()),
        ("KILN_WORKSPACE".to_owned(), workspace.display().to_string()),
        ("KILN_OUTPUT".to_owned(), output.display().to_string()),
        ("KILN_CACHE".to_owned(), cache_dir.display().to_string()),
        ("KILN_ATTEMPT".to_owned(), claim.attempt.to_string()),
        ("KILN_SERVER".to_owned(), conn.url().to_owned()),
    ];
    let steps = [
        ("install", Some(&claim.install_script)),
        ("configure", claim.configure_script.as_ref()),
        ("image", Some(&claim.image_script)),
        ("verify", claim.verify_script.as_ref()),
    ];
    for (name, script) in steps {
        let Some(script) = script else { continue };
        let _ = log_tx
            .send(note(format!(
                "step {name}: {script} (attempt {}, client {client_id})",
                claim.attempt
            )))
            .await;
        let spec = StepSpec {
            name: name.to_owned(),
            script: workspace.join(script),
            cwd: workspace.clone(),
            env: env.clone(),
        };
        let (line_tx, line_rx) = mpsc::channel::<OutputLine>(1024);
        let forward = forward_lines(line_rx, log_tx.clone(), shared.clone());
        let step = run_step(
            &spec,
            deadline,
            kill_grace,
            line_tx,
            cancel.clone(),
            |pgid| {
                local_state.record_pgid(claim, pgid);
            },
        );
        let (result, ()) = tokio::join!(step, forward);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                return Outcome::Failed {
                    reason: "setup".into(),
                    message: format!("step {name} could not run: {err}"),
                    exit_status: None,
                }
            }
        };
        match outcome {
            StepOutcome::Exited(0) => {}
            StepOutcome::Exited(code) => {
                let _ = log_tx
                    .send(note(format!("step {name} exited with status {code}")))
                    .await;
                return Outcome::Failed {
                    reason: "exit".into(),
                    message: format!("step {name} ({script}) exited with status {code}"),
                    exit_status: Some(code),
                };
            }
            StepOutcome::Signaled(signal) => {
                return Outcome::Failed {
                    reason: "signal".into(),
                    message: format!("step {name} ({script}) was killed by signal {signal}"),
                    exit_status: None,
                };
            }
            StepOutcome::TimedOut => {
                let _ = log_tx
                    .send(note(format!(
                        "step {name}: the job's timeout of {} s passed; its processes were killed",
                        claim.timeout_secs
                    )))
                    .await;
                return Outcome::Failed {
                    reason: "timeout".into(),
                    message: format!(
                        "the job ran past its timeout of {} s in step {name}",
                        claim.timeout_secs
                    ),
                    exit_status: None,
                };
            }
            StepOutcome::Cancelled => return Outcome::Cancelled,
        }
    }
    Outcome::Succeeded
}

/// Makes the job's directory afresh and unpacks the build's files into the workspace
/// (a kept copy when the server says it is theirs: see [`KeptFiles`]).
async fn prepare(
    conn: &ServerConn,
    claim: &Claim,
    job_dir: &Path,
    workspace: &Path,
    output: &Path,
    kept_files: &KeptFiles,
) -> Result<(), String> {
    if tokio::fs::try_exists(job_dir).await.unwrap_or(false) {
        tokio::fs::remove_dir_all(job_dir)
            .await
            .map_err(|err| format!("cannot clear {}: {err}", job_dir.display()))?;
    }
    for dir in [workspace, output] {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    // Where a download goes; a kept copy is read where it is kept.
    let archive = job_dir.join("files.tar");
    let mut delay = Duration::from_millis(500);
    let file = loop {
        match kept_files.fetch(conn, claim, &archive).await {
            Ok(file) => break file,
            Err(err) if err.is_retryable() && delay < Duration::from_secs(30) => {
                tracing::warn!(cause = %kiln_proto::error_chain(&err), build = %claim.build, "fetching build files; will retry");
                tokio::time::sleep(delay).await;
                delay *= 2;
                // A try that failed half-way may have left a part of the archive.
                let _ = tokio::fs::remove_file(&archive).await;
            }
            Err(err) => return Err(format!("cannot fetch the build's files: {err}")),
        }
    };
    let workspace = workspace.to_owned();
    let unpack = tokio::task::spawn_blocking(move || {
        unpack_files(file, &workspace)?;
        // A download is kept under its ETag (or could not be): this name of it goes.
        match std::fs::remove_file(&archive) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot remove {}: {err}", archive.display()))
            }
            _ => Ok(()),
        }
    });
    unpack
        .await
        .map_err(|err| format!("unpacking the build's files: {err}"))?
}

/// Unpacks only regular files and directories, never outside `dest`.
///
/// The headers are read first, and the directories made; then each regular file's
/// bytes are copied from the archive with `std::io::copy` between the two files, which
/// the standard library hands to the kernel (`copy_file_range`) where it can: every job
/// copies its build's whole files, and a build's manifest alone can be megabytes.
fn unpack_files(archive: std::fs::File, dest: &Path) -> Result<(), String> {
    let mut files = Vec::new();
    let mut tar = tar::Archive::new(&archive);
    tar.set_preserve_permissions(true);
    let entries = tar
        .entries_with_seek()
        .map_err(|err| format!("the build's files are not a tar archive: {err}"))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|err| format!("the build's files archive is damaged: {err}"))?;
        let kind = entry.header().entry_type();
        let name = entry
            .path()
            .map(|p| p.into_owned())
            .map_err(|err| format!("the build's files hold a bad name: {err}"))?;
        if kind.is_dir() {
            // unpack_in refuses paths that would land outside `dest`.
            let inside = entry
                .unpack_in(dest)
                .map_err(|err| format!("unpacking the build's files: {err}"))?;
            if !inside {
                return Err("the build's files hold a path that escapes the workspace".into());
            }
            continue;
        }
        if !kind.is_file() {
            return Err(format!(
                "the build's files hold {:?}, which is not a regular file or directory",
                name.display().to_string()
            ));
        }
        let Some(relative) = path_inside(&name) else {
            return Err("the build's files hold a path that escapes the workspace".into());
        };
        let header = entry.header();
        files.push(FileInArchive {
            target: dest.join(relative),
            offset: entry.raw_file_position(),
            len: entry.size(),
            mode: header.mode().unwrap_or(0o644) & 0o7777,
            mtime: header.mtime().ok(),
            name,
        });
    }
    for file in &files {
        file.copy_out(&archive).map_err(|err| {
            format!(
                "unpacking {} from the build's files: {err}",
                file.name.display()
            )
        })?;
    }
    Ok(())
}

/// `name` as a path under the workspace: leading `/` and `.` parts dropped; `None` if
/// it climbs out (`..`) or names the workspace itself, as `tar`'s `unpack_in` decides.
fn path_inside(name: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut inside = PathBuf::new();
    for part in name.components() {
        match part {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(part) => inside.push(part),
        }
    }
    (!inside.as_os_str().is_empty()).then_some(inside)
}

/// A regular file of a build's files archive, to be written into the workspace.
struct FileInArchive {
    /// Its name in the archive.
    name: PathBuf,
    target: PathBuf,
    /// Where its bytes are in the archive.
    offset: u64,
    len: u64,
    mode: u32,
    /// Its modification time, in seconds.
    mtime: Option<u64>,
}

impl FileInArchive {
    /// Writes the file at its target (its parents made as needed), from `archive`.
    fn copy_out(&self, mut archive: &std::fs::File) -> std::io::Result<()> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = self.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&self.target)?;
        archive.seek(SeekFrom::Start(self.offset))?;
        let copied = std::io::copy(&mut archive.take(self.len), &mut out)?;
        if copied != self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive ends {copied} bytes into a file of {} bytes",
                    self.len
                ),
            ));
        }
        out.set_permissions(std::fs::Permissions::from_mode(self.mode))?;
        if let Some(secs) = self.mtime {
            out.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))?;
        }
        Ok(())
    }
}

/// Passes a step's lines to the log shipper, noting progress lines and the tail.
async fn forward_lines(
    mut lines: mpsc::Receiver<OutputLine>,
    log_tx: mpsc::Sender<NewLogLine>,
    shared: Arc<Mutex<Shared>>,
) {
    while let Some(line) = lines.recv().await {
        {
            let mut shared = shared.lock().expect("job state poisoned");
            if let Some(progress) = parse_progress_line(&line.text) {
                merge_progress(&mut shared.progress, progress);
                shared.progress_dirty = true;
            }
            if shared.tail.len() == TAIL_LINES {
                shared.tail.pop_front();
            }
            shared.tail.push_back(line.text.clone());
        }
        let stream = match line.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        // A closed shipper means the job is ending: keep draining the step's output.
        let _ = log_tx
            .send(NewLogLine {
                stream: stream.into(),
                text: line.text,
            })
            .await;
    }
}

/// Sends log lines in batches, with the latest progress; a 409 cancels the job.
async fn ship_logs(
    conn: ServerConn,
    claim: Claim,
    shared: Arc<Mutex<Shared>>,
    mut rx: mpsc::Receiver<NewLogLine>,
    cancel: Arc<watch::Sender<bool>>,
) {
    let mut buffer: VecDeque<NewLogLine> = VecDeque::new();
    let mut n_dropped: u64 = 0;
    let mut closed = false;
    let mut failures: u32 = 0;
    // The server cut the job's log at its limit: lines are drained and dropped here,
    // and only progress is sent.
    let mut truncated = false;
    loop {
        let flush_at = Instant::now() + LOG_FLUSH;
        while !closed && buffer.len() < LOG_BATCH {
            match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(_)) if truncated => {}
                Ok(Some(line)) => {
                    if buffer.len() >= LOG_BUFFER {
                        buffer.pop_front();
                        n_dropped += 1;
                    }
                    buffer.push_back(line);
                }
                Ok(None) => closed = true,
                Err(_elapsed) => break,
            }
        }
        let progress = {
            let mut shared = shared.lock().expect("job state poisoned");
            let dirty = std::mem::take(&mut shared.progress_dirty);
            dirty.then(|| shared.progress.clone()).flatten()
        };
        if buffer.is_empty() && progress.is_none() {
            if closed {
                return;
            }
            continue;
        }
        let mut lines: Vec<NewLogLine> = Vec::with_capacity(buffer.len().min(LOG_BATCH) + 1);
        if n_dropped > 0 {
            lines.push(NewLogLine {
                stream: "kiln".into(),
                text: format!(
                    "{n_dropped} log lines were dropped while the server could not be reached"
                ),
            });
        }
        lines.extend(buffer.iter().take(LOG_BATCH).cloned());
        let n_sent = lines.len() - usize::from(n_dropped > 0);
        match conn
            .log(
                &claim,
                &LogBatch {
                    lines,
                    progress: progress.clone(),
                },
            )
            .await
        {
            Ok(answer) => {
                buffer.drain(..n_sent);
                n_dropped = 0;
                failures = 0;
                if answer.truncated && !truncated {
                    truncated = true;
                    buffer.clear();
                    tracing::warn!(build = %claim.build, job = %claim.job_id, "the server cut this job's log at its limit; no more of its output is sent (the job runs on)");
                }
            }
            Err(CallError::Stale(_)) => {
                let _ = cancel.send(true);
                return;
            }
            Err(err) => {
                failures += 1;
                if progress.is_some() {
                    shared.lock().expect("job state poisoned").progress_dirty = true;
                }
                tracing::warn!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "sending log lines; will retry");
                if closed && failures > 10 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500 * u64::from(failures.min(10)))).await;
            }
        }
    }
}

/// Extends the lease every `heartbeat_secs`; a 409 cancels the job.
async fn heartbeat_loop(
    conn: ServerConn,
    claim: Claim,
    shared: Arc<Mutex<Shared>>,
    cancel: Arc<watch::Sender<bool>>,
) {
    let mut interval = tokio::time::interval(Duration::from_secs(claim.heartbeat_secs.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let progress = shared.lock().expect("job state poisoned").progress.clone();
        match conn.heartbeat(&claim, progress).await {
            Ok(()) => {}
            Err(CallError::Stale(message)) => {
                tracing::warn!(job = %claim.job_id, build = %claim.build, %message, "lease lost; stopping the job");
                let _ = cancel.send(true);
                return;
            }
            Err(err) => {
                tracing::warn!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "heartbeat failed; will retry")
            }
        }
    }
}

/// Retries `call` while it fails in a way that may pass (server away, disk full).
async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut delay = Duration::from_millis(500);
    let give_up = Instant::now() + Duration::from_secs(3600);
    loop {
        match call().await {
            Err(err) if err.is_retryable() && Instant::now() < give_up => {
                tracing::warn!(cause = %kiln_proto::error_chain(&err), "{what}; will retry in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            result => return result,
        }
    }
}

async fn report_failure(
    conn: &ServerConn,
    claim: &Claim,
    reason: &str,
    message: String,
    exit_status: Option<i32>,
    shared: &Mutex<Shared>,
) -> JobEnd {
    let tail: Vec<String> = shared
        .lock()
        .expect("job state poisoned")
        .tail
        .iter()
        .cloned()
        .collect();
    let message = if tail.is_empty() {
        message
    } else {
        format!("{message}; last lines:\n{}", tail.join("\n"))
    };
    let report = Fail {
        reason: reason.to_owned(),
        message,
        exit_status,
    };
    match with_retries("reporting a failure", || conn.fail(claim, &report)).await {
        Ok(()) => JobEnd::Failed(reason.to_owned()),
        Err(CallError::Stale(_)) => JobEnd::LeaseLost,
        Err(err) => {
            tracing::error!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "cannot report the failure");
            JobEnd::Failed(reason.to_owned())
        }
    }
}

/// The images the steps left: every regular file directly in `output`.
async fn collect_images(output: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut images = Vec::new();
    let mut dir = tokio::fs::read_dir(output)
        .await
        .map_err(|err| format!("cannot read KILN_OUTPUT {}: {err}", output.display()))?;
    while let Some(entry) = dir
        .next_entry()
        .await
        .map_err(|err| format!("cannot read KILN_OUTPUT {}: {err}", output.display()))?
    {
        let meta = tokio::fs::symlink_metadata(entry.path())
            .await
            .map_err(|err| format!("cannot read {}: {err}", entry.path().display()))?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        kiln_proto::names::check_name("image file name", &name)?;
        images.push((name, entry.path()));
    }
    images.sort();
    Ok(images)
}

async fn upload_and_finish(
    conn: &ServerConn,
    claim: &Claim,
    output: &Path,
    uploader: &dyn ImageUploader,
    shared: &Mutex<Shared>,
) -> JobEnd {
    let images = match collect_images(output).await {
        Ok(images) if images.is_empty() => {
            let message = "the steps left no image in KILN_OUTPUT".to_owned();
            return report_failure(conn, claim, "no_images", message, None, shared).await;
        }
        Ok(images) => images,
        Err(message) => return report_failure(conn, claim, "output", message, None, shared).await,
    };
    // The steps are over: from here on the lease alone says this client is alive, so a
    // long upload (or a full disk on the server) is not taken for a hung job.
    match with_retries("reporting the steps done", || conn.steps_done(claim)).await {
        Err(CallError::Stale(_)) => return JobEnd::LeaseLost,
        Err(err) => {
            tracing::warn!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "cannot report the steps done")
        }
        Ok(()) => {}
    }
    for (name, path) in &images {
        let mut n_refused = 0;
        // The upload's progress rides on the heartbeats, for `kiln status` and `wait`.
        let on_progress = |done: u64, total: u64| {
            let percent = (done * 100).checked_div(total).unwrap_or(100).min(100) as u8;
            let mut shared = shared.lock().expect("job state poisoned");
            shared.progress = Some(Progress {
                major: Some("upload".into()),
                minor: Some(name.clone()),
                percent: Some(percent),
            });
            shared.progress_dirty = true;
        };
        loop {
            match with_retries("uploading an image", || {
                uploader.upload(conn, claim, name, path, &on_progress)
            })
            .await
            {
                Ok(report) => {
                    tracing::info!(
                        job = %claim.job_id,
                        image = %name,
                        size = report.size,
                        chunks = report.chunks,
                        chunks_sent = report.chunks_sent,
                        wire_bytes = report.wire_bytes_sent,
                        secs = report.elapsed.as_secs_f64(),
                        "image uploaded"
                    );
                    break;
                }
                Err(CallError::Stale(_)) => return JobEnd::LeaseLost,
                Err(CallError::Refused { message, .. }) if n_refused < 2 => {
                    // A refused upload (its bytes did not match their hash) is sent again.
                    n_refused += 1;
                    tracing::warn!(image = %name, %message, "upload refused; sending it again");
                }
                Err(err) => {
                    let message = format!("image {name} could not be uploaded: {err}");
                    return report_failure(conn, claim, "upload", message, None, shared).await;
                }
            }
        }
    }
    let names: Vec<String> = images.into_iter().map(|(name, _)| name).collect();
    match with_retries("reporting the job finished", || {
        conn.finish(claim, names.clone())
    })
    .await
    {
        Ok(()) => JobEnd::Finished,
        Err(CallError::Stale(_)) => JobEnd::LeaseLost,
        Err(CallError::Refused { message, .. }) => {
            let message = format!("the server refused to finish the job: {message}");
            report_failure(conn, claim, "report", message, None, shared).await
        }
        Err(err) => {
            tracing::error!(cause = %kiln_proto::error_chain(&err), job = %claim.job_id, "cannot report the job finished");
            JobEnd::Failed("report".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    type Entry<'a> = (&'a [u8], &'a [u8], u32, tar::EntryType);

    fn archive(dir: &Path, entries: &[Entry]) -> std::fs::File {
        let path = dir.join("files.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, bytes, mode, kind) in entries {
            let mut header = tar::Header::new_gnu();
            // Written by hand: `set_path` refuses `..`, which the hostile case needs.
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_size(bytes.len() as u64);
            header.set_mode(*mode);
            header.set_mtime(1_700_000_000);
            header.set_entry_type(*kind);
            header.set_cksum();
            builder.append(&header, *bytes).unwrap();
        }
        builder.finish().unwrap();
        std::fs::File::open(&path).unwrap()
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_are_unpacked_with_their_bytes_mode_and_time() {
        let temp = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|n| (n % 251) as u8).collect();
        let file = archive(
            temp.path(),
            &[
                (b"scripts/", b"", 0o755, tar::EntryType::Directory),
                (
                    b"scripts/install.sh",
                    b"true\n",
                    0o755,
                    tar::EntryType::Regular,
                ),
                (b"./relbuild.xml", &big, 0o644, tar::EntryType::Regular),
                (
                    b"deep/er/file.txt",
                    b"no directory entry before me",
                    0o600,
                    tar::EntryType::Regular,
                ),
                (b"empty", b"", 0o644, tar::EntryType::Regular),
            ],
        );
        let dest = temp.path().join("workspace");
        std::fs::create_dir(&dest).unwrap();
        unpack_files(file, &dest).unwrap();

        assert_eq!(
            std::fs::read(dest.join("scripts/install.sh")).unwrap(),
            b"true\n"
        );
        assert_eq!(std::fs::read(dest.join("relbuild.xml")).unwrap(), big);
        assert_eq!(
            std::fs::read(dest.join("deep/er/file.txt")).unwrap(),
            b"no directory entry before me"
        );
        assert_eq!(std::fs::read(dest.join("empty")).unwrap(), b"");
        assert_eq!(mode_of(&dest.join("scripts/install.sh")), 0o755);
        assert_eq!(mode_of(&dest.join("deep/er/file.txt")), 0o600);
        let modified = std::fs::metadata(dest.join("relbuild.xml"))
            .unwrap()
            .modified()
            .unwrap();
        let secs = modified
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs, 1_700_000_000);
    }

    #[test]
    fn an_archive_climbing_out_or_holding_a_link_is_refused_and_writes_nothing_outside() {
        let temp = tempfile::tempdir().unwrap();
        let dest = temp.path().join("workspace");
        std::fs::create_dir(&dest).unwrap();

        let climbing = archive(
            temp.path(),
            &[(
                b"../outside.txt",
                b"escaped",
                0o644,
                tar::EntryType::Regular,
            )],
        );
        let err = unpack_files(climbing, &dest).unwrap_err();
        assert!(err.contains("escapes the workspace"), "{err}");
        assert!(!temp.path().join("outside.txt").exists());

        let linking = archive(
            temp.path(),
            &[(b"link", b"", 0o777, tar::EntryType::Symlink)],
        );
        let err = unpack_files(linking, &dest).unwrap_err();
        assert!(
            err.contains("\"link\"") && err.contains("not a regular file"),
            "{err}"
        );
        assert!(!dest.join("link").exists());
    }

    #[test]
    fn an_archive_cut_short_inside_a_file_is_refused_naming_the_file() {
        let temp = tempfile::tempdir().unwrap();
        let bytes = vec![7u8; 100_000];
        archive(
            temp.path(),
            &[(b"relbuild.xml", &bytes, 0o644, tar::EntryType::Regular)],
        );
        let path = temp.path().join("files.tar");
        // The header (512 bytes) and 40,000 of the file's 100,000 bytes.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(512 + 40_000).unwrap();
        let dest = temp.path().join("workspace");
        std::fs::create_dir(&dest).unwrap();
        let err = unpack_files(std::fs::File::open(&path).unwrap(), &dest).unwrap_err();
        assert!(
            err.contains("relbuild.xml") && err.contains("ends"),
            "{err}"
        );
    }
}
