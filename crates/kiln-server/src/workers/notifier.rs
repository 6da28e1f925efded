//! The notifier: delivers the webhook notices the store queued (job finished, failed or
//! expired; build finished) to each build's NOTIFY URLs, retrying with backoff. It runs
//! apart from everything else, so that a dead webhook never holds up the queue.

use super::{Worker, WorkerError};
use crate::domain::Farm;
use async_trait::async_trait;
use futures::StreamExt;
use kiln_store::Notification;
use std::sync::Arc;
use std::time::Duration;

/// Deliveries tried before a notice is given up (about a day of backoff).
const MAX_ATTEMPTS: u32 = 30;
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 8;
/// How often the outbox is read when nothing says a notice was queued (retries come
/// due with time).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long notices taken for a round are kept from other servers' notifiers: longer
/// than a round takes. A server that dies mid-round leaves them to the others then.
const HOLD: Duration = Duration::from_secs(300);

/// The wait before try number `attempts + 1`: 1 s, 2 s, 4 s ... up to an hour.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(12)).min(MAX_BACKOFF)
}

/// Delivers due notices, a URL's in order, several URLs side by side.
pub struct Notifier {
    farm: Arc<Farm>,
    http: reqwest::Client,
}

impl Notifier {
    pub fn new(farm: Arc<Farm>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Notifier { farm, http })
    }

    /// Tries one delivery and records the outcome; true if it was delivered.
    async fn deliver(&self, notification: Notification) -> Result<bool, WorkerError> {
        let result = self
            .http
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
            None => self.farm.notice_delivered(notification.id, now).await,
            Some(error) => {
                let tries = notification.attempts + 1;
                let retry_at =
                    (tries < MAX_ATTEMPTS).then(|| now + backoff(tries).as_micros() as i64);
                tracing::warn!(
                    build = %notification.build,
                    url = %notification.url,
                    tries,
                    cause = %error,
                    gave_up = retry_at.is_none(),
                    "webhook delivery failed"
                );
                self.farm
                    .notice_failed(notification.id, error, retry_at, now)
                    .await
            }
        };
        recorded.map_err(|err| WorkerError::of(&err))?;
        Ok(error.is_none())
    }
}

#[async_trait]
impl Worker for Notifier {
    fn name(&self) -> &'static str {
        "notifier"
    }

    async fn wait_for_work(&mut self) {
        self.farm.notices_may_be_due(POLL_EVERY).await;
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        let now = kiln_common::now_micros();
        let due = self
            .farm
            .take_due_notices(now, now + HOLD.as_micros() as i64)
            .await
            .map_err(|err| WorkerError::of(&err))?;
        // Each URL gets its notices one at a time, in order, stopping at a failure (the
        // rest wait for the retry); different URLs are served side by side.
        let mut by_url: Vec<(String, Vec<Notification>)> = Vec::new();
        for notification in due {
            match by_url.iter_mut().find(|(url, _)| *url == notification.url) {
                Some((_, queue)) => queue.push(notification),
                None => by_url.push((notification.url.clone(), vec![notification])),
            }
        }
        let outcomes: Vec<Result<(), WorkerError>> = futures::stream::iter(by_url)
            .map(|(_, queue)| async {
                let mut queue = queue.into_iter();
                for notification in queue.by_ref() {
                    if !self.deliver(notification).await? {
                        break;
                    }
                }
                // What a failure left untried waits behind it, due again.
                let untried: Vec<i64> = queue.map(|notification| notification.id).collect();
                if !untried.is_empty() {
                    self.farm
                        .release_notices(&untried, kiln_common::now_micros())
                        .await
                        .map_err(|err| WorkerError::of(&err))?;
                }
                Ok(())
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        outcomes.into_iter().collect()
    }
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
