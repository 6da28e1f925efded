//! kiln-harness: a kiln farm of real `kiln` processes on 127.0.0.1, and what is built
//! on it. Benchmarks and tests share it, so that what the benches measure is what the
//! tests check.
//!
//! - [`farm::Farm`]: a server and clients as processes of the `kiln` binary, each
//!   logging to a file, killed and restarted at will;
//! - [`bench`]: `kiln bench` — dispatch latency, failover, re-attach, makespan, image
//!   transfer ([`bench::transfer`]) and a fleet of servers behind a master
//!   ([`bench::fleet`]); each prints its table on stdout;
//! - [`chaos`]: `kiln bench chaos`, a build run while clients and the server are
//!   SIGKILLed, checked from the images and the event log;
//! - [`demo`]: `kiln demo`, a whole farm building the bundled example;
//! - [`proxy::TcpProxy`]: a proxy that cuts the network between a client and a server;
//! - [`nginx::LoadBalancer`]: an nginx in front of a farm's replicas, for the test of
//!   the setup docs/operations.md describes;
//! - [`postgres::PgCluster`]: a throwaway PostgreSQL server, for the tests and the
//!   chaos bench's replica mode;
//! - [`seaweed::Seaweed`]: a SeaweedFS of its own (`weed mini`) for the object storage
//!   tests and benches;
//! - `testing` (feature `testing`): the end-to-end tests' support (blocking: a test's
//!   harness, servers, clients, masters, builds, a tiny HTTP client).
//!
//! The harness is test and benchmark code: its errors are `anyhow`'s, and it reports
//! its progress on stderr. It runs the `kiln` binary that [`kiln_exe`] finds.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod farm;
pub mod nginx;
pub mod postgres;
pub mod proxy;
pub mod seaweed;
#[cfg(feature = "testing")]
pub mod testing;

use std::path::PathBuf;

/// The `kiln` binary the harness starts: `KILN_EXE` if set; else this process itself
/// when it is `kiln` (a bench run by `kiln bench`); else the one Cargo built for the
/// running tests (`CARGO_BIN_EXE_kiln`, or `kiln` beside the test binary's `deps`
/// directory).
pub fn kiln_exe() -> std::io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_EXE") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|name| name == "kiln") {
        return Ok(exe);
    }
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_kiln") {
        return Ok(PathBuf::from(path));
    }
    // A test binary lives in target/PROFILE/deps, the binaries in target/PROFILE.
    let beside = exe
        .parent()
        .map(|dir| {
            if dir.ends_with("deps") {
                dir.parent().unwrap_or(dir)
            } else {
                dir
            }
        })
        .map(|dir| dir.join("kiln"));
    match beside {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no kiln binary beside {} (set KILN_EXE to its path)",
                exe.display()
            ),
        )),
    }
}

/// Finds a program on PATH or in the sbin directories where e2fsprogs lives.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
