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
use crate::telemetry::{Metrics, StageFigures};

/// The name the decider locks with [`Store::lock_repo`] (a repo name cannot hold a space).
pub const DECIDER_LOCK: &str = " rollout decider";

/// How often the decider looks.
const EVERY: Duration = Duration::from_secs(1);
/// Waits between attempts to take the decider's lock after one failed: doubling up to the most.
const LOCK_RETRY_FIRST: Duration = Duration::from_secs(1);
const LOCK_RETRY_MAX: Duration = Duration::from_secs(30);

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
    // Waiting for the lock can fail (the database restarted, the waiting session was ended):
    // wait again, or no replica might be left waiting when the holder goes.
    let mut retry = LOCK_RETRY_FIRST;
    let _lock = loop {
        let lock = tokio::select! {
            _ = shutdown.cancelled() => return,
            lock = store.lock_repo(DECIDER_LOCK) => lock,
        };
        match lock {
            Ok(lock) => break lock,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "cannot take the rollout decider's lock; waiting for it again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(LOCK_RETRY_MAX);
            }
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

/// One look at every active rollout: judges the rolling ones (promote, halt, or wait), reverts
/// an `auto_revert` halt whose revert did not happen, and sets the stage metrics.
pub async fn decide_once(
    store: &dyn Store,
    hub: &Hub,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let all = store.stagings().await?;
    let count = |state| all.iter().filter(|s| s.state == state).count() as i64;
    // The deciding replica's gauges are never more than a look old, halts included (which log
    // nothing, so other replicas learn of them with the next change).
    metrics.rollouts(count(StagingState::Rolling), count(StagingState::Halted));
    if !all.iter().any(|s| s.state.active()) {
        metrics.rollout_stages(&[]);
        return Ok(());
    }
    // A pinned topic is frozen: its rollout neither widens, halts nor reverts until unpinned.
    let pinned: Vec<String> = store.pins().await?.into_iter().map(|p| p.topic).collect();
    let free = |s: &&Staging| !pinned.contains(&s.topic);
    // A halt of the decider's own with `auto_revert` whose revert did not happen (the abort
    // failed, or the replica stopped between the two steps): revert it now.
    for staging in all.iter().filter(free).filter(|s| {
        s.state == StagingState::Halted
            && s.policy.auto_revert
            && s.reason.starts_with(staging::HALTED_AT)
    }) {
        revert(store, hub, metrics, staging, &staging.reason).await?;
    }
    let instances = store.instances().await?;
    let acks = store.acks().await?;
    let now = crate::store::now_ms();
    let mut figures = Vec::new();
    for staging in all.iter().filter(|s| s.state.active()) {
        let tally = tally_acks(staging, &instances, &acks);
        figures.push(StageFigures {
            topic: &staging.topic,
            stage: staging.stage + 1,
            members: tally.members,
            applied: tally.applied,
            failed: tally.failed.len() as u64,
        });
        if staging.state != StagingState::Rolling || !free(&staging) {
            continue;
        }
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
                match promote(store, hub, staging, &instances, reason.clone()).await {
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
                        revert(store, hub, metrics, staging, &reason).await?;
                    }
                }
            }
        }
    }
    metrics.rollout_stages(&figures);
    Ok(())
}

/// `auto_revert` after a halt: the stages reached get the base files back (an abort). On failure
/// the rollout stays halted with the decider's reason, and the next look tries again; the other
/// rollouts are still decided.
async fn revert(
    store: &dyn Store,
    hub: &Hub,
    metrics: &Metrics,
    staging: &Staging,
    reason: &str,
) -> Result<(), StoreError> {
    let why = format!("auto_revert: {reason}");
    // As a rollback: no sync of the repo in between.
    let _repo = match store.lock_repo(&staging.repo).await {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!(topic = %staging.topic, error = %e, "rollout not reverted (repo lock); trying again at the next look");
            return Ok(());
        }
    };
    match abort(store, hub, &staging.topic, "confcast", &why).await {
        Ok(version) => {
            metrics.rollout_decision("abort");
            tracing::warn!(topic = %staging.topic, version, "rollout reverted");
        }
        Err(e) => {
            tracing::error!(topic = %staging.topic, error = %e, "rollout not reverted; trying again at the next look")
        }
    }
    Ok(())
}

/// [`tally`] from every instance's latest acks (all topics; the rollout's are picked out).
pub fn tally_acks(staging: &Staging, instances: &[InstanceRecord], acks: &[AckRecord]) -> Tally {
    let latest: BTreeMap<&str, &AckRecord> = acks
        .iter()
        .filter(|a| a.topic == staging.topic)
        .map(|a| (a.instance.as_str(), a))
        .collect();
    tally(staging, instances, &latest)
}

/// The members of the current stage and what their latest acks say about the rolling version.
///
/// A member is an instance subscribed to the topic that the stages reached admit, and that is
/// connected or was connected after the current stage started: a canary that crashes (or
/// disconnects) during its stage still counts, as not applied, so its stage cannot promote
/// without it. An instance gone before the stage started does not count.
///
/// `applied`: its latest ack applied the rolling version (or a later one). `failed`: its latest
/// ack failed the rolling version (or a later one) after the current stage started. A failure of
/// an earlier version (a bad push that a later one fixes) says nothing about this one, and a
/// failure from before the stage started was already judged: the rollout passed it (tolerated,
/// or an operator promoted over it), so that instance is left out of the stage's counts.
pub fn tally(
    staging: &Staging,
    instances: &[InstanceRecord],
    latest: &BTreeMap<&str, &AckRecord>,
) -> Tally {
    let mut tally = Tally::default();
    for i in instances {
        let present = i.connected || i.last_seen_ms >= staging.stage_started_at_ms;
        let subscribed = crate::store::in_rollout(&i.subscriptions, &staging.topic, false);
        if !present || !subscribed || !staging.admits(&i.id, &i.labels) {
            continue;
        }
        let ack = latest.get(i.id.as_str());
        let passed_over = ack.is_some_and(|a| {
            a.status == AckStatus::Failed
                && a.version >= staging.version
                && a.acked_at_ms < staging.stage_started_at_ms
        });
        if passed_over {
            // Neither a member nor a failure of this stage.
            continue;
        }
        tally.members += 1;
        match ack {
            Some(a) if a.status == AckStatus::Applied && a.version >= staging.version => {
                tally.applied += 1
            }
            Some(a) if a.status == AckStatus::Failed && a.version >= staging.version => {
                tally.failed.push((i.id.clone(), a.error.clone()));
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
