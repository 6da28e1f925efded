//! Word between servers sharing one PostgreSQL database: every transaction that writes
//! an event (a job queued, claimed, ended, taken back) sends `NOTIFY kiln_changes` as
//! it commits (a trigger on `events` does, migration 0008, with no round trip of its
//! own), and each server LISTENs on a connection of its own, so that a job
//! submitted to one server goes to a client waiting on another at once, and their
//! dashboards follow each other's changes.
//!
//! A notification sent while the listening connection is down is lost: when it comes
//! back the follower says "changed" anyway, and says so every [`FALLBACK_EVERY`] when
//! nothing came, so a lost word costs at most that long.

use crate::StoreResult;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::mpsc;

/// The channel's name.
const CHANNEL: &str = "kiln_changes";

/// How often a follower says "changed" when no notification came.
pub const FALLBACK_EVERY: Duration = Duration::from_secs(5);

/// Starts listening (failing if the database cannot be reached now) and returns the
/// feed; a task forwards notifications until the receiver is dropped.
pub(super) async fn follow(pool: &PgPool) -> StoreResult<mpsc::Receiver<()>> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    // One pending word is enough: the follower reads everything when it wakes.
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let word = tokio::select! {
                _ = sender.closed() => return,
                word = tokio::time::timeout(FALLBACK_EVERY, listener.try_recv()) => word,
            };
            match word {
                // A notification, or a quiet while: look again either way.
                Ok(Ok(Some(_))) | Err(_) => {}
                // The connection dropped; the next call reconnects and listens again.
                // Whatever was sent meanwhile is lost: look again.
                Ok(Ok(None)) => {
                    tracing::warn!(
                        "lost the connection that listens for other servers' changes; reconnecting"
                    );
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "listening for other servers' changes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // Full means a word is already waiting.
            let _ = sender.try_send(());
        }
    });
    Ok(receiver)
}
