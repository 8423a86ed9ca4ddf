//! The progressive rollouts' decider: one replica at a time (the holder of the store lock
//! [`DECIDER_LOCK`]) reads each rolling rollout's stage and acks once a second and promotes or
//! halts it ([`crate::staging::judge`]); and the operators' overrides (promote, halt, abort).
//!
//! Every decision is a conditional store step ([`Store::stage_step`]): it is made only if the
//! rollout is still at the version and stage it was judged at, so two deciders (a lock handed
//! over mid-decision) or a decider and an operator cannot both move it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::protocol::AckStatus;
use crate::staging::{self, Tally, Verdict};
use crate::store::{
    AckRecord, ChangedFile, InstanceRecord, Rollback, StageStep, Staging, StagingState, Store,
    StoreError, SyncOutcome, TopicChange,
};

use super::Hub;
use crate::telemetry::Metrics;

/// The name the decider locks with [`Store::lock_repo`] (a repo name cannot hold a space).
pub const DECIDER_LOCK: &str = " rollout decider";

/// How often the decider looks.
const EVERY: Duration = Duration::from_secs(1);

/// Why an override was refused.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("topic `{0}` has no active rollout")]
    NoRollout(String),
    #[error("the rollout of `{0}` moved on meanwhile; look again")]
    Moved(String),
    #[error("the rollout of `{topic}` is at its last stage")]
    LastStage { topic: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides every rolling rollout once a second while this replica holds the decider lock.
pub async fn decide(
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let lock = tokio::select! {
        _ = shutdown.cancelled() => return,
        lock = store.lock_repo(DECIDER_LOCK) => lock,
    };
    let _lock = match lock {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!(error = %e, "cannot take the rollout decider's lock; this replica does not decide rollouts");
            return;
        }
    };
    tracing::debug!("this replica decides the progressive rollouts");
    loop {
        if let Err(e) = decide_once(store.as_ref(), &hub, &metrics).await {
            tracing::warn!(error = %e, "rollout decisions failed; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One look at every rolling rollout.
pub async fn decide_once(
    store: &dyn Store,
    hub: &Hub,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let rolling: Vec<Staging> = store
        .stagings()
        .await?
        .into_iter()
        .filter(|s| s.state == StagingState::Rolling)
        .collect();
    if rolling.is_empty() {
        return Ok(());
    }
    let instances = store.instances().await?;
    let acks = store.acks().await?;
    let now = crate::store::now_ms();
    for staging in rolling {
        let tally = tally_acks(&staging, &instances, &acks);
        let verdict = staging::judge(
            &staging.policy,
            staging.stage,
            staging.stage_started_at_ms,
            now,
            &tally,
        );
        match verdict {
            Verdict::Wait(_) => {}
            Verdict::Promote(reason) => {
                match promote(store, hub, &staging, &instances, reason.clone()).await {
                    Ok(()) => {
                        metrics.rollout_decision("promote");
                        tracing::info!(topic = %staging.topic, version = staging.version, %reason, "rollout promoted");
                    }
                    Err(StageError::Moved(_)) => {}
                    Err(e) => {
                        tracing::warn!(topic = %staging.topic, error = %e, "rollout not promoted")
                    }
                }
            }
            Verdict::Halt(reason) => {
                let step = StageStep::Halt {
                    reason: reason.clone(),
                };
                if store
                    .stage_step(&staging.topic, staging.version, staging.stage, &step)
                    .await?
                {
                    metrics.rollout_decision("halt");
                    tracing::warn!(topic = %staging.topic, version = staging.version, %reason, "rollout halted");
                    if staging.policy.auto_revert {
                        let why = format!("auto_revert: {reason}");
                        // As a rollback: no sync of the repo in between.
                        let _repo = store.lock_repo(&staging.repo).await?;
                        match abort(store, hub, &staging.topic, "confcast", &why).await {
                            Ok(version) => {
                                metrics.rollout_decision("abort");
                                tracing::warn!(topic = %staging.topic, version, "rollout reverted");
                            }
                            Err(e) => {
                                tracing::error!(topic = %staging.topic, error = %e, "rollout not reverted")
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The connected instances subscribed to the topic that the stages reached admit, and what their
/// latest acks say about the rolling version.
/// [`tally`] from every instance's latest acks (all topics; the rollout's are picked out).
pub fn tally_acks(staging: &Staging, instances: &[InstanceRecord], acks: &[AckRecord]) -> Tally {
    let latest: BTreeMap<&str, (AckStatus, u64, Option<&str>)> = acks
        .iter()
        .filter(|a| a.topic == staging.topic)
        .map(|a| {
            (
                a.instance.as_str(),
                (a.status, a.version, a.error.as_deref()),
            )
        })
        .collect();
    tally(staging, instances, &latest)
}

pub fn tally(
    staging: &Staging,
    instances: &[InstanceRecord],
    latest: &BTreeMap<&str, (AckStatus, u64, Option<&str>)>,
) -> Tally {
    let mut tally = Tally::default();
    for i in instances {
        let subscribed = crate::store::in_rollout(&i.subscriptions, &staging.topic, false);
        if !i.connected || !subscribed || !staging.admits(&i.id, &i.labels) {
            continue;
        }
        tally.members += 1;
        match latest.get(i.id.as_str()) {
            Some((AckStatus::Applied, v, _)) if *v >= staging.version => tally.applied += 1,
            Some((AckStatus::Failed, v, error)) if *v > staging.base_version => {
                tally.failed.push((i.id.clone(), error.map(str::to_string)));
            }
            _ => {}
        }
    }
    tally
}

/// Widens `staging` to its next stage, chosen among the instances connected and subscribed now.
pub async fn promote(
    store: &dyn Store,
    hub: &Hub,
    staging: &Staging,
    instances: &[InstanceRecord],
    reason: String,
) -> Result<(), StageError> {
    let Some(next) = staging.policy.stages.get(staging.stage + 1) else {
        return Err(StageError::LastStage {
            topic: staging.topic.clone(),
        });
    };
    let subscribers: Vec<(&str, &BTreeMap<String, String>)> = instances
        .iter()
        .filter(|i| {
            i.connected && crate::store::in_rollout(&i.subscriptions, &staging.topic, false)
        })
        .map(|i| (i.id.as_str(), &i.labels))
        .collect();
    let cut = staging::cut_for(next, &staging.topic, &subscribers, &staging.cuts);
    let step = StageStep::Promote { cut, reason };
    if !store
        .stage_step(&staging.topic, staging.version, staging.stage, &step)
        .await?
    {
        return Err(StageError::Moved(staging.topic.clone()));
    }
    hub.wake();
    Ok(())
}

/// The active rollout of `topic`.
pub async fn active(store: &dyn Store, topic: &str) -> Result<Staging, StageError> {
    store
        .stagings()
        .await?
        .into_iter()
        .find(|s| s.topic == topic && s.state.active())
        .ok_or_else(|| StageError::NoRollout(topic.to_string()))
}

/// Ends `topic`'s active rollout by giving the base version's content back as a new version:
/// to the stages reached as a change from the rolled-out version, to everyone else as a change
/// from the base version. Returns the new version. The caller holds the topic's repo lock (a
/// sync must not publish in between).
pub async fn abort(
    store: &dyn Store,
    hub: &Hub,
    topic: &str,
    by: &str,
    reason: &str,
) -> Result<u64, StageError> {
    let staging = active(store, topic).await?;
    let (_, current) = store.snapshots(&|t: &str| t == topic).await?;
    let current = current
        .into_iter()
        .next()
        .map(|s| s.files)
        .unwrap_or_default();
    let files: Vec<ChangedFile> = crate::store::jump_files(&current, &staging.base_files)
        .into_iter()
        .map(|f| {
            let content = f
                .content
                .as_deref()
                .map(|c| crate::protocol::decode_content(c, f.encoding))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("stored content of {}: {e}", f.path)))?;
            Ok(ChangedFile {
                path: f.path,
                status: f.status,
                old_path: None,
                sha: f.sha,
                content,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let reason = format!("rollout of v{} aborted: {reason}", staging.version);
    let mut outcome = SyncOutcome {
        repo: staging.repo.clone(),
        commit: staging.base_commit.clone(),
        author: by.to_string(),
        message: reason.clone(),
        topics: vec![TopicChange {
            topic: topic.to_string(),
            files,
        }],
        rollback: Some(Rollback {
            rollback_of: staging.base_version,
            requested_by: by.to_string(),
            reason: reason.clone(),
        }),
        ..SyncOutcome::default()
    };
    outcome
        .ends
        .insert(topic.to_string(), (StagingState::Aborted, reason));
    let changes = store.publish(&outcome).await?;
    hub.wake();
    Ok(changes.first().map_or(staging.version, |c| c.version))
}
