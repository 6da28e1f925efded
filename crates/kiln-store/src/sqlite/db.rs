//! The SQLite store's connections. Reads run on the caller's thread, on a connection
//! taken from a small pool; writes run on one writer thread, which commits them in
//! groups.
//!
//! An async driver gives every statement to a thread of its connection and waits for
//! the answer: two thread switches per statement, tens per job, and those switches were
//! most of the server's CPU. Here a read costs none: SQLite answers a point read from
//! its page cache in microseconds, which is no longer than other work an async task
//! does between awaits. Reads that can scan a whole database go through
//! [`Db::read_blocking`] instead.
//!
//! A write is a closure sent to the writer thread. The thread takes every write waiting
//! for it, runs each in a savepoint of one `BEGIN IMMEDIATE` transaction (a write that
//! fails is rolled back to its savepoint and the others go on), commits once, and only
//! then answers each caller: a write is on disk before it is acknowledged, with one
//! sync for the group. SQLite takes one writer at a time, so one thread loses nothing,
//! and writes never wait in SQLite's busy handler, which sleeps.

use crate::{StoreError, StoreResult};
use rusqlite::{Connection, OpenFlags};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Reader connections kept for reuse; a burst above this opens and closes its extras.
const READERS_KEPT: usize = 8;
/// Each connection's page cache, in KiB (SQLite's default is 2,000). With the writer
/// and up to [`READERS_KEPT`] readers, the default let the server's memory grow by
/// several MiB as the database grew during a long upload (docs/benchmarks.md, "Packs
/// sent in parts as they fill"); pages it no longer holds are read from the operating
/// system's cache. Measured: no change in whole-farm throughput, the store alone
/// about 6 % fewer cycles a second.
const PAGE_CACHE_KIB: i64 = 512;

/// Writes one commit groups at most, so that a caller's answer is not held back by an
/// unbounded queue behind it.
const GROUP_MAX: usize = 256;

/// Prepared statements each connection keeps.
const STATEMENT_CACHE: usize = 128;

/// A write waiting for the writer thread.
trait PendingWrite: Send {
    /// Runs the write; the result says whether it succeeded and how to answer its
    /// caller once the group's commit is known.
    fn run(self: Box<Self>, conn: &Connection) -> Ran;
    /// Answers the caller that the write could not run.
    fn refuse(self: Box<Self>, err: &rusqlite::Error);
}

struct Pending<F, T> {
    write: F,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<F, T> PendingWrite for Pending<F, T>
where
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
    T: Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> Ran {
        let Pending { write, reply } = *self;
        let result = write(conn);
        Ran {
            ok: result.is_ok(),
            answer: Box::new(move |commit_failed| {
                let result = match (result, commit_failed) {
                    (Ok(_), Some(err)) => Err(StoreError::Sqlite(copy_error(err))),
                    (result, _) => result,
                };
                let _ = reply.send(result);
            }),
        }
    }

    fn refuse(self: Box<Self>, err: &rusqlite::Error) {
        let _ = self.reply.send(Err(StoreError::Sqlite(copy_error(err))));
    }
}

type Write = Box<dyn PendingWrite>;

/// Answers a write's caller, given the error of the group's commit if it failed.
type Answer = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

struct Ran {
    ok: bool,
    answer: Answer,
}

/// The connections of one database file.
pub(super) struct Db {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    writes: mpsc::Sender<Write>,
}

impl Db {
    /// Opens the database at `path` (already created and migrated) and starts its writer
    /// thread, which ends when the last handle to the `Db` is dropped.
    pub(super) fn open(path: &Path) -> StoreResult<Arc<Db>> {
        let writer = connect(path)?;
        // FULL: a state change is on disk before it is acknowledged (invariant 3).
        writer.pragma_update(None, "synchronous", "FULL")?;
        let (sender, receiver) = mpsc::channel::<Write>();
        std::thread::Builder::new()
            .name("kiln-sqlite-writer".into())
            .spawn(move || write_loop(writer, receiver))
            .map_err(|err| StoreError::Conflict(format!("starting the SQLite writer: {err}")))?;
        Ok(Arc::new(Db {
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            writes: sender,
        }))
    }

    /// Runs `read` on a reader connection, on this thread. For reads bounded by what
    /// they ask (a row, a job's events, a page); see [`Db::read_blocking`] for the rest.
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let conn = self.take_reader()?;
        let result = read(&conn);
        self.give_back(conn);
        result
    }

    /// Runs `read` on a reader connection on a blocking thread: for reads that can scan
    /// the whole database (every chunk, every build).
    pub(super) async fn read_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let db = Arc::clone(self);
        tokio::task::spawn_blocking(move || db.read(read))
            .await
            .map_err(|err| StoreError::Conflict(format!("a database read panicked: {err}")))?
    }

    /// Runs `write` in the writer's transaction and answers once it is committed. An
    /// error from `write` rolls back what it wrote, and only that.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel::<StoreResult<T>>();
        let job: Write = Box::new(Pending { write, reply });
        self.writes
            .send(job)
            .map_err(|_| StoreError::Conflict("the SQLite writer has stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Conflict("a database write panicked and was rolled back".into())
        })?
    }

    fn take_reader(&self) -> StoreResult<Connection> {
        let kept = self
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match kept {
            Some(conn) => Ok(conn),
            None => connect(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        // A read that stopped inside a transaction of its own leaves the connection unfit.
        if !conn.is_autocommit() {
            return;
        }
        let mut readers = self
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if readers.len() < READERS_KEPT {
            readers.push(conn);
        }
    }
}

/// Opens a connection with the settings every connection of the store has.
fn connect(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
    Ok(conn)
}

/// The writer thread: takes the writes waiting, runs them in one transaction, commits,
/// answers. Ends when every sender is gone.
fn write_loop(conn: Connection, writes: mpsc::Receiver<Write>) {
    while let Ok(first) = writes.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match writes.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        commit_group(&conn, group);
    }
}

fn commit_group(conn: &Connection, group: Vec<Write>) {
    if let Err(err) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::warn!(error = %err, "a group of SQLite writes could not begin");
        for write in group {
            write.refuse(&err);
        }
        return;
    }
    let alone = group.len() == 1;
    let mut answers = Vec::with_capacity(group.len());
    for write in group {
        answers.push(run_one(conn, write, !alone));
    }
    // A write alone that failed is rolled back whole; any other group commits.
    let roll_back = alone && !answers[0].ok;
    let end = conn
        .execute_batch(if roll_back { "ROLLBACK" } else { "COMMIT" })
        .err();
    if end.is_some() && !conn.is_autocommit() {
        // A COMMIT that failed (the disk is full) can leave the transaction open.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let commit_failed = if roll_back { None } else { end };
    for ran in answers {
        (ran.answer)(commit_failed.as_ref());
    }
}

/// Runs one write (in a savepoint of its own when it shares the transaction) and rolls
/// back what it wrote if it failed or panicked.
fn run_one(conn: &Connection, write: Write, savepoint: bool) -> Ran {
    if savepoint {
        if let Err(err) = conn.execute_batch("SAVEPOINT one") {
            write.refuse(&err);
            return Ran {
                ok: false,
                answer: Box::new(|_| {}),
            };
        }
    }
    let ran = match catch_unwind(AssertUnwindSafe(|| write.run(conn))) {
        Ok(ran) => ran,
        // The caller's answer channel went with the write: its caller sees the panic.
        Err(_) => Ran {
            ok: false,
            answer: Box::new(|_| {}),
        },
    };
    if savepoint {
        let undo = if ran.ok {
            conn.execute_batch("RELEASE one")
        } else {
            conn.execute_batch("ROLLBACK TO one; RELEASE one")
        };
        if let Err(err) = undo {
            tracing::error!(error = %err, "ending the savepoint of a SQLite write");
        }
    }
    ran
}

/// A copy of `err` for each caller of a group whose commit failed.
fn copy_error(err: &rusqlite::Error) -> rusqlite::Error {
    match err {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(conn: &Connection, name: &str) -> StoreResult<()> {
        conn.execute("INSERT INTO t (name) VALUES (?)", [name])?;
        Ok(())
    }

    fn names(db: &Db) -> Vec<String> {
        db.read(|conn| {
            // By name: the spawned writes reach the writer in any order.
            let mut statement = conn.prepare("SELECT name FROM t ORDER BY name")?;
            let names = statement.query_map([], |row| row.get(0))?;
            Ok(names.collect::<Result<Vec<String>, _>>()?)
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commits_the_writes_that_succeeded_and_rolls_back_each_one_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (name TEXT NOT NULL);")
            .unwrap();
        let db = Db::open(&path).unwrap();

        // The first write holds the writer thread until the others wait behind it, so
        // that they run as one group, each in a savepoint.
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let db = Arc::clone(&db);
            async move {
                db.write(move |conn| {
                    gate.recv().unwrap();
                    insert(conn, "first")
                })
                .await
            }
        });
        let spawn_write = |name: &'static str, ending: fn() -> StoreResult<()>| {
            let db = Arc::clone(&db);
            tokio::spawn(async move {
                db.write(move |conn| {
                    insert(conn, name)?;
                    ending()
                })
                .await
            })
        };
        let kept = spawn_write("kept", || Ok(()));
        let refused = spawn_write("refused", || Err(StoreError::Conflict("no".into())));
        let panicked = spawn_write("panicked", || panic!("a write that panics"));
        let kept_too = spawn_write("kept too", || Ok(()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        open_gate.send(()).unwrap();

        assert!(first.await.unwrap().is_ok());
        assert!(kept.await.unwrap().is_ok());
        assert!(matches!(
            refused.await.unwrap(),
            Err(StoreError::Conflict(message)) if message == "no"
        ));
        assert!(matches!(
            panicked.await.unwrap(),
            Err(StoreError::Conflict(message)) if message.contains("panicked")
        ));
        assert!(kept_too.await.unwrap().is_ok());
        assert_eq!(names(&db), ["first", "kept", "kept too"]);
        // (The rows of "refused" and "panicked" were written, then rolled back alone.)

        // The writer thread outlived the panic.
        db.write(|conn| insert(conn, "after")).await.unwrap();
        assert_eq!(names(&db), ["after", "first", "kept", "kept too"]);
    }
}
