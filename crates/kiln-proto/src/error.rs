//! Errors in user files: where they are and what was wrong.
//!
//! [`FormatError`] is the one error every parser of a user file returns (build
//! manifests, client configs). It names the file, the 1-based line and column of the
//! offending text and says what was expected and what was found, so that a user can
//! go straight to the mistake. [`line_col`] turns a byte offset into that position.

/// A user file that could not be parsed, with the place of the mistake.
///
/// Displays as `{file}:{line}:{column}: {message}`, the form editors and terminals
/// turn into a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct FormatError {
    /// The file name as the caller gave it.
    pub file: String,
    /// 1-based line of the mistake; 0 when unknown.
    pub line: u32,
    /// 1-based column (in characters) of the mistake; 0 when unknown.
    pub column: u32,
    /// What was expected and what was found, in lowercase.
    pub message: String,
}

impl FormatError {
    /// An error at a known line and column (1-based; 0 when unknown).
    pub fn new(file: &str, line: u32, column: u32, message: impl Into<String>) -> Self {
        FormatError {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// An error at `byte_offset` into `text`, the contents of `file`.
    pub fn at_offset(
        file: &str,
        text: &str,
        byte_offset: usize,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = line_col(text, byte_offset);
        FormatError::new(file, line, column, message)
    }

    /// The error roxmltree gave for malformed XML, at the position it names.
    pub(crate) fn from_xml(file: &str, text: &str, err: &roxmltree::Error) -> Self {
        use roxmltree::Error as XmlError;
        let pos = err.pos();
        // roxmltree puts " at LINE:COL" into its messages; the position goes in front here.
        let detail = err.to_string().replacen(&format!(" at {pos}"), "", 1);
        // A bare '&' in a title is the usual cause; a bad "&#...;" is not.
        let is_bare_ampersand = matches!(err, XmlError::MalformedEntityReference(_))
            && !text_at(text, pos.row, pos.col).starts_with("&#");
        let hint = if is_bare_ampersand {
            "; write a literal '&' as &amp;"
        } else {
            ""
        };
        let message = format!("malformed xml: {detail}{hint}");
        match err {
            // These carry no position of their own: the document ended too early.
            XmlError::NoRootNode | XmlError::UnclosedRootNode | XmlError::UnexpectedEndOfStream => {
                FormatError::at_offset(file, text, text.len(), message)
            }
            XmlError::DtdDetected => {
                let offset = text.find("<!DOCTYPE").unwrap_or(0);
                FormatError::at_offset(
                    file,
                    text,
                    offset,
                    "malformed xml: a document type declaration (<!DOCTYPE>) is not allowed",
                )
            }
            _ => FormatError::new(file, pos.row, pos.col, message),
        }
    }

    /// The error the TOML parser gave, at the start of the span it names.
    pub(crate) fn from_toml(file: &str, text: &str, err: &toml::de::Error) -> Self {
        // Some messages span lines ("invalid string\nexpected ..."); one line reads
        // better after a position.
        let lines: Vec<&str> = err
            .message()
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        let message = format!("invalid toml: {}", lines.join("; "));
        match err.span() {
            Some(span) => FormatError::at_offset(file, text, span.start, message),
            None => FormatError::new(file, 0, 0, message),
        }
    }
}

/// The 1-based line and column of `byte_offset` in `text`.
///
/// Columns count characters, not bytes, as editors do. An offset past the end of the
/// text is the end of the text; an offset inside a multi-byte character is that
/// character.
pub fn line_col(text: &str, byte_offset: usize) -> (u32, u32) {
    let mut offset = byte_offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.bytes().filter(|byte| *byte == b'\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (saturating_u32(line), saturating_u32(column))
}

/// The text from 1-based `line` and `column` (in characters) on; empty if out of range.
fn text_at(text: &str, line: u32, column: u32) -> &str {
    let Some(line_text) = text.split_inclusive('\n').nth(
        usize::try_from(line)
            .unwrap_or(usize::MAX)
            .saturating_sub(1),
    ) else {
        return "";
    };
    let skip = usize::try_from(column)
        .unwrap_or(usize::MAX)
        .saturating_sub(1);
    match line_text.char_indices().nth(skip) {
        Some((offset, _)) => &line_text[offset..],
        None => "",
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// `value` quoted for an error message, shortened when it is long.
pub(crate) fn quote_found(value: &str) -> String {
    const MAX_CHARS: usize = 60;
    if value.chars().count() > MAX_CHARS {
        let head: String = value.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    } else {
        format!("{value:?}")
    }
}

/// What an integer field may hold, so that both formats refuse it in the same words.
pub(crate) struct IntegerSpec {
    /// What the field holds, e.g. "an integer number of seconds".
    pub(crate) expected: &'static str,
    /// The smallest value allowed.
    pub(crate) min: i128,
    /// The largest value allowed.
    pub(crate) max: i128,
}

impl IntegerSpec {
    /// Parses `text`, the contents of the field named `label` (e.g. `<TIMEOUT>`).
    pub(crate) fn parse<T: TryFrom<i128>>(&self, text: &str, label: &str) -> Result<T, String> {
        let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
        let is_integer = !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit());
        match text.parse::<i128>() {
            Ok(value) => self.check(value, label, &quote_found(text)),
            // Too many digits even for an i128: an integer, out of any range.
            Err(_) if is_integer => {
                let beyond = if text.starts_with('-') {
                    i128::MIN
                } else {
                    i128::MAX
                };
                self.check(beyond, label, &quote_found(text))
            }
            Err(_) => Err(format!(
                "expected {} in {label}, found {}",
                self.expected,
                quote_found(text)
            )),
        }
    }

    /// Checks that `value`, written `found` in the file, is in range and fits `T`.
    pub(crate) fn check<T: TryFrom<i128>>(
        &self,
        value: i128,
        label: &str,
        found: &str,
    ) -> Result<T, String> {
        let in_range = (self.min..=self.max).contains(&value);
        match T::try_from(value) {
            Ok(value) if in_range => Ok(value),
            _ => Err(format!(
                "expected {} from {} to {} in {label}, found {found}",
                self.expected, self.min, self.max
            )),
        }
    }
}

/// Reads a TOML user file, turning every error into a [`FormatError`] at its place.
pub(crate) struct TomlReader<'a> {
    file: &'a str,
    text: &'a str,
}

impl<'a> TomlReader<'a> {
    /// A reader of `text`, the contents of `file`.
    pub(crate) fn new(file: &'a str, text: &'a str) -> Self {
        TomlReader { file, text }
    }

    /// Deserializes the whole file (syntax, unknown keys and types are checked here).
    pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, FormatError> {
        toml::from_str(self.text).map_err(|err| FormatError::from_toml(self.file, self.text, &err))
    }

    /// An error at the start of `span`.
    pub(crate) fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> FormatError {
        FormatError::at_offset(self.file, self.text, span.start, message)
    }

    /// The integer under `key`, checked against `spec`; `None` when the key is absent.
    pub(crate) fn optional_integer<T: TryFrom<i128>>(
        &self,
        value: Option<&toml::Spanned<toml::Value>>,
        key: &str,
        spec: &IntegerSpec,
    ) -> Result<Option<T>, FormatError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let label = format!("`{key}`");
        let checked = match value.get_ref() {
            toml::Value::Integer(integer) => {
                spec.check(i128::from(*integer), &label, &integer.to_string())
            }
            other => Err(format!(
                "expected {} in {label}, found {}",
                spec.expected,
                describe_toml_value(other)
            )),
        };
        checked
            .map(Some)
            .map_err(|message| self.error_at(value.span(), message))
    }

    /// The string under `key`, which may also be written as an integer (ids, numbers).
    pub(crate) fn string_or_integer(
        &self,
        value: &toml::Spanned<toml::Value>,
        key: &str,
        expected: &str,
    ) -> Result<String, FormatError> {
        match value.get_ref() {
            toml::Value::String(text) => Ok(text.trim().to_owned()),
            toml::Value::Integer(integer) => Ok(integer.to_string()),
            other => Err(self.error_at(
                value.span(),
                format!(
                    "expected {expected} (a string or an integer) in `{key}`, found {}",
                    describe_toml_value(other)
                ),
            )),
        }
    }
}

/// A TOML value as an error message names what was found.
pub(crate) fn describe_toml_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("the string {}", quote_found(text)),
        toml::Value::Integer(integer) => integer.to_string(),
        toml::Value::Float(float) => float.to_string(),
        toml::Value::Boolean(boolean) => boolean.to_string(),
        toml::Value::Datetime(datetime) => format!("the date-time {datetime}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_file_line_column_message() {
        let err = FormatError::new(
            "relbuild.xml",
            12,
            7,
            "expected an integer number of seconds in <TIMEOUT>, found \"abc\"",
        );
        assert_eq!(
            err.to_string(),
            "relbuild.xml:12:7: expected an integer number of seconds in <TIMEOUT>, found \"abc\""
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        let text = "ab\ncd\n\nef";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 6), (3, 1));
        assert_eq!(line_col(text, 7), (4, 1));
        assert_eq!(line_col(text, 8), (4, 2));
    }

    #[test]
    fn line_col_past_the_end_is_the_end() {
        assert_eq!(line_col("ab\nc", 100), (2, 2));
        assert_eq!(line_col("", 5), (1, 1));
    }

    #[test]
    fn line_col_counts_characters_not_bytes() {
        // "é" is two bytes, "€" three: the column after them is 3.
        let text = "é€x";
        assert_eq!(line_col(text, 5), (1, 3));
        // An offset inside "€" is the "€".
        assert_eq!(line_col(text, 3), (1, 2));
    }

    #[test]
    fn line_col_handles_crlf_lines() {
        assert_eq!(line_col("a\r\nb", 3), (2, 1));
    }

    #[test]
    fn xml_errors_keep_their_position_once() {
        let text = "<A>\n  <B></C>\n</A>";
        let err = roxmltree::Document::parse(text).map(|_| ()).unwrap_err();
        assert_eq!(
            FormatError::from_xml("f.xml", text, &err).to_string(),
            "f.xml:2:6: malformed xml: expected 'B' tag, not 'C'"
        );
    }

    #[test]
    fn unclosed_xml_points_at_the_end() {
        let text = "<A>\n  <B/>\n";
        let err = roxmltree::Document::parse(text).map(|_| ()).unwrap_err();
        assert_eq!(
            FormatError::from_xml("f.xml", text, &err).to_string(),
            "f.xml:3:1: malformed xml: the root node was opened but never closed"
        );
    }

    #[test]
    fn toml_errors_point_at_their_span() {
        let text = "a = 1\nb = \n";
        let err = toml::from_str::<toml::Table>(text).unwrap_err();
        assert_eq!(
            FormatError::from_toml("f.toml", text, &err).to_string(),
            "f.toml:2:5: invalid toml: invalid string; expected `\"`, `'`"
        );
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "x".repeat(100);
        assert_eq!(quote_found(&long), format!("\"{}\"...", "x".repeat(60)));
        assert_eq!(quote_found("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn integer_spec_says_what_and_range() {
        let spec = IntegerSpec {
            expected: "an integer number of seconds",
            min: 1,
            max: 100,
        };
        assert_eq!(spec.parse::<u64>("7", "<TIMEOUT>"), Ok(7));
        assert_eq!(spec.parse::<u64>("+7", "<TIMEOUT>"), Ok(7));
        assert_eq!(
            spec.parse::<u64>("abc", "<TIMEOUT>"),
            Err("expected an integer number of seconds in <TIMEOUT>, found \"abc\"".to_owned())
        );
        assert_eq!(
            spec.parse::<u64>("0", "<TIMEOUT>"),
            Err(
                "expected an integer number of seconds from 1 to 100 in <TIMEOUT>, found \"0\""
                    .to_owned()
            )
        );
        assert_eq!(
            spec.parse::<u64>(&"9".repeat(41), "<TIMEOUT>"),
            Err(format!(
                "expected an integer number of seconds from 1 to 100 in <TIMEOUT>, found \"{}\"",
                "9".repeat(41)
            ))
        );
    }
}
