//! The live rollout board the dashboards watch: every topic with its current version and how
//! many instances applied it, are behind, failed or are offline.
//!
//! One task computes it for every viewer, from two grouped store reads ([`Store::rollout_groups`]),
//! encodes it once as JSON and shares the text through a `watch` channel that each
//! server-sent-event stream reads: a thousand open dashboards cost one computation, not a
//! thousand. It computes only while someone watches, when something happened on this replica
//! (a change fanned out, an ack recorded, an instance connected, subscribed or gone), at most once
//! per [`DEBOUNCE`], and every [`RESCAN`] as well, which is how acks and connections recorded
//! by other replicas (PostgreSQL) reach this replica's viewers. It must never compute per viewer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::protocol::topic_matches;
use crate::store::{AckGroup, Standing, Store, StoreError, SubscriberGroup, TopicSummary};

/// The shortest time between two computations: bursts of acks coalesce into one.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// How often the board is computed anyway while anyone watches: what other replicas recorded
/// shows up within this time.
pub const RESCAN: Duration = Duration::from_secs(2);

/// The board and who watches it.
pub struct Rollouts {
    activity: Notify,
    board: watch::Sender<Arc<str>>,
    viewers: AtomicUsize,
}

/// A viewer's place, given back when dropped.
pub struct Viewer {
    rollouts: Arc<Rollouts>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        if self.rollouts.viewers.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Nobody watches, so the board goes stale: the next viewer waits for a fresh one
            // (its arrival stirs a computation) rather than being shown this one.
            self.rollouts.board.send_replace(Arc::from(""));
        }
    }
}

impl Rollouts {
    pub fn new() -> Arc<Rollouts> {
        let (board, _) = watch::channel(Arc::from(""));
        Arc::new(Rollouts {
            activity: Notify::new(),
            board,
            viewers: AtomicUsize::new(0),
        })
    }

    /// Something a rollout counts may have changed: recompute soon if anyone watches.
    pub fn stir(&self) {
        self.activity.notify_one();
    }

    /// A place among at most `cap` viewers, or `None` when all are taken.
    pub fn enter(self: &Arc<Self>, cap: usize) -> Option<Viewer> {
        self.viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        self.stir();
        Some(Viewer {
            rollouts: self.clone(),
        })
    }

    /// The board as JSON text (empty until computed for the viewers present), changing as it is
    /// recomputed.
    pub fn watch(&self) -> watch::Receiver<Arc<str>> {
        self.board.subscribe()
    }

    /// Computes the board while anyone watches, until `shutdown`.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        loop {
            let watched = self.viewers.load(Ordering::Acquire) > 0;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.activity.notified() => {}
                _ = tokio::time::sleep(RESCAN), if watched => {}
            }
            if self.viewers.load(Ordering::Acquire) == 0 {
                continue;
            }
            match board(store.as_ref()).await {
                Ok(text) => {
                    // Viewers hear only of a board that differs from the last one.
                    self.board.send_if_modified(|current| {
                        if **current == *text {
                            false
                        } else {
                            *current = Arc::from(text);
                            true
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "rollout board not computed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(DEBOUNCE) => {}
            }
        }
    }
}

/// How the instances of one topic stand.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Their latest ack applied the current version.
    pub applied: u64,
    /// Connected, and not (yet) on the current version: no ack, or an older one.
    pub behind: u64,
    /// Their latest ack failed.
    pub failed: u64,
    /// Disconnected, and neither applied nor failed.
    pub offline: u64,
    pub total: u64,
}

#[derive(Serialize)]
struct TopicLine<'a> {
    #[serde(flatten)]
    summary: &'a TopicSummary,
    counts: Counts,
    /// Who pinned it, why, and how many pushes it holds back; `null` when not pinned.
    pinned: Option<PinLine<'a>>,
    /// Its progressive rollout, the last one it had (any state); `null` when it never had one.
    stage: Option<StageLine<'a>>,
}

#[derive(Serialize)]
struct StageLine<'a> {
    policy: &'a str,
    state: crate::store::StagingState,
    version: u64,
    base_version: u64,
    /// 1-based, as people count stages.
    stage: usize,
    stages: Vec<String>,
    reason: &'a str,
    stage_started_at_ms: i64,
    bake_secs: u64,
    /// While rolling or halted: the connected subscribers the stages reached admit, how many of
    /// them applied the version, and how many failed it (as `stages` in the topic API).
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<u64>,
}

#[derive(Serialize)]
struct PinLine<'a> {
    by: &'a str,
    reason: &'a str,
    version: u64,
    at_ms: i64,
    held_total: u64,
}

async fn board(store: &dyn Store) -> Result<String, StoreError> {
    let topics = store.topics().await?;
    let (subscribers, acks) = store.rollout_groups().await?;
    let pins = store.pins().await?;
    let stagings = store.stagings().await?;
    let active = |s: &crate::store::Staging| {
        matches!(
            s.state,
            crate::store::StagingState::Rolling | crate::store::StagingState::Halted
        )
    };
    // The stage tallies read every instance and ack, only while some rollout is active.
    let (instances, all_acks) = if stagings.iter().any(active) {
        (store.instances().await?, store.acks().await?)
    } else {
        (Vec::new(), Vec::new())
    };
    let counts = count(&topics, &subscribers, &acks);
    let lines: Vec<TopicLine> = topics
        .iter()
        .map(|t| TopicLine {
            summary: t,
            counts: counts.get(&t.topic).cloned().unwrap_or_default(),
            pinned: pins.iter().find(|p| p.topic == t.topic).map(|p| PinLine {
                by: &p.by,
                reason: &p.reason,
                version: p.version,
                at_ms: p.at_ms,
                held_total: p.held_total,
            }),
            stage: stagings.iter().find(|s| s.topic == t.topic).map(|s| {
                let tally =
                    active(s).then(|| crate::hub::stages::tally_acks(s, &instances, &all_acks));
                StageLine {
                    policy: &s.policy.name,
                    state: s.state,
                    version: s.version,
                    base_version: s.base_version,
                    stage: s.stage + 1,
                    stages: s.policy.stages.iter().map(ToString::to_string).collect(),
                    reason: &s.reason,
                    stage_started_at_ms: s.stage_started_at_ms,
                    bake_secs: s.policy.bake_secs,
                    members: tally.as_ref().map(|t| t.members),
                    applied: tally.as_ref().map(|t| t.applied),
                    failed: tally.as_ref().map(|t| t.failed.len() as u64),
                }
            }),
        })
        .collect();
    let total: u64 = subscribers.iter().map(|g| g.count).sum();
    let connected: u64 = subscribers
        .iter()
        .filter(|g| g.connected)
        .map(|g| g.count)
        .sum();
    let board = serde_json::json!({
        "topics": lines,
        "instances": {"total": total, "connected": connected},
    });
    Ok(board.to_string())
}

/// The counts of every topic: its instances are those subscribed to a pattern matching it and
/// those that acked it (as in `GET /api/v1/topics/{topic}`'s rollout).
pub fn count(
    topics: &[TopicSummary],
    subscribers: &[SubscriberGroup],
    acks: &[AckGroup],
) -> BTreeMap<String, Counts> {
    let subscribed =
        |patterns: &[String], topic: &str| patterns.iter().any(|p| topic_matches(p, topic));
    let mut out = BTreeMap::new();
    for t in topics {
        // Subscribers without an ack are behind or offline; each ack below moves its
        // instances out of there into what the ack says.
        let (mut waiting_on, mut waiting_off) = (0u64, 0u64);
        for g in subscribers
            .iter()
            .filter(|g| subscribed(&g.subscriptions, &t.topic))
        {
            if g.connected {
                waiting_on += g.count;
            } else {
                waiting_off += g.count;
            }
        }
        let mut c = Counts::default();
        for a in acks.iter().filter(|a| a.topic == t.topic) {
            if subscribed(&a.subscriptions, &t.topic) {
                let waiting = if a.connected {
                    &mut waiting_on
                } else {
                    &mut waiting_off
                };
                *waiting = waiting.saturating_sub(a.count);
            }
            match (
                Standing::of(Some((a.status, a.version)), t.version),
                a.connected,
            ) {
                (Standing::Failed, _) => c.failed += a.count,
                (Standing::Applied, _) => c.applied += a.count,
                (Standing::Behind, true) => c.behind += a.count,
                (Standing::Behind, false) => c.offline += a.count,
            }
        }
        c.behind += waiting_on;
        c.offline += waiting_off;
        c.total = c.applied + c.behind + c.failed + c.offline;
        out.insert(t.topic.clone(), c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AckStatus;

    fn topic(name: &str, version: u64) -> TopicSummary {
        TopicSummary {
            topic: name.into(),
            repo: "config".into(),
            version,
            seq: 1,
            commit: "c".into(),
            updated_at_ms: 0,
            author: None,
            message: None,
        }
    }

    fn group(patterns: &[&str], connected: bool, count: u64) -> SubscriberGroup {
        SubscriberGroup {
            subscriptions: patterns.iter().map(|p| p.to_string()).collect(),
            connected,
            count,
        }
    }

    fn ack(
        topic: &str,
        version: u64,
        status: AckStatus,
        patterns: &[&str],
        connected: bool,
        count: u64,
    ) -> AckGroup {
        AckGroup {
            topic: topic.into(),
            version,
            status,
            connected,
            subscriptions: patterns.iter().map(|p| p.to_string()).collect(),
            count,
        }
    }

    #[test]
    fn every_instance_is_counted_once_in_the_right_column() {
        let topics = [topic("payments", 3), topic("shared", 1)];
        let subscribers = [
            group(&["payments"], true, 10),
            group(&["payments"], false, 4),
            group(&["*"], true, 2),
            group(&["other"], true, 7),
        ];
        let acks = [
            ack("payments", 3, AckStatus::Applied, &["payments"], true, 6),
            ack("payments", 2, AckStatus::Applied, &["payments"], true, 1),
            ack("payments", 3, AckStatus::Failed, &["payments"], true, 2),
            ack("payments", 3, AckStatus::Applied, &["payments"], false, 3),
            ack("payments", 2, AckStatus::Applied, &["*"], true, 1),
            // Acked once, no longer subscribed: still part of the rollout.
            ack("payments", 3, AckStatus::Applied, &["other"], true, 1),
        ];
        let counts = count(&topics, &subscribers, &acks);
        let payments = &counts["payments"];
        // applied: 6 + 3 + 1; failed 2; behind: 1 (older ack) + 1 (older, `*`) + 1 (`*`, no ack)
        // + 10 - 6 - 1 - 2 (connected subscribers without an ack); offline: 4 - 3.
        assert_eq!(
            *payments,
            Counts {
                applied: 10,
                behind: 4,
                failed: 2,
                offline: 1,
                total: 17
            }
        );
        assert_eq!(
            counts["shared"],
            Counts {
                behind: 2,
                total: 2,
                ..Counts::default()
            }
        );
    }
}
