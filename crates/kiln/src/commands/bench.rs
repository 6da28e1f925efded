//! `kiln bench ...`: the benchmarks of kiln-harness, each run on a farm of real
//! processes on this machine; each prints its table on stdout.

use super::status::exit_code;
use crate::cli::{BenchArgs, BenchWhich, FailoverMode};
use kiln_harness::bench::{self, fleet, throughput, transfer};
use kiln_harness::chaos;
use std::process::ExitCode;

/// Runs the bench. SIGTERM or SIGINT ends it at once: the bench's future is dropped, and
/// with it the processes it started (spawned with `kill_on_drop`), the PostgreSQL and
/// SeaweedFS it started, and its temporary directories. (`transfer` stops on the
/// signal itself, between trials.)
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if matches!(args.which, BenchWhich::Transfer { .. }) {
        return run_to_its_end(args).await;
    }
    tokio::select! {
        result = run_to_its_end(args) => result,
        () = super::terminated() => {
            eprintln!("bench: stopped by a signal; the processes it started are ended");
            Ok(ExitCode::from(130))
        }
    }
}

async fn run_to_its_end(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let ran_to_its_end = match args.which {
        BenchWhich::Dispatch {
            clients,
            jobs,
            database,
            servers,
            wait_elsewhere,
        } => bench::dispatch(clients, jobs, database.as_deref(), servers, wait_elsewhere).await?,
        BenchWhich::Makespan {
            clients,
            jobs,
            job_secs,
        } => bench::makespan(clients, jobs, job_secs).await?,
        BenchWhich::Tabs {
            tabs,
            rounds,
            clients,
            jobs,
            job_secs,
        } => bench::tabs::run(clients, jobs, job_secs, tabs, rounds).await?,
        BenchWhich::Failover {
            mode,
            trials,
            lease_secs,
            heartbeat_secs,
        } => {
            let mode = match mode {
                FailoverMode::Kill => bench::FailoverMode::Kill,
                FailoverMode::Stop => bench::FailoverMode::Stop,
                FailoverMode::Partition => bench::FailoverMode::Partition,
            };
            bench::failover(mode, trials, lease_secs, heartbeat_secs).await?
        }
        BenchWhich::Throughput {
            jobs,
            clients,
            slots,
            database,
            replicas,
            webhook_down,
        } => {
            throughput::throughput(
                jobs,
                clients,
                slots,
                database.as_deref(),
                replicas,
                webhook_down,
            )
            .await?
        }
        BenchWhich::Store {
            jobs,
            workers,
            dispatchers,
            rounds,
            database,
            webhook,
        } => {
            kiln_harness::bench::store::store(
                jobs,
                &workers,
                rounds,
                dispatchers,
                database.as_deref(),
                webhook,
            )
            .await?
        }
        BenchWhich::Reattach {
            clients,
            trials,
            replicas,
        } => bench::reattach(clients, trials, replicas).await?,
        BenchWhich::Chaos {
            products,
            configs,
            clients,
            client_kills,
            server_kills,
            replicas,
            database_restarts,
            seed,
        } => {
            let plan = chaos::Plan {
                products,
                configs,
                clients,
                client_kills,
                server_kills,
                replicas,
                database_restarts,
                seed,
            };
            chaos::run(plan).await?
        }
        BenchWhich::Transfer {
            size_mib,
            rss_size_mib,
            skip_rss,
            skip_s3,
            only,
            trials,
            work,
        } => {
            let options = transfer::Options {
                size_mib,
                rss_size_mib,
                skip_rss,
                skip_s3,
                only,
                trials,
                work,
            };
            transfer::run(options, super::terminated()).await?
        }
        BenchWhich::Fleet {
            servers,
            clients,
            jobs,
            trials,
        } => {
            let options = fleet::Options {
                servers,
                clients,
                jobs,
                trials,
            };
            fleet::run(options).await?
        }
    };
    Ok(exit_code(ran_to_its_end))
}
