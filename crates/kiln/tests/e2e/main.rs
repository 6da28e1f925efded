//! kiln's end-to-end tests, in one binary: each module drives the real `kiln` binary
//! as processes over loopback HTTP, with the support of kiln-harness's `testing`
//! ([`common`]). `cargo test -p kiln --test e2e MODULE::` runs one module's tests.

mod common;

mod attempts;
mod bad_input;
mod build_files;
mod chaos;
mod client_killed;
mod client_reset;
mod client_stop;
mod dashboard;
mod debian;
mod disk_full;
mod events_log;
mod expiry_notify;
mod failures;
mod fleet;
mod fleet_clients;
mod gc_interleaving;
mod hostile;
mod hung;
mod identities;
mod inventory;
mod limits;
mod metrics;
mod object_store;
mod partition;
mod permissions;
mod postgres;
mod release_reuse;
mod restart_cancel;
mod scheduling;
mod secrets;
mod seed_example;
mod server_restart;
mod streams;
mod tls;
mod transfer;
