//! The timekeeper: the background loop that reclaims jobs whose lease lapsed (or whose
//! client hung past the timeout) and expires jobs nobody accepted in time.

use crate::AppState;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the loop looks at the earliest deadline in the store.
const TICK: Duration = Duration::from_millis(200);

/// Runs until `shutdown` fires. Each tick reads the earliest deadline (a cheap read) and
/// writes only when one has passed.
pub async fn timekeeper(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut n_errors: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(err) = tick(&state).await {
            n_errors += 1;
            tracing::error!(cause = %err, n_errors, "timekeeper tick failed");
        }
    }
}

async fn tick(state: &AppState) -> Result<(), kiln_store::StoreError> {
    let now = kiln_common::now_micros();
    match state.store.next_deadline().await? {
        Some(deadline) if deadline <= now => {}
        _ => {
            // Hung clients are found by time_start + timeout, which next_deadline does
            // not cover; look for them once in a while only.
            if now / 1_000_000 % 5 != 0 {
                return Ok(());
            }
        }
    }
    let reaped = state
        .store
        .reap_leases(now, state.config.hung_grace_secs)
        .await?;
    let expired = state.store.expire_unclaimed(now).await?;
    for transition in reaped.iter().chain(expired.iter()) {
        let event = &transition.event;
        tracing::info!(
            build = %transition.build,
            job = %transition.job,
            to = %event.to,
            client = event.client_id.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            "job changed state by time"
        );
    }
    if !reaped.is_empty() || !expired.is_empty() {
        state.changed();
        state.dispatcher.wake();
    }
    Ok(())
}
