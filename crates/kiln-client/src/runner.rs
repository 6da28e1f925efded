//! Runs one step of a job (install, configure, image or verify) as a supervised child process.
//!
//! [`run_step`] starts the step's script described by a [`StepSpec`] in its own process
//! group with stdin closed, forwards its stdout and stderr line by line as
//! [`OutputLine`]s, and ends in a [`StepOutcome`]: the script's exit status, the signal
//! that killed it, or the deadline or a cancel request having stopped it. Stopping a step
//! sends SIGTERM to the whole group, waits a grace period, then sends SIGKILL
//! ([`kill_process_group`]); a step that ends by itself also has its leftover background
//! processes killed, so that nothing a step started outlives it.
//!
//! Errors are `std::io::Error`s; those raised by this module carry a [`RunStepError`]
//! as their inner error.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The longest line forwarded, in bytes; longer lines are cut into pieces of this size
/// so that a script printing without newlines cannot make the runner buffer without bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Once the step's group is dead, how long the pipes may keep us waiting for data.
/// Only a process that left the group (for example through `setsid`) can still hold
/// them open; we stop reading rather than let it hang the step.
const DRAIN_READ_BUDGET: Duration = Duration::from_secs(2);

/// Once the step's group is dead, how many more bytes are read from each pipe. Output
/// the group wrote before it died is at most one pipe buffer, far below this; the cap
/// only stops an escaped process that keeps writing from keeping the step alive.
const DRAIN_MAX_BYTES: usize = 4 * 1024 * 1024;

/// How long to wait for the step's process to be reaped after SIGKILL. It only takes
/// longer when the process is stuck in the kernel (uninterruptible sleep).
const REAP_BOUND: Duration = Duration::from_secs(5);

/// How long to wait, after SIGKILL, for every member of the group to be gone. Orphaned
/// members are reaped by init (or a subreaper), which some inits only do periodically.
const GROUP_EXIT_BOUND: Duration = Duration::from_secs(5);

/// How often the group is checked while waiting for it to be gone.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How many times a spawn failing with ETXTBSY is retried. The script may have been
/// written just before: while another thread forks, the child briefly inherits our
/// write descriptor of the file, and exec refuses to run a file open for writing.
const SPAWN_BUSY_RETRIES: u32 = 10;

/// Pause between two spawn attempts after ETXTBSY.
const SPAWN_BUSY_DELAY: Duration = Duration::from_millis(20);

/// Size of the buffer each pipe is read into.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// One step of a job (install, configure, image or verify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    /// The step's name: "install", "configure", "image" or "verify".
    pub name: String,
    /// Absolute path of the script file; it runs directly if any execute bit is set,
    /// otherwise as `/bin/sh SCRIPT`.
    pub script: PathBuf,
    /// Working directory of the script.
    pub cwd: PathBuf,
    /// Variables added to the environment the script inherits from the client.
    pub env: Vec<(String, String)>,
}

/// Which output stream of the step a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The script's standard output.
    Stdout,
    /// The script's standard error.
    Stderr,
}

/// One line of a step's output, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The stream the line was read from.
    pub stream: Stream,
    /// The line, decoded as lossy UTF-8, without the trailing `\n` or `\r\n`; at most
    /// [`MAX_LINE_BYTES`] bytes before decoding.
    pub text: String,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The process exited with this status (0 = success).
    Exited(i32),
    /// The process was killed by this signal, which the runner did not send.
    Signaled(i32),
    /// The deadline passed; the group got SIGTERM, then SIGKILL after the grace.
    TimedOut,
    /// The cancel signal fired; the group was killed the same way as on timeout.
    Cancelled,
}

/// What went wrong while running a step; found inside the `std::io::Error`s this module
/// returns (`err.get_ref()` and `downcast_ref`), whose kind is kept from the cause.
#[derive(Debug, thiserror::Error)]
pub enum RunStepError {
    /// The script path is relative; it would be looked up in `PATH` or against the
    /// working directory instead of naming one file.
    #[error("step script path {script:?} is not absolute")]
    RelativeScript {
        /// The path given in the [`StepSpec`].
        script: PathBuf,
    },
    /// The script could not be examined.
    #[error("cannot read metadata of step script {script:?}")]
    Stat {
        /// The path given in the [`StepSpec`].
        script: PathBuf,
        /// The error from the file system.
        #[source]
        source: io::Error,
    },
    /// The script could not be started.
    #[error("cannot start step {step} ({script:?})")]
    Spawn {
        /// The step's name.
        step: String,
        /// The path given in the [`StepSpec`].
        script: PathBuf,
        /// The error from spawning the process.
        #[source]
        source: io::Error,
    },
    /// Waiting for the step's process failed.
    #[error("cannot wait for step {step}")]
    Wait {
        /// The step's name.
        step: String,
        /// The error from waiting.
        #[source]
        source: io::Error,
    },
    /// The process ended with a status that is neither an exit code nor a signal.
    #[error("step {step} ended with an unrecognised status {status}")]
    UnknownStatus {
        /// The step's name.
        step: String,
        /// The status as reported by the operating system.
        status: ExitStatus,
    },
    /// The process group id cannot name a group of ours: 0 means the caller's own
    /// group and 1 would turn into `kill(-1, ..)`, every process we may signal.
    #[error("refusing to signal process group {pgid}")]
    InvalidProcessGroup {
        /// The rejected id.
        pgid: u32,
    },
    /// Sending a signal to the group failed.
    #[error("cannot send signal {signal} to process group {pgid}")]
    Signal {
        /// The group signalled.
        pgid: u32,
        /// The signal number.
        signal: i32,
        /// The error from `kill`.
        #[source]
        source: io::Error,
    },
}

impl RunStepError {
    /// Wraps the error in an `std::io::Error` of the kind of its cause.
    fn into_io(self) -> io::Error {
        let kind = match &self {
            Self::RelativeScript { .. } | Self::InvalidProcessGroup { .. } => {
                io::ErrorKind::InvalidInput
            }
            Self::Stat { source, .. }
            | Self::Spawn { source, .. }
            | Self::Wait { source, .. }
            | Self::Signal { source, .. } => source.kind(),
            Self::UnknownStatus { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// Runs one step to its end and reports how it ended.
///
/// The script runs in a new process group whose id equals the child's pid, which is
/// passed to `on_spawn` right after the spawn. Every line of stdout and stderr is sent on
/// `lines`, awaiting room in the channel; once the receiver is closed the output is still
/// read (so the script never blocks on a full pipe) and discarded.
///
/// When `deadline` passes or `cancel` becomes true, the whole group gets SIGTERM, then
/// SIGKILL after `grace` (earlier if the script exits), and the result is
/// [`StepOutcome::TimedOut`] or [`StepOutcome::Cancelled`]. When the script exits by
/// itself, whatever it left running in its group is killed with SIGKILL. In every case
/// the group is gone by the time this returns, bounded in time, except for processes
/// that left the group; such a process holding the output pipes open delays the return
/// by at most a couple of seconds.
///
/// If `cancel` is already true or `deadline` already passed, nothing is spawned and
/// `on_spawn` is not called. If the returned future is dropped before it completes, the
/// group is killed with SIGKILL.
///
/// # Errors
///
/// Fails if the script path is relative, the script cannot be examined or started, or
/// waiting for the child fails; the inner error is a [`RunStepError`]. A script that
/// fails is not an error but [`StepOutcome::Exited`] with its status.
pub async fn run_step(
    spec: &StepSpec,
    deadline: Instant,
    grace: Duration,
    lines: mpsc::Sender<OutputLine>,
    mut cancel: watch::Receiver<bool>,
    on_spawn: impl FnOnce(u32),
) -> io::Result<StepOutcome> {
    if *cancel.borrow() {
        return Ok(StepOutcome::Cancelled);
    }
    if Instant::now() >= deadline {
        return Ok(StepOutcome::TimedOut);
    }

    let mut child = spawn_step(spec).await?;
    let pgid = child
        .id()
        .ok_or_else(|| io::Error::other("spawned step has no pid"))?;
    let mut kill_guard = GroupKillGuard { pgid, armed: true };
    debug!(step = %spec.name, pid = pgid, "step started");
    on_spawn(pgid);

    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("spawned step has no stdout pipe"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| io::Error::other("spawned step has no stderr pipe"))?;

    // Tells the pumps that the group is dead, so that from then on their reads are
    // bounded: only a process outside the group can still hold the pipes open.
    let (drain_sender, drain_receiver) = watch::channel(false);
    let supervise = supervise(
        spec,
        &mut child,
        pgid,
        deadline,
        grace,
        &mut cancel,
        &drain_sender,
    );
    let stdout_pump = async {
        pump_stream(stdout, Stream::Stdout, &lines, drain_receiver.clone()).await;
        Ok::<(), io::Error>(())
    };
    let stderr_pump = async {
        pump_stream(stderr, Stream::Stderr, &lines, drain_receiver.clone()).await;
        Ok::<(), io::Error>(())
    };
    // try_join drops the pumps as soon as supervision fails: they could otherwise wait
    // forever for a drain signal that will never come.
    let (outcome, (), ()) = tokio::try_join!(supervise, stdout_pump, stderr_pump)?;

    kill_guard.armed = false;
    debug!(step = %spec.name, pid = pgid, outcome = ?outcome, "step ended");
    Ok(outcome)
}

/// Sends `signal` to every process of the group `pgid` (`kill(-pgid, signal)`).
///
/// A group that no longer exists (ESRCH) is not an error. Ids 0 and 1 are refused with
/// `InvalidInput`, since `kill` would read them as the caller's own group and as every
/// process the caller may signal; so are ids above `i32::MAX`, which no process has.
///
/// # Errors
///
/// Returns the refusal above, or the error from `kill` other than ESRCH (for example
/// EPERM), with a [`RunStepError`] as the inner error.
pub fn kill_process_group(pgid: u32, signal: i32) -> io::Result<()> {
    match signal_group(pgid, signal) {
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(err) => Err(RunStepError::Signal {
            pgid,
            signal,
            source: err,
        }
        .into_io()),
        Ok(()) => Ok(()),
    }
}

/// `kill(-pgid, signal)` with the raw OS error, after refusing ids that do not name a
/// group of ours.
fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let target = match libc::pid_t::try_from(pgid) {
        Ok(id) if id > 1 => -id,
        _ => return Err(RunStepError::InvalidProcessGroup { pgid }.into_io()),
    };
    // SAFETY: kill has no memory-safety preconditions; the target was checked above.
    if unsafe { libc::kill(target, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether any process, zombies included, is still in the group `pgid`.
fn process_group_exists(pgid: u32) -> bool {
    match signal_group(pgid, 0) {
        Ok(()) => true,
        // EPERM means members exist that we may not signal.
        Err(err) => err.raw_os_error() != Some(libc::ESRCH),
    }
}

/// Kills the group with SIGKILL when dropped while armed, so that a [`run_step`] future
/// dropped mid-step (for example by the caller's own `select!`) leaves nothing running.
struct GroupKillGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(err) = kill_process_group(self.pgid, libc::SIGKILL) {
                warn!(pgid = self.pgid, cause = %err, "cannot kill abandoned step");
            }
        }
    }
}

/// Starts the step's script with its own process group, stdin from /dev/null and both
/// output streams piped.
async fn spawn_step(spec: &StepSpec) -> io::Result<Child> {
    if !spec.script.is_absolute() {
        return Err(RunStepError::RelativeScript {
            script: spec.script.clone(),
        }
        .into_io());
    }
    // One stat of a local file: blocking it is no worse than the fork and exec that
    // tokio's spawn does on this thread anyway.
    let metadata = std::fs::metadata(&spec.script).map_err(|source| {
        RunStepError::Stat {
            script: spec.script.clone(),
            source,
        }
        .into_io()
    })?;
    let mut direct = metadata.permissions().mode() & 0o111 != 0;
    let mut busy_retries = 0;
    loop {
        let mut command = if direct {
            Command::new(&spec.script)
        } else {
            let mut command = Command::new("/bin/sh");
            command.arg(&spec.script);
            command
        };
        command
            .current_dir(&spec.cwd)
            // The client's credential is the client's, not the job's: a step never
            // inherits it, even when the client was given it in its environment.
            .env_remove("KILN_TOKEN")
            .envs(spec.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        match command.spawn() {
            Ok(child) => return Ok(child),
            // An executable without a `#!` line: run it with the shell, as execvp and
            // every shell do, rather than fail a script that only lacks its first line.
            Err(err) if direct && err.raw_os_error() == Some(libc::ENOEXEC) => {
                debug!(step = %spec.name, "script has no interpreter line, using /bin/sh");
                direct = false;
            }
            Err(err)
                if err.raw_os_error() == Some(libc::ETXTBSY)
                    && busy_retries < SPAWN_BUSY_RETRIES =>
            {
                busy_retries += 1;
                tokio::time::sleep(SPAWN_BUSY_DELAY).await;
            }
            Err(source) => {
                return Err(RunStepError::Spawn {
                    step: spec.name.clone(),
                    script: spec.script.clone(),
                    source,
                }
                .into_io())
            }
        }
    }
}

/// Waits for the first of: the child's exit, the cancel signal, the deadline. Then kills
/// the group, releases the pumps into their bounded drain, and waits for the group to
/// be gone.
async fn supervise(
    spec: &StepSpec,
    child: &mut Child,
    pgid: u32,
    deadline: Instant,
    grace: Duration,
    cancel: &mut watch::Receiver<bool>,
    drain: &watch::Sender<bool>,
) -> io::Result<StepOutcome> {
    let wait_error = |source| {
        RunStepError::Wait {
            step: spec.name.clone(),
            source,
        }
        .into_io()
    };
    // Biased so that a child that has already exited is reported as exited, even if the
    // deadline or a cancel arrived at the same time.
    let outcome = tokio::select! {
        biased;
        status = child.wait() => {
            let status = status.map_err(wait_error)?;
            // The script is done; background processes it left in its group must not
            // outlive the step, and must not keep the pipes open.
            signal_group_best_effort(pgid, libc::SIGKILL);
            outcome_of(spec, status)?
        }
        () = cancel_requested(cancel) => {
            debug!(step = %spec.name, pid = pgid, "step cancelled");
            stop_group(child, pgid, grace, None).await.map_err(wait_error)?;
            StepOutcome::Cancelled
        }
        () = tokio::time::sleep_until(deadline) => {
            debug!(step = %spec.name, pid = pgid, "step timed out");
            // A cancel during the grace (the lease is gone) cuts the grace short.
            stop_group(child, pgid, grace, Some(cancel)).await.map_err(wait_error)?;
            StepOutcome::TimedOut
        }
    };
    drain.send_replace(true);
    wait_for_group_exit(pgid).await;
    Ok(outcome)
}

/// Resolves when `cancel` is or becomes true; never if its sender goes away first.
async fn cancel_requested(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|&cancelled| cancelled).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM to the group, up to `grace` for the child to exit (less if `cancel` fires),
/// SIGKILL to the group (even if the child exited: its group may live on), and the
/// child reaped.
async fn stop_group(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
    cancel: Option<&mut watch::Receiver<bool>>,
) -> io::Result<()> {
    signal_group_best_effort(pgid, libc::SIGTERM);
    let cancelled = async {
        match cancel {
            Some(cancel) => cancel_requested(cancel).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        waited = tokio::time::timeout(grace, child.wait()) => {
            if let Ok(status) = waited {
                status?;
            }
        }
        () = cancelled => {}
    }
    signal_group_best_effort(pgid, libc::SIGKILL);
    // Returns at once if the child was reaped during the grace.
    match tokio::time::timeout(REAP_BOUND, child.wait()).await {
        Ok(status) => status.map(drop),
        Err(_) => {
            // Dropping the child later hands it to tokio, which reaps it when it dies.
            warn!(pid = pgid, "step process did not die after SIGKILL");
            Ok(())
        }
    }
}

/// Signals the group, logging a failure instead of returning it: this is cleanup, and
/// [`wait_for_group_exit`] reports a group that survives it.
fn signal_group_best_effort(pgid: u32, signal: i32) {
    if let Err(err) = kill_process_group(pgid, signal) {
        warn!(pgid, signal, cause = %err, "cannot signal step process group");
    }
}

/// Waits, bounded, until no process of the group is left, so that callers (and tests)
/// can rely on the group being gone once the step is over.
async fn wait_for_group_exit(pgid: u32) {
    let give_up_at = Instant::now() + GROUP_EXIT_BOUND;
    while process_group_exists(pgid) {
        if Instant::now() >= give_up_at {
            warn!(
                pgid,
                "processes of the step's group are still present after SIGKILL; \
                 is an init process reaping orphans?"
            );
            return;
        }
        tokio::time::sleep(GROUP_POLL_INTERVAL).await;
    }
}

/// Maps the child's exit status to the outcome of a step that ended by itself.
fn outcome_of(spec: &StepSpec, status: ExitStatus) -> io::Result<StepOutcome> {
    if let Some(code) = status.code() {
        Ok(StepOutcome::Exited(code))
    } else if let Some(signal) = status.signal() {
        Ok(StepOutcome::Signaled(signal))
    } else {
        Err(RunStepError::UnknownStatus {
            step: spec.name.clone(),
            status,
        }
        .into_io())
    }
}

/// Reads one output stream to its end, sending each line on `lines`.
///
/// Before the drain signal, reads wait as long as it takes. After it, the group is dead
/// and reads are bounded by a time and byte budget, since only an escaped process can
/// still hold the pipe. Time spent waiting on `lines` is not counted: a slow receiver
/// must not make us drop output the step wrote before it ended.
async fn pump_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    lines: &mpsc::Sender<OutputLine>,
    mut drain: watch::Receiver<bool>,
) {
    let mut splitter = LineSplitter::default();
    let mut chunk = vec![0_u8; READ_CHUNK_BYTES];
    let mut ready = Vec::new();
    let mut drain_budget: Option<DrainBudget> = None;
    loop {
        let read = match drain_budget.as_mut() {
            None => tokio::select! {
                biased;
                read = reader.read(&mut chunk) => read,
                // An error means the sender is gone, which only happens once the step
                // is over: drain then too.
                _ = drain.wait_for(|&started| started) => {
                    drain_budget = Some(DrainBudget::new());
                    continue;
                }
            },
            Some(budget) => match budget.read(&mut reader, &mut chunk).await {
                Some(read) => read,
                None => {
                    warn!(
                        ?stream,
                        "step output still open after its process group died; \
                         a process that left the group holds it, no longer reading"
                    );
                    break;
                }
            },
        };
        let n_read = match read {
            Ok(0) => break,
            Ok(n_read) => n_read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                warn!(?stream, cause = %err, "cannot read step output");
                break;
            }
        };
        splitter.push(&chunk[..n_read], &mut ready);
        for text in ready.drain(..) {
            forward(lines, stream, text).await;
        }
    }
    if let Some(text) = splitter.finish() {
        forward(lines, stream, text).await;
    }
}

/// Sends one line, waiting for room in the channel.
async fn forward(lines: &mpsc::Sender<OutputLine>, stream: Stream, text: String) {
    // A closed receiver only means nobody wants the output any more; the caller keeps
    // reading the pipes so that the script is not blocked on a full one.
    let _ = lines.send(OutputLine { stream, text }).await;
}

/// What a pipe may still cost once the step's group is dead.
struct DrainBudget {
    read_time_left: Duration,
    bytes_left: usize,
}

impl DrainBudget {
    fn new() -> Self {
        Self {
            read_time_left: DRAIN_READ_BUDGET,
            bytes_left: DRAIN_MAX_BYTES,
        }
    }

    /// Reads within the budget; `None` once it is spent.
    async fn read<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>> {
        if self.read_time_left.is_zero() || self.bytes_left == 0 {
            return None;
        }
        let started = Instant::now();
        let read = tokio::time::timeout(self.read_time_left, reader.read(buf))
            .await
            .ok();
        self.read_time_left = self.read_time_left.saturating_sub(started.elapsed());
        if let Some(Ok(n_read)) = read {
            self.bytes_left = self.bytes_left.saturating_sub(n_read);
        }
        read
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`] bytes: on `\n`, with a
/// trailing `\r` removed, and longer runs cut into pieces.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Consumes `data`, appending every completed line or piece to `out`.
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while !data.is_empty() {
            let room = MAX_LINE_BYTES - self.pending.len();
            // One byte past the room is examined so that a line of exactly
            // MAX_LINE_BYTES followed by its newline stays one line.
            let window = data.len().min(room + 1);
            if let Some(newline) = data[..window].iter().position(|&byte| byte == b'\n') {
                self.pending.extend_from_slice(&data[..newline]);
                data = &data[newline + 1..];
                out.push(self.take_line());
            } else if data.len() <= room {
                self.pending.extend_from_slice(data);
                data = &[];
            } else {
                self.pending.extend_from_slice(&data[..room]);
                data = &data[room..];
                out.push(self.take_piece());
            }
        }
    }

    /// The unterminated last line, if any, once the stream has ended.
    fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take_line())
    }

    fn take_line(&mut self) -> String {
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        line
    }

    /// Takes a full buffer as one piece of a long line. A multi-byte character at the
    /// cut is carried over to the next piece rather than decoded as two halves, which
    /// would turn it into replacement characters.
    fn take_piece(&mut self) -> String {
        let carry = self.pending.split_off(utf8_cut_point(&self.pending));
        let piece = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = carry;
        piece
    }
}

/// The length of the longest prefix of `bytes` that does not end inside a multi-byte
/// UTF-8 character; never 0 for a non-empty input.
fn utf8_cut_point(bytes: &[u8]) -> usize {
    // A UTF-8 character is at most 4 bytes, so its lead byte is within the last 3.
    for back in 1..=bytes.len().min(3) {
        let index = bytes.len() - back;
        let byte = bytes[index];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue;
        }
        let char_len = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if char_len > back && index > 0 {
            index
        } else {
            bytes.len()
        };
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;
    use std::path::Path;
    use std::time::Duration;

    /// Upper bound for a whole `run_step` call in a test; only there so that a bug shows
    /// up as a failure instead of a hung test run.
    const HANG_GUARD: Duration = Duration::from_secs(15);
    const EXECUTABLE: u32 = 0o755;
    const NOT_EXECUTABLE: u32 = 0o644;

    fn write_script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
        path
    }

    fn spec_for(dir: &Path, script: PathBuf) -> StepSpec {
        StepSpec {
            name: "install".to_owned(),
            script,
            cwd: dir.to_path_buf(),
            env: Vec::new(),
        }
    }

    struct Finished {
        outcome: StepOutcome,
        lines: Vec<OutputLine>,
        pgid: Option<u32>,
        elapsed: Duration,
    }

    impl Finished {
        fn texts(&self, stream: Stream) -> Vec<&str> {
            self.lines
                .iter()
                .filter(|line| line.stream == stream)
                .map(|line| line.text.as_str())
                .collect()
        }
    }

    /// Runs `spec`; once a line equal to `cancel_on_line` arrives (if given), cancels.
    async fn run(
        spec: &StepSpec,
        deadline_after: Duration,
        grace: Duration,
        cancel_on_line: Option<&'static str>,
    ) -> Finished {
        let (cancel_sender, cancel_receiver) = watch::channel(false);
        // A small channel, so that the tests also go through backpressure.
        let (line_sender, mut line_receiver) = mpsc::channel::<OutputLine>(8);
        let collector = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = line_receiver.recv().await {
                if cancel_on_line == Some(line.text.as_str()) {
                    cancel_sender.send_replace(true);
                }
                lines.push(line);
            }
            lines
        });
        let started = Instant::now();
        let mut pgid = None;
        let outcome = tokio::time::timeout(
            HANG_GUARD,
            run_step(
                spec,
                started + deadline_after,
                grace,
                line_sender,
                cancel_receiver,
                |pid| pgid = Some(pid),
            ),
        )
        .await
        .expect("run_step hung")
        .unwrap();
        let elapsed = started.elapsed();
        Finished {
            outcome,
            lines: collector.await.unwrap(),
            pgid,
            elapsed,
        }
    }

    async fn run_script(body: &str, mode: u32) -> (Finished, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let script = write_script(dir.path(), "step.sh", body, mode);
        let spec = spec_for(dir.path(), script);
        let finished = run(
            &spec,
            Duration::from_secs(10),
            Duration::from_millis(200),
            None,
        )
        .await;
        (finished, dir)
    }

    fn process_gone(pid: i32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        let result = unsafe { libc::kill(pid, 0) };
        result == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    fn group_gone(pgid: u32) -> bool {
        process_gone(-i32::try_from(pgid).unwrap())
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn stdout_and_stderr_lines_keep_order_and_stream() {
        let body = "echo out1\necho err1 >&2\necho out2\necho err2 >&2\n\
                    printf 'crlf\\r\\n'\nprintf 'unterminated'\n";
        let (finished, _dir) = run_script(body, NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        assert_eq!(
            finished.texts(Stream::Stdout),
            ["out1", "out2", "crlf", "unterminated"]
        );
        assert_eq!(finished.texts(Stream::Stderr), ["err1", "err2"]);
    }

    #[tokio::test]
    async fn exit_status_is_reported() {
        let (finished, _dir) = run_script("echo failing\nexit 1\n", NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(1));
        assert_eq!(finished.texts(Stream::Stdout), ["failing"]);
    }

    #[tokio::test]
    async fn death_by_foreign_signal_is_reported() {
        let (finished, _dir) = run_script("kill -KILL $$\n", NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Signaled(libc::SIGKILL));
    }

    #[tokio::test]
    async fn non_executable_script_runs_with_bin_sh() {
        // The file cannot be executed itself, so output proves it went through /bin/sh.
        let (finished, _dir) = run_script("echo \"ran as $0\"\n", NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        let lines = finished.texts(Stream::Stdout);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("ran as /"), "{lines:?}");
        assert!(lines[0].ends_with("step.sh"), "{lines:?}");
    }

    #[tokio::test]
    async fn executable_script_with_shebang_runs_directly() {
        // `-x` in the interpreter line makes sh trace commands to stderr; run as
        // `/bin/sh SCRIPT` instead, the line would only be a comment and trace nothing.
        let (finished, _dir) = run_script("#!/bin/sh -x\necho direct\n", EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        assert_eq!(finished.texts(Stream::Stdout), ["direct"]);
        assert_eq!(finished.texts(Stream::Stderr), ["+ echo direct"]);
    }

    #[tokio::test]
    async fn executable_script_without_shebang_falls_back_to_bin_sh() {
        let (finished, _dir) = run_script("echo fallback\nexit 3\n", EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(3));
        assert_eq!(finished.texts(Stream::Stdout), ["fallback"]);
    }

    #[tokio::test]
    async fn environment_and_working_directory_reach_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let body = "echo \"job=$KILN_JOB_ID\"\necho \"note=$KILN_NOTE\"\n\
                    echo \"path=${PATH:+inherited}\"\npwd -P\n";
        let script = write_script(dir.path(), "env.sh", body, NOT_EXECUTABLE);
        let mut spec = spec_for(dir.path(), script);
        spec.env = vec![
            ("KILN_JOB_ID".to_owned(), "42".to_owned()),
            ("KILN_NOTE".to_owned(), "two words".to_owned()),
        ];
        let finished = run(&spec, Duration::from_secs(10), Duration::ZERO, None).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            finished.texts(Stream::Stdout),
            [
                "job=42",
                "note=two words",
                "path=inherited",
                cwd.to_str().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn stdin_is_closed() {
        let body = "if read line; then echo \"stdin gave: $line\"; else echo stdin-eof; fi\n\
                    if [ /dev/stdin -ef /dev/null ]; then echo stdin-is-null; fi\n";
        let (finished, _dir) = run_script(body, NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        assert_eq!(
            finished.texts(Stream::Stdout),
            ["stdin-eof", "stdin-is-null"]
        );
    }

    #[tokio::test]
    async fn deadline_kills_the_group_including_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let body = "sleep 1000 &\necho $! > grandchild.pid\necho started\nwait\n";
        let script = write_script(dir.path(), "hang.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let finished = run(
            &spec,
            Duration::from_millis(400),
            Duration::from_millis(200),
            None,
        )
        .await;
        assert_eq!(finished.outcome, StepOutcome::TimedOut);
        assert_eq!(finished.texts(Stream::Stdout), ["started"]);
        assert!(group_gone(finished.pgid.unwrap()));
        assert!(process_gone(read_pid(&pid_file)));
    }

    #[tokio::test]
    async fn script_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        // The trap keeps the shell alive through SIGTERM and says so; only SIGKILL ends
        // it. The background subshell reports the SIGTERM too, which shows that the
        // signal went to the whole group and not only to the script.
        let body = "trap 'echo survived-sigterm' TERM\n\
                    ( trap 'echo grandchild-got-sigterm; exit 0' TERM; \
                    while :; do sleep 0.05; done ) &\n\
                    echo ready\nwhile :; do sleep 0.05; done\n";
        let script = write_script(dir.path(), "stubborn.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let finished = run(
            &spec,
            Duration::from_millis(500),
            Duration::from_millis(300),
            None,
        )
        .await;
        assert_eq!(finished.outcome, StepOutcome::TimedOut);
        let stdout = finished.texts(Stream::Stdout);
        assert_eq!(stdout.first(), Some(&"ready"));
        assert!(stdout.contains(&"survived-sigterm"), "{stdout:?}");
        assert!(stdout.contains(&"grandchild-got-sigterm"), "{stdout:?}");
        assert!(group_gone(finished.pgid.unwrap()));
    }

    #[tokio::test]
    async fn cancel_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let body = "sleep 1000 &\necho $! > grandchild.pid\necho started\nwait\n";
        let script = write_script(dir.path(), "hang.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let deadline_after = Duration::from_secs(10);
        let finished = run(
            &spec,
            deadline_after,
            Duration::from_millis(200),
            Some("started"),
        )
        .await;
        assert_eq!(finished.outcome, StepOutcome::Cancelled);
        assert!(finished.elapsed < deadline_after);
        assert!(group_gone(finished.pgid.unwrap()));
        assert!(process_gone(read_pid(&pid_file)));
    }

    #[tokio::test]
    async fn already_cancelled_step_is_not_started() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = write_script(dir.path(), "step.sh", "touch ran\n", NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let (_cancel_sender, cancel_receiver) = watch::channel(true);
        let (line_sender, _line_receiver) = mpsc::channel(1);
        let mut spawned = false;
        let outcome = run_step(
            &spec,
            Instant::now() + Duration::from_secs(10),
            Duration::ZERO,
            line_sender,
            cancel_receiver,
            |_| spawned = true,
        )
        .await
        .unwrap();
        assert_eq!(outcome, StepOutcome::Cancelled);
        assert!(!spawned);
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn step_past_its_deadline_is_not_started() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = write_script(dir.path(), "step.sh", "touch ran\n", NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let (line_sender, _line_receiver) = mpsc::channel(1);
        let mut spawned = false;
        let outcome = run_step(
            &spec,
            Instant::now(),
            Duration::ZERO,
            line_sender,
            cancel_receiver,
            |_| spawned = true,
        )
        .await
        .unwrap();
        assert_eq!(outcome, StepOutcome::TimedOut);
        assert!(!spawned);
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn dropping_the_step_future_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let body = "sleep 1000 &\necho $! > grandchild.pid\necho started\nwait\n";
        let script = write_script(dir.path(), "hang.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let (line_sender, mut line_receiver) = mpsc::channel(8);
        let mut pgid = None;
        {
            let step = run_step(
                &spec,
                Instant::now() + Duration::from_secs(10),
                Duration::ZERO,
                line_sender,
                cancel_receiver,
                |pid| pgid = Some(pid),
            );
            tokio::pin!(step);
            // Drive the step until the script has started its grandchild, then drop it.
            tokio::select! {
                outcome = &mut step => panic!("step ended early: {outcome:?}"),
                line = line_receiver.recv() => {
                    assert_eq!(line.map(|line| line.text), Some("started".to_owned()));
                }
            }
        }
        let pgid = pgid.unwrap();
        let grandchild = read_pid(&pid_file);
        // The members die at once, but orphans only vanish once init reaps them.
        let give_up_at = Instant::now() + HANG_GUARD;
        while !(group_gone(pgid) && process_gone(grandchild)) {
            assert!(Instant::now() < give_up_at, "group {pgid} still present");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn background_process_left_behind_is_killed_when_script_exits() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("leftover.pid");
        // The background sleep inherits stdout, so it would also hold the pipe open.
        let body = "sleep 1000 &\necho $! > leftover.pid\necho bye\nexit 0\n";
        let script = write_script(dir.path(), "leaves.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let finished = run(&spec, Duration::from_secs(10), Duration::ZERO, None).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        assert_eq!(finished.texts(Stream::Stdout), ["bye"]);
        assert!(process_gone(read_pid(&pid_file)));
        assert!(group_gone(finished.pgid.unwrap()));
    }

    #[tokio::test]
    async fn escaped_grandchild_holding_stdout_does_not_hang_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("escaped.pid");
        // The escaped process writes its own pid, as setsid may or may not fork; the
        // script waits for it so that the process has left the group before the script
        // exits and the group is killed.
        let body = "setsid sh -c 'echo $$ > escaped.tmp; mv escaped.tmp escaped.pid; \
                    exec sleep 30' &\n\
                    while [ ! -e escaped.pid ]; do sleep 0.01; done\necho done\n";
        let script = write_script(dir.path(), "escape.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let finished = run(&spec, Duration::from_secs(10), Duration::ZERO, None).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        assert_eq!(finished.texts(Stream::Stdout), ["done"]);

        let escaped_pid = read_pid(&pid_file);
        // Alive: it really escaped the group kill, so the pipe really stayed open.
        let still_alive = !process_gone(escaped_pid);
        // SAFETY: plain kill of the process this test started.
        unsafe { libc::kill(escaped_pid, libc::SIGKILL) };
        assert!(still_alive);
    }

    #[tokio::test]
    async fn output_without_newlines_is_cut_into_bounded_lines() {
        let body = "head -c 1048576 /dev/zero | tr '\\0' x\n";
        let (finished, _dir) = run_script(body, NOT_EXECUTABLE).await;
        assert_eq!(finished.outcome, StepOutcome::Exited(0));
        let lines = finished.texts(Stream::Stdout);
        assert!(lines.iter().all(|line| line.len() <= MAX_LINE_BYTES));
        assert!(lines
            .iter()
            .all(|line| line.bytes().all(|byte| byte == b'x')));
        assert_eq!(lines.iter().map(|line| line.len()).sum::<usize>(), 1 << 20);
        assert_eq!(lines.len(), (1 << 20) / MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn output_is_drained_when_the_receiver_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        // Far more than a pipe holds: the script finishes only if we keep reading.
        let body = "head -c 4194304 /dev/zero | tr '\\0' '\\n'\necho finished >&2\n";
        let script = write_script(dir.path(), "flood.sh", body, NOT_EXECUTABLE);
        let spec = spec_for(dir.path(), script);
        let (line_sender, line_receiver) = mpsc::channel(1);
        drop(line_receiver);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let outcome = tokio::time::timeout(
            HANG_GUARD,
            run_step(
                &spec,
                Instant::now() + Duration::from_secs(10),
                Duration::ZERO,
                line_sender,
                cancel_receiver,
                |_| {},
            ),
        )
        .await
        .expect("run_step hung")
        .unwrap();
        assert_eq!(outcome, StepOutcome::Exited(0));
    }

    #[tokio::test]
    async fn relative_script_path_is_refused() {
        let spec = StepSpec {
            name: "image".to_owned(),
            script: PathBuf::from("image.sh"),
            cwd: PathBuf::from("."),
            env: Vec::new(),
        };
        let (line_sender, _line_receiver) = mpsc::channel(1);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let err = run_step(
            &spec,
            Instant::now() + Duration::from_secs(10),
            Duration::ZERO,
            line_sender,
            cancel_receiver,
            |_| {},
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let inner = err.get_ref().unwrap().downcast_ref::<RunStepError>();
        assert!(matches!(inner, Some(RunStepError::RelativeScript { .. })));
    }

    #[tokio::test]
    async fn missing_script_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_for(dir.path(), dir.path().join("absent.sh"));
        let (line_sender, _line_receiver) = mpsc::channel(1);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let err = run_step(
            &spec,
            Instant::now() + Duration::from_secs(10),
            Duration::ZERO,
            line_sender,
            cancel_receiver,
            |_| {},
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("absent.sh"), "{err}");
    }

    #[test]
    fn kill_process_group_refuses_ids_that_are_not_our_groups() {
        for pgid in [0, 1, u32::MAX] {
            let err = kill_process_group(pgid, 0).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "pgid {pgid}");
        }
    }

    #[test]
    fn kill_process_group_accepts_a_group_that_is_gone() {
        // Above any pid_max Linux allows, so no such group can exist.
        let absent_pgid = u32::try_from(i32::MAX).unwrap();
        assert!(group_gone(absent_pgid));
        kill_process_group(absent_pgid, libc::SIGKILL).unwrap();
    }

    #[test]
    fn run_step_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let spec = spec_for(Path::new("/"), PathBuf::from("/step.sh"));
        let (line_sender, _line_receiver) = mpsc::channel(1);
        let (_cancel_sender, cancel_receiver) = watch::channel(false);
        let future = run_step(
            &spec,
            Instant::now(),
            Duration::ZERO,
            line_sender,
            cancel_receiver,
            |_| {},
        );
        assert_send(&future);
    }

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        out.extend(splitter.finish());
        out
    }

    #[test]
    fn splitter_joins_lines_across_chunks_and_strips_carriage_returns() {
        assert_eq!(
            split(&[b"ab", b"c\r\nde", b"f\n\ng\r"]),
            ["abc", "def", "", "g"]
        );
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn splitter_keeps_a_line_of_exactly_the_maximum_whole() {
        let line = vec![b'a'; MAX_LINE_BYTES];
        let lines = split(&[&line, b"\nnext\n"]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn splitter_does_not_cut_a_character_in_two() {
        // "é" is two bytes; placed so that it straddles the cut.
        let mut data = vec![b'a'; MAX_LINE_BYTES - 1];
        data.extend_from_slice("é".as_bytes());
        data.extend_from_slice(b"z\n");
        let lines = split(&[&data]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES - 1);
        assert_eq!(lines[1], "éz");
        assert!(lines.iter().all(|line| !line.contains('\u{FFFD}')));
    }
}
