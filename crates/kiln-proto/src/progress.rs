//! The progress line a job step prints: `##kiln[progress major=WORD minor=WORD percent=N]`.
//!
//! A step's stdout and stderr go to the job's log line by line; the client passes each
//! line to [`parse_progress_line`], and a line that is a progress report becomes a
//! [`Progress`] (the seed's MAJORSTATE, MINORSTATE and % complete). Anything else,
//! including a malformed report, is just a log line, so parsing never fails loudly.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest major or minor state kept, in characters; longer values are truncated.
pub const MAX_PROGRESS_VALUE_CHARS: usize = 128;

/// What the line starts with, after leading whitespace.
const PREFIX: &str = "##kiln[";

/// The command word that follows [`PREFIX`].
const COMMAND: &str = "progress";

/// One progress report from a job step. Each field is `None` when the line did not
/// give it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// The seed's MAJORSTATE, e.g. `install`.
    pub major: Option<String>,
    /// The seed's MINORSTATE, e.g. `format`.
    pub minor: Option<String>,
    /// Percent complete, 0 to 100.
    pub percent: Option<u8>,
}

/// Parses a progress report, or returns `None` for any other line.
///
/// After leading whitespace and trailing whitespace (including a `\r`), the line must be
/// `##kiln[progress key=value ...]`. The keys `major`, `minor` and `percent` are each
/// optional and may come in any order; other keys are ignored, and a repeated key keeps
/// its last value. A value is a bare word (no whitespace, no `]`) or a double-quoted
/// string in which `\"` and `\\` stand for `"` and `\`. `percent` is an integer or a
/// decimal, optionally followed by `%`, rounded down and clamped to 0..=100. Values
/// longer than [`MAX_PROGRESS_VALUE_CHARS`] are truncated.
pub fn parse_progress_line(line: &str) -> Option<Progress> {
    let body = line.trim().strip_prefix(PREFIX)?;
    let mut cursor = Cursor::new(body);
    cursor.skip_whitespace();
    if cursor.take_while(|ch| !ch.is_whitespace() && ch != ']') != COMMAND {
        return None;
    }

    let mut progress = Progress::default();
    loop {
        let had_whitespace = cursor.skip_whitespace();
        match cursor.peek() {
            None => return None,
            Some(']') => {
                cursor.next();
                return cursor.is_at_end().then_some(progress);
            }
            Some(_) if !had_whitespace => return None,
            Some(_) => {}
        }
        let key = cursor.take_while(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
        if key.is_empty() || cursor.next() != Some('=') {
            return None;
        }
        let value = cursor.value()?;
        match key {
            "major" => progress.major = Some(truncate(value)),
            "minor" => progress.minor = Some(truncate(value)),
            "percent" => progress.percent = Some(parse_percent(&value)?),
            _ => {}
        }
    }
}

/// A position in the text after the prefix.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { rest: text }
    }

    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek()?;
        self.rest = &self.rest[ch.len_utf8()..];
        Some(ch)
    }

    fn is_at_end(&self) -> bool {
        self.rest.is_empty()
    }

    /// Skips whitespace; says whether there was any.
    fn skip_whitespace(&mut self) -> bool {
        let before = self.rest.len();
        self.rest = self.rest.trim_start();
        self.rest.len() != before
    }

    /// Takes the longest run of characters that match `keep`.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let end = self.rest.find(|ch| !keep(ch)).unwrap_or(self.rest.len());
        let (taken, rest) = self.rest.split_at(end);
        self.rest = rest;
        taken
    }

    /// A bare word or a quoted string, which must end at whitespace, `]` or the end.
    fn value(&mut self) -> Option<String> {
        let value = if self.peek() == Some('"') {
            self.next();
            self.quoted()?
        } else {
            let word = self.take_while(|ch| !ch.is_whitespace() && ch != ']');
            if word.is_empty() {
                return None;
            }
            word.to_owned()
        };
        match self.peek() {
            None | Some(']') => Some(value),
            Some(ch) if ch.is_whitespace() => Some(value),
            Some(_) => None,
        }
    }

    /// The rest of a quoted string whose opening quote was taken.
    fn quoted(&mut self) -> Option<String> {
        let mut value = String::new();
        loop {
            match self.next()? {
                '"' => return Some(value),
                '\\' => match self.next()? {
                    escaped @ ('"' | '\\') => value.push(escaped),
                    // Other backslashes are kept as written (e.g. Windows paths).
                    other => {
                        value.push('\\');
                        value.push(other);
                    }
                },
                other => value.push(other),
            }
        }
    }
}

/// `value` cut to [`MAX_PROGRESS_VALUE_CHARS`] characters.
fn truncate(value: String) -> String {
    match value.char_indices().nth(MAX_PROGRESS_VALUE_CHARS) {
        Some((end, _)) => value[..end].to_owned(),
        None => value,
    }
}

/// A percentage: an integer or decimal, optionally signed and followed by `%`, rounded
/// down and clamped to 0..=100.
fn parse_percent(text: &str) -> Option<u8> {
    let text = text.strip_suffix('%').unwrap_or(text);
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(unsigned) => (true, unsigned),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    if negative {
        return Some(0);
    }
    let significant = whole.trim_start_matches('0');
    if significant.len() > 3 {
        return Some(100);
    }
    let whole: u16 = if significant.is_empty() {
        0
    } else {
        significant.parse().ok()?
    };
    u8::try_from(whole.min(100)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(major: Option<&str>, minor: Option<&str>, percent: Option<u8>) -> Option<Progress> {
        Some(Progress {
            major: major.map(str::to_owned),
            minor: minor.map(str::to_owned),
            percent,
        })
    }

    #[test]
    fn full_line() {
        assert_eq!(
            parse_progress_line("##kiln[progress major=install minor=format percent=10]"),
            progress(Some("install"), Some("format"), Some(10))
        );
    }

    #[test]
    fn every_key_is_optional_and_order_is_free() {
        assert_eq!(
            parse_progress_line("##kiln[progress]"),
            progress(None, None, None)
        );
        assert_eq!(
            parse_progress_line("##kiln[progress percent=50]"),
            progress(None, None, Some(50))
        );
        assert_eq!(
            parse_progress_line("##kiln[progress minor=copy major=image]"),
            progress(Some("image"), Some("copy"), None)
        );
    }

    #[test]
    fn quoted_values_with_escapes() {
        assert_eq!(
            parse_progress_line(
                r#"##kiln[progress major="installing drivers" minor="say \"hi\" in C:\temp\\x]"]"#
            ),
            progress(
                Some("installing drivers"),
                Some(r#"say "hi" in C:\temp\x]"#),
                None
            )
        );
        assert_eq!(
            parse_progress_line(r#"##kiln[progress major="" percent="75"]"#),
            progress(Some(""), None, Some(75))
        );
    }

    #[test]
    fn odd_spacing() {
        assert_eq!(
            parse_progress_line("   \t##kiln[  progress   major=a\tminor=b    percent=5   ]  \r"),
            progress(Some("a"), Some("b"), Some(5))
        );
        assert_eq!(
            parse_progress_line("##kiln[progress percent=5]\r"),
            progress(None, None, Some(5))
        );
        assert_eq!(
            parse_progress_line("##kiln[progress major=a]\r\n"),
            progress(Some("a"), None, None)
        );
    }

    #[test]
    fn percent_forms() {
        let percent = |text: &str| {
            parse_progress_line(&format!("##kiln[progress percent={text}]"))
                .and_then(|progress| progress.percent)
        };
        assert_eq!(percent("0"), Some(0));
        assert_eq!(percent("100"), Some(100));
        assert_eq!(percent("42.99"), Some(42));
        assert_eq!(percent("7."), Some(7));
        assert_eq!(percent(".5"), Some(0));
        assert_eq!(percent("+3"), Some(3));
        assert_eq!(percent("50%"), Some(50));
        assert_eq!(percent("007"), Some(7));
        assert_eq!(percent("101"), Some(100));
        assert_eq!(percent("99999999999999999999999"), Some(100));
        assert_eq!(percent("-5"), Some(0));
        assert_eq!(percent("-0.5"), Some(0));
        assert_eq!(percent("abc"), None);
        assert_eq!(percent("1e3"), None);
        assert_eq!(percent("."), None);
        assert_eq!(percent("5.5.5"), None);
        assert_eq!(percent("%"), None);
    }

    #[test]
    fn unknown_keys_are_ignored_and_repeats_keep_the_last() {
        assert_eq!(
            parse_progress_line("##kiln[progress eta=5 major=a step_2=\"x y\" major=b]"),
            progress(Some("b"), None, None)
        );
    }

    #[test]
    fn long_values_are_truncated() {
        let long = "é".repeat(200);
        let line = format!("##kiln[progress major={long} minor=\"{long}\"]");
        let truncated = "é".repeat(MAX_PROGRESS_VALUE_CHARS);
        assert_eq!(
            parse_progress_line(&line),
            progress(Some(&truncated), Some(&truncated), None)
        );
    }

    #[test]
    fn malformed_lines_are_not_progress() {
        for line in [
            "",
            "progress major=a",
            "installing...",
            "# #kiln[progress]",
            "##KILN[progress]",
            "##kiln[progres major=a]",
            "##kiln[progressmajor=a]",
            "##kiln[status major=a]",
            "##kiln[progress major=a",
            "##kiln[progress major=a] trailing",
            "##kiln[progress major=a]]",
            "##kiln[progress major]",
            "##kiln[progress major=]",
            "##kiln[progress major= a]",
            "##kiln[progress =a]",
            "##kiln[progress major=\"unterminated]",
            "##kiln[progress major=\"a\"minor=b]",
            "##kiln[progress major=\"a\\\"]",
            "##kiln[progress percent=lots]",
            "##kiln[progress major:a]",
            "log: ##kiln[progress major=a]",
        ] {
            assert_eq!(parse_progress_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn serializes_as_plain_fields() {
        let progress = Progress {
            major: Some("install".to_owned()),
            minor: None,
            percent: Some(3),
        };
        let json = serde_json::to_string(&progress).unwrap();
        assert_eq!(json, r#"{"major":"install","minor":null,"percent":3}"#);
        assert_eq!(serde_json::from_str::<Progress>(&json).unwrap(), progress);
    }
}
