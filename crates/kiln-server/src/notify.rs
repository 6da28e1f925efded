//! The notifier: delivers the webhook notices the store queued (job finished, failed or
//! expired; build finished) to each build's NOTIFY URLs, retrying with backoff. It runs
//! apart from everything else, so that a dead webhook never holds up the queue.

use crate::AppState;
use futures::StreamExt;
use kiln_store::Notification;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Deliveries tried before a notice is given up (about a day of backoff).
const MAX_ATTEMPTS: u32 = 30;
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 8;

/// The wait before try number `attempts + 1`: 1 s, 2 s, 4 s ... up to an hour.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(12)).min(MAX_BACKOFF)
}

/// Runs until `shutdown` fires.
pub async fn notifier(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            tracing::error!(cause = %kiln_proto::error_chain(&err), "notifier cannot set up HTTP; webhooks are off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = state.notices.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let due = match state
            .store
            .due_notifications(kiln_common::now_micros(), 256)
            .await
        {
            Ok(due) => due,
            Err(err) => {
                tracing::error!(cause = %kiln_proto::error_chain(&err), "notifier cannot read the outbox");
                continue;
            }
        };
        // Each URL gets its notices one at a time, in order, stopping at a failure (the
        // rest wait for the retry); different URLs are served side by side.
        let mut by_url: Vec<(String, Vec<Notification>)> = Vec::new();
        for notification in due {
            match by_url.iter_mut().find(|(url, _)| *url == notification.url) {
                Some((_, queue)) => queue.push(notification),
                None => by_url.push((notification.url.clone(), vec![notification])),
            }
        }
        futures::stream::iter(by_url)
            .for_each_concurrent(CONCURRENCY, |(_, queue)| async {
                for notification in queue {
                    if !deliver(&state, &http, notification).await {
                        break;
                    }
                }
            })
            .await;
    }
}

/// Tries one delivery and records the outcome; true if it was delivered.
async fn deliver(state: &AppState, http: &reqwest::Client, notification: Notification) -> bool {
    let result = http
        .post(&notification.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(notification.body.clone())
        .send()
        .await;
    let error = match result {
        Ok(response) if response.status().is_success() => None,
        Ok(response) => Some(format!("HTTP {}", response.status())),
        Err(err) => Some(kiln_proto::error_chain(&err)),
    };
    let now = kiln_common::now_micros();
    let recorded = match &error {
        None => {
            state
                .store
                .notification_delivered(notification.id, now)
                .await
        }
        Some(error) => {
            let tries = notification.attempts + 1;
            let retry_at = (tries < MAX_ATTEMPTS).then(|| now + backoff(tries).as_micros() as i64);
            tracing::warn!(
                build = %notification.build,
                url = %notification.url,
                tries,
                cause = %error,
                gave_up = retry_at.is_none(),
                "webhook delivery failed"
            );
            state
                .store
                .notification_failed(notification.id, error, retry_at, now)
                .await
        }
    };
    if let Err(err) = recorded {
        tracing::error!(cause = %kiln_proto::error_chain(&err), "notifier cannot update the outbox");
    }
    error.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
