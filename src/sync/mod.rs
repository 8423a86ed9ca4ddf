//! Sync: one worker per repo that fetches, diffs and publishes. Webhooks only wake it.
//!
//! Invariant it owns: at most one sync per repo runs at a time; wake-ups that arrive during a sync
//! coalesce into exactly one more sync (a `Notify` holds at most one permit).

pub mod git;
pub mod rules;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{RepoConfig, RetentionConfig};
use crate::hub::Hub;
use crate::store::Store;

/// What the API shows about a repo's syncing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoStatus {
    pub name: String,
    pub branch: String,
    pub url: String,
    /// The last published commit.
    pub head: Option<String>,
    pub syncs: u64,
    pub last_sync_ms: Option<i64>,
    pub last_error: Option<String>,
    pub syncing: bool,
}

struct Worker {
    wake: Arc<Notify>,
    status: Arc<Mutex<RepoStatus>>,
}

/// The per-repo sync workers.
pub struct Syncers {
    workers: HashMap<String, Worker>,
}

impl Syncers {
    /// Starts one worker per repo; each does a first sync right away.
    pub fn start(
        repos: &[RepoConfig],
        retention: &RetentionConfig,
        data_dir: PathBuf,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Syncers {
        let mut workers = HashMap::new();
        for repo in repos {
            let wake = Arc::new(Notify::new());
            let status = Arc::new(Mutex::new(RepoStatus {
                name: repo.name.clone(),
                branch: repo.branch.clone(),
                url: git::redact_url(&repo.url),
                ..RepoStatus::default()
            }));
            wake.notify_one();
            let job = Job {
                repo: Arc::new(repo.clone()),
                data_dir: data_dir.clone(),
                store: store.clone(),
                hub: hub.clone(),
                status: status.clone(),
                retention: retention.clone(),
            };
            tracker.spawn(job.run(wake.clone(), shutdown.clone()));
            workers.insert(repo.name.clone(), Worker { wake, status });
        }
        Syncers { workers }
    }

    /// Asks for a sync of `repo`; returns false for an unknown repo.
    pub fn trigger(&self, repo: &str) -> bool {
        match self.workers.get(repo) {
            Some(w) => {
                w.wake.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn status(&self) -> Vec<RepoStatus> {
        let mut all: Vec<RepoStatus> = self
            .workers
            .values()
            .map(|w| w.status.lock().map(|s| s.clone()).unwrap_or_default())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

struct Job {
    repo: Arc<RepoConfig>,
    data_dir: PathBuf,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    status: Arc<Mutex<RepoStatus>>,
    retention: RetentionConfig,
}

impl Job {
    async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
            }
            self.set(|s| s.syncing = true);
            let result = self.sync_once().await;
            self.set(|s| {
                s.syncing = false;
                s.syncs += 1;
                s.last_sync_ms = Some(crate::store::now_ms());
                s.last_error = result.as_ref().err().cloned();
            });
            if let Err(e) = result {
                tracing::error!(repo = %self.repo.name, error = %e, "sync failed");
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut RepoStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn sync_once(&self) -> Result<(), String> {
        let last = self
            .store
            .repo_head(&self.repo.name)
            .await
            .map_err(|e| e.to_string())?;
        self.set(|s| s.head = last.clone());
        let (repo, dir, prev) = (self.repo.clone(), self.data_dir.clone(), last.clone());
        let outcome = tokio::task::spawn_blocking(move || git::sync(&dir, &repo, prev.as_deref()))
            .await
            .map_err(|e| format!("sync task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let Some(outcome) = outcome else {
            tracing::debug!(repo = %self.repo.name, "head unchanged");
            return Ok(());
        };
        let changes = self
            .store
            .publish(&outcome)
            .await
            .map_err(|e| e.to_string())?;
        self.set(|s| s.head = Some(outcome.commit.clone()));
        for change in &changes {
            tracing::info!(repo = %self.repo.name, topic = %change.topic, version = change.version, seq = change.seq,
                files = change.files.len(), commit = %change.commit, "published");
        }
        if changes.is_empty() {
            tracing::info!(repo = %self.repo.name, commit = %outcome.commit, "new head touches no topic");
        }
        self.hub.wake();
        let r = &self.retention;
        match self
            .store
            .trim(
                r.max_events,
                i64::try_from(r.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            )
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "event log trimmed by retention"),
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
        Ok(())
    }
}
