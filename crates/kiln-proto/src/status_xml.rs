//! The seed's job status file (`job_id.xml`) and the helpers shared by its XML formats.
//!
//! [`render_job_status`] writes a job's status as the seed's JOBSTATUS element from a
//! [`JobStatusXml`], with kiln's PERCENT and ETA after CLIENTSTATUS. Times in the seed's
//! files are written `YYYYMMDD:HH:MM:SS` in UTC: [`format_seed_time`] and
//! [`parse_seed_time`] convert them from and to unix microseconds.
//!
//! The crate-private part of this module is what the parsers of the seed's other XML
//! files (`relbuild.xml` in [`crate::manifest`], `buildclient.xml` in
//! [`crate::client_config`]) share: escaping, telling XML from TOML, and an
//! `XmlReader` that checks element names and reads trimmed text with positions.

use std::fmt::Write as _;

use roxmltree::{Document, Node, NodeType};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::error::{quote_found, FormatError, IntegerSpec};

/// One job's status as the seed's JOBSTATUS element shows it.
///
/// Every field is optional: an absent value is written as an empty element, as the seed
/// does for a job that has not completed (`<TIMECOMPLETE></TIMECOMPLETE>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobStatusXml<'a> {
    /// CLIENTID: the client that holds or held the job.
    pub client_id: Option<&'a str>,
    /// TIMESTART in unix microseconds.
    pub time_start: Option<i64>,
    /// TIMECOMPLETE in unix microseconds.
    pub time_complete: Option<i64>,
    /// MAJORSTATE under CLIENTSTATUS (the seed writes e.g. `install`).
    pub major_state: Option<&'a str>,
    /// MINORSTATE under CLIENTSTATUS (the seed writes e.g. `format`).
    pub minor_state: Option<&'a str>,
    /// PERCENT complete, 0 to 100.
    pub percent: Option<u8>,
    /// ETA: estimated seconds remaining.
    pub eta_seconds: Option<u64>,
}

/// Writes `status` as the seed's JOBSTATUS document, indented by two spaces like the seed.
///
/// The order is the seed's (CLIENTID, TIMESTART, TIMECOMPLETE, CLIENTSTATUS with
/// MAJORSTATE and MINORSTATE), then PERCENT and ETA. Text is XML-escaped.
pub fn render_job_status(status: &JobStatusXml) -> String {
    let time_start = status.time_start.map(format_seed_time);
    let time_complete = status.time_complete.map(format_seed_time);
    let percent = status.percent.map(|percent| percent.min(100).to_string());
    let eta = status.eta_seconds.map(|eta| eta.to_string());

    let mut out = String::from("<JOBSTATUS>\n");
    push_text_element(&mut out, 1, "CLIENTID", status.client_id);
    push_text_element(&mut out, 1, "TIMESTART", time_start.as_deref());
    push_text_element(&mut out, 1, "TIMECOMPLETE", time_complete.as_deref());
    out.push_str("  <CLIENTSTATUS>\n");
    push_text_element(&mut out, 2, "MAJORSTATE", status.major_state);
    push_text_element(&mut out, 2, "MINORSTATE", status.minor_state);
    out.push_str("  </CLIENTSTATUS>\n");
    push_text_element(&mut out, 1, "PERCENT", percent.as_deref());
    push_text_element(&mut out, 1, "ETA", eta.as_deref());
    out.push_str("</JOBSTATUS>\n");
    out
}

/// The earliest time the seed's format can write: 0000-01-01 00:00:00 UTC.
const MIN_SEED_UNIX_SECS: i64 = time::macros::datetime!(0000-01-01 0:00 UTC).unix_timestamp();
/// The latest time the seed's format can write: 9999-12-31 23:59:59 UTC.
const MAX_SEED_UNIX_SECS: i64 = time::macros::datetime!(9999-12-31 23:59:59 UTC).unix_timestamp();

/// Formats unix microseconds as the seed's time, `YYYYMMDD:HH:MM:SS` in UTC.
///
/// Fractions of a second are dropped (rounding down). Times outside the years 0000 to
/// 9999, which the format cannot write, are clamped to that range.
pub fn format_seed_time(unix_micros: i64) -> String {
    let unix_secs = unix_micros
        .div_euclid(1_000_000)
        .clamp(MIN_SEED_UNIX_SECS, MAX_SEED_UNIX_SECS);
    let date_time =
        OffsetDateTime::from_unix_timestamp(unix_secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}:{:02}:{:02}:{:02}",
        date_time.year(),
        u8::from(date_time.month()),
        date_time.day(),
        date_time.hour(),
        date_time.minute(),
        date_time.second()
    )
}

/// Parses the seed's time `YYYYMMDD:HH:MM:SS` (UTC) into unix microseconds.
///
/// Surrounding whitespace is ignored. Returns `None` for anything else, including dates
/// that do not exist such as `20020230:00:00:00`.
pub fn parse_seed_time(text: &str) -> Option<i64> {
    let text = text.trim();
    let bytes = text.as_bytes();
    if bytes.len() != 17 {
        return None;
    }
    for (idx, byte) in bytes.iter().enumerate() {
        let is_separator = matches!(idx, 8 | 11 | 14);
        if is_separator != (*byte == b':') || (!is_separator && !byte.is_ascii_digit()) {
            return None;
        }
    }
    let year: i32 = text.get(0..4)?.parse().ok()?;
    let month: u8 = text.get(4..6)?.parse().ok()?;
    let day: u8 = text.get(6..8)?.parse().ok()?;
    let hour: u8 = text.get(9..11)?.parse().ok()?;
    let minute: u8 = text.get(12..14)?.parse().ok()?;
    let second: u8 = text.get(15..17)?.parse().ok()?;
    let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
    let time_of_day = Time::from_hms(hour, minute, second).ok()?;
    PrimitiveDateTime::new(date, time_of_day)
        .assume_utc()
        .unix_timestamp()
        .checked_mul(1_000_000)
}

/// Appends `<NAME>value</NAME>` on its own line, indented by two spaces per level.
pub(crate) fn push_text_element(out: &mut String, level: usize, name: &str, value: Option<&str>) {
    for _ in 0..level {
        out.push_str("  ");
    }
    let value = value.map(escape_text).unwrap_or_default();
    // Writing into a String cannot fail.
    let _ = writeln!(out, "<{name}>{value}</{name}>");
}

/// Escapes `text` for use as an element's text.
///
/// Carriage returns are written as a character reference: an XML parser would turn a
/// literal one into a line feed.
pub(crate) fn escape_text(text: &str) -> String {
    escape(text, false)
}

/// Escapes `text` for use inside a double-quoted attribute value.
///
/// Tabs and line breaks are written as character references: an XML parser would turn
/// literal ones into spaces.
pub(crate) fn escape_attribute(text: &str) -> String {
    escape(text, true)
}

fn escape(text: &str, in_attribute: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if in_attribute => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' if in_attribute => out.push_str("&#10;"),
            '\t' if in_attribute => out.push_str("&#9;"),
            other => out.push(other),
        }
    }
    out
}

/// `text` without a leading UTF-8 byte order mark (Windows editors write one).
pub(crate) fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Whether a user file is XML rather than TOML.
///
/// The extension decides (`.xml` or `.toml`, in any case); without one of those, a file
/// whose first character after a byte order mark and whitespace is `<` is XML.
pub(crate) fn looks_like_xml(file: &str, text: &str) -> bool {
    let extension = std::path::Path::new(file)
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("xml") => true,
        Some("toml") => false,
        _ => strip_bom(text).trim_start().starts_with('<'),
    }
}

/// Reads the seed's XML strictly: known element names only, text with positions.
///
/// Every error it returns points at the offending node of `doc`, the contents of `file`.
pub(crate) struct XmlReader<'a, 'input> {
    file: &'a str,
    doc: &'a Document<'input>,
}

impl<'a, 'input> XmlReader<'a, 'input> {
    /// A reader of `doc`, parsed from the user file `file`.
    pub(crate) fn new(file: &'a str, doc: &'a Document<'input>) -> Self {
        XmlReader { file, doc }
    }

    /// An error at the start of `node`.
    pub(crate) fn error_at(&self, node: Node, message: impl Into<String>) -> FormatError {
        self.error_at_offset(node.range().start, message)
    }

    /// An error at byte `offset` of the document.
    pub(crate) fn error_at_offset(&self, offset: usize, message: impl Into<String>) -> FormatError {
        let pos = self.doc.text_pos_at(offset);
        FormatError::new(self.file, pos.row, pos.col, message)
    }

    /// The root element, which must be named `name` and have only `attributes`.
    pub(crate) fn root(
        &self,
        name: &str,
        attributes: &[&str],
    ) -> Result<Node<'a, 'input>, FormatError> {
        let root = self.doc.root_element();
        let found = root.tag_name().name();
        if found != name {
            return Err(self.error_at(
                root,
                format!("expected the root element <{name}>, found <{found}>"),
            ));
        }
        self.check_attributes(root, attributes)?;
        Ok(root)
    }

    /// Refuses attributes of `node` other than `allowed`.
    pub(crate) fn check_attributes(&self, node: Node, allowed: &[&str]) -> Result<(), FormatError> {
        let element = node.tag_name().name();
        for attribute in node.attributes() {
            let name = attribute.name();
            if !allowed.contains(&name) {
                let expected = if allowed.is_empty() {
                    format!("<{element}> takes no attributes")
                } else {
                    format!("expected {}", allowed.join(", "))
                };
                return Err(self.error_at_offset(
                    attribute.range().start,
                    format!("unknown attribute {name} on <{element}>; {expected}"),
                ));
            }
        }
        Ok(())
    }

    /// The child elements of `parent`, refusing any not named in `allowed` and any text
    /// between them. Comments and processing instructions are skipped.
    pub(crate) fn child_elements(
        &self,
        parent: Node<'a, 'input>,
        allowed: &[&str],
    ) -> Result<Vec<Node<'a, 'input>>, FormatError> {
        let parent_name = parent.tag_name().name();
        let mut elements = Vec::new();
        for child in parent.children() {
            match child.node_type() {
                NodeType::Element => {
                    let name = child.tag_name().name();
                    if !allowed.contains(&name) {
                        let accepted: Vec<String> =
                            allowed.iter().map(|name| format!("<{name}>")).collect();
                        return Err(self.error_at(
                            child,
                            format!(
                                "unknown element <{name}> in <{parent_name}>; expected one of {}",
                                accepted.join(", ")
                            ),
                        ));
                    }
                    elements.push(child);
                }
                NodeType::Text => {
                    let text = child.text().unwrap_or_default();
                    if !text.trim().is_empty() {
                        let leading = text.len() - text.trim_start().len();
                        return Err(self.error_at_offset(
                            child.range().start + leading,
                            format!(
                                "expected only elements in <{parent_name}>, found the text {}",
                                quote_found(text.trim())
                            ),
                        ));
                    }
                }
                NodeType::Root | NodeType::Comment | NodeType::PI => {}
            }
        }
        Ok(elements)
    }

    /// Stores `node` in `slot`, refusing a second element of the same name.
    pub(crate) fn set_once(
        &self,
        slot: &mut Option<Node<'a, 'input>>,
        node: Node<'a, 'input>,
    ) -> Result<(), FormatError> {
        if let Some(first) = slot {
            let parent = node.parent_element().map(|parent| parent.tag_name().name());
            let pos = self.doc.text_pos_at(first.range().start);
            return Err(self.error_at(
                node,
                format!(
                    "duplicate <{}> in <{}>; the first one is at line {}, column {}",
                    node.tag_name().name(),
                    parent.unwrap_or_default(),
                    pos.row,
                    pos.col
                ),
            ));
        }
        *slot = Some(node);
        Ok(())
    }

    /// The text of `node`, trimmed; refuses child elements.
    pub(crate) fn text(&self, node: Node) -> Result<String, FormatError> {
        let mut text = String::new();
        for child in node.children() {
            match child.node_type() {
                NodeType::Text => text.push_str(child.text().unwrap_or_default()),
                NodeType::Element => {
                    return Err(self.error_at(
                        child,
                        format!(
                            "expected only text in <{}>, found the element <{}>",
                            node.tag_name().name(),
                            child.tag_name().name()
                        ),
                    ));
                }
                NodeType::Root | NodeType::Comment | NodeType::PI => {}
            }
        }
        Ok(text.trim().to_owned())
    }

    /// The text of an optional element: `None` when it is absent or empty.
    pub(crate) fn optional_text(&self, node: Option<Node>) -> Result<Option<String>, FormatError> {
        match node {
            Some(node) => {
                let text = self.text(node)?;
                Ok((!text.is_empty()).then_some(text))
            }
            None => Ok(None),
        }
    }

    /// The text of a required element of `parent`: `expected` says what it should hold
    /// (e.g. "a config type") for the message when it is absent or empty.
    pub(crate) fn required_text(
        &self,
        parent: Node,
        node: Option<Node<'a, 'input>>,
        name: &str,
        expected: &str,
    ) -> Result<(String, Node<'a, 'input>), FormatError> {
        let Some(node) = node else {
            return Err(self.error_at(
                parent,
                format!(
                    "missing <{name}> in <{}>; expected {expected}",
                    parent.tag_name().name()
                ),
            ));
        };
        let text = self.text(node)?;
        if text.is_empty() {
            return Err(self.error_at(
                node,
                format!("expected {expected} in <{name}>, found an empty element"),
            ));
        }
        Ok((text, node))
    }

    /// The integer in an optional element, checked against `spec`; `None` when the
    /// element is absent or empty.
    pub(crate) fn optional_integer<T: TryFrom<i128>>(
        &self,
        node: Option<Node>,
        spec: &IntegerSpec,
    ) -> Result<Option<T>, FormatError> {
        let Some(node) = node else {
            return Ok(None);
        };
        let text = self.text(node)?;
        if text.is_empty() {
            return Ok(None);
        }
        let label = format!("<{}>", node.tag_name().name());
        spec.parse(&text, &label)
            .map(Some)
            .map_err(|message| self.error_at(node, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's populated JOBSTATUS example, paragraph [0063], verbatim.
    const SEED_JOB_STATUS: &str = "\
<JOBSTATUS>
  <CLIENTID>RACK05_MACHINE10</CLIENTID>
  <TIMESTART>20021016:18:01:00</TIMESTART>
  <TIMECOMPLETE></TIMECOMPLETE>
  <CLIENTSTATUS>
    <MAJORSTATE>install</MAJORSTATE>
    <MINORSTATE>format</MINORSTATE>
  </CLIENTSTATUS>
</JOBSTATUS>
";

    /// The seed's empty JOBSTATUS schema, paragraph [0062], verbatim.
    const SEED_JOB_STATUS_SCHEMA: &str = "\
<JOBSTATUS>
  <CLIENTID></CLIENTID>
  <TIMESTART></TIMESTART>
  <TIMECOMPLETE></TIMECOMPLETE>
  <CLIENTSTATUS>
    <MAJORSTATE></MAJORSTATE>
    <MINORSTATE></MINORSTATE>
  </CLIENTSTATUS>
</JOBSTATUS>
";

    /// The seed's text with kiln's two extra elements after CLIENTSTATUS.
    fn with_percent_and_eta(seed: &str, percent: &str, eta: &str) -> String {
        seed.replace(
            "  </CLIENTSTATUS>\n",
            &format!("  </CLIENTSTATUS>\n  <PERCENT>{percent}</PERCENT>\n  <ETA>{eta}</ETA>\n"),
        )
    }

    const SEED_START_MICROS: i64 = 1_034_791_260_000_000;

    #[test]
    fn renders_the_seed_example() {
        let status = JobStatusXml {
            client_id: Some("RACK05_MACHINE10"),
            time_start: Some(SEED_START_MICROS),
            time_complete: None,
            major_state: Some("install"),
            minor_state: Some("format"),
            percent: None,
            eta_seconds: None,
        };
        assert_eq!(
            render_job_status(&status),
            with_percent_and_eta(SEED_JOB_STATUS, "", "")
        );
    }

    #[test]
    fn renders_the_seed_schema_when_nothing_is_known() {
        assert_eq!(
            render_job_status(&JobStatusXml::default()),
            with_percent_and_eta(SEED_JOB_STATUS_SCHEMA, "", "")
        );
    }

    #[test]
    fn renders_percent_eta_and_completion() {
        let status = JobStatusXml {
            client_id: Some("c1"),
            time_start: Some(SEED_START_MICROS),
            time_complete: Some(SEED_START_MICROS + 3_599_999_999),
            major_state: Some("image"),
            minor_state: Some("upload"),
            percent: Some(42),
            eta_seconds: Some(95),
        };
        assert_eq!(
            render_job_status(&status),
            "<JOBSTATUS>\n  <CLIENTID>c1</CLIENTID>\n  <TIMESTART>20021016:18:01:00</TIMESTART>\n  \
             <TIMECOMPLETE>20021016:19:00:59</TIMECOMPLETE>\n  <CLIENTSTATUS>\n    \
             <MAJORSTATE>image</MAJORSTATE>\n    <MINORSTATE>upload</MINORSTATE>\n  \
             </CLIENTSTATUS>\n  <PERCENT>42</PERCENT>\n  <ETA>95</ETA>\n</JOBSTATUS>\n"
        );
    }

    #[test]
    fn rendering_escapes_text() {
        let status = JobStatusXml {
            major_state: Some("a<b>&\"c\"\r"),
            ..JobStatusXml::default()
        };
        let xml = render_job_status(&status);
        assert_eq!(
            xml.lines().nth(5),
            Some("    <MAJORSTATE>a&lt;b&gt;&amp;\"c\"&#13;</MAJORSTATE>")
        );
        let doc = Document::parse(&xml).unwrap();
        let major = doc
            .descendants()
            .find(|node| node.has_tag_name("MAJORSTATE"))
            .and_then(|node| node.text());
        assert_eq!(major, Some("a<b>&\"c\"\r"));
    }

    #[test]
    fn percent_above_100_is_written_as_100() {
        let status = JobStatusXml {
            percent: Some(250),
            ..JobStatusXml::default()
        };
        assert_eq!(
            render_job_status(&status).lines().nth(8),
            Some("  <PERCENT>100</PERCENT>")
        );
    }

    #[test]
    fn seed_time_formats_in_utc() {
        assert_eq!(format_seed_time(SEED_START_MICROS), "20021016:18:01:00");
        assert_eq!(format_seed_time(0), "19700101:00:00:00");
        assert_eq!(format_seed_time(999_999), "19700101:00:00:00");
        // Before 1970 fractions still round down, to the earlier second.
        assert_eq!(format_seed_time(-1), "19691231:23:59:59");
    }

    #[test]
    fn seed_time_clamps_to_four_digit_years() {
        assert_eq!(format_seed_time(i64::MAX), "99991231:23:59:59");
        assert_eq!(format_seed_time(i64::MIN), "00000101:00:00:00");
    }

    #[test]
    fn seed_time_parses() {
        assert_eq!(
            parse_seed_time("20021016:18:01:00"),
            Some(SEED_START_MICROS)
        );
        assert_eq!(
            parse_seed_time(" 20021016:18:00:00\n"),
            Some(1_034_791_200_000_000)
        );
        assert_eq!(parse_seed_time("19700101:00:00:00"), Some(0));
        assert_eq!(parse_seed_time("19691231:23:59:59"), Some(-1_000_000));
    }

    #[test]
    fn seed_time_round_trips() {
        for micros in [0, SEED_START_MICROS, 4_102_444_799_000_000, -86_400_000_000] {
            assert_eq!(parse_seed_time(&format_seed_time(micros)), Some(micros));
        }
    }

    #[test]
    fn seed_time_refuses_other_text() {
        for text in [
            "",
            "2002-10-16 18:01:00",
            "20021016:18:01",
            "20021016:18:01:00:00",
            "2002101618:01:00:0",
            "20021016:18:01:0x",
            "20020230:00:00:00",
            "20021016:24:00:00",
            "20021316:00:00:00",
            "+2021016:00:00:00",
            "２0021016:18:01:00",
        ] {
            assert_eq!(parse_seed_time(text), None, "{text:?}");
        }
    }

    #[test]
    fn attributes_escape_line_breaks_and_quotes() {
        assert_eq!(escape_attribute("a\"b\n\tc&"), "a&quot;b&#10;&#9;c&amp;");
        assert_eq!(escape_text("a\"b\n\tc&"), "a\"b\n\tc&amp;");
    }

    #[test]
    fn format_is_chosen_by_extension_then_content() {
        assert!(looks_like_xml("relbuild.xml", "number = 1"));
        assert!(looks_like_xml("dir/RELBUILD.XML", ""));
        assert!(!looks_like_xml("kiln.toml", "<SERVER/>"));
        assert!(looks_like_xml("manifest", "\u{feff}\n  <SERVER/>"));
        assert!(!looks_like_xml("manifest", "number = 1"));
        assert!(!looks_like_xml("-", ""));
    }
}
