//! kiln's shared vocabulary: wire types, manifest and seed XML formats, and the job
//! state machine.
//!
//! - [`manifest`]: `relbuild.xml` / `kiln.toml` into [`manifest::BuildManifest`].
//! - [`client_config`]: `buildclient.xml` / client TOML into [`client_config::ClientConfig`].
//! - [`progress`]: the `##kiln[progress ...]` line a job step prints.
//! - [`status_xml`]: the seed's `job_id.xml` (JOBSTATUS) rendering.
//! - [`state`]: [`state::JobState`] and the transitions the invariants allow.
//! - [`api`]: the JSON bodies of the HTTP API under `/v1`.
//! - [`transfer`]: chunk names and the bodies of the chunked image transfer calls.
//! - [`names`]: validation of names that come from outside.

pub mod api;
pub mod client_config;
pub mod error;
pub mod manifest;
pub mod names;
pub mod progress;
pub mod state;
pub mod status_xml;
pub mod transfer;

/// The HTTP header that carries a job's lease token on every client call about it.
pub const LEASE_HEADER: &str = "x-kiln-lease";
/// The HTTP header that carries an image's whole-file BLAKE3 hash (hex) on upload.
pub const BLAKE3_HEADER: &str = "x-kiln-blake3";

/// An error followed by its causes, `: `-joined: for logs and response bodies.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Unix microseconds as an RFC 3339 UTC time with microseconds, e.g.
/// `2026-11-24T17:42:01.123456Z`.
pub fn format_rfc3339(unix_micros: i64) -> String {
    let nanos = i128::from(unix_micros) * 1000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_micros.to_string())
}
