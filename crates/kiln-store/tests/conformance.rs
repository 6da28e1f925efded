//! The store's conformance cases (`kiln_store::conformance`) on every backend, each a
//! test of its own: on [`SqliteStore`], a new database in a temporary directory; on
//! [`PgStore`], a new database on a throwaway PostgreSQL server the tests start
//! ([`PgCluster`]).

use async_trait::async_trait;
use kiln_harness::postgres::PgCluster;
use kiln_store::conformance::StoreFactory;
use kiln_store::{PgStore, SqliteStore, Store};
use std::collections::BTreeSet;
use std::sync::Arc;
use tempfile::TempDir;

/// SQLite stores: a database file in a temporary directory.
struct SqliteFactory;

#[async_trait]
impl StoreFactory for SqliteFactory {
    type Place = TempDir;

    async fn new_place(&self) -> anyhow::Result<TempDir> {
        Ok(tempfile::tempdir()?)
    }

    async fn open(&self, place: &TempDir) -> anyhow::Result<Arc<dyn Store>> {
        Ok(Arc::new(
            SqliteStore::open(&place.path().join("kiln.db")).await?,
        ))
    }
}

kiln_store::conformance_tests!(sqlite, SqliteFactory);

/// PostgreSQL stores: a new database on the test process's PostgreSQL server.
struct PgFactory;

#[async_trait]
impl StoreFactory for PgFactory {
    type Place = String;

    async fn new_place(&self) -> anyhow::Result<String> {
        PgCluster::shared()?.new_database().await
    }

    async fn open(&self, url: &String) -> anyhow::Result<Arc<dyn Store>> {
        Ok(Arc::new(PgStore::connect(url).await?))
    }
}

kiln_store::conformance_tests!(postgres, PgFactory);

/// A case written in `cases.rs` but missing from the list in `conformance_tests!` would
/// run on no backend.
#[test]
fn every_case_written_is_run() {
    let source = include_str!("../src/conformance/cases.rs");
    let written: BTreeSet<&str> = source
        .lines()
        .filter_map(|line| line.strip_prefix("pub async fn "))
        .filter_map(|rest| rest.split(['<', '(']).next())
        .collect();
    let run: BTreeSet<&str> = sqlite::CASES.iter().copied().collect();
    assert_eq!(written, run);
    assert_eq!(run.len(), sqlite::CASES.len(), "a case listed twice");
    assert_eq!(sqlite::CASES, postgres::CASES);
}

/// Two stores on one PostgreSQL database, as two servers are: what one writes (a build
/// submitted, then a job claimed and finished) reaches the other's feed of changes by
/// its notification, well before the feed's fallback word (every 5 s when none comes),
/// saying whether a job ended; what a store writes itself does not reach its own feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_postgresql_store_is_told_to_another_following_it() -> anyhow::Result<()> {
    use kiln_store::conformance::{at, claim, image, job, new_build, BUILD};
    use kiln_store::{Change, Images, Queue};
    use std::time::Duration;
    /// Well under the fallback's 5 s: a word that comes only by the fallback fails.
    const TOLD_WITHIN: Duration = Duration::from_millis(2500);
    let url = PgCluster::shared()?.new_database().await?;
    let writer = PgStore::connect(&url).await?;
    let follower = PgStore::connect(&url).await?;
    let mut feed = follower
        .follow_changes()
        .await?
        .expect("a PostgreSQL store has a feed of changes");
    let mut told = async |what: &str| {
        tokio::time::timeout(TOLD_WITHIN, feed.recv())
            .await
            .map_err(|_| anyhow::anyhow!("{what} was not told within {TOLD_WITHIN:?}"))?
            .ok_or_else(|| anyhow::anyhow!("the feed ended"))
    };
    writer
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    assert_eq!(told("a submitted build").await?, Change { ended: false });
    let run = claim(&writer, BUILD, "a", "client-1", at(1)).await?;
    assert_eq!(told("a claim").await?, Change { ended: false });
    writer
        .add_image(BUILD, "a", &run.lease, &image("a.img", at(2)))
        .await?;
    writer
        .finish(BUILD, "a", &run.lease, &["a.img".to_owned()], at(3))
        .await?;
    assert_eq!(told("a job's end").await?, Change { ended: true });
    // The follower's own claim, then the writer's cancel: the next word is the cancel's.
    claim(&follower, BUILD, "b", "client-2", at(4)).await?;
    writer.cancel(BUILD, "b", at(5)).await?;
    assert_eq!(told("a cancel").await?, Change { ended: true });
    Ok(())
}

/// Calls that come while every lane of a PostgreSQL store is busy wait, and once a lane
/// frees go together into one transaction (`postgres/batch.rs`), each decided as if it
/// were alone. Four claims of jobs whose rows another connection holds take the four
/// lanes and wait; twelve claims that come meanwhile wait for a lane; when the rows are
/// let go, the twelve share a batch. Every job is then handed out once, with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_wait_for_a_lane_on_postgresql_are_committed_together() -> anyhow::Result<()> {
    use kiln_store::conformance::{at, claim, BUILD};
    use kiln_store::Queue;
    use sqlx::Connection;
    use std::time::Duration;
    let (url, store, ids) = store_with_jobs(16).await?;
    let (held, others) = ids.split_at(4);
    let mut holder = hold_rows(&url, held).await?;
    let mut calls = tokio::task::JoinSet::new();
    let spawn_claims = |calls: &mut tokio::task::JoinSet<_>, ids: &[String]| {
        for (idx, id) in ids.iter().enumerate() {
            let (store, id) = (store.clone(), id.clone());
            calls.spawn(async move {
                let client = format!("client-{}", idx % 3);
                let run = claim(&*store, BUILD, &id, &client, at(1)).await?;
                anyhow::Ok(run.job)
            });
        }
    };
    spawn_claims(&mut calls, held);
    // The four claims wait for the held rows, each in a lane.
    let mut watcher = sqlx::PgConnection::connect(&url).await?;
    waiting_for_locks(&mut watcher, "%", 4).await?;
    spawn_claims(&mut calls, others);
    // Time for the twelve to reach the batcher's queue; none can run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.calls_batched(), Some(0));
    sqlx::query("COMMIT").execute(&mut holder).await?;

    let mut claimed = Vec::new();
    while let Some(joined) = calls.join_next().await {
        claimed.push(joined??);
    }
    claimed.sort();
    assert_eq!(claimed, ids, "every job handed out once");
    assert_eq!(store.calls_batched(), Some(others.len() as u64));
    let events = store.events(BUILD, 0).await?;
    assert_eq!(events.len(), 2 * ids.len(), "queued and running a job");
    for id in &ids {
        let status = store.get_job(BUILD, id).await?;
        assert_eq!((status.attempt, status.state.as_str()), (1, "running"));
    }
    Ok(())
}

/// A batch whose connection is lost (PostgreSQL ends its backend, as a restart does)
/// tells every call in it that the database is unavailable, and none of them is
/// written. Four claims wait on rows another connection holds, one in each lane;
/// thirteen more wait for a lane. Ending one waiting claim's backend frees its lane,
/// and the thirteen go into one batch, which waits for the one of its rows that is
/// also held; then the batch's backend is ended. Every job not handed out is still
/// queued, and is handed out once the store is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_loses_its_connection_tells_every_caller_and_writes_nothing(
) -> anyhow::Result<()> {
    use kiln_store::conformance::{at, claim, BUILD};
    use kiln_store::{ClaimingClient, Queue, StoreError};
    use sqlx::Connection;
    use std::time::Duration;
    let (url, store, ids) = store_with_jobs(17).await?;
    // Four jobs whose claims take the lanes, and one of the batch's.
    let (in_lanes, batched) = ids.split_at(4);
    let held: Vec<String> = in_lanes.iter().chain(&batched[..1]).cloned().collect();
    let mut holder = hold_rows(&url, &held).await?;
    let spawn_claims = |ids: &[String]| {
        let mut calls = tokio::task::JoinSet::new();
        for (idx, id) in ids.iter().enumerate() {
            let (store, id) = (store.clone(), id.clone());
            calls.spawn(async move {
                let client = ClaimingClient {
                    id: format!("client-{}", idx % 3),
                    include: vec!["*".into()],
                    slots: Some(4),
                    version: None,
                    address: None,
                };
                let claimed = store
                    .claim(BUILD, &id, &client, at(1) + 600_000_000, at(1))
                    .await;
                (id, claimed)
            });
        }
        calls
    };
    let mut watcher = sqlx::PgConnection::connect(&url).await?;
    let end_backend = |pid: i32| {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut conn)
                .await?;
            assert!(ended, "backend {pid} was not ended");
            anyhow::Ok(())
        }
    };

    let mut lane_calls = spawn_claims(in_lanes);
    let lane_pids = waiting_for_locks(
        &mut watcher,
        "%FROM jobs WHERE build = $1 AND id = $2 FOR UPDATE",
        4,
    )
    .await?;
    let mut batch_calls = spawn_claims(batched);
    // Time for the thirteen to reach the batcher's queue; none can run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    end_backend(lane_pids[0]).await?;
    let batch_pid = waiting_for_locks(&mut watcher, "%UNNEST%FOR UPDATE OF jobs", 1).await?[0];
    end_backend(batch_pid).await?;

    // Answered while the row is still held: none of them waits for it again.
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(20), batch_calls.join_next())
        .await
        .expect("the batch's calls were answered")
    {
        let (id, claimed) = joined?;
        assert!(
            matches!(claimed, Err(StoreError::Unavailable(_))),
            "{id}: {claimed:?}"
        );
    }
    assert_eq!(store.calls_batched(), Some(0));
    sqlx::query("COMMIT").execute(&mut holder).await?;
    let mut handed_out = Vec::new();
    while let Some(joined) = lane_calls.join_next().await {
        match joined? {
            (id, Ok(Some(_))) => handed_out.push(id),
            (id, Err(StoreError::Unavailable(_))) => {
                assert!(!handed_out.contains(&id), "{id}")
            }
            (id, other) => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(handed_out.len(), 3, "the three claims whose lanes lived");

    // Nothing of the lost calls was written: every other job is queued as submitted.
    let events = store.events(BUILD, 0).await?;
    assert_eq!(events.len(), ids.len() + handed_out.len());
    for id in &ids {
        let status = store.get_job(BUILD, id).await?;
        let expected = if handed_out.contains(id) {
            (1, "running")
        } else {
            (0, "queued")
        };
        assert_eq!((status.attempt, status.state.as_str()), expected, "{id}");
    }
    // And the store serves them now.
    for id in ids.iter().filter(|id| !handed_out.contains(id)) {
        claim(&*store, BUILD, id, "client-0", at(2)).await?;
    }
    assert_eq!(
        store.events(BUILD, 0).await?.len(),
        2 * ids.len(),
        "queued and running a job"
    );
    Ok(())
}

/// The backends of `watcher`'s database waiting for a lock while running a statement
/// LIKE `statement`, once there are `n` of them (seen from a connection outside any
/// transaction: a transaction sees one snapshot of the server's activity).
async fn waiting_for_locks(
    watcher: &mut sqlx::PgConnection,
    statement: &str,
    n: usize,
) -> anyhow::Result<Vec<i32>> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE $1 ORDER BY pid",
        )
        .bind(statement)
        .fetch_all(&mut *watcher)
        .await?;
        if pids.len() >= n {
            return Ok(pids);
        }
        assert!(
            Instant::now() < deadline,
            "never {n} waiting for a lock: {statement}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A new PostgreSQL database, a store on it, and a build of `n` jobs in it: the
/// database's URL, the store and the jobs' ids.
async fn store_with_jobs(n: usize) -> anyhow::Result<(String, Arc<PgStore>, Vec<String>)> {
    use kiln_store::conformance::{at, job, new_build, BUILD};
    use kiln_store::Queue;
    let url = PgCluster::shared()?.new_database().await?;
    let store = Arc::new(PgStore::connect(&url).await?);
    let ids: Vec<String> = (0..n).map(|idx| format!("job-{idx:02}")).collect();
    let jobs = ids.iter().map(|id| job(id)).collect();
    store.insert_build(&new_build(BUILD, jobs, at(0))).await?;
    Ok((url, store, ids))
}

/// A connection of its own holding the rows of the jobs `ids` in an open transaction,
/// until it commits.
async fn hold_rows(url: &str, ids: &[String]) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection;
    let mut holder = sqlx::PgConnection::connect(url).await?;
    sqlx::query("BEGIN").execute(&mut holder).await?;
    sqlx::query("SELECT 1 FROM jobs WHERE id = ANY($1) FOR UPDATE")
        .bind(ids)
        .execute(&mut holder)
        .await?;
    Ok(holder)
}
