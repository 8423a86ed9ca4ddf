//! The log witness: a small file in this replica's `data_dir` recording the log epoch and the
//! highest position this replica has seen. It lives outside the store, so when the store is
//! restored from an older backup (the documented SQLite restore replaces only `confcast.db`;
//! a PostgreSQL restore leaves every replica's `data_dir` alone) the next start sees a log that
//! lost its head and begins a new epoch before a single number is handed out again. Instances
//! then start over from snapshots instead of trusting positions that now mean other changes.
//!
//! It must never decide anything on its own: a missing or unreadable witness says nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// The file name under `data_dir`.
pub const FILE: &str = "log-witness.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Witness {
    epoch: String,
    head: u64,
}

fn read(path: &Path) -> Option<Witness> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write(path: &Path, witness: &Witness) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(witness).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// At start: if this replica saw the current epoch reach further than the store's head now, the
/// store was restored from an older state; start a new epoch. Returns the epoch in force.
pub async fn check_at_start(store: &dyn Store, data_dir: &Path) -> Result<String, StoreError> {
    let path = data_dir.join(FILE);
    let epoch = store.epoch().await?;
    let head = store.head_seq().await?;
    match read(&path) {
        Some(seen) if seen.epoch == epoch && seen.head > head => {
            let rotated = store.rotate_epoch(&epoch).await?;
            tracing::warn!(
                seen = seen.head,
                head,
                old = %epoch,
                new = %rotated,
                "the store's log is behind what this replica served (restored from a backup?): new log epoch, instances start over from snapshots"
            );
            Ok(rotated)
        }
        _ => Ok(epoch),
    }
}

/// Keeps the witness current (checked every second, written only when it changed) until
/// `shutdown`.
pub async fn keep(store: Arc<dyn Store>, data_dir: PathBuf, shutdown: CancellationToken) {
    let path = data_dir.join(FILE);
    let mut last: Option<Witness> = read(&path);
    loop {
        let now = async {
            Some(Witness {
                epoch: store.epoch().await.ok()?,
                head: store.head_seq().await.ok()?,
            })
        }
        .await;
        if let Some(now) = now {
            // Within one epoch the witness only moves forward: a head read while the store was
            // being swapped under us must not lower it.
            let newer = match &last {
                Some(old) => old.epoch != now.epoch || now.head > old.head,
                None => true,
            };
            if newer {
                if let Err(e) = write(&path, &now) {
                    tracing::warn!(path = %path.display(), error = %e, "could not write the log witness");
                } else {
                    last = Some(now);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
