//! Small builds for a test: [`Job`] and [`write_build`] (manifest and scripts), gates
//! a step waits on, pid files scripts write, and reading jobs and events as JSON.

use super::*;

/// One job of a build written by [`write_build`].
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub config_type: String,
    /// The install script's text (run with /bin/sh).
    pub install: String,
    /// The image script's text; the default leaves one small image.
    pub image: String,
    pub timeout_secs: u64,
    pub priority: Option<i64>,
    pub assigned_to: Option<String>,
    pub accept_within_secs: Option<u64>,
    /// MAXATTEMPTS: lost runs the job survives.
    pub max_attempts: Option<u32>,
    /// RETRIES: script failures queued again.
    pub retries: Option<u32>,
    /// The verify script's text (VERIFYSCRIPT), if the job has one.
    pub verify: Option<String>,
}

/// An image script that leaves `$KILN_OUTPUT/$KILN_JOB_ID.img` naming where it was made.
pub const DEFAULT_IMAGE_SCRIPT: &str = "printf 'build=%s job=%s type=%s client=%s\\n' \
     \"$KILN_BUILD\" \"$KILN_JOB_ID\" \"$KILN_CONFIG_TYPE\" \"$KILN_CLIENT_ID\" \
     > \"$KILN_OUTPUT/$KILN_JOB_ID.img\"\n";

impl Job {
    /// A quick job: install does nothing, image leaves one small file.
    pub fn new(id: &str, config_type: &str) -> Self {
        Job {
            id: id.to_owned(),
            config_type: config_type.to_owned(),
            install: "true\n".to_owned(),
            image: DEFAULT_IMAGE_SCRIPT.to_owned(),
            timeout_secs: 60,
            priority: None,
            assigned_to: None,
            accept_within_secs: None,
            max_attempts: None,
            retries: None,
            verify: None,
        }
    }

    pub fn install(mut self, script: &str) -> Self {
        self.install = script.to_owned();
        self
    }

    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }

    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = Some(priority);
        self
    }

    pub fn assigned_to(mut self, client_id: &str) -> Self {
        self.assigned_to = Some(client_id.to_owned());
        self
    }

    pub fn image(mut self, script: &str) -> Self {
        self.image = script.to_owned();
        self
    }

    pub fn accept_within(mut self, secs: u64) -> Self {
        self.accept_within_secs = Some(secs);
        self
    }

    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    pub fn verify(mut self, script: &str) -> Self {
        self.verify = Some(script.to_owned());
        self
    }
}

/// Writes a build into `dir`: `relbuild.xml` and `scripts/ID-install.sh`,
/// `scripts/ID-image.sh` (and `scripts/ID-verify.sh` for a job with a verify step) per
/// job; returns the manifest's path.
pub fn write_build(dir: &Path, number: &str, jobs: &[Job]) -> PathBuf {
    write_build_notifying(dir, number, &[], jobs)
}

/// As [`write_build`], with one `<NOTIFY>URL</NOTIFY>` per entry of `notify`.
pub fn write_build_notifying(dir: &Path, number: &str, notify: &[&str], jobs: &[Job]) -> PathBuf {
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts).expect("creating the build's directory");
    let mut xml = format!(
        "<SERVER>\n  <BUILDNUMBER>{number}</BUILDNUMBER>\n  <TITLE>Test build {number}</TITLE>\n"
    );
    for url in notify {
        let _ = writeln!(xml, "  <NOTIFY>{url}</NOTIFY>");
    }
    xml.push_str("  <JOBS>\n");
    for job in jobs {
        let install = format!("scripts/{}-install.sh", job.id);
        let image = format!("scripts/{}-image.sh", job.id);
        std::fs::write(dir.join(&install), &job.install).expect("writing a script");
        std::fs::write(dir.join(&image), &job.image).expect("writing a script");
        let _ = write!(
            xml,
            "    <JOB ID=\"{id}\">\n      <TITLE>Job {id}</TITLE>\n      <CONFIGTYPE>{config}</CONFIGTYPE>\n      <INSTALLSCRIPT>{install}</INSTALLSCRIPT>\n      <IMAGESCRIPT>{image}</IMAGESCRIPT>\n      <TIMEOUT>{timeout}</TIMEOUT>\n",
            id = job.id,
            config = job.config_type,
            timeout = job.timeout_secs,
        );
        if let Some(priority) = job.priority {
            let _ = writeln!(xml, "      <PRIORITY>{priority}</PRIORITY>");
        }
        if let Some(client) = &job.assigned_to {
            let _ = writeln!(xml, "      <ASSIGNEDTO>{client}</ASSIGNEDTO>");
        }
        if let Some(secs) = job.accept_within_secs {
            let _ = writeln!(xml, "      <ACCEPTWITHIN>{secs}</ACCEPTWITHIN>");
        }
        if let Some(attempts) = job.max_attempts {
            let _ = writeln!(xml, "      <MAXATTEMPTS>{attempts}</MAXATTEMPTS>");
        }
        if let Some(retries) = job.retries {
            let _ = writeln!(xml, "      <RETRIES>{retries}</RETRIES>");
        }
        if let Some(verify_text) = &job.verify {
            let verify = format!("scripts/{}-verify.sh", job.id);
            std::fs::write(dir.join(&verify), verify_text).expect("writing a script");
            let _ = writeln!(xml, "      <VERIFYSCRIPT>{verify}</VERIFYSCRIPT>");
        }
        xml.push_str("    </JOB>\n");
    }
    xml.push_str("  </JOBS>\n</SERVER>\n");
    let manifest = dir.join("relbuild.xml");
    std::fs::write(&manifest, xml).expect("writing relbuild.xml");
    manifest
}

/// Shell text that waits until the file `gate` exists (for at most 60 s), so that a
/// step stays running until the test lets it go.
pub fn wait_for_gate(gate: &Path) -> String {
    format!(
        "i=0\nwhile [ ! -e '{gate}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n",
        gate = gate.display()
    )
}

/// Reads a pid that a script wrote (a number and a newline) into `path`, waiting for
/// the file to be complete.
pub fn read_pid_file(log_dir: &Path, path: &Path) -> i32 {
    wait_until(
        log_dir,
        &format!("a script to write its pid to {}", path.display()),
        || {
            let text = std::fs::read_to_string(path).ok()?;
            text.strip_suffix('\n')?.trim().parse().ok()
        },
        || format!("{:?}", std::fs::read_to_string(path)),
    )
}

/// Waits until no process has this pid (`kill(pid, 0)` fails with ESRCH). Reaping an
/// orphan is up to init and may lag a little behind the kill.
pub fn wait_until_gone(log_dir: &Path, what: &str, pid: i32) {
    wait_until(
        log_dir,
        &format!("{what} (pid {pid}) to be gone"),
        || (!process_exists(pid)).then_some(()),
        || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
            format!("kill({pid}, 0) succeeds; /proc/{pid}/status: {status:?}")
        },
    );
}

/// SIGKILLs, when dropped, the processes whose pids scripts wrote into these files
/// (if they still run a shell or `sleep`), so that a failing test leaves none behind.
pub struct PidFilesGuard(pub Vec<PathBuf>);

impl Drop for PidFilesGuard {
    fn drop(&mut self) {
        for path in &self.0 {
            let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<i32>().ok())
                .filter(|pid| *pid > 1)
            else {
                continue;
            };
            // Only a process that is still one of ours, not one that reused the pid.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("sleep") || cmdline.contains("/bin/sh") || cmdline.contains(".sh") {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A job's field as text, or "" when absent.
pub fn text<'a>(job: &'a Value, field: &str) -> &'a str {
    job[field].as_str().unwrap_or("")
}

/// A job's events (in log order) from a build's event log.
pub fn events_of<'a>(events: &'a [Value], job: &str) -> Vec<&'a Value> {
    events.iter().filter(|event| event["job"] == job).collect()
}

/// A job's first requeue (`running` to `queued`) in a build's event log; panics with
/// the log when there is none.
pub fn first_requeue<'a>(events: &'a [Value], job: &str) -> &'a Value {
    events_of(events, job)
        .into_iter()
        .find(|event| event["from"] == "running" && event["to"] == "queued")
        .unwrap_or_else(|| panic!("no requeue of {job} in the event log: {events:#?}"))
}
