//! [`Secret`]: a credential held in memory that never shows in `Debug` output or logs.

use std::fmt;

/// A token or password. Its `Debug` form hides it; [`Secret::expose`] is the one way
/// to read it, at the place it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Holds `text` as it is.
    pub fn new(text: &str) -> Self {
        Secret(text.to_owned())
    }

    /// Holds `text` trimmed of the whitespace a file or a variable leaves around it.
    pub fn trimmed(text: &str) -> Self {
        Secret(text.trim().to_owned())
    }

    /// The secret itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn a_secret_is_trimmed_and_never_printed() {
        let secret = Secret::trimmed("  s3cret\n");
        assert_eq!(secret.expose(), "s3cret");
        assert!(!format!("{secret:?}").contains("s3cret"));
    }
}
