//! Background upkeep of the store, spawned by `serve`: a health watch that tells the operator when
//! the store goes bad (nobody polls `/readyz` by hand).
//!
//! It may not take the process down: a failed round is logged and the next one tries again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Store;

/// Spawns the health watch.
pub fn start(tracker: &TaskTracker, store: &Arc<dyn Store>, shutdown: &CancellationToken) {
    tracker.spawn(watch_health(store.clone(), HEALTH_EVERY, shutdown.clone()));
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
