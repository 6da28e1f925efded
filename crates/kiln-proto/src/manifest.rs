//! Build manifests: the seed's `relbuild.xml` and the same content as `kiln.toml`.
//!
//! [`BuildManifest`] is what a submission describes: the build's number, title and time,
//! who to notify, and its [`JobSpec`]s. Both formats parse into it, and
//! [`BuildManifest::to_relbuild_xml`] writes it back in the seed's schema.
//!
//! The parsers are strict because users write these files by hand: an unknown element
//! or key, a missing required one, a number that is not one, or a name that could
//! escape its directory is refused with the file, line and column ([`FormatError`]).
//! [`BuildManifest::validate`] holds the rules on names and paths for manifests that
//! arrive by other ways (e.g. as JSON).

use std::collections::HashMap;
use std::fmt::Write as _;

use roxmltree::{Document, Node};
use serde::{Deserialize, Serialize};
use toml::{Spanned, Value};

use crate::error::{quote_found, FormatError, IntegerSpec, TomlReader};
use crate::status_xml::{
    escape_attribute, looks_like_xml, push_text_element, strip_bom, XmlReader,
};

/// A build as submitted: the seed's SERVER element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildManifest {
    /// BUILDNUMBER: unique per server; names the build everywhere.
    pub number: String,
    /// TITLE of the build.
    pub title: String,
    /// BUILDTIME as written in the manifest (the seed writes `20021016:18:00:00`).
    pub build_time: Option<String>,
    /// LOGFILE named by the manifest (kept for the seed's format; kiln's log is the event log).
    pub log_file: Option<String>,
    /// URLs told about expired, failed and finished jobs (`<NOTIFY>` under SERVER).
    pub notify: Vec<String>,
    /// The jobs, in the order the manifest lists them.
    pub jobs: Vec<JobSpec>,
}

/// One imaging job: the seed's JOB element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The JOB's ID attribute, unique within its build.
    pub id: String,
    /// TITLE of the job.
    pub title: String,
    /// CONFIGTYPE: which clients may take it (their CONFIGINCLUDE list).
    pub config_type: String,
    /// INSTALLSCRIPT: a path relative to the build's files.
    pub install_script: String,
    /// CONFIGURESCRIPT (optional): runs between install and image.
    pub configure_script: Option<String>,
    /// IMAGESCRIPT: a path relative to the build's files.
    pub image_script: String,
    /// VERIFYSCRIPT (optional): runs after image and checks its result (boots it, say);
    /// if it fails, the job fails.
    #[serde(default)]
    pub verify_script: Option<String>,
    /// TIMEOUT in seconds, covering all steps of one attempt.
    pub timeout_secs: u64,
    /// PRIORITY: higher runs first. `None` means "by position": earlier in the file first.
    pub priority: Option<i64>,
    /// ACCEPTWITHIN in seconds: the job expires if no client claims it in that time.
    pub accept_within_secs: Option<u64>,
    /// ASSIGNEDTO: the only client id that may take the job.
    pub assigned_to: Option<String>,
    /// MAXATTEMPTS: the job fails with `lost` once this many of its runs were lost (lease
    /// lapsed, client gone, run given back); script failures do not count.
    pub max_attempts: Option<u32>,
    /// RETRIES: how many times a script failure is retried.
    pub retries: Option<u32>,
}

/// The longest TIMEOUT or ACCEPTWITHIN a manifest may give, in seconds: 365 days.
///
/// Longer values are surely mistakes, and a bound keeps deadline arithmetic far from
/// overflow.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 60 * 60;

/// The longest build number, job id or client id, in characters.
const MAX_NAME_CHARS: usize = 128;

/// The longest script path, in bytes.
const MAX_SCRIPT_PATH_BYTES: usize = 1024;

/// The elements the seed's SERVER may hold, with kiln's NOTIFY.
const SERVER_CHILDREN: &[&str] = &[
    "BUILDTIME",
    "BUILDNUMBER",
    "LOGFILE",
    "TITLE",
    "NOTIFY",
    "JOBS",
];

/// The elements the seed's JOB may hold, with kiln's extensions.
const JOB_CHILDREN: &[&str] = &[
    "TITLE",
    "CONFIGTYPE",
    "INSTALLSCRIPT",
    "CONFIGURESCRIPT",
    "IMAGESCRIPT",
    "VERIFYSCRIPT",
    "TIMEOUT",
    "PRIORITY",
    "ACCEPTWITHIN",
    "ASSIGNEDTO",
    "MAXATTEMPTS",
    "RETRIES",
];

const TIMEOUT_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of seconds",
    min: 1,
    max: MAX_DURATION_SECS as i128,
};

const PRIORITY_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer",
    min: i64::MIN as i128,
    max: i64::MAX as i128,
};

const MAX_ATTEMPTS_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of attempts",
    min: 1,
    max: u32::MAX as i128,
};

const RETRIES_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of retries",
    min: 0,
    max: u32::MAX as i128,
};

impl BuildManifest {
    /// Parses the seed's `relbuild.xml`: a SERVER element with BUILDTIME, BUILDNUMBER,
    /// LOGFILE, TITLE, NOTIFY (any number) and JOBS of JOBs.
    ///
    /// `file` is the name errors carry. Script paths written with `\` are normalised
    /// to `/`. Every rule of [`BuildManifest::validate`] is checked at the element that
    /// breaks it.
    pub fn from_relbuild_xml(file: &str, text: &str) -> Result<Self, FormatError> {
        let text = strip_bom(text);
        let doc = Document::parse(text).map_err(|err| FormatError::from_xml(file, text, &err))?;
        let xml = XmlReader::new(file, &doc);
        let server = xml.root("SERVER", &[])?;

        let mut build_time_node = None;
        let mut number_node = None;
        let mut log_file_node = None;
        let mut title_node = None;
        let mut jobs_node = None;
        let mut notify = Vec::new();
        for child in xml.child_elements(server, SERVER_CHILDREN)? {
            xml.check_attributes(child, &[])?;
            match child.tag_name().name() {
                "BUILDTIME" => xml.set_once(&mut build_time_node, child)?,
                "BUILDNUMBER" => xml.set_once(&mut number_node, child)?,
                "LOGFILE" => xml.set_once(&mut log_file_node, child)?,
                "TITLE" => xml.set_once(&mut title_node, child)?,
                "JOBS" => xml.set_once(&mut jobs_node, child)?,
                _ => {
                    // NOTIFY; an empty one is a placeholder, as in the seed's schema.
                    if let Some(url) = xml.optional_text(Some(child))? {
                        check_notify_url(&url, "<NOTIFY>").map_err(|m| xml.error_at(child, m))?;
                        notify.push(url);
                    }
                }
            }
        }

        let (number, number_node) =
            xml.required_text(server, number_node, "BUILDNUMBER", "a build number")?;
        check_name(&number, "a build number", "<BUILDNUMBER>")
            .map_err(|m| xml.error_at(number_node, m))?;
        let build_time = optional_plain_text(&xml, build_time_node)?;
        let log_file = optional_plain_text(&xml, log_file_node)?;
        let title =
            optional_plain_text(&xml, title_node)?.unwrap_or_else(|| format!("Build {number}"));

        let Some(jobs_node) = jobs_node else {
            return Err(xml.error_at(
                server,
                "missing <JOBS> in <SERVER>; expected at least one <JOB>",
            ));
        };
        let mut jobs = Vec::new();
        let mut seen_ids = SeenIds::default();
        for job_node in xml.child_elements(jobs_node, &["JOB"])? {
            let job = job_from_xml(&xml, job_node)?;
            seen_ids
                .insert(&job.id, job_node.range().start, |offset| {
                    let pos = doc.text_pos_at(offset);
                    (pos.row, pos.col)
                })
                .map_err(|m| xml.error_at(job_node, m))?;
            jobs.push(job);
        }
        if jobs.is_empty() {
            return Err(xml.error_at(
                jobs_node,
                "expected at least one <JOB> in <JOBS>, found none",
            ));
        }

        let manifest = BuildManifest {
            number,
            title,
            build_time,
            log_file,
            notify,
            jobs,
        };
        // Each rule was checked above where its element is; this guards against the
        // two sets of checks drifting apart.
        manifest.validate().map_err(|m| xml.error_at(server, m))?;
        Ok(manifest)
    }

    /// Parses `kiln.toml`: top-level `number`, `title`, `build_time`, `log_file`,
    /// `notify`, and one `[[job]]` table per job.
    ///
    /// `file` is the name errors carry. Unknown keys are refused; every rule of
    /// [`BuildManifest::validate`] is checked at the value that breaks it.
    pub fn from_toml(file: &str, text: &str) -> Result<Self, FormatError> {
        let text = strip_bom(text);
        let reader = TomlReader::new(file, text);
        let raw: RawManifest = reader.deserialize()?;

        let number = reader.string_or_integer(&raw.number, "number", "a build number")?;
        check_name(&number, "a build number", "`number`")
            .map_err(|m| reader.error_at(raw.number.span(), m))?;
        let title = optional_toml_text(&reader, raw.title.as_ref(), "title")?
            .unwrap_or_else(|| format!("Build {number}"));
        let build_time = match &raw.build_time {
            Some(value) => match value.get_ref() {
                Value::String(text) => non_empty(text),
                Value::Datetime(datetime) => Some(datetime.to_string()),
                other => {
                    return Err(reader.error_at(
                        value.span(),
                        format!(
                        "expected a build time (a string or a date-time) in `build_time`, found {}",
                        crate::error::describe_toml_value(other)
                    ),
                    ))
                }
            },
            None => None,
        };
        if let (Some(build_time), Some(value)) = (&build_time, &raw.build_time) {
            check_plain_text(build_time, "`build_time`")
                .map_err(|m| reader.error_at(value.span(), m))?;
        }
        let log_file = optional_toml_text(&reader, raw.log_file.as_ref(), "log_file")?;
        let mut notify = Vec::new();
        for url in &raw.notify {
            if let Some(trimmed) = non_empty(url.get_ref()) {
                check_notify_url(&trimmed, "`notify`")
                    .map_err(|m| reader.error_at(url.span(), m))?;
                notify.push(trimmed);
            }
        }

        if raw.job.is_empty() {
            return Err(reader.error_at(0..0, "expected at least one [[job]] table, found none"));
        }
        let mut jobs = Vec::new();
        let mut seen_ids = SeenIds::default();
        for raw_job in &raw.job {
            let job = job_from_toml(&reader, raw_job.get_ref())?;
            seen_ids
                .insert(&job.id, raw_job.span().start, |offset| {
                    crate::error::line_col(text, offset)
                })
                .map_err(|m| reader.error_at(raw_job.get_ref().id.span(), m))?;
            jobs.push(job);
        }

        let manifest = BuildManifest {
            number,
            title,
            build_time,
            log_file,
            notify,
            jobs,
        };
        // Each rule was checked above where its value is; this guards against the two
        // sets of checks drifting apart.
        manifest.validate().map_err(|m| reader.error_at(0..0, m))?;
        Ok(manifest)
    }

    /// Parses a manifest in either format: by the extension of `file` (`.xml` or
    /// `.toml`), else XML when the text starts with `<` (after a byte order mark and
    /// whitespace), else TOML.
    pub fn parse(file: &str, text: &str) -> Result<Self, FormatError> {
        if looks_like_xml(file, text) {
            BuildManifest::from_relbuild_xml(file, text)
        } else {
            BuildManifest::from_toml(file, text)
        }
    }

    /// Writes the manifest as the seed's `relbuild.xml`, indented by two spaces as the
    /// seed's example is, with kiln's extension elements only where they are set.
    ///
    /// [`BuildManifest::from_relbuild_xml`] reads the result back into an equal
    /// manifest, for every manifest the parsers produce.
    pub fn to_relbuild_xml(&self) -> String {
        let mut out = String::from("<SERVER>\n");
        push_text_element(&mut out, 1, "BUILDTIME", self.build_time.as_deref());
        push_text_element(&mut out, 1, "BUILDNUMBER", Some(&self.number));
        push_text_element(&mut out, 1, "LOGFILE", self.log_file.as_deref());
        push_text_element(&mut out, 1, "TITLE", Some(&self.title));
        for url in &self.notify {
            push_text_element(&mut out, 1, "NOTIFY", Some(url));
        }
        out.push_str("  <JOBS>\n");
        for job in &self.jobs {
            // Writing into a String cannot fail.
            let _ = writeln!(out, "    <JOB ID=\"{}\">", escape_attribute(&job.id));
            push_text_element(&mut out, 3, "TITLE", Some(&job.title));
            push_text_element(&mut out, 3, "CONFIGTYPE", Some(&job.config_type));
            push_text_element(&mut out, 3, "INSTALLSCRIPT", Some(&job.install_script));
            if let Some(configure_script) = &job.configure_script {
                push_text_element(&mut out, 3, "CONFIGURESCRIPT", Some(configure_script));
            }
            push_text_element(&mut out, 3, "IMAGESCRIPT", Some(&job.image_script));
            if let Some(verify_script) = &job.verify_script {
                push_text_element(&mut out, 3, "VERIFYSCRIPT", Some(verify_script));
            }
            push_text_element(&mut out, 3, "TIMEOUT", Some(&job.timeout_secs.to_string()));
            let optional_numbers = [
                (
                    "PRIORITY",
                    job.priority.map(|priority| priority.to_string()),
                ),
                (
                    "ACCEPTWITHIN",
                    job.accept_within_secs.map(|secs| secs.to_string()),
                ),
            ];
            for (name, value) in &optional_numbers {
                if let Some(value) = value {
                    push_text_element(&mut out, 3, name, Some(value));
                }
            }
            if let Some(assigned_to) = &job.assigned_to {
                push_text_element(&mut out, 3, "ASSIGNEDTO", Some(assigned_to));
            }
            let optional_counts = [("MAXATTEMPTS", job.max_attempts), ("RETRIES", job.retries)];
            for (name, value) in optional_counts {
                if let Some(value) = value {
                    push_text_element(&mut out, 3, name, Some(&value.to_string()));
                }
            }
            out.push_str("    </JOB>\n");
        }
        out.push_str("  </JOBS>\n</SERVER>\n");
        out
    }

    /// Checks the rules every manifest must keep, whichever way it arrived.
    ///
    /// The build number and job ids (and ASSIGNEDTO) are names of 1 to 128 letters,
    /// digits, `.`, `_` or `-` starting with a letter or digit; job ids are unique,
    /// ignoring letter case; script paths are relative, with `/` or `\` separators and
    /// no empty or `..` component; config types are non-empty with no whitespace or
    /// separators; timeouts are from 1 second to [`MAX_DURATION_SECS`]; there is at
    /// least one job. The error says what was wrong, and where in the manifest.
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.number, "a build number", "the build number")?;
        check_plain_text(&self.title, "the build title")?;
        if let Some(build_time) = &self.build_time {
            check_plain_text(build_time, "the build time")?;
        }
        if let Some(log_file) = &self.log_file {
            check_plain_text(log_file, "the log file")?;
        }
        for url in &self.notify {
            check_notify_url(url, "a notify url")?;
        }
        if self.jobs.is_empty() {
            return Err("expected at least one job in the build, found none".to_owned());
        }
        let mut seen_ids: HashMap<String, &str> = HashMap::new();
        for job in &self.jobs {
            check_name(&job.id, "a job id", "a job id")?;
            if let Some(first) = seen_ids.insert(job.id.to_ascii_lowercase(), &job.id) {
                return Err(if first == job.id {
                    format!("duplicate job id {}", quote_found(&job.id))
                } else {
                    format!(
                        "job id {} differs only in letter case from job id {}",
                        quote_found(&job.id),
                        quote_found(first)
                    )
                });
            }
            job.validate()?;
        }
        Ok(())
    }
}

impl JobSpec {
    /// Checks one job's fields (not its id's uniqueness, which is the build's).
    fn validate(&self) -> Result<(), String> {
        let of_job = |key: &str| format!("`{key}` of job {}", quote_found(&self.id));
        check_plain_text(&self.title, &of_job("title"))?;
        check_config_type(&self.config_type, false, &of_job("config_type"))?;
        check_script_path(&self.install_script, &of_job("install_script"))?;
        if let Some(configure_script) = &self.configure_script {
            check_script_path(configure_script, &of_job("configure_script"))?;
        }
        check_script_path(&self.image_script, &of_job("image_script"))?;
        if let Some(verify_script) = &self.verify_script {
            check_script_path(verify_script, &of_job("verify"))?;
        }
        let timeout = self.timeout_secs;
        TIMEOUT_SPEC.check::<u64>(
            i128::from(timeout),
            &of_job("timeout"),
            &timeout.to_string(),
        )?;
        if let Some(accept_within) = self.accept_within_secs {
            TIMEOUT_SPEC.check::<u64>(
                i128::from(accept_within),
                &of_job("accept_within"),
                &accept_within.to_string(),
            )?;
        }
        if let Some(assigned_to) = &self.assigned_to {
            check_name(assigned_to, "a client id", &of_job("assigned_to"))?;
        }
        if let Some(max_attempts) = self.max_attempts {
            MAX_ATTEMPTS_SPEC.check::<u32>(
                i128::from(max_attempts),
                &of_job("max_attempts"),
                &max_attempts.to_string(),
            )?;
        }
        Ok(())
    }
}

/// Reads one JOB element.
fn job_from_xml(xml: &XmlReader, job: Node) -> Result<JobSpec, FormatError> {
    xml.check_attributes(job, &["ID"])?;
    let Some(id) = job.attribute("ID") else {
        return Err(xml.error_at(job, "missing the ID attribute of <JOB>; expected a job id"));
    };
    let id = id.trim().to_owned();
    check_name(&id, "a job id", "the ID of <JOB>").map_err(|m| xml.error_at(job, m))?;

    let mut slots: HashMap<&str, Node> = HashMap::new();
    for child in xml.child_elements(job, JOB_CHILDREN)? {
        xml.check_attributes(child, &[])?;
        let mut slot = slots.get(child.tag_name().name()).copied();
        xml.set_once(&mut slot, child)?;
        slots.insert(child.tag_name().name(), child);
    }
    let slot = |name: &str| slots.get(name).copied();

    let title = optional_plain_text(xml, slot("TITLE"))?.unwrap_or_else(|| id.clone());
    let (config_type, node) =
        xml.required_text(job, slot("CONFIGTYPE"), "CONFIGTYPE", "a config type")?;
    check_config_type(&config_type, false, "<CONFIGTYPE>").map_err(|m| xml.error_at(node, m))?;
    let install_script = required_script(xml, job, slot("INSTALLSCRIPT"), "INSTALLSCRIPT")?;
    let configure_script = optional_script(xml, slot("CONFIGURESCRIPT"))?;
    let image_script = required_script(xml, job, slot("IMAGESCRIPT"), "IMAGESCRIPT")?;
    let verify_script = optional_script(xml, slot("VERIFYSCRIPT"))?;
    let (timeout, node) = xml.required_text(
        job,
        slot("TIMEOUT"),
        "TIMEOUT",
        "an integer number of seconds",
    )?;
    let timeout_secs = TIMEOUT_SPEC
        .parse(&timeout, "<TIMEOUT>")
        .map_err(|m| xml.error_at(node, m))?;
    let priority = xml.optional_integer(slot("PRIORITY"), &PRIORITY_SPEC)?;
    let accept_within_secs = xml.optional_integer(slot("ACCEPTWITHIN"), &TIMEOUT_SPEC)?;
    let assigned_to = match slot("ASSIGNEDTO") {
        Some(node) => {
            let assigned_to = xml.optional_text(Some(node))?;
            if let Some(assigned_to) = &assigned_to {
                check_name(assigned_to, "a client id", "<ASSIGNEDTO>")
                    .map_err(|m| xml.error_at(node, m))?;
            }
            assigned_to
        }
        None => None,
    };
    let max_attempts = xml.optional_integer(slot("MAXATTEMPTS"), &MAX_ATTEMPTS_SPEC)?;
    let retries = xml.optional_integer(slot("RETRIES"), &RETRIES_SPEC)?;

    Ok(JobSpec {
        id,
        title,
        config_type,
        install_script,
        configure_script,
        image_script,
        verify_script,
        timeout_secs,
        priority,
        accept_within_secs,
        assigned_to,
        max_attempts,
        retries,
    })
}

/// The text of an optional element that holds free text: `None` when absent or empty.
fn optional_plain_text(xml: &XmlReader, node: Option<Node>) -> Result<Option<String>, FormatError> {
    let Some(node) = node else {
        return Ok(None);
    };
    let text = xml.optional_text(Some(node))?;
    if let Some(text) = &text {
        let label = format!("<{}>", node.tag_name().name());
        check_plain_text(text, &label).map_err(|m| xml.error_at(node, m))?;
    }
    Ok(text)
}

/// A required script element's path, normalised and checked.
fn required_script(
    xml: &XmlReader,
    job: Node,
    node: Option<Node>,
    name: &str,
) -> Result<String, FormatError> {
    let (path, node) = xml.required_text(job, node, name, "a script path")?;
    checked_script(xml, node, path)
}

/// An optional script element's path, normalised and checked: `None` when the element
/// is absent or empty.
fn optional_script(xml: &XmlReader, node: Option<Node>) -> Result<Option<String>, FormatError> {
    let Some(node) = node else {
        return Ok(None);
    };
    match xml.optional_text(Some(node))? {
        Some(path) => Ok(Some(checked_script(xml, node, path)?)),
        None => Ok(None),
    }
}

/// `path`, read from the script element `node`, checked as written, then normalised.
fn checked_script(xml: &XmlReader, node: Node, path: String) -> Result<String, FormatError> {
    let label = format!("<{}>", node.tag_name().name());
    check_script_path(&path, &label).map_err(|m| xml.error_at(node, m))?;
    Ok(normalise_script_path(&path))
}

/// `kiln.toml` as written: every key, with its place in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    number: Spanned<Value>,
    title: Option<Spanned<String>>,
    build_time: Option<Spanned<Value>>,
    log_file: Option<Spanned<String>>,
    #[serde(default)]
    notify: Vec<Spanned<String>>,
    #[serde(default)]
    job: Vec<Spanned<RawJob>>,
}

/// One `[[job]]` table of `kiln.toml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Spanned<Value>,
    title: Option<Spanned<String>>,
    config_type: Spanned<String>,
    install_script: Spanned<String>,
    configure_script: Option<Spanned<String>>,
    image_script: Spanned<String>,
    verify: Option<Spanned<String>>,
    timeout: Spanned<Value>,
    priority: Option<Spanned<Value>>,
    accept_within: Option<Spanned<Value>>,
    assigned_to: Option<Spanned<String>>,
    max_attempts: Option<Spanned<Value>>,
    retries: Option<Spanned<Value>>,
}

/// Converts and checks one `[[job]]` table.
fn job_from_toml(reader: &TomlReader, raw: &RawJob) -> Result<JobSpec, FormatError> {
    let id = reader.string_or_integer(&raw.id, "id", "a job id")?;
    check_name(&id, "a job id", "`id`").map_err(|m| reader.error_at(raw.id.span(), m))?;
    let title =
        optional_toml_text(reader, raw.title.as_ref(), "title")?.unwrap_or_else(|| id.clone());
    let config_type = raw.config_type.get_ref().trim().to_owned();
    check_config_type(&config_type, false, "`config_type`")
        .map_err(|m| reader.error_at(raw.config_type.span(), m))?;
    let install_script = toml_script(reader, &raw.install_script, "install_script")?;
    let configure_script =
        optional_toml_script(reader, raw.configure_script.as_ref(), "configure_script")?;
    let image_script = toml_script(reader, &raw.image_script, "image_script")?;
    let verify_script = optional_toml_script(reader, raw.verify.as_ref(), "verify")?;
    let timeout_secs = reader
        .optional_integer(Some(&raw.timeout), "timeout", &TIMEOUT_SPEC)?
        .unwrap_or_default();
    let priority = reader.optional_integer(raw.priority.as_ref(), "priority", &PRIORITY_SPEC)?;
    let accept_within_secs =
        reader.optional_integer(raw.accept_within.as_ref(), "accept_within", &TIMEOUT_SPEC)?;
    let assigned_to = match &raw.assigned_to {
        Some(value) => {
            let assigned_to = non_empty(value.get_ref());
            if let Some(assigned_to) = &assigned_to {
                check_name(assigned_to, "a client id", "`assigned_to`")
                    .map_err(|m| reader.error_at(value.span(), m))?;
            }
            assigned_to
        }
        None => None,
    };
    let max_attempts = reader.optional_integer(
        raw.max_attempts.as_ref(),
        "max_attempts",
        &MAX_ATTEMPTS_SPEC,
    )?;
    let retries = reader.optional_integer(raw.retries.as_ref(), "retries", &RETRIES_SPEC)?;
    Ok(JobSpec {
        id,
        title,
        config_type,
        install_script,
        configure_script,
        image_script,
        verify_script,
        timeout_secs,
        priority,
        accept_within_secs,
        assigned_to,
        max_attempts,
        retries,
    })
}

/// An optional free-text TOML string, trimmed: `None` when absent or empty.
fn optional_toml_text(
    reader: &TomlReader,
    value: Option<&Spanned<String>>,
    key: &str,
) -> Result<Option<String>, FormatError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = non_empty(value.get_ref());
    if let Some(text) = &text {
        check_plain_text(text, &format!("`{key}`"))
            .map_err(|m| reader.error_at(value.span(), m))?;
    }
    Ok(text)
}

/// A script path from TOML, trimmed, checked as written, then normalised.
fn toml_script(
    reader: &TomlReader,
    value: &Spanned<String>,
    key: &str,
) -> Result<String, FormatError> {
    let path = value.get_ref().trim();
    check_script_path(path, &format!("`{key}`")).map_err(|m| reader.error_at(value.span(), m))?;
    Ok(normalise_script_path(path))
}

/// An optional script path from TOML: `None` when absent or empty.
fn optional_toml_script(
    reader: &TomlReader,
    value: Option<&Spanned<String>>,
    key: &str,
) -> Result<Option<String>, FormatError> {
    match value {
        Some(path) if !path.get_ref().trim().is_empty() => {
            Ok(Some(toml_script(reader, path, key)?))
        }
        _ => Ok(None),
    }
}

/// `text` trimmed, or `None` when that leaves nothing.
fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The job ids seen so far in one manifest, with where each was.
#[derive(Default)]
struct SeenIds {
    /// Lowercased id → (id as written, byte offset of its job in the text).
    by_lowercase: HashMap<String, (String, usize)>,
}

impl SeenIds {
    /// Records `id`, whose job starts at byte `offset`, refusing one that repeats an
    /// earlier id, ignoring letter case (ids name files, and some file systems ignore
    /// case). `position` turns an offset into a line and column; it is called only for
    /// the refusal, as it reads the text from its start.
    fn insert(
        &mut self,
        id: &str,
        offset: usize,
        position: impl Fn(usize) -> (u32, u32),
    ) -> Result<(), String> {
        let key = id.to_ascii_lowercase();
        if let Some((first, first_offset)) = self.by_lowercase.get(&key) {
            let (first_line, first_column) = position(*first_offset);
            return Err(if first == id {
                format!(
                    "duplicate job id {}; the first job with it is at line {first_line}, column {first_column}",
                    quote_found(id)
                )
            } else {
                format!(
                    "job id {} differs only in letter case from job id {} at line {first_line}, column {first_column}",
                    quote_found(id),
                    quote_found(first)
                )
            });
        }
        self.by_lowercase.insert(key, (id.to_owned(), offset));
        Ok(())
    }
}

/// What a safe name may hold, as error messages say it.
const NAME_RULE: &str =
    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit";

/// Refuses a `name` (e.g. "a job id") found in `label` that is not a safe name.
pub(crate) fn check_name(name: &str, what: &str, label: &str) -> Result<(), String> {
    if crate::names::is_safe_name(name) {
        Ok(())
    } else {
        Err(format!(
            "expected {what} ({NAME_RULE}) in {label}, found {}",
            quote_found(name)
        ))
    }
}

/// Refuses a config type found in `label` that could not be matched or used as a
/// directory name. `*` ("any") is allowed only where `allow_any` (a client's list).
pub(crate) fn check_config_type(
    config_type: &str,
    allow_any: bool,
    label: &str,
) -> Result<(), String> {
    let problem = if config_type.is_empty() {
        Some("it is empty".to_owned())
    } else if config_type.chars().count() > MAX_NAME_CHARS {
        Some(format!("it is longer than {MAX_NAME_CHARS} characters"))
    } else if config_type.chars().any(char::is_whitespace) {
        Some("it contains whitespace".to_owned())
    } else if let Some(bad) = config_type
        .chars()
        .find(|ch| ch.is_control() || matches!(ch, '/' | '\\' | ',' | ';'))
    {
        Some(format!("it contains {bad:?}"))
    } else if config_type == "." || config_type == ".." {
        Some("it is a directory name".to_owned())
    } else if config_type == "*" && !allow_any {
        Some("'*' means any config type and is only for clients".to_owned())
    } else if config_type.contains('*') && config_type != "*" {
        Some("'*' must stand alone".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!(
            "expected a config type (no whitespace, '/', '\\', ',' or ';') in {label}, found {} ({problem})",
            quote_found(config_type)
        )),
        None => Ok(()),
    }
}

/// Refuses a script path found in `label` that is not relative to the build's files or
/// could leave them.
fn check_script_path(path: &str, label: &str) -> Result<(), String> {
    let too_long: String;
    let first_two: Vec<char> = path.chars().take(2).collect();
    let problem = if path.is_empty() {
        Some("it is empty")
    } else if path.contains('\0') {
        Some("it contains a NUL character")
    } else if path.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if path.len() > MAX_SCRIPT_PATH_BYTES {
        too_long = format!("it is longer than {MAX_SCRIPT_PATH_BYTES} bytes");
        Some(too_long.as_str())
    } else if path.starts_with(['/', '\\']) {
        Some("it is absolute")
    } else if first_two.len() == 2 && first_two[0].is_ascii_alphabetic() && first_two[1] == ':' {
        Some("it starts with a drive letter")
    } else if path.split(['/', '\\']).any(|component| component == "..") {
        Some("it has a '..' component")
    } else if path.split(['/', '\\']).any(str::is_empty) {
        Some("it has an empty component")
    } else if path.split(['/', '\\']).all(|component| component == ".") {
        Some("it names no file")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!(
            "expected a relative path inside the build's files in {label}, found {} ({problem})",
            quote_found(path)
        )),
        None => Ok(()),
    }
}

/// A script path with Windows separators turned into `/` (seed manifests come from
/// Windows) and `.` components dropped. `path` has passed [`check_script_path`], so
/// something other than `.` is left.
fn normalise_script_path(path: &str) -> String {
    let components: Vec<&str> = path
        .split(['/', '\\'])
        .filter(|component| *component != ".")
        .collect();
    components.join("/")
}

/// Refuses free text (titles, times, log file names) found in `label` with control
/// characters other than tab and line breaks, which XML cannot carry.
pub(crate) fn check_plain_text(text: &str, label: &str) -> Result<(), String> {
    match text
        .chars()
        .find(|ch| ch.is_control() && !matches!(ch, '\t' | '\n' | '\r'))
    {
        Some(bad) => Err(format!(
            "expected text without control characters in {label}, found {} (it contains {bad:?})",
            quote_found(text)
        )),
        None => Ok(()),
    }
}

/// Refuses a notify URL found in `label` that is empty or holds whitespace.
fn check_notify_url(url: &str, label: &str) -> Result<(), String> {
    if url.is_empty() || url.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        Err(format!(
            "expected a url without whitespace in {label}, found {}",
            quote_found(url)
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's populated `relbuild.xml` example, paragraph [0061], verbatim.
    const SEED_RELBUILD: &str = "\
<SERVER>
  <BUILDTIME>20021016:18:00:00</BUILDTIME>
  <BUILDNUMBER>3700</BUILDNUMBER>
  <LOGFILE>relbuild.log</LOGFILE>
  <TITLE>Main Build 3700</TITLE>
  <JOBS>
    <JOB ID=\"1\">
      <TITLE>Professional Installation</TITLE>
      <CONFIGTYPE>PRO</CONFIGTYPE>
      <INSTALLSCRIPT>pro/install.cmd</INSTALLSCRIPT>
      <IMAGESCRIPT>pro/image.cmd</IMAGESCRIPT>
      <TIMEOUT>3600</TIMEOUT>
    </JOB>
  </JOBS>
</SERVER>
";

    /// The seed's empty `relbuild.xml` schema, paragraph [0060], verbatim.
    const SEED_RELBUILD_SCHEMA: &str = "\
<SERVER>
  <BUILDTIME></BUILDTIME>
  <BUILDNUMBER></BUILDNUMBER>
  <LOGFILE></LOGFILE>
  <TITLE></TITLE>
  <JOBS>
    <JOB ID=\"\">
      <TITLE></TITLE>
      <CONFIGTYPE></CONFIGTYPE>
      <INSTALLSCRIPT></INSTALLSCRIPT>
      <IMAGESCRIPT></IMAGESCRIPT>
      <TIMEOUT></TIMEOUT>
    </JOB>
  </JOBS>
</SERVER>
";

    /// The seed's example as `kiln.toml`.
    const SEED_TOML: &str = r#"
number = 3700
title = "Main Build 3700"
build_time = "20021016:18:00:00"
log_file = "relbuild.log"

[[job]]
id = 1
title = "Professional Installation"
config_type = "PRO"
install_script = "pro/install.cmd"
image_script = "pro/image.cmd"
timeout = 3600
"#;

    fn seed_job() -> JobSpec {
        JobSpec {
            id: "1".to_owned(),
            title: "Professional Installation".to_owned(),
            config_type: "PRO".to_owned(),
            install_script: "pro/install.cmd".to_owned(),
            configure_script: None,
            image_script: "pro/image.cmd".to_owned(),
            verify_script: None,
            timeout_secs: 3600,
            priority: None,
            accept_within_secs: None,
            assigned_to: None,
            max_attempts: None,
            retries: None,
        }
    }

    fn seed_manifest() -> BuildManifest {
        BuildManifest {
            number: "3700".to_owned(),
            title: "Main Build 3700".to_owned(),
            build_time: Some("20021016:18:00:00".to_owned()),
            log_file: Some("relbuild.log".to_owned()),
            notify: Vec::new(),
            jobs: vec![seed_job()],
        }
    }

    /// A manifest using every extension, with text that needs escaping.
    fn full_manifest() -> BuildManifest {
        let mut second = seed_job();
        second.id = "home-x64".to_owned();
        second.title = "Home <x64> & \"friends\" – ünïcode".to_owned();
        second.config_type = "HOME".to_owned();
        second.install_script = "home/install.sh".to_owned();
        second.configure_script = Some("home/configure.sh".to_owned());
        second.image_script = "home/image.sh".to_owned();
        second.verify_script = Some("home/verify.sh".to_owned());
        second.timeout_secs = 7200;
        second.priority = Some(-5);
        second.accept_within_secs = Some(600);
        second.assigned_to = Some("RACK05_MACHINE10".to_owned());
        second.max_attempts = Some(3);
        second.retries = Some(0);
        let mut manifest = seed_manifest();
        manifest.title = "Main & <Build>".to_owned();
        manifest.notify = vec![
            "https://hooks.example.com/kiln?a=1&b=2".to_owned(),
            "mailto:release@example.com".to_owned(),
        ];
        manifest.jobs.push(second);
        manifest
    }

    /// The seed example with every line containing `needle` removed.
    fn seed_without(needle: &str) -> String {
        SEED_RELBUILD
            .lines()
            .filter(|line| !line.contains(needle))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// The seed example with `from` replaced by `to` (which must occur).
    fn seed_with(from: &str, to: &str) -> String {
        assert!(SEED_RELBUILD.contains(from), "{from:?} is not in the seed");
        SEED_RELBUILD.replacen(from, to, 1)
    }

    fn xml_error(text: &str) -> String {
        BuildManifest::from_relbuild_xml("relbuild.xml", text)
            .unwrap_err()
            .to_string()
    }

    fn toml_error(text: &str) -> String {
        BuildManifest::from_toml("kiln.toml", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn seed_example_parses() {
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", SEED_RELBUILD),
            Ok(seed_manifest())
        );
    }

    #[test]
    fn seed_example_parses_with_declaration_bom_and_crlf() {
        let text = format!(
            "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n{}",
            SEED_RELBUILD.replace('\n', "\r\n")
        );
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &text),
            Ok(seed_manifest())
        );
    }

    #[test]
    fn seed_example_is_written_back_verbatim() {
        assert_eq!(seed_manifest().to_relbuild_xml(), SEED_RELBUILD);
    }

    #[test]
    fn every_extension_round_trips() {
        let manifest = full_manifest();
        let xml = manifest.to_relbuild_xml();
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &xml),
            Ok(manifest)
        );
    }

    #[test]
    fn extensions_are_written_in_order_and_escaped() {
        let xml = full_manifest().to_relbuild_xml();
        let expected = "\
<SERVER>
  <BUILDTIME>20021016:18:00:00</BUILDTIME>
  <BUILDNUMBER>3700</BUILDNUMBER>
  <LOGFILE>relbuild.log</LOGFILE>
  <TITLE>Main &amp; &lt;Build&gt;</TITLE>
  <NOTIFY>https://hooks.example.com/kiln?a=1&amp;b=2</NOTIFY>
  <NOTIFY>mailto:release@example.com</NOTIFY>
  <JOBS>
    <JOB ID=\"1\">
      <TITLE>Professional Installation</TITLE>
      <CONFIGTYPE>PRO</CONFIGTYPE>
      <INSTALLSCRIPT>pro/install.cmd</INSTALLSCRIPT>
      <IMAGESCRIPT>pro/image.cmd</IMAGESCRIPT>
      <TIMEOUT>3600</TIMEOUT>
    </JOB>
    <JOB ID=\"home-x64\">
      <TITLE>Home &lt;x64&gt; &amp; \"friends\" – ünïcode</TITLE>
      <CONFIGTYPE>HOME</CONFIGTYPE>
      <INSTALLSCRIPT>home/install.sh</INSTALLSCRIPT>
      <CONFIGURESCRIPT>home/configure.sh</CONFIGURESCRIPT>
      <IMAGESCRIPT>home/image.sh</IMAGESCRIPT>
      <VERIFYSCRIPT>home/verify.sh</VERIFYSCRIPT>
      <TIMEOUT>7200</TIMEOUT>
      <PRIORITY>-5</PRIORITY>
      <ACCEPTWITHIN>600</ACCEPTWITHIN>
      <ASSIGNEDTO>RACK05_MACHINE10</ASSIGNEDTO>
      <MAXATTEMPTS>3</MAXATTEMPTS>
      <RETRIES>0</RETRIES>
    </JOB>
  </JOBS>
</SERVER>
";
        assert_eq!(xml, expected);
    }

    #[test]
    fn seed_without_verifyscript_has_no_verify_step_and_is_written_back_without_one() {
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", SEED_RELBUILD).unwrap();
        assert_eq!(manifest.jobs[0].verify_script, None);
        let xml = manifest.to_relbuild_xml();
        assert!(!xml.contains("VERIFYSCRIPT"), "{xml}");
        assert_eq!(xml, SEED_RELBUILD);
    }

    #[test]
    fn verifyscript_is_parsed_normalised_and_written_after_imagescript() {
        let text = seed_with(
            "      <TIMEOUT>3600</TIMEOUT>\n",
            "      <VERIFYSCRIPT>.\\pro\\verify.sh</VERIFYSCRIPT>\n      <TIMEOUT>3600</TIMEOUT>\n",
        );
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", &text).unwrap();
        let mut expected = seed_manifest();
        expected.jobs[0].verify_script = Some("pro/verify.sh".to_owned());
        assert_eq!(manifest, expected);
        let xml = manifest.to_relbuild_xml();
        assert!(
            xml.contains(
                "<IMAGESCRIPT>pro/image.cmd</IMAGESCRIPT>\n      \
                 <VERIFYSCRIPT>pro/verify.sh</VERIFYSCRIPT>\n      <TIMEOUT>"
            ),
            "{xml}"
        );
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &xml),
            Ok(expected)
        );
    }

    #[test]
    fn empty_verifyscript_means_no_verify_step() {
        let text = seed_with(
            "      <TIMEOUT>3600</TIMEOUT>\n",
            "      <VERIFYSCRIPT> </VERIFYSCRIPT>\n      <TIMEOUT>3600</TIMEOUT>\n",
        );
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &text),
            Ok(seed_manifest())
        );
    }

    #[test]
    fn verifyscript_that_escapes_or_repeats_is_refused_at_its_element() {
        let text = seed_with(
            "      <TIMEOUT>3600</TIMEOUT>\n",
            "      <VERIFYSCRIPT>../boot.sh</VERIFYSCRIPT>\n      <TIMEOUT>3600</TIMEOUT>\n",
        );
        assert_eq!(
            xml_error(&text),
            "relbuild.xml:12:7: expected a relative path inside the build's files in \
             <VERIFYSCRIPT>, found \"../boot.sh\" (it has a '..' component)"
        );
        let text = seed_with(
            "      <TIMEOUT>3600</TIMEOUT>\n",
            "      <VERIFYSCRIPT>a.sh</VERIFYSCRIPT>\n      <VERIFYSCRIPT>b.sh</VERIFYSCRIPT>\n      \
             <TIMEOUT>3600</TIMEOUT>\n",
        );
        assert!(
            xml_error(&text).starts_with("relbuild.xml:13:7: "),
            "{}",
            xml_error(&text)
        );
    }

    #[test]
    fn toml_verify_is_parsed_and_checked() {
        let text = SEED_TOML.replace(
            "timeout = 3600",
            "verify = \"pro/verify.sh\"\ntimeout = 3600",
        );
        let mut expected = seed_manifest();
        expected.jobs[0].verify_script = Some("pro/verify.sh".to_owned());
        assert_eq!(BuildManifest::from_toml("kiln.toml", &text), Ok(expected));
        let text = SEED_TOML.replace("timeout = 3600", "verify = \"\"\ntimeout = 3600");
        assert_eq!(
            BuildManifest::from_toml("kiln.toml", &text),
            Ok(seed_manifest())
        );
        let text = SEED_TOML.replace("timeout = 3600", "verify = \"/boot.sh\"\ntimeout = 3600");
        assert_eq!(
            toml_error(&text),
            "kiln.toml:13:10: expected a relative path inside the build's files in `verify`, \
             found \"/boot.sh\" (it is absolute)"
        );
        let mut manifest = seed_manifest();
        manifest.jobs[0].verify_script = Some("a/../b".to_owned());
        assert_eq!(
            manifest.validate(),
            Err(
                "expected a relative path inside the build's files in `verify` of job \"1\", \
                 found \"a/../b\" (it has a '..' component)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn stored_manifests_without_verify_script_still_read() {
        let mut json = serde_json::to_value(seed_manifest()).unwrap();
        json["jobs"][0]
            .as_object_mut()
            .unwrap()
            .remove("verify_script");
        assert_eq!(
            serde_json::from_value::<BuildManifest>(json).unwrap(),
            seed_manifest()
        );
    }

    #[test]
    fn round_trip_without_build_time_or_log_file() {
        let mut manifest = seed_manifest();
        manifest.build_time = None;
        manifest.log_file = None;
        let xml = manifest.to_relbuild_xml();
        assert_eq!(xml.lines().nth(1), Some("  <BUILDTIME></BUILDTIME>"));
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &xml),
            Ok(manifest)
        );
    }

    #[test]
    fn seed_schema_template_is_refused_at_its_empty_build_number() {
        assert_eq!(
            xml_error(SEED_RELBUILD_SCHEMA),
            "relbuild.xml:3:3: expected a build number in <BUILDNUMBER>, found an empty element"
        );
    }

    #[test]
    fn empty_optional_elements_are_none_and_titles_default() {
        let text = seed_with("relbuild.log", "")
            .replace("20021016:18:00:00", "  ")
            .replace("Main Build 3700", "")
            .replace("Professional Installation", "");
        let mut expected = seed_manifest();
        expected.build_time = None;
        expected.log_file = None;
        expected.title = "Build 3700".to_owned();
        expected.jobs[0].title = "1".to_owned();
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &text),
            Ok(expected)
        );
    }

    #[test]
    fn absent_optional_elements_are_none_and_titles_default() {
        let text = seed_without("TITLE")
            .replace("  <LOGFILE>relbuild.log</LOGFILE>\n", "")
            .replace("  <BUILDTIME>20021016:18:00:00</BUILDTIME>\n", "");
        let mut expected = seed_manifest();
        expected.build_time = None;
        expected.log_file = None;
        expected.title = "Build 3700".to_owned();
        expected.jobs[0].title = "1".to_owned();
        assert_eq!(
            BuildManifest::from_relbuild_xml("relbuild.xml", &text),
            Ok(expected)
        );
    }

    #[test]
    fn whitespace_comments_and_entities_in_text() {
        let text = seed_with(
            "<TITLE>Main Build 3700</TITLE>",
            "<TITLE>\n    Main <!-- not shown --> &amp; <![CDATA[<Build>]]>\n  </TITLE>",
        );
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", &text).unwrap();
        assert_eq!(manifest.title, "Main  & <Build>");
    }

    #[test]
    fn missing_build_number() {
        assert_eq!(
            xml_error(&seed_without("BUILDNUMBER")),
            "relbuild.xml:1:1: missing <BUILDNUMBER> in <SERVER>; expected a build number"
        );
    }

    #[test]
    fn missing_jobs() {
        let text = "<SERVER>\n  <BUILDNUMBER>3700</BUILDNUMBER>\n</SERVER>\n";
        assert_eq!(
            xml_error(text),
            "relbuild.xml:1:1: missing <JOBS> in <SERVER>; expected at least one <JOB>"
        );
    }

    #[test]
    fn jobs_without_a_job() {
        let text = "<SERVER>\n  <BUILDNUMBER>3700</BUILDNUMBER>\n  <JOBS>\n  </JOBS>\n</SERVER>\n";
        assert_eq!(
            xml_error(text),
            "relbuild.xml:3:3: expected at least one <JOB> in <JOBS>, found none"
        );
    }

    #[test]
    fn missing_job_id() {
        assert_eq!(
            xml_error(&seed_with("<JOB ID=\"1\">", "<JOB>")),
            "relbuild.xml:7:5: missing the ID attribute of <JOB>; expected a job id"
        );
    }

    #[test]
    fn empty_job_id() {
        assert_eq!(
            xml_error(&seed_with("ID=\"1\"", "ID=\" \"")),
            "relbuild.xml:7:5: expected a job id (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in the ID of <JOB>, found \"\""
        );
    }

    #[test]
    fn missing_required_job_elements() {
        let cases = [
            ("CONFIGTYPE", "a config type"),
            ("INSTALLSCRIPT", "a script path"),
            ("IMAGESCRIPT", "a script path"),
            ("TIMEOUT", "an integer number of seconds"),
        ];
        for (name, expected) in cases {
            assert_eq!(
                xml_error(&seed_without(&format!("<{name}>"))),
                format!("relbuild.xml:7:5: missing <{name}> in <JOB>; expected {expected}")
            );
        }
    }

    #[test]
    fn empty_required_job_elements() {
        assert_eq!(
            xml_error(&seed_with(
                "<CONFIGTYPE>PRO</CONFIGTYPE>",
                "<CONFIGTYPE> </CONFIGTYPE>"
            )),
            "relbuild.xml:9:7: expected a config type in <CONFIGTYPE>, found an empty element"
        );
        assert_eq!(
            xml_error(&seed_with("<TIMEOUT>3600</TIMEOUT>", "<TIMEOUT/>")),
            "relbuild.xml:12:7: expected an integer number of seconds in <TIMEOUT>, found an empty element"
        );
    }

    #[test]
    fn timeout_must_be_a_positive_integer() {
        assert_eq!(
            xml_error(&seed_with(">3600<", ">abc<")),
            "relbuild.xml:12:7: expected an integer number of seconds in <TIMEOUT>, found \"abc\""
        );
        assert_eq!(
            xml_error(&seed_with(">3600<", ">1.5<")),
            "relbuild.xml:12:7: expected an integer number of seconds in <TIMEOUT>, found \"1.5\""
        );
        for bad in ["0", "-5", "31536001", "99999999999999999999999"] {
            assert_eq!(
                xml_error(&seed_with(">3600<", &format!(">{bad}<"))),
                format!(
                    "relbuild.xml:12:7: expected an integer number of seconds from 1 to 31536000 \
                     in <TIMEOUT>, found \"{bad}\""
                )
            );
        }
    }

    #[test]
    fn extension_numbers_are_checked() {
        let with_extension = |element: &str| {
            seed_with(
                "      <TIMEOUT>3600</TIMEOUT>\n",
                &format!("      <TIMEOUT>3600</TIMEOUT>\n      {element}\n"),
            )
        };
        assert_eq!(
            xml_error(&with_extension("<PRIORITY>high</PRIORITY>")),
            "relbuild.xml:13:7: expected an integer in <PRIORITY>, found \"high\""
        );
        assert_eq!(
            xml_error(&with_extension("<MAXATTEMPTS>0</MAXATTEMPTS>")),
            "relbuild.xml:13:7: expected an integer number of attempts from 1 to 4294967295 \
             in <MAXATTEMPTS>, found \"0\""
        );
        assert_eq!(
            xml_error(&with_extension("<RETRIES>-1</RETRIES>")),
            "relbuild.xml:13:7: expected an integer number of retries from 0 to 4294967295 \
             in <RETRIES>, found \"-1\""
        );
        assert_eq!(
            xml_error(&with_extension("<ACCEPTWITHIN>soon</ACCEPTWITHIN>")),
            "relbuild.xml:13:7: expected an integer number of seconds in <ACCEPTWITHIN>, found \"soon\""
        );
        assert_eq!(
            xml_error(&with_extension("<ASSIGNEDTO>rack 5</ASSIGNEDTO>")),
            "relbuild.xml:13:7: expected a client id (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in <ASSIGNEDTO>, found \"rack 5\""
        );
        let text = with_extension("<PRIORITY> 9223372036854775807 </PRIORITY><RETRIES/>");
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", &text).unwrap();
        assert_eq!(manifest.jobs[0].priority, Some(i64::MAX));
        assert_eq!(manifest.jobs[0].retries, None);
    }

    #[test]
    fn unknown_element_is_named_with_the_accepted_ones() {
        assert_eq!(
            xml_error(&seed_with(
                "<TIMEOUT>3600</TIMEOUT>",
                "<TIMOUT>3600</TIMOUT>"
            )),
            "relbuild.xml:12:7: unknown element <TIMOUT> in <JOB>; expected one of <TITLE>, \
             <CONFIGTYPE>, <INSTALLSCRIPT>, <CONFIGURESCRIPT>, <IMAGESCRIPT>, <VERIFYSCRIPT>, \
             <TIMEOUT>, <PRIORITY>, <ACCEPTWITHIN>, <ASSIGNEDTO>, <MAXATTEMPTS>, <RETRIES>"
        );
        assert_eq!(
            xml_error(&seed_with("<LOGFILE>", "<LOGFILES/><LOGFILE>")),
            "relbuild.xml:4:3: unknown element <LOGFILES> in <SERVER>; expected one of \
             <BUILDTIME>, <BUILDNUMBER>, <LOGFILE>, <TITLE>, <NOTIFY>, <JOBS>"
        );
    }

    #[test]
    fn element_names_are_case_sensitive() {
        assert_eq!(
            xml_error(&seed_with(
                "<TITLE>Main Build 3700</TITLE>",
                "<Title>Main Build 3700</Title>"
            )),
            "relbuild.xml:5:3: unknown element <Title> in <SERVER>; expected one of \
             <BUILDTIME>, <BUILDNUMBER>, <LOGFILE>, <TITLE>, <NOTIFY>, <JOBS>"
        );
    }

    #[test]
    fn wrong_root_element() {
        assert_eq!(
            xml_error("<BUILDCLIENT ID=\"x\"/>"),
            "relbuild.xml:1:1: expected the root element <SERVER>, found <BUILDCLIENT>"
        );
    }

    #[test]
    fn unknown_attribute() {
        assert_eq!(
            xml_error(&seed_with("<JOB ID=\"1\">", "<JOB ID=\"1\" Id=\"2\">")),
            "relbuild.xml:7:17: unknown attribute Id on <JOB>; expected ID"
        );
        assert_eq!(
            xml_error(&seed_with("<SERVER>", "<SERVER version=\"2\">")),
            "relbuild.xml:1:9: unknown attribute version on <SERVER>; <SERVER> takes no attributes"
        );
    }

    #[test]
    fn duplicate_single_element() {
        assert_eq!(
            xml_error(&seed_with(
                "<TIMEOUT>3600</TIMEOUT>",
                "<TIMEOUT>3600</TIMEOUT><TIMEOUT>60</TIMEOUT>"
            )),
            "relbuild.xml:12:30: duplicate <TIMEOUT> in <JOB>; the first one is at line 12, column 7"
        );
    }

    #[test]
    fn stray_text_is_refused() {
        assert_eq!(
            xml_error(&seed_with("  <JOBS>\n", "  <JOBS>\n    oops\n")),
            "relbuild.xml:7:5: expected only elements in <JOBS>, found the text \"oops\""
        );
        assert_eq!(
            xml_error(&seed_with("pro/install.cmd", "pro/<B>install</B>.cmd")),
            "relbuild.xml:10:26: expected only text in <INSTALLSCRIPT>, found the element <B>"
        );
    }

    #[test]
    fn malformed_xml_gives_its_line_and_column() {
        assert_eq!(
            xml_error(&seed_with("</IMAGESCRIPT>", "</IMAGESCRIP>")),
            "relbuild.xml:11:33: malformed xml: expected 'IMAGESCRIPT' tag, not 'IMAGESCRIP'"
        );
        assert_eq!(
            xml_error(&seed_with("Main Build 3700", "Main & Build")),
            "relbuild.xml:5:15: malformed xml: malformed entity reference; write a literal '&' as &amp;"
        );
        assert_eq!(
            xml_error(&seed_without("</SERVER>")),
            "relbuild.xml:15:1: malformed xml: the root node was opened but never closed"
        );
        assert_eq!(
            xml_error(""),
            "relbuild.xml:1:1: malformed xml: the document does not have a root node"
        );
    }

    #[test]
    fn doctype_is_refused() {
        let text = format!("<!DOCTYPE SERVER [<!ENTITY x \"y\">]>\n{SEED_RELBUILD}");
        assert_eq!(
            xml_error(&text),
            "relbuild.xml:1:1: malformed xml: a document type declaration (<!DOCTYPE>) is not allowed"
        );
    }

    #[test]
    fn duplicate_job_ids_point_at_the_second() {
        let second_job = "    <JOB ID=\"1\">
      <CONFIGTYPE>HOME</CONFIGTYPE>
      <INSTALLSCRIPT>home/install.cmd</INSTALLSCRIPT>
      <IMAGESCRIPT>home/image.cmd</IMAGESCRIPT>
      <TIMEOUT>3600</TIMEOUT>
    </JOB>
  </JOBS>";
        let text = seed_with("  </JOBS>", second_job);
        assert_eq!(
            xml_error(&text),
            "relbuild.xml:14:5: duplicate job id \"1\"; the first job with it is at line 7, column 5"
        );
        let text = seed_with("<JOB ID=\"1\">", "<JOB ID=\"pro\">").replacen(
            "  </JOBS>",
            &second_job.replace("ID=\"1\"", "ID=\"PRO\""),
            1,
        );
        assert_eq!(
            xml_error(&text),
            "relbuild.xml:14:5: job id \"PRO\" differs only in letter case from job id \"pro\" \
             at line 7, column 5"
        );
    }

    #[test]
    fn job_id_that_escapes_is_refused_at_the_job() {
        assert_eq!(
            xml_error(&seed_with("ID=\"1\"", "ID=\"../x\"")),
            "relbuild.xml:7:5: expected a job id (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in the ID of <JOB>, found \"../x\""
        );
        assert_eq!(
            xml_error(&seed_with("<BUILDNUMBER>3700", "<BUILDNUMBER>.hidden")),
            "relbuild.xml:3:3: expected a build number (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in <BUILDNUMBER>, found \".hidden\""
        );
    }

    #[test]
    fn script_paths_that_escape_are_refused() {
        let cases = [
            ("../../etc/passwd", "it has a '..' component"),
            ("pro\\..\\..\\x.cmd", "it has a '..' component"),
            ("/etc/passwd", "it is absolute"),
            ("\\\\ntre101\\bvt$\\install.cmd", "it is absolute"),
            ("C:\\build\\install.cmd", "it starts with a drive letter"),
            ("pro//install.cmd", "it has an empty component"),
            ("pro/", "it has an empty component"),
            (".", "it names no file"),
            ("pro/&#0;x", ""),
        ];
        for (path, problem) in cases {
            let text = seed_with("pro/install.cmd", path);
            if problem.is_empty() {
                // A NUL cannot even be written in XML: the parser refuses it.
                assert_eq!(
                    xml_error(&text),
                    "relbuild.xml:10:26: malformed xml: malformed entity reference"
                );
                continue;
            }
            let found = path.replace('\\', "\\\\");
            assert_eq!(
                xml_error(&text),
                format!(
                    "relbuild.xml:10:7: expected a relative path inside the build's files in \
                     <INSTALLSCRIPT>, found \"{found}\" ({problem})"
                )
            );
        }
    }

    #[test]
    fn windows_separators_and_dot_components_are_normalised() {
        let text = seed_with("pro/install.cmd", ".\\pro\\install.cmd")
            .replace("pro/image.cmd", "pro/./image.cmd");
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", &text).unwrap();
        assert_eq!(manifest.jobs[0].install_script, "pro/install.cmd");
        assert_eq!(manifest.jobs[0].image_script, "pro/image.cmd");
    }

    #[test]
    fn config_types_are_checked() {
        for (config_type, problem) in [
            ("PRO X", "it contains whitespace"),
            ("PRO,HOME", "it contains ','"),
            ("a/b", "it contains '/'"),
            ("..", "it is a directory name"),
            ("*", "'*' means any config type and is only for clients"),
        ] {
            assert_eq!(
                xml_error(&seed_with(">PRO<", &format!(">{config_type}<"))),
                format!(
                    "relbuild.xml:9:7: expected a config type (no whitespace, '/', '\\', ',' or ';') \
                     in <CONFIGTYPE>, found \"{config_type}\" ({problem})"
                )
            );
        }
    }

    #[test]
    fn empty_notify_is_a_placeholder() {
        let text = seed_with(
            "  <JOBS>",
            "  <NOTIFY></NOTIFY>\n  <NOTIFY> http://a/b </NOTIFY>\n  <JOBS>",
        );
        let manifest = BuildManifest::from_relbuild_xml("relbuild.xml", &text).unwrap();
        assert_eq!(manifest.notify, vec!["http://a/b".to_owned()]);
        assert_eq!(
            xml_error(&seed_with(
                "  <JOBS>",
                "  <NOTIFY>http://a b</NOTIFY>\n  <JOBS>"
            )),
            "relbuild.xml:6:3: expected a url without whitespace in <NOTIFY>, found \"http://a b\""
        );
    }

    #[test]
    fn seed_toml_equals_seed_xml() {
        assert_eq!(
            BuildManifest::from_toml("kiln.toml", SEED_TOML),
            Ok(seed_manifest())
        );
    }

    #[test]
    fn toml_with_every_extension() {
        let text = r#"
number = "3700"
title = "Main & <Build>"
build_time = "20021016:18:00:00"
log_file = "relbuild.log"
notify = ["https://hooks.example.com/kiln?a=1&b=2", "mailto:release@example.com", " "]

[[job]]
id = "1"
title = "Professional Installation"
config_type = "PRO"
install_script = "pro/install.cmd"
image_script = "pro/image.cmd"
timeout = 3600

[[job]]
id = "home-x64"
title = "Home <x64> & \"friends\" – ünïcode"
config_type = "HOME"
install_script = 'home\install.sh'
configure_script = "home/configure.sh"
image_script = "./home/image.sh"
verify = "home/verify.sh"
timeout = 7200
priority = -5
accept_within = 600
assigned_to = "RACK05_MACHINE10"
max_attempts = 3
retries = 0
"#;
        assert_eq!(
            BuildManifest::from_toml("kiln.toml", text),
            Ok(full_manifest())
        );
    }

    #[test]
    fn toml_unknown_key() {
        let text = SEED_TOML.replace("timeout = 3600", "timeout = 3600\ntimout = 5");
        assert_eq!(
            toml_error(&text),
            "kiln.toml:14:1: invalid toml: unknown field `timout`, expected one of `id`, `title`, \
             `config_type`, `install_script`, `configure_script`, `image_script`, `verify`, \
             `timeout`, `priority`, `accept_within`, `assigned_to`, `max_attempts`, `retries`"
        );
        let text = SEED_TOML.replace("number = 3700", "numbr = 3700");
        assert_eq!(
            toml_error(&text),
            "kiln.toml:2:1: invalid toml: unknown field `numbr`, expected one of `number`, \
             `title`, `build_time`, `log_file`, `notify`, `job`"
        );
    }

    #[test]
    fn toml_missing_keys() {
        assert_eq!(
            toml_error(&SEED_TOML.replace("number = 3700\n", "")),
            "kiln.toml:1:1: invalid toml: missing field `number`"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("timeout = 3600\n", "")),
            "kiln.toml:7:1: invalid toml: missing field `timeout`"
        );
        let no_jobs = SEED_TOML.split("[[job]]").next().unwrap_or_default();
        assert_eq!(
            toml_error(no_jobs),
            "kiln.toml:1:1: expected at least one [[job]] table, found none"
        );
    }

    #[test]
    fn toml_wrong_values() {
        assert_eq!(
            toml_error(&SEED_TOML.replace("timeout = 3600", "timeout = \"abc\"")),
            "kiln.toml:13:11: expected an integer number of seconds in `timeout`, found the string \"abc\""
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("timeout = 3600", "timeout = 0")),
            "kiln.toml:13:11: expected an integer number of seconds from 1 to 31536000 in `timeout`, found 0"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("timeout = 3600", "timeout = 1.5")),
            "kiln.toml:13:11: expected an integer number of seconds in `timeout`, found 1.5"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("number = 3700", "number = [1]")),
            "kiln.toml:2:10: expected a build number (a string or an integer) in `number`, found an array"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("config_type = \"PRO\"", "config_type = 5")),
            "kiln.toml:10:15: invalid toml: invalid type: integer `5`, expected a string"
        );
    }

    #[test]
    fn toml_syntax_error_has_a_position() {
        assert_eq!(
            toml_error(
                &SEED_TOML.replace("title = \"Main Build 3700\"", "title = \"Main Build 3700")
            ),
            "kiln.toml:3:25: invalid toml: invalid basic string"
        );
    }

    #[test]
    fn toml_duplicate_ids_and_traversal() {
        let twice = format!(
            "{SEED_TOML}{}",
            &SEED_TOML[SEED_TOML.find("[[job]]").unwrap_or(0)..]
        );
        assert_eq!(
            toml_error(&twice),
            "kiln.toml:15:6: duplicate job id \"1\"; the first job with it is at line 7, column 1"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("id = 1", "id = \"../x\"")),
            "kiln.toml:8:6: expected a job id (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in `id`, found \"../x\""
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("\"pro/install.cmd\"", "\"../pro/install.cmd\"")),
            "kiln.toml:11:18: expected a relative path inside the build's files in \
             `install_script`, found \"../pro/install.cmd\" (it has a '..' component)"
        );
        assert_eq!(
            toml_error(&SEED_TOML.replace("\"pro/image.cmd\"", "\"/pro/image.cmd\"")),
            "kiln.toml:12:16: expected a relative path inside the build's files in \
             `image_script`, found \"/pro/image.cmd\" (it is absolute)"
        );
    }

    #[test]
    fn toml_control_characters_in_titles_are_refused() {
        assert_eq!(
            toml_error(&SEED_TOML.replace("Main Build 3700", "Main\\u0001")),
            "kiln.toml:3:9: expected text without control characters in `title`, found \
             \"Main\\u{1}\" (it contains '\\u{1}')"
        );
    }

    #[test]
    fn parse_chooses_the_format() {
        assert_eq!(
            BuildManifest::parse("relbuild.xml", SEED_RELBUILD),
            Ok(seed_manifest())
        );
        assert_eq!(
            BuildManifest::parse("kiln.toml", SEED_TOML),
            Ok(seed_manifest())
        );
        assert_eq!(
            BuildManifest::parse("manifest", SEED_RELBUILD),
            Ok(seed_manifest())
        );
        assert_eq!(BuildManifest::parse("-", SEED_TOML), Ok(seed_manifest()));
        assert_eq!(
            BuildManifest::parse("kiln.toml", SEED_RELBUILD)
                .unwrap_err()
                .file,
            "kiln.toml"
        );
    }

    #[test]
    fn validate_accepts_what_the_parsers_produce() {
        assert_eq!(seed_manifest().validate(), Ok(()));
        assert_eq!(full_manifest().validate(), Ok(()));
        let mut windows = seed_manifest();
        windows.jobs[0].install_script = "pro\\install.cmd".to_owned();
        assert_eq!(windows.validate(), Ok(()));
    }

    #[test]
    fn validate_refuses_unsafe_manifests() {
        let mut manifest = seed_manifest();
        manifest.number = "a/b".to_owned();
        assert_eq!(
            manifest.validate(),
            Err(
                "expected a build number (1 to 128 letters, digits, '.', '_' or '-', starting \
                 with a letter or digit) in the build number, found \"a/b\""
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].install_script = "pro/\0x".to_owned();
        assert_eq!(
            manifest.validate(),
            Err(
                "expected a relative path inside the build's files in `install_script` of job \
                 \"1\", found \"pro/\\0x\" (it contains a NUL character)"
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].image_script = "x".repeat(1025);
        assert_eq!(
            manifest.validate(),
            Err(format!(
                "expected a relative path inside the build's files in `image_script` of job \
                 \"1\", found \"{}\"... (it is longer than 1024 bytes)",
                "x".repeat(60)
            ))
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].configure_script = Some(String::new());
        assert_eq!(
            manifest.validate(),
            Err(
                "expected a relative path inside the build's files in `configure_script` of \
                 job \"1\", found \"\" (it is empty)"
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].timeout_secs = 0;
        assert_eq!(
            manifest.validate(),
            Err(
                "expected an integer number of seconds from 1 to 31536000 in `timeout` of job \
                 \"1\", found 0"
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].max_attempts = Some(0);
        assert_eq!(
            manifest.validate(),
            Err(
                "expected an integer number of attempts from 1 to 4294967295 in `max_attempts` \
                 of job \"1\", found 0"
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs[0].config_type = String::new();
        assert_eq!(
            manifest.validate(),
            Err(
                "expected a config type (no whitespace, '/', '\\', ',' or ';') in \
                 `config_type` of job \"1\", found \"\" (it is empty)"
                    .to_owned()
            )
        );

        let mut manifest = seed_manifest();
        manifest.jobs.push(seed_job());
        assert_eq!(
            manifest.validate(),
            Err("duplicate job id \"1\"".to_owned())
        );

        let mut manifest = seed_manifest();
        manifest.jobs.clear();
        assert_eq!(
            manifest.validate(),
            Err("expected at least one job in the build, found none".to_owned())
        );
    }
}
