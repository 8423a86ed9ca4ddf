//! Sync: one worker per repo that fetches, diffs and publishes. Webhooks only wake it.
//!
//! Invariant it owns: at most one sync per repo runs at a time; wake-ups that arrive during a sync
//! coalesce into exactly one more sync (a `Notify` holds at most one permit).

pub mod auth;
pub mod git;
pub mod rules;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LimitsConfig, RepoConfig, RetentionConfig};
use crate::hub::Hub;
use crate::store::{HeldChange, Pin, Rejection, Store, SyncOutcome};
use crate::telemetry::{Metrics, StoreCall};

/// Longest commit message a pin's held list keeps per change.
const HELD_MESSAGE_BYTES: usize = 1024;

/// Failed syncs in a row after which a repo counts as stuck rather than unlucky: one failure is
/// often a blip (a forge restarting), three with backoff span about 6 s of retries.
pub const STUCK_AFTER: u32 = 3;

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
    /// Syncs in a row that failed (0 after a success): a repo stuck on one error shows in
    /// `/readyz` once this reaches [`STUCK_AFTER`].
    pub consecutive_failures: u32,
    pub syncing: bool,
    /// When the next scheduled fetch (poll, or retry after an error) happens, if any.
    pub next_poll_ms: Option<i64>,
    pub poll_interval_secs: u64,
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
    /// Starts one worker per repo of `config`; each does a first sync right away.
    pub fn start(
        config: &Config,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Syncers {
        let mut workers = HashMap::new();
        let limits = Arc::new(config.limits.clone());
        let policies = Arc::new(config.rollout_policies());
        for repo in &config.repos {
            let wake = Arc::new(Notify::new());
            let status = Arc::new(Mutex::new(RepoStatus {
                name: repo.name.clone(),
                branch: repo.branch.clone(),
                url: git::redact_url(&repo.url),
                poll_interval_secs: repo.poll_interval_secs,
                ..RepoStatus::default()
            }));
            wake.notify_one();
            metrics.repo_configured(&repo.name);
            let job = Job {
                repo: Arc::new(repo.clone()),
                data_dir: config.server.data_dir.clone(),
                store: store.clone(),
                hub: hub.clone(),
                status: status.clone(),
                retention: config.retention.clone(),
                limits: limits.clone(),
                metrics: metrics.clone(),
                policies: policies.clone(),
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

    /// Waits until every repo has finished its first sync (published or failed), at most
    /// `deadline`. `serve` answers no instance before that: after a restore or a long stop the
    /// store holds older content than git, and an instance must never be shown it in between.
    pub async fn first_round(&self, deadline: Duration) -> bool {
        let done = tokio::time::timeout(deadline, async {
            while self.status().iter().any(|s| s.syncs == 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        done.is_ok()
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
    /// Size caps on repo content (`[limits]`), judged on the git side before anything is read.
    limits: Arc<LimitsConfig>,
    metrics: Arc<Metrics>,
    /// `[[rollouts]]`: which changes roll out in stages.
    policies: Arc<Vec<crate::staging::Policy>>,
}

impl Job {
    /// Chooses how each topic's change rolls out (`[[rollouts]]`, or the head commit's
    /// `Confcast-Rollout:` trailer), and who the first stage of each staged one admits: from the
    /// instances connected and subscribed to the topic now.
    async fn stage(&self, outcome: &mut SyncOutcome) -> Result<(), String> {
        if self.policies.is_empty() || outcome.topics.is_empty() {
            return Ok(());
        }
        let trailer = outcome.rollout_trailer.clone();
        let mut instances = None;
        for tc in &outcome.topics {
            let policy = match crate::staging::choose(&self.policies, &tc.topic, trailer.as_deref())
            {
                Ok(policy) => policy,
                Err(e) => {
                    tracing::warn!(repo = %self.repo.name, topic = %tc.topic, commit = %outcome.commit,
                        "{e}; the topic's default rollout applies");
                    crate::staging::choose(&self.policies, &tc.topic, None).unwrap_or(None)
                }
            };
            let Some(policy) = policy else { continue };
            let Some(first) = policy.stages.first() else {
                continue;
            };
            if instances.is_none() {
                instances = Some(self.store.instances().await.map_err(|e| e.to_string())?);
            }
            let subscribers: Vec<(&str, &BTreeMap<String, String>)> = instances
                .iter()
                .flatten()
                .filter(|i| {
                    i.connected && crate::store::in_rollout(&i.subscriptions, &tc.topic, false)
                })
                .map(|i| (i.id.as_str(), &i.labels))
                .collect();
            let cut = crate::staging::cut_for(first, &tc.topic, &subscribers, &[]);
            tracing::info!(repo = %self.repo.name, topic = %tc.topic, policy = %policy.name,
                "the change rolls out in stages");
            outcome.rollouts.insert(
                tc.topic.clone(),
                crate::store::RolloutStart {
                    policy: policy.clone(),
                    cut,
                },
            );
        }
        Ok(())
    }

    async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            // After a failure retry with backoff (2 s, 4 s, ... 60 s); otherwise poll on schedule.
            let wait = if failures > 0 {
                Some(Duration::from_secs(1 << failures.min(6)).min(Duration::from_secs(60)))
            } else {
                (self.repo.poll_interval_secs > 0)
                    .then(|| Duration::from_secs(self.repo.poll_interval_secs))
            };
            let next_ms = wait
                .map(|w| crate::store::now_ms() + i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
            self.set(|s| s.next_poll_ms = next_ms);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = async { match wait { Some(w) => tokio::time::sleep(w).await, None => std::future::pending().await } } => {
                    tracing::debug!(repo = %self.repo.name, "scheduled fetch");
                }
            }
            self.set(|s| s.syncing = true);
            let started = std::time::Instant::now();
            let result = self.sync_once().await;
            (self.metrics).sync_finished(&self.repo.name, started.elapsed(), result.is_ok());
            failures = if result.is_ok() {
                0
            } else {
                failures.saturating_add(1)
            };
            self.set(|s| {
                s.syncing = false;
                s.syncs += 1;
                s.last_sync_ms = Some(crate::store::now_ms());
                s.last_error = result.as_ref().err().cloned();
                s.consecutive_failures = failures;
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

    /// Holds back every topic change that the git side marked (`held`: a path that must never be
    /// published, a size over `[limits]`) or with a file that does not parse, and releases topics
    /// that were held back and now validate (or went back to their last good state).
    fn validate(
        &self,
        outcome: &mut SyncOutcome,
        mut held: BTreeMap<String, git::Held>,
        last: Option<&str>,
        withheld: &BTreeMap<String, String>,
        owners: &BTreeMap<String, String>,
    ) {
        let rules = &self.repo.rules;
        // A commit that asks for a rollout policy no one configured (a typo) must not go out
        // at once, nor under another policy: its topics are held back until a later push names
        // a known policy, `immediate` or none.
        let unknown_policy = outcome.rollout_trailer.as_deref().and_then(|name| {
            crate::staging::choose(&self.policies, "", Some(name))
                .err()
                .map(|e| format!("{e}: the change is held back; push a commit with a known name"))
        });
        let mut keep = Vec::with_capacity(outcome.topics.len());
        for change in std::mem::take(&mut outcome.topics) {
            // Topic names are global: a topic another repo publishes is never mixed with ours.
            let foreign = owners.get(&change.topic).filter(|owner| **owner != self.repo.name).map(|owner| {
                let path = change.files.first().map(|f| f.path.clone()).unwrap_or_default();
                let message = format!(
                    "topic `{}` is published by repo `{owner}`; two repos cannot share a topic (change repos.topics)",
                    change.topic
                );
                (path, validate::Problem { line: None, message })
            });
            let unpublishable = held.remove(&change.topic).map(|h| {
                let problem = validate::Problem {
                    line: None,
                    message: h.message,
                };
                (h.path, problem)
            });
            let unknown_policy = unknown_policy.as_ref().map(|message| {
                let path = change
                    .files
                    .first()
                    .map(|f| f.path.clone())
                    .unwrap_or_default();
                let message = message.clone();
                (
                    path,
                    validate::Problem {
                        line: None,
                        message,
                    },
                )
            });
            let problem = foreign.or(unpublishable).or(unknown_policy).or_else(|| {
                change.files.iter().find_map(|f| {
                    let bytes = f.content.as_deref()?;
                    validate::check(rules.format_of(&f.path), bytes)
                        .err()
                        .map(|p| (f.path.clone(), p))
                })
            });
            match problem {
                Some((path, p)) => {
                    tracing::warn!(repo = %self.repo.name, topic = %change.topic, %path, line = ?p.line,
                        error = %p.message, commit = %outcome.commit, "validation failed; topic held back");
                    outcome.rejected.push(Rejection {
                        repo: self.repo.name.clone(),
                        topic: change.topic.clone(),
                        base_commit: withheld
                            .get(&change.topic)
                            .cloned()
                            .unwrap_or_else(|| last.unwrap_or_default().to_string()),
                        commit: outcome.commit.clone(),
                        author: outcome.author.clone(),
                        path,
                        line: p.line,
                        message: p.message,
                        at_ms: crate::store::now_ms(),
                    });
                }
                None => {
                    if withheld.contains_key(&change.topic) {
                        tracing::info!(repo = %self.repo.name, topic = %change.topic, "topic valid again; released");
                        outcome.cleared.push(change.topic.clone());
                    }
                    if !change.files.is_empty() {
                        keep.push(change);
                    }
                }
            }
        }
        outcome.topics = keep;
    }

    /// The topics of this repo whose stored files may differ from git, with those files, for a
    /// full compare ([`git::Compare`]). Pinned topics are left out: whatever git says about
    /// them is held back anyway, and their unpin marks them due.
    async fn compare(
        &self,
        pins: &BTreeMap<String, Pin>,
    ) -> Result<BTreeMap<String, git::Compare>, crate::store::StoreError> {
        let mut compare: BTreeMap<String, git::Compare> = self
            .store
            .resyncs(&self.repo.name)
            .await?
            .into_iter()
            .filter(|r| !pins.contains_key(&r.topic))
            .map(|r| {
                let c = git::Compare {
                    due: r.due,
                    stored: BTreeMap::new(),
                };
                (r.topic, c)
            })
            .collect();
        if compare.is_empty() {
            return Ok(compare);
        }
        let (_, snapshots) = self.store.snapshots(&|t| compare.contains_key(t)).await?;
        for snapshot in snapshots {
            if let Some(c) = compare.get_mut(&snapshot.topic) {
                c.stored = snapshot
                    .files
                    .into_iter()
                    .map(|f| (f.path, f.sha))
                    .collect();
            }
        }
        Ok(compare)
    }

    /// Takes the changes of pinned topics out of `outcome` and lists them as held instead.
    fn hold_pinned(&self, outcome: &mut SyncOutcome, pins: &BTreeMap<String, Pin>) {
        let mut keep = Vec::with_capacity(outcome.topics.len());
        for change in std::mem::take(&mut outcome.topics) {
            if change.files.is_empty() || !pins.contains_key(&change.topic) {
                keep.push(change);
                continue;
            }
            let message =
                crate::protocol::truncate_utf8(&outcome.message, HELD_MESSAGE_BYTES).to_string();
            outcome.held.push((
                change.topic,
                HeldChange {
                    commit: outcome.commit.clone(),
                    author: outcome.author.clone(),
                    message,
                    at_ms: crate::store::now_ms(),
                    files: change.files.len(),
                },
            ));
        }
        outcome.topics = keep;
    }

    async fn sync_once(&self) -> Result<(), String> {
        // One syncer per repo across replicas: wait for the repo's lock, then read the head.
        let _lock = self
            .store
            .lock_repo(&self.repo.name)
            .await
            .map_err(|e| e.to_string())?;
        let last = self
            .store
            .repo_head(&self.repo.name)
            .await
            .map_err(|e| e.to_string())?;
        self.set(|s| s.head = last.clone());
        let withheld: BTreeMap<String, String> = self
            .store
            .rejections(&self.repo.name)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| (r.topic, r.base_commit))
            .collect();
        let pins: BTreeMap<String, Pin> = self
            .store
            .pins()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|p| p.repo == self.repo.name)
            .map(|p| (p.topic.clone(), p))
            .collect();
        let compare = self.compare(&pins).await.map_err(|e| e.to_string())?;
        let (repo, limits, dir, prev, bases) = (
            self.repo.clone(),
            self.limits.clone(),
            self.data_dir.clone(),
            last.clone(),
            withheld.clone(),
        );
        let timeout = auth::fetch_timeout(&self.repo.auth) + Duration::from_secs(5);
        let task = tokio::task::spawn_blocking(move || {
            git::sync(&dir, &repo, &limits, prev.as_deref(), &bases, &compare)
        });
        let outcome = tokio::time::timeout(timeout, task)
            .await
            .map_err(|_| {
                format!(
                    "repo `{}`: sync did not finish within {timeout:?}",
                    self.repo.name
                )
            })?
            .map_err(|e| format!("sync task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let Some(git::Synced {
            mut outcome,
            held,
            compared,
        }) = outcome
        else {
            tracing::debug!(repo = %self.repo.name, "head unchanged");
            return Ok(());
        };
        let owners: BTreeMap<String, String> = self
            .store
            .topics()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|t| (t.topic, t.repo))
            .collect();
        self.hold_pinned(&mut outcome, &pins);
        self.validate(&mut outcome, held, last.as_deref(), &withheld, &owners);
        // Compared and published (or found equal): the topic is at its git state again.
        outcome.resynced = compared
            .into_iter()
            .filter(|t| !outcome.rejected.iter().any(|r| r.topic == *t))
            .collect();
        outcome.max_held = self.limits.max_held_changes;
        self.stage(&mut outcome).await?;
        for (topic, h) in &outcome.held {
            tracing::info!(repo = %self.repo.name, %topic, commit = %h.commit, files = h.files,
                "topic is pinned; change held back");
        }
        let changes = (self.metrics)
            .time_store(StoreCall::Publish, self.store.publish(&outcome))
            .await
            .map_err(|e| e.to_string())?;
        self.metrics.published(&self.repo.name, changes.len());
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
