//! Validation of names that come from outside: build numbers, job ids, client ids,
//! config types and file names. Nothing named here may escape its directory.

/// Whether `name` is a safe identifier: 1–128 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit (so never `.` or `..`).
pub fn is_safe_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks `name` with [`is_safe_name`], naming `what` in the refusal.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_safe_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a valid name (1-128 of letters, digits, '.', '_', '-', starting with a letter or digit)"
        ))
    }
}

/// Whether `path` is a safe relative path inside a directory: `/`-separated safe-ish
/// components, none empty, `.` or `..`, no NUL, not absolute.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && !path.starts_with('/')
        && !path.contains('\0')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_safe_name("3700"));
        assert!(is_safe_name("pro-base.v2_1"));
        assert!(!is_safe_name(""));
        assert!(!is_safe_name(".."));
        assert!(!is_safe_name(".hidden"));
        assert!(!is_safe_name("a/b"));
        assert!(!is_safe_name("a b"));
        assert!(!is_safe_name(&"x".repeat(129)));
    }

    #[test]
    fn relative_paths() {
        assert!(is_safe_relative_path("pro/install.cmd"));
        assert!(!is_safe_relative_path("/etc/passwd"));
        assert!(!is_safe_relative_path("pro/../../x"));
        assert!(!is_safe_relative_path("pro//x"));
        assert!(!is_safe_relative_path("pro\\x"));
        assert!(!is_safe_relative_path(""));
    }
}
