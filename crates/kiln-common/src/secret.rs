//! Secrets and the files that hold them.
//!
//! A secret is 32 random bytes as 64 hex digits. Token files hold one secret on a
//! line, mode 0600, replaced crash-safely ([`crate::fs::write_atomic_with_mode`]).

use rand::RngCore;
use std::path::{Path, PathBuf};

/// What went wrong with a token file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("reading token file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file holds no secret.
    #[error("token file {} is empty{hint}", path.display())]
    Empty { path: PathBuf, hint: &'static str },
    /// The file could not be written.
    #[error("writing token file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A fresh random secret: 32 bytes, hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Reads the secret in `path` (trimmed); refuses an empty file.
pub fn read_secret_file(path: &Path) -> Result<String, SecretFileError> {
    read_non_empty(path, "")
}

/// Reads a secret from `given`, else from `default_path`, else makes a new one there
/// (random, mode 0600): how the server's and the master's token files come to be.
pub fn read_or_create_secret(
    default_path: &Path,
    given: Option<&Path>,
) -> Result<String, SecretFileError> {
    if let Some(path) = given {
        return read_non_empty(path, "");
    }
    if default_path.exists() {
        return read_non_empty(default_path, " (delete it to have a new secret made)");
    }
    let secret = new_secret();
    write_secret_file(default_path, &secret)?;
    Ok(secret)
}

/// Writes `secret` on a line to `path` (mode 0600), replacing it crash-safely.
pub fn write_secret_file(path: &Path, secret: &str) -> Result<(), SecretFileError> {
    crate::fs::write_atomic_with_mode(path, format!("{secret}\n").as_bytes(), 0o600).map_err(
        |source| SecretFileError::Write {
            path: path.to_owned(),
            source,
        },
    )
}

fn read_non_empty(path: &Path, hint: &'static str) -> Result<String, SecretFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
            hint,
        });
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_missing_token_file_is_made_once_and_read_back_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let made = read_or_create_secret(&path, None).unwrap();
        assert_eq!(made.len(), 64);
        assert_eq!(read_or_create_secret(&path, None).unwrap(), made);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_given_file_wins_and_an_empty_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("given");
        std::fs::write(&given, "  s3cret\n").unwrap();
        let default = dir.path().join("default");
        assert_eq!(
            read_or_create_secret(&default, Some(&given)).unwrap(),
            "s3cret"
        );
        assert!(!default.exists());
        std::fs::write(&given, "\n").unwrap();
        let err = read_or_create_secret(&default, Some(&given)).unwrap_err();
        assert!(err.to_string().contains("given"), "{err}");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn new_secrets_differ() {
        assert_ne!(new_secret(), new_secret());
    }
}
