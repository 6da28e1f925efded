//! Word between servers sharing one PostgreSQL database: every transaction that writes
//! an event (a job queued, claimed, ended, taken back) sends `NOTIFY kiln_changes` as
//! it commits (a trigger on `events` does, migrations 0008 and 0010, with no round trip
//! of its own), and each server LISTENs on a connection of its own, so that a job
//! submitted to one server goes to a client waiting on another at once, and their
//! dashboards follow each other's changes.
//!
//! The word's payload is the writing connection's `application_name`, which each store
//! sets to an origin of its own ([`new_origin`]), followed by `" end"` when a job ended:
//! a store's feed passes over its own words (its server already knows), and tells
//! whether a webhook notice may have been queued ([`Change::ended`]).
//!
//! A notification sent while the listening connection is down is lost: when it comes
//! back the follower says "changed" anyway, and says so every [`FALLBACK_EVERY`] when
//! nothing came, so a lost word costs at most that long.

use crate::{Change, StoreResult};
use rand::RngCore;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::mpsc;

/// The channel's name.
const CHANNEL: &str = "kiln_changes";

/// How often a follower says "changed" when no notification came.
pub const FALLBACK_EVERY: Duration = Duration::from_secs(5);

/// Words waiting for the follower. When they are this many, a new one is dropped: the
/// follower looks at everything when it wakes, and an end it would have said is found
/// by the notifier's own poll (every second).
const WAITING: usize = 64;

/// A new store's origin: `kiln-` and 16 random hex digits (within PostgreSQL's 63
/// bytes of `application_name`).
pub(super) fn new_origin() -> String {
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("kiln-{}", hex::encode(bytes))
}

/// What a word's payload says to the store of `origin`: `None` for its own change.
fn change_of(payload: &str, origin: &str) -> Option<Change> {
    let (from, ended) = match payload.strip_suffix(" end") {
        Some(from) => (from, true),
        None => (payload, false),
    };
    (from != origin).then_some(Change { ended })
}

/// Starts listening (failing if the database cannot be reached now) and returns the
/// feed of other stores' changes; a task forwards them until the receiver is dropped.
pub(super) async fn follow(pool: &PgPool, origin: &str) -> StoreResult<mpsc::Receiver<Change>> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    let origin = origin.to_owned();
    let (sender, receiver) = mpsc::channel(WAITING);
    tokio::spawn(async move {
        loop {
            let word = tokio::select! {
                _ = sender.closed() => return,
                word = tokio::time::timeout(FALLBACK_EVERY, listener.try_recv()) => word,
            };
            let change = match word {
                Ok(Ok(Some(notification))) => match change_of(notification.payload(), &origin) {
                    Some(change) => change,
                    None => continue,
                },
                // A quiet while: look again, in case a word was lost.
                Err(_) => Change { ended: true },
                // The connection dropped; the next call reconnects and listens again.
                // Whatever was sent meanwhile is lost: look again.
                Ok(Ok(None)) => {
                    tracing::warn!(
                        "lost the connection that listens for other servers' changes; reconnecting"
                    );
                    Change { ended: true }
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "listening for other servers' changes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Change { ended: true }
                }
            };
            // Full means many words are waiting already.
            let _ = sender.try_send(change);
        }
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_names_its_origin_and_whether_a_job_ended() {
        let origin = "kiln-00112233aabbccdd";
        assert_eq!(change_of(origin, origin), None);
        assert_eq!(change_of(&format!("{origin} end"), origin), None);
        assert_eq!(
            change_of("kiln-ffffffffffffffff", origin),
            Some(Change { ended: false })
        );
        assert_eq!(
            change_of("kiln-ffffffffffffffff end", origin),
            Some(Change { ended: true })
        );
        // A word of a connection that has no `application_name` (a server from before
        // migration 0010, or anyone else writing events): another's change.
        assert_eq!(change_of("", origin), Some(Change { ended: false }));
        assert!(new_origin().len() < 64);
        assert_ne!(new_origin(), new_origin());
    }
}
