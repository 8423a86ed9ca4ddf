//! Background upkeep of the store, one small task each, spawned by `serve`: a health watch that
//! tells the operator when the store goes bad (nobody polls `/readyz` by hand), and the expiry of
//! instances that left for good.
//!
//! Neither may take the process down: a failed round is logged and the next one tries again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Store;

/// Spawns the health watch, and instance expiry unless `instance_expiry` is zero (keep forever).
pub fn start(
    tracker: &TaskTracker,
    store: &Arc<dyn Store>,
    instance_expiry: Duration,
    shutdown: &CancellationToken,
) {
    tracker.spawn(watch_health(store.clone(), HEALTH_EVERY, shutdown.clone()));
    if !instance_expiry.is_zero() {
        tracker.spawn(expire_instances(
            store.clone(),
            instance_expiry,
            shutdown.clone(),
        ));
    }
}

/// How often the health watch checks the store.
pub const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// Checks the store every `every` until `shutdown`, logging an error once when it goes bad and
/// an info line when it is good again: one line per change, not one per round.
pub async fn watch_health(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    let mut bad = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.check().await {
            Err(e) if !bad => {
                bad = true;
                tracing::error!(error = %e, "store unhealthy: /readyz answers 503 until it recovers");
            }
            Ok(()) if bad => {
                bad = false;
                tracing::info!("store healthy again");
            }
            _ => {}
        }
    }
}

/// How often expiry runs for `expiry`: a tenth of it, so an instance is gone at most 10% late,
/// between 1 s and a minute.
pub fn expiry_interval(expiry: Duration) -> Duration {
    (expiry / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Forgets instances disconnected longer than `expiry`, with their acks, every
/// [`expiry_interval`] until `shutdown`. Several replicas may all run it: the delete is the same.
pub async fn expire_instances(
    store: Arc<dyn Store>,
    expiry: Duration,
    shutdown: CancellationToken,
) {
    let every = expiry_interval(expiry);
    let expiry_ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let before = super::now_ms().saturating_sub(expiry_ms);
        match store.expire_instances(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                expiry_secs = expiry.as_secs(),
                "expired instances forgotten with their acks"
            ),
            Err(e) => tracing::warn!(error = %e, "instance expiry failed; retried next round"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_runs_a_tenth_as_often_within_bounds() {
        assert_eq!(
            expiry_interval(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            expiry_interval(Duration::from_secs(300)),
            Duration::from_secs(30)
        );
        assert_eq!(
            expiry_interval(Duration::from_secs(7 * 24 * 3600)),
            Duration::from_secs(60)
        );
    }
}
