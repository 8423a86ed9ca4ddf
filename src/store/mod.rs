//! The store: the append-only event log with its gap-free sequence, the current files and version of
//! every topic, the instances and their acks.
//!
//! Invariant it owns: a change gets its sequence number and is committed, together with the new
//! topic state, in one transaction, before any byte of it is sent. Sequence numbers are 1, 2, 3, ...
//! with no gap, so a reader that has seen `n` knows exactly what it has not seen.

pub mod postgres;
pub mod rewind;
pub mod sql;
pub mod sqlite;
pub mod upkeep;
pub mod witness;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::protocol::{AckStatus, Change, FileChange, FileStatus, Snapshot, SnapshotFile};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Carries the scheme only: the rest of a store url may hold a password.
    #[error("unsupported store url scheme `{0}` (use sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    #[error("cannot create the database directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    /// The database answers, but using it would lose or refuse writes; the message says why
    /// and what to do.
    #[error("{0}")]
    Unhealthy(String),
    /// The transaction of a batch of writes failed ([`Store::write_batch`]): every write in it
    /// gets this, and none of them was made.
    #[error("{0}")]
    Batch(Arc<StoreError>),
    /// The task that batches the connections' writes has stopped (the server is shutting down).
    #[error("the store's writer has stopped (server shutting down)")]
    WriterStopped,
}

/// What one sync found: the new head of a repo and the changes of each topic it touches.
#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    pub repo: String,
    pub commit: String,
    pub author: String,
    pub message: String,
    /// The commit's `Confcast-Rollout` trailer (staging::trailer), read from the whole message
    /// before `message` is cut to its cap: trailers come last.
    pub rollout_trailer: Option<String>,
    pub topics: Vec<TopicChange>,
    /// Topics held back by validation, written with the publish.
    pub rejected: Vec<Rejection>,
    /// Topics no longer held back.
    pub cleared: Vec<String>,
    /// Set for a rollback, which is not a sync: the repo head stays where it is, every change
    /// records what it restores and who asked, and its topics are marked as differing from git
    /// (a [`Resync`]) in the same transaction.
    pub rollback: Option<Rollback>,
    /// Changes of pinned topics that this sync did not publish, each added to its pin's list.
    pub held: Vec<(String, HeldChange)>,
    /// How many held changes a pin lists (`limits.max_held_changes`); older ones are counted.
    pub max_held: usize,
    /// Topics whose whole git state this sync compared with their stored files: their
    /// [`Resync`] marks are cleared with the publish.
    pub resynced: Vec<String>,
    /// Topics whose change rolls out in stages (the policy chosen and the first stage's cut).
    /// A topic with an active rollout keeps it: the change joins it at its current stage.
    pub rollouts: BTreeMap<String, RolloutStart>,
    /// How the active rollout of a topic changed here without a [`RolloutStart`] ends (default:
    /// superseded), and why.
    pub ends: BTreeMap<String, (StagingState, String)>,
}

/// How a topic's change starts a progressive rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutStart {
    pub policy: crate::staging::Policy,
    /// Who the first stage admits.
    pub cut: crate::staging::Cut,
}

/// Where a progressive rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagingState {
    /// Widening stage by stage as the acks allow.
    Rolling,
    /// Stopped widening (failed acks, or an operator); the stages reached keep the version.
    Halted,
    /// Every instance has the version.
    Completed,
    /// An operator (or `auto_revert`) gave the stages reached the previous content back.
    Aborted,
    /// A later change ended it (one rolled out at once, or a rollback).
    Superseded,
}

impl StagingState {
    pub fn as_str(self) -> &'static str {
        match self {
            StagingState::Rolling => "rolling",
            StagingState::Halted => "halted",
            StagingState::Completed => "completed",
            StagingState::Aborted => "aborted",
            StagingState::Superseded => "superseded",
        }
    }

    pub fn parse(text: &str) -> Option<StagingState> {
        [
            StagingState::Rolling,
            StagingState::Halted,
            StagingState::Completed,
            StagingState::Aborted,
            StagingState::Superseded,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Rolling or halted: delivery still follows the stages.
    pub fn active(self) -> bool {
        matches!(self, StagingState::Rolling | StagingState::Halted)
    }
}

/// A topic's progressive rollout, active or the last one it had.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Staging {
    pub topic: String,
    pub repo: String,
    pub state: StagingState,
    /// The version rolling out.
    pub version: u64,
    /// The version every instance outside the stages reached keeps.
    pub base_version: u64,
    /// The log position of the base version's change.
    pub base_seq: u64,
    #[serde(skip)]
    pub base_commit: String,
    /// The base version's files, as a snapshot sends them.
    #[serde(skip)]
    pub base_files: Vec<SnapshotFile>,
    pub policy: crate::staging::Policy,
    /// The index of the current stage in `policy.stages`.
    pub stage: usize,
    /// Who each stage reached admits, fixed when it started.
    pub cuts: Vec<crate::staging::Cut>,
    pub started_at_ms: i64,
    pub stage_started_at_ms: i64,
    pub updated_at_ms: i64,
    /// Why it is where it is: the last promotion, halt or end, in words.
    pub reason: String,
}

impl Staging {
    /// Whether `instance` (with `labels`) is in the stages reached.
    pub fn admits(&self, instance: &str, labels: &BTreeMap<String, String>) -> bool {
        crate::staging::admitted(&self.cuts, &self.topic, instance, labels)
    }

    /// The base version as a snapshot: what an instance outside the stages runs.
    pub fn base_snapshot(&self) -> Snapshot {
        Snapshot {
            topic: self.topic.clone(),
            version: self.base_version,
            seq: self.base_seq,
            commit: self.base_commit.clone(),
            files: self.base_files.clone(),
        }
    }
}

/// One decision on an active rollout, made only if it is still at `version` and `stage`.
#[derive(Debug, Clone, PartialEq)]
pub enum StageStep {
    /// Widens to the next stage, admitting `cut` too; a cut admitting everyone completes it.
    Promote {
        cut: crate::staging::Cut,
        reason: String,
    },
    /// Stops widening.
    Halt { reason: String },
}

/// What a rollback change restores and why, recorded with it in the log.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Rollback {
    /// The earlier version whose files the change restores.
    pub rollback_of: u64,
    /// The API token that asked.
    pub requested_by: String,
    pub reason: String,
}

/// A change a pin kept from being published: the commit the sync reached, and how many of the
/// topic's files it changed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HeldChange {
    pub commit: String,
    pub author: String,
    pub message: String,
    pub at_ms: i64,
    pub files: usize,
}

/// A topic held at a version: syncs go on, but its changes are recorded, not published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pin {
    pub topic: String,
    pub repo: String,
    /// The topic's version when it was pinned.
    pub version: u64,
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
    /// The newest held changes, oldest first (at most `limits.max_held_changes`).
    pub held: Vec<HeldChange>,
    /// Every change held since the pin, including those no longer listed.
    pub held_total: u64,
}

/// A topic whose stored files may differ from its git state (after a rollback or an unpin):
/// its next sync compares the whole git state with the stored files instead of diffing commits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resync {
    pub topic: String,
    pub repo: String,
    pub since_ms: i64,
    /// Compare at the next sync even if git did not move (after an unpin); otherwise at the
    /// first sync whose commits touch the topic (after a rollback).
    pub due: bool,
}

/// A topic change held back because a file did not validate.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub repo: String,
    pub topic: String,
    /// The commit the topic was last good at: its next change is diffed from here.
    pub base_commit: String,
    pub commit: String,
    pub author: String,
    pub path: String,
    pub line: Option<u32>,
    pub message: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct TopicChange {
    pub topic: String,
    pub files: Vec<ChangedFile>,
}

#[derive(Debug, Clone)]
pub struct ChangedFile {
    pub path: String,
    pub status: FileStatus,
    pub old_path: Option<String>,
    pub sha: String,
    /// `None` for deletions.
    pub content: Option<Vec<u8>>,
}

impl ChangedFile {
    fn to_wire(&self) -> FileChange {
        let (content, encoding) = match &self.content {
            Some(bytes) => {
                let (c, e) = crate::protocol::encode_content(bytes);
                (Some(c), e)
            }
            None => (None, Default::default()),
        };
        FileChange {
            path: self.path.clone(),
            status: self.status,
            old_path: self.old_path.clone(),
            sha: self.sha.clone(),
            content,
            encoding,
        }
    }
}

/// A logged change, as read back: its position, its topic and the frame exactly as it is sent.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub seq: u64,
    pub topic: String,
    pub frame: String,
    /// Who it is for, when a progressive rollout limits it to the stages reached.
    pub audience: Option<Arc<crate::staging::Audience>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicSummary {
    pub topic: String,
    pub repo: String,
    pub version: u64,
    pub seq: u64,
    pub commit: String,
    pub updated_at_ms: i64,
    /// Author and message of the commit of the current version; `None` once its change has
    /// left the log (retention).
    pub author: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub seq: u64,
    pub version: u64,
    pub commit: String,
    pub author: String,
    pub message: String,
    pub created_at_ms: i64,
    pub files: Vec<HistoryFile>,
    /// Set for a rollback: what it restored, who asked and why.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HistoryFile {
    pub path: String,
    pub status: FileStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    pub sha: String,
}

impl HistoryFile {
    pub fn of(f: &FileChange) -> HistoryFile {
        HistoryFile {
            path: f.path.clone(),
            status: f.status,
            old_path: f.old_path.clone(),
            sha: f.sha.clone(),
        }
    }
}

/// The files of a change that takes a topic from `from` to `to` (both in path order): added,
/// modified and deleted, never renamed. Empty when they hold the same files.
pub fn jump_files(from: &[SnapshotFile], to: &[SnapshotFile]) -> Vec<FileChange> {
    let before: BTreeMap<&str, &SnapshotFile> = from.iter().map(|f| (f.path.as_str(), f)).collect();
    let after: BTreeMap<&str, &SnapshotFile> = to.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut files = Vec::new();
    for path in before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        match (before.get(path), after.get(path)) {
            (Some(old), None) => files.push(FileChange {
                path: old.path.clone(),
                status: FileStatus::Deleted,
                old_path: None,
                sha: old.sha.clone(),
                content: None,
                encoding: Default::default(),
            }),
            (old, Some(new)) if old.is_none_or(|o| o.sha != new.sha) => files.push(FileChange {
                path: new.path.clone(),
                status: if old.is_some() {
                    FileStatus::Modified
                } else {
                    FileStatus::Added
                },
                old_path: None,
                sha: new.sha.clone(),
                content: Some(new.content.clone()),
                encoding: new.encoding,
            }),
            _ => {}
        }
    }
    files
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceRecord {
    pub id: String,
    pub app: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub subscriptions: Vec<String>,
    pub connected: bool,
    pub node: Option<String>,
    pub last_seen_ms: i64,
    /// When its current connection (or, disconnected, its last one) was accepted; `None` for
    /// an instance last seen before this was recorded.
    pub connected_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AckRecord {
    pub instance: String,
    pub topic: String,
    pub version: u64,
    pub status: AckStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub acked_at_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoRecord {
    pub name: String,
    pub head: String,
    pub synced_at_ms: i64,
}

/// One line of the audit log: who did (or tried) what to what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// The API token's name, `instance:<id>`, `anonymous`, or for a refused credential the peer
    /// address it came from.
    pub actor: String,
    /// What was asked: `sync`, `command`, `rollback`, `pin`, `unpin`, `credential_refused`, ...
    pub action: String,
    /// What it was asked of: a repo, a topic, a command id, an endpoint.
    pub target: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// What else the action carried (a reason, a version), as JSON.
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub id: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// A page of the audit log: entries with `id < before`, of one `action` if given.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub before: Option<u64>,
    pub action: Option<String>,
    pub limit: u32,
}

/// Instances that subscribed to the same patterns and are connected alike, counted: what a
/// rollout needs of them without reading each one ([`Store::rollout_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberGroup {
    pub subscriptions: Vec<String>,
    pub connected: bool,
    pub count: u64,
}

/// Acks alike (topic, version, verdict) from instances alike (connected, subscriptions), counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckGroup {
    pub topic: String,
    pub version: u64,
    pub status: AckStatus,
    pub connected: bool,
    pub subscriptions: Vec<String>,
    pub count: u64,
}

/// Which instances one page of [`Store::instances_page`] is taken from. Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// `app` equal to this.
    pub app: Option<String>,
    /// A label with this key and value (ASCII letters compared without case).
    pub label: Option<(String, String)>,
    /// Text found in the id or the app (ASCII letters compared without case).
    pub text: Option<String>,
    pub connected: Option<bool>,
}

/// A logged change read back whole (its files with content), with the time it was logged.
#[derive(Debug, Clone)]
pub struct LoggedChange {
    pub change: Change,
    pub created_at_ms: i64,
}

/// A topic file's content just before some version ([`Store::file_before`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileBefore {
    Content(Vec<u8>),
    /// The file did not exist (never added, or deleted).
    Absent,
    /// The changes that would tell have left the log (retention).
    Unknown,
}

/// A command as it is created: who asked, what, for whom, until when.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: String,
    pub name: String,
    pub args: serde_json::Value,
    /// The target as the API took it (`{"all": true}`, `{"instances": [..]}`, ...).
    pub target: serde_json::Value,
    pub created_by: String,
    pub created_at_ms: i64,
    pub deadline_ms: i64,
}

/// A command whose deadline has not passed, as connections deliver it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveCommand {
    pub id: String,
    pub name: String,
    pub args: serde_json::Value,
    pub target: serde_json::Value,
    pub deadline_ms: i64,
}

/// How many targeted instances are where: `targeted` is the sum of the four others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CommandCounts {
    pub targeted: u64,
    pub pending: u64,
    pub delivered: u64,
    pub done: u64,
    pub failed: u64,
    /// Targeted instances that did not ack before the deadline (pending or delivered once it
    /// passed); 0 while the deadline is ahead.
    pub expired: u64,
}

/// A command with its outcome so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRecord {
    pub id: String,
    pub name: String,
    pub args: serde_json::Value,
    pub target: serde_json::Value,
    pub created_by: String,
    pub created_at_ms: i64,
    pub deadline_ms: i64,
    /// The deadline has passed: nothing more is delivered.
    pub expired: bool,
    pub counts: CommandCounts,
}

/// One targeted instance of a command.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandInstance {
    pub instance: String,
    /// `pending`, `delivered`, `done` or `failed`.
    pub status: String,
    pub message: Option<String>,
    pub delivered_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// How many times it was sent (once per connection until acked).
    pub deliveries: u64,
}

/// Why a command was not created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandRefusal {
    /// `limits.max_active_commands` commands have their deadline ahead.
    TooManyActive { active: u64 },
}

/// What became of a `command_ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandAckOutcome {
    Recorded,
    /// Acked before: the first verdict stands.
    AlreadyFinished(crate::protocol::CommandStatus),
    /// The command was never delivered to this instance (or does not exist).
    NotDelivered,
}

/// Where one instance stands in a topic's rollout, by its latest ack for the topic: the one rule
/// that the API's `rollout`, the dashboard's counts and the convergence metric all apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its latest ack applied the topic's current version.
    Applied,
    /// No ack yet, or its latest ack applied an older version.
    Behind,
    /// Its latest ack failed (for any version).
    Failed,
}

impl Standing {
    /// `ack` is the latest ack's verdict and version, `current` the topic's version.
    pub fn of(ack: Option<(AckStatus, u64)>, current: u64) -> Standing {
        match ack {
            Some((AckStatus::Failed, _)) => Standing::Failed,
            Some((AckStatus::Applied, version)) if version == current => Standing::Applied,
            _ => Standing::Behind,
        }
    }
}

/// Whether an instance counts in `topic`'s rollout: it subscribed to a pattern matching the
/// topic, or it acked the topic.
pub fn in_rollout(subscriptions: &[String], topic: &str, acked: bool) -> bool {
    acked
        || subscriptions
            .iter()
            .any(|p| crate::protocol::topic_matches(p, topic))
}

/// A rollout has converged when at least one instance applied its version and none is behind
/// or failed.
pub fn converged(applied: u64, behind: u64, failed: u64) -> bool {
    applied > 0 && behind == 0 && failed == 0
}

/// Why an ack was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckRejection {
    UnknownTopic,
    UnknownVersion { current: u64 },
}

/// One write an instance's connection makes: batched with other connections' writes into one
/// transaction by [`Store::write_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceWrite {
    /// `instance` connected through `connection` on replica `node` (its subscriptions start
    /// empty).
    Connected {
        instance: String,
        app: Option<String>,
        labels: BTreeMap<String, String>,
        connection: String,
        node: String,
    },
    /// `instance` is subscribed to `patterns` (all of them, replacing what it had).
    Subscriptions {
        instance: String,
        patterns: Vec<String>,
    },
    /// `instance` disconnected, unless a newer connection than `connection` has taken it over.
    Disconnected {
        instance: String,
        connection: String,
    },
    /// What `instance` did with `version` of `topic` (its latest word per topic counts).
    Ack {
        instance: String,
        topic: String,
        version: u64,
        status: AckStatus,
        error: Option<String>,
    },
}

impl InstanceWrite {
    pub fn connected(
        instance: &str,
        app: Option<&str>,
        labels: &BTreeMap<String, String>,
        connection: &str,
        node: &str,
    ) -> InstanceWrite {
        InstanceWrite::Connected {
            instance: instance.into(),
            app: app.map(Into::into),
            labels: labels.clone(),
            connection: connection.into(),
            node: node.into(),
        }
    }

    pub fn subscriptions(instance: &str, patterns: &[String]) -> InstanceWrite {
        InstanceWrite::Subscriptions {
            instance: instance.into(),
            patterns: patterns.to_vec(),
        }
    }

    pub fn disconnected(instance: &str, connection: &str) -> InstanceWrite {
        InstanceWrite::Disconnected {
            instance: instance.into(),
            connection: connection.into(),
        }
    }

    pub fn ack(
        instance: &str,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<&str>,
    ) -> InstanceWrite {
        InstanceWrite::Ack {
            instance: instance.into(),
            topic: topic.into(),
            version,
            status,
            error: error.map(Into::into),
        }
    }

    pub fn instance(&self) -> &str {
        match self {
            InstanceWrite::Connected { instance, .. }
            | InstanceWrite::Subscriptions { instance, .. }
            | InstanceWrite::Disconnected { instance, .. }
            | InstanceWrite::Ack { instance, .. } => instance,
        }
    }
}

/// Where the log stands, read at one moment: what a `subscribe` with `since` is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBounds {
    pub epoch: String,
    /// The highest sequence number written (0 for an empty log).
    pub head: u64,
    /// The lowest sequence number still kept, if the log is not empty.
    pub oldest: Option<u64>,
}

/// The store behind confcast. SQLite is the embedded default; PostgreSQL serves several replicas.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The last commit of `repo` that was published, if any.
    async fn repo_head(&self, repo: &str) -> Result<Option<String>, StoreError>;
    async fn repos(&self) -> Result<Vec<RepoRecord>, StoreError>;

    /// Writes the new repo head and every topic change in one transaction, giving each change the
    /// next sequence number and its topic the next version. Returns the changes as logged.
    async fn publish(&self, outcome: &SyncOutcome) -> Result<Vec<Change>, StoreError>;

    /// Logged events with `seq > after`, in order, at most `limit`.
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError>;
    /// The highest sequence number written (0 for an empty log).
    async fn head_seq(&self) -> Result<u64, StoreError>;
    /// The log's epoch: created with the store and replaced whenever the log starts over, so a
    /// position (`seq`) means something only together with the epoch it was read in.
    async fn epoch(&self) -> Result<String, StoreError>;
    /// Starts a new epoch if the log is still in `current` (so replicas noticing the same restore
    /// together start one, not several); returns the epoch in force afterwards.
    async fn rotate_epoch(&self, current: &str) -> Result<String, StoreError>;
    /// The lowest sequence number still kept, if the log is not empty.
    async fn oldest_seq(&self) -> Result<Option<u64>, StoreError>;
    /// [`Store::epoch`], [`Store::head_seq`] and [`Store::oldest_seq`] in one read.
    async fn log_bounds(&self) -> Result<LogBounds, StoreError>;

    /// A consistent view: the log head and the full state of every topic `filter` accepts.
    async fn snapshots(
        &self,
        filter: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
    ) -> Result<(u64, Vec<Snapshot>), StoreError>;
    async fn topics(&self) -> Result<Vec<TopicSummary>, StoreError>;
    async fn topic_history(&self, topic: &str, limit: u32)
        -> Result<Vec<HistoryEntry>, StoreError>;

    /// Makes `writes` in one transaction and answers each, in the order given: `Ok(())`, or for
    /// an ack the reason it was refused (an unknown topic, a version 0 or above the topic's
    /// current one), which writes nothing while the batch's other writes are made. The writes of
    /// one instance are made in the order given. An error means the transaction failed and
    /// none was made.
    async fn write_batch(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<Result<(), AckRejection>>, StoreError>;

    /// Marks `instance` connected through `connection` on replica `node` (a batch of one).
    async fn instance_connected(
        &self,
        instance: &str,
        app: Option<&str>,
        labels: &BTreeMap<String, String>,
        connection: &str,
        node: &str,
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::connected(instance, app, labels, connection, node);
        self.write_batch(&[write]).await.map(drop)
    }
    /// Records the patterns `instance` is subscribed to (a batch of one).
    async fn instance_subscriptions(
        &self,
        instance: &str,
        patterns: &[String],
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::subscriptions(instance, patterns);
        self.write_batch(&[write]).await.map(drop)
    }
    /// Marks `instance` disconnected unless a newer connection has taken it over (a batch of
    /// one).
    async fn instance_disconnected(
        &self,
        instance: &str,
        connection: &str,
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::disconnected(instance, connection);
        self.write_batch(&[write]).await.map(drop)
    }
    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
    /// At most `limit` instances that `filter` accepts with an id above `after`, in id order,
    /// and how many `filter` accepts in all (whatever `after`).
    async fn instances_page(
        &self,
        filter: &InstanceFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<InstanceRecord>, u64), StoreError>;
    /// Every instance counted by (subscriptions, connected), and every ack counted by (topic,
    /// version, status) and its instance's (connected, subscriptions): the rollout of every
    /// topic in two grouped reads, however many instances there are.
    async fn rollout_groups(&self) -> Result<(Vec<SubscriberGroup>, Vec<AckGroup>), StoreError>;
    /// Forgets every instance disconnected before `disconnected_before_ms`, with its acks, so a
    /// rollout stops waiting for instances that were scaled away. Connected instances stay,
    /// however old. Returns how many were forgotten.
    async fn expire_instances(&self, disconnected_before_ms: i64) -> Result<u64, StoreError>;

    /// Records what `instance` did with `version` of `topic` (its latest word per topic counts;
    /// a batch of one).
    async fn record_ack(
        &self,
        instance: &str,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<&str>,
    ) -> Result<Result<(), AckRejection>, StoreError> {
        let write = InstanceWrite::ack(instance, topic, version, status, error);
        let mut answers = self.write_batch(&[write]).await?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a batch of one ack was not answered".into()))
    }
    async fn acks(&self) -> Result<Vec<AckRecord>, StoreError>;
    /// Remembers a webhook delivery id; `false` when it was seen before (a redelivery). Keeps
    /// the most recent ids only (bounded).
    async fn remember_delivery(
        &self,
        repo: &str,
        provider: &str,
        id: &str,
    ) -> Result<bool, StoreError>;

    /// Topics of `repo` held back by validation.
    async fn rejections(&self, repo: &str) -> Result<Vec<Rejection>, StoreError>;

    /// The acks of one instance.
    async fn acks_of(&self, instance: &str) -> Result<Vec<AckRecord>, StoreError>;
    /// The acks of these instances.
    async fn acks_for(&self, instances: &[String]) -> Result<Vec<AckRecord>, StoreError>;

    /// `version` of `topic` as logged, with its files' content; `None` when it is not (or no
    /// longer) in the log.
    async fn topic_change(
        &self,
        topic: &str,
        version: u64,
    ) -> Result<Option<LoggedChange>, StoreError>;
    /// The content `path` had in `topic` just before `version`: from the latest logged change
    /// below `version` that touched it.
    async fn file_before(
        &self,
        topic: &str,
        path: &str,
        version: u64,
    ) -> Result<FileBefore, StoreError>;

    /// Applies retention: keeps at most `max_events` most recent events (0 = any number) and none
    /// older than `max_age_ms` (0 = any age). Returns how many were removed. Topic state stays.
    async fn trim(&self, max_events: u64, max_age_ms: i64) -> Result<u64, StoreError>;

    /// The change that made `version` of `topic`, with its files' content, if still logged.
    async fn change_at(&self, topic: &str, version: u64) -> Result<Option<Change>, StoreError>;

    /// Every topic's progressive rollout, active or its last, by topic.
    async fn stagings(&self) -> Result<Vec<Staging>, StoreError>;
    /// Makes `step` on `topic`'s rollout if it is still active at `version` and `stage`; a
    /// promotion logs, in the same transaction, the change from the base version to `version`
    /// for the stages now reached. `false` when the rollout had moved on (nothing done).
    async fn stage_step(
        &self,
        topic: &str,
        version: u64,
        stage: usize,
        step: &StageStep,
    ) -> Result<bool, StoreError>;

    /// Every pin, by topic.
    async fn pins(&self) -> Result<Vec<Pin>, StoreError>;
    /// Pins a topic; `false` when it is already pinned (the existing pin stays).
    async fn pin(&self, pin: &Pin) -> Result<bool, StoreError>;
    /// Removes a topic's pin and, in the same transaction, marks the topic for a full compare
    /// at its repo's next sync ([`Resync`] with `due`). Returns the pin, `None` if there was none.
    async fn unpin(&self, topic: &str) -> Result<Option<Pin>, StoreError>;
    /// The topics of `repo` whose stored files may differ from git.
    async fn resyncs(&self, repo: &str) -> Result<Vec<Resync>, StoreError>;

    /// Appends one entry to the audit log, keeping the newest `keep` (0 = all); returns its id.
    async fn record_audit(&self, entry: &AuditEntry, keep: u64) -> Result<u64, StoreError>;
    /// Audit entries, newest first.
    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Creates a command with a `pending` row for each of `targeted`, unless `max_active`
    /// commands already have their deadline ahead; keeps the newest `keep` commands. Wakes the
    /// other replicas (PostgreSQL: the `confcast_log` notification) on commit.
    async fn create_command(
        &self,
        command: &NewCommand,
        targeted: &[String],
        max_active: u64,
        keep: u64,
    ) -> Result<Result<(), CommandRefusal>, StoreError>;
    /// How many commands have their deadline after `now_ms`.
    async fn active_command_count(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Commands whose deadline is after `now_ms`, oldest first.
    async fn active_commands(&self, now_ms: i64) -> Result<Vec<ActiveCommand>, StoreError>;
    /// Records that `command` is being sent to `instance`; `false` (nothing recorded) when the
    /// instance already acked it.
    async fn command_delivered(
        &self,
        command: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Records `instance`'s verdict on `command`, if it was delivered to it and not acked yet.
    async fn record_command_ack(
        &self,
        command: &str,
        instance: &str,
        status: crate::protocol::CommandStatus,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<CommandAckOutcome, StoreError>;
    /// The newest `limit` commands with their counts.
    async fn commands(&self, limit: u32, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError>;
    /// One command with each targeted instance.
    async fn command(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<(CommandRecord, Vec<CommandInstance>)>, StoreError>;
    /// Marks the commands whose deadline passed by `now_ms` as expired, once (whichever replica
    /// gets there first); returns each with how many targeted instances never acked it.
    async fn expire_commands(&self, now_ms: i64) -> Result<Vec<(String, u64)>, StoreError>;

    /// Waits until this replica may sync `repo`: at most one replica (and one task) syncs a repo
    /// at a time. The returned guard holds the right until dropped; a replica that dies loses it.
    async fn lock_repo(&self, repo: &str) -> Result<RepoLock, StoreError>;

    /// Marks every instance connected through replica `node` as disconnected (after a restart:
    /// whatever the previous process had is gone).
    async fn reset_node(&self, node: &str) -> Result<(), StoreError>;

    /// Whether the store can be used right now: a round trip, plus what each database can check
    /// cheaply for writes that would fail or be lost (see each backend). Bounded in time.
    async fn check(&self) -> Result<(), StoreError>;

    /// Calls `wake` whenever another replica may have appended to the log, until `shutdown`.
    /// A store with a single writer (SQLite) has nothing to watch and returns at once.
    async fn watch(
        &self,
        wake: Arc<tokio::sync::Notify>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let _ = (wake, shutdown);
    }
}

/// Held while a repo is being synced; dropping it releases the repo.
pub struct RepoLock {
    _guard: Box<dyn std::any::Any + Send>,
}

impl RepoLock {
    pub fn new(guard: impl std::any::Any + Send) -> RepoLock {
        RepoLock {
            _guard: Box::new(guard),
        }
    }
}

/// Opens the store named by `url`, creating and migrating it when needed.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::open(url).await?))
    } else {
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        Err(StoreError::UnsupportedUrl(scheme.to_string()))
    }
}

/// One topic change as every store logs it: the wire change, the frame sent to subscribers and
/// the `files` column its history is read back from.
pub struct LogEntry {
    pub change: Change,
    pub frame: String,
    pub files: String,
}

/// Builds the log entry of `topic` at `seq`. Shared by the stores so a change is encoded the same
/// way whichever database holds it: clients and the history API must not see which one it is.
/// This is where a change is encoded, once; public for `benches/hot_paths.rs`.
pub fn log_entry(
    outcome: &SyncOutcome,
    topic: &TopicChange,
    seq: u64,
    previous_version: u64,
) -> Result<LogEntry, StoreError> {
    let change = Change {
        seq,
        topic: topic.topic.clone(),
        version: previous_version + 1,
        previous_version,
        commit: outcome.commit.clone(),
        author: outcome.author.clone(),
        message: outcome.message.clone(),
        files: topic.files.iter().map(|f| f.to_wire()).collect(),
    };
    let frame = serde_json::to_string(&crate::protocol::ServerMessage::Change(change.clone()))
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let files: Vec<HistoryFile> = change.files.iter().map(HistoryFile::of).collect();
    let files = serde_json::to_string(&files).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(LogEntry {
        change,
        frame,
        files,
    })
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A fresh epoch id: 128 random bits as hex.
pub fn new_epoch_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::{converged, in_rollout, jump_files, Standing};
    use crate::protocol::{AckStatus, FileStatus, SnapshotFile};

    fn file(path: &str, sha: &str) -> SnapshotFile {
        SnapshotFile {
            path: path.into(),
            sha: sha.into(),
            content: format!("content {sha}"),
            encoding: Default::default(),
        }
    }

    #[test]
    fn a_jump_adds_modifies_and_deletes_what_differs_and_nothing_else() {
        let from = [file("a", "1"), file("b", "2"), file("c", "3")];
        let to = [file("b", "2"), file("c", "4"), file("d", "5")];
        let jump: Vec<(String, FileStatus, Option<String>)> = jump_files(&from, &to)
            .into_iter()
            .map(|f| (f.path, f.status, f.content))
            .collect();
        assert_eq!(
            jump,
            [
                ("a".into(), FileStatus::Deleted, None),
                ("c".into(), FileStatus::Modified, Some("content 4".into())),
                ("d".into(), FileStatus::Added, Some("content 5".into())),
            ]
        );
        assert!(jump_files(&to, &to).is_empty(), "the same files: nothing");
    }

    #[test]
    fn the_rollout_rule_is_the_latest_ack_against_the_current_version() {
        assert_eq!(Standing::of(None, 3), Standing::Behind);
        assert_eq!(
            Standing::of(Some((AckStatus::Applied, 2)), 3),
            Standing::Behind
        );
        assert_eq!(
            Standing::of(Some((AckStatus::Applied, 3)), 3),
            Standing::Applied
        );
        // A failure counts whatever version it was for.
        assert_eq!(
            Standing::of(Some((AckStatus::Failed, 3)), 3),
            Standing::Failed
        );
        assert_eq!(
            Standing::of(Some((AckStatus::Failed, 1)), 3),
            Standing::Failed
        );
        let subs = vec!["payments/*".to_string()];
        assert!(in_rollout(&subs, "payments/eu", false));
        assert!(!in_rollout(&subs, "billing", false));
        assert!(in_rollout(&subs, "billing", true), "an ack counts it in");
        assert!(converged(3, 0, 0));
        assert!(!converged(0, 0, 0), "nobody applied: not converged");
        assert!(!converged(3, 1, 0));
        assert!(!converged(3, 0, 1));
    }
}
