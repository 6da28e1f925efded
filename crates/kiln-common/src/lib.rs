//! What several kiln crates need and none of them owns.
//!
//! - [`fs`]: [`fs::AtomicFile`] and [`fs::write_atomic`], the one crash-safe way kiln
//!   replaces a file (temporary file beside it, fsync, rename, fsync the directory,
//!   the temporary file removed on every error).
//! - [`clock`]: [`clock::now_micros`], the one clock that orders a server's store, and
//!   the [`clock::Clock`] seam with a [`clock::FakeClock`] for tests.
//! - [`secret`]: fresh random secrets and the token files that hold them (mode 0600).

pub mod clock;
pub mod fs;
pub mod secret;

pub use clock::now_micros;
