//! kiln-api: one typed client for kiln's HTTP API, for every caller of it.
//!
//! - [`Operator`]: the operator's calls to a server with the admin credential
//!   (builds, jobs, logs, events, images and chunks, clients, credentials, storage),
//!   [`Operator::submit`] and [`Operator::wait_for_build`];
//! - [`ServerConn`]: the agent's calls to a server (claim, heartbeat, log, finish,
//!   upload), made with the client's own identity, enrolled with the join token
//!   ([`Given`]);
//! - [`MasterConn`]: a master's list of live servers for clients, and registration
//!   ([`Registration`]) for servers.
//!
//! Each is made for an [`Endpoint`] (base URL and TLS settings). Every call fails with
//! a [`CallError`] that says whether the server could not be reached, refused (in its
//! own words), or wants the call again later; the CLI maps that to its exit codes.
//! Credentials are [`Secret`]s, never printed.

mod endpoint;
mod error;
pub mod identity;
mod master;
pub mod operator;
mod secret;
mod server;
mod submit;
mod watch;

pub use endpoint::{Endpoint, EndpointError};
pub use error::CallError;
pub use identity::{kept_client_id, kept_secret_path, Given};
pub use master::{MasterConn, Registration};
pub use operator::{Download, JobAction, Operator};
/// HTTP status codes, as [`CallError::Refused`] carries them.
pub use reqwest::StatusCode;
pub use secret::Secret;
pub use server::{FilesFetch, ServerConn};
pub use submit::SubmitError;
pub use watch::{format_eta, WaitError};
