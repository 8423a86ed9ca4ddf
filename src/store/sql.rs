//! The store's logic, written once: every query, every transaction and every row mapping of
//! [`Store`], generic over the sqlx database it runs on.
//!
//! The SQL here is the subset SQLite and PostgreSQL both accept: numbered `$n` parameters,
//! `INSERT ... ON CONFLICT`, `RETURNING`, `true`/`false`, `CAST(.. AS TEXT)`. What really differs
//! lives in a [`Backend`]: its column types and how it records the migrations it ran, how a snapshot read begins,
//! how a repo is locked, how the other replicas are woken after a publish, and what a restarted
//! replica resets. Adding a table and its queries is one change here plus one migration entry.
//!
//! Why a generic implementation over `sqlx::Database` and not sqlx's `Any` driver or a query
//! builder: the queries stay checked against each concrete driver's types (`bool`, `BYTEA`/`BLOB`,
//! `BIGINT`), rows are decoded without `Any`'s owned intermediate copy of every value (the replay
//! path reads frames in bulk), and `Any` cannot decode a SQLite integer as a `bool`. A query
//! builder would add a dependency to express SQL both databases already share.
//!
//! It must never hand out a sequence number outside the transaction that writes the event.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Transaction, Type,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    log_entry, now_ms, AckGroup, AckRecord, AckRejection, ActiveCommand, AuditEntry, AuditQuery,
    AuditRecord, CommandAckOutcome, CommandCounts, CommandInstance, CommandRecord, CommandRefusal,
    FileBefore, HeldChange, HistoryEntry, HistoryFile, InstanceFilter, InstanceRecord,
    InstanceWrite, LogBounds, LogEntry, LoggedChange, LoggedEvent, NewCommand, Pin, Rejection,
    RepoLock, RepoRecord, Resync, StageStep, Staging, StagingState, Store, StoreError,
    SubscriberGroup, SyncOutcome, TopicSummary,
};
use crate::protocol::{
    AckStatus, Change, CommandStatus, FileStatus, ServerMessage, Snapshot, SnapshotFile,
};
use crate::staging::Audience;

/// How many webhook delivery ids are remembered for redelivery detection.
const DELIVERIES_KEPT: i64 = 10_000;

/// How many topic names one `IN (...)` list binds: well under both databases' parameter limits.
const NAMES_PER_QUERY: usize = 500;

/// How long [`Store::check`] may take: a probe that hangs (a pool waiting for an unreachable
/// server) must answer "unhealthy", not keep a readiness probe waiting past its own timeout.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The schema, in order, written once. Column types that differ are written as tokens each
/// backend replaces ([`Backend::TYPES`]): `{int}` (a 64-bit integer), `{bool}`, `{bytes}`,
/// `{serial}` (an auto-numbered 64-bit primary key) and `{random_id}` (an expression giving 32
/// random hex digits). A database records how many steps it ran, so
/// a step is never edited once released: a change to the schema is a new step at the end.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE log_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq {int} NOT NULL);
INSERT INTO log_head (id, seq) VALUES (1, 0);
CREATE TABLE repos (name TEXT PRIMARY KEY, head TEXT NOT NULL, synced_at {int} NOT NULL);
CREATE TABLE topics (
    name TEXT PRIMARY KEY, repo TEXT NOT NULL, version {int} NOT NULL, seq {int} NOT NULL,
    commit_id TEXT NOT NULL, updated_at {int} NOT NULL);
CREATE TABLE topic_files (
    topic TEXT NOT NULL, path TEXT NOT NULL, sha TEXT NOT NULL, content {bytes} NOT NULL,
    PRIMARY KEY (topic, path));
CREATE TABLE events (
    seq {int} PRIMARY KEY, topic TEXT NOT NULL, version {int} NOT NULL, repo TEXT NOT NULL,
    commit_id TEXT NOT NULL, author TEXT NOT NULL, message TEXT NOT NULL, files TEXT NOT NULL,
    created_at {int} NOT NULL, frame TEXT NOT NULL);
CREATE INDEX events_by_topic ON events (topic, seq);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, app TEXT, labels TEXT NOT NULL, subscriptions TEXT NOT NULL,
    connected {bool} NOT NULL, connection TEXT, node TEXT, last_seen {int} NOT NULL);
CREATE TABLE acks (
    instance TEXT NOT NULL, topic TEXT NOT NULL, version {int} NOT NULL, status TEXT NOT NULL,
    error TEXT, acked_at {int} NOT NULL, PRIMARY KEY (instance, topic));
"#,
    r#"
CREATE TABLE deliveries (
    n {serial}, repo TEXT NOT NULL, provider TEXT NOT NULL, id TEXT NOT NULL,
    received_at {int} NOT NULL, UNIQUE (repo, provider, id));
"#,
    r#"
CREATE TABLE rejections (
    repo TEXT NOT NULL, topic TEXT NOT NULL, base_commit TEXT NOT NULL, commit_id TEXT NOT NULL,
    author TEXT NOT NULL, path TEXT NOT NULL, line {int}, message TEXT NOT NULL, at {int} NOT NULL,
    PRIMARY KEY (repo, topic));
"#,
    // The log epoch (see `Store::epoch`); a database created or migrated here starts one.
    r#"
CREATE TABLE log_meta (id INTEGER PRIMARY KEY CHECK (id = 1), epoch TEXT NOT NULL);
INSERT INTO log_meta (id, epoch) VALUES (1, {random_id});
"#,
    // The audit log (see `Store::record_audit`): every write through the API and every refused
    // credential, newest kept.
    r#"
CREATE TABLE audit (
    id {serial},
    at_ms {int} NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_action ON audit (action, id);
"#,
    // Commands (see `Store::create_command`) and what became of them per targeted instance.
    r#"
CREATE TABLE commands (
    n {serial},
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    target TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at {int} NOT NULL,
    deadline_ms {int} NOT NULL,
    expired {bool} NOT NULL
);
CREATE INDEX commands_by_deadline ON commands (deadline_ms);
CREATE TABLE command_instances (
    command TEXT NOT NULL,
    instance TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT,
    delivered_at {int},
    finished_at {int},
    deliveries {int} NOT NULL,
    PRIMARY KEY (command, instance)
);
"#,
    // Rollback and pin (see `Store::pin`, `Store::resyncs`): what a rollback change restored,
    // the pinned topics with the changes they held back, and the topics whose stored files may
    // differ from git until their next full compare.
    r#"
ALTER TABLE events ADD COLUMN rollback TEXT;
CREATE TABLE pins (
    topic TEXT PRIMARY KEY, repo TEXT NOT NULL, version {int} NOT NULL, pinned_by TEXT NOT NULL,
    reason TEXT NOT NULL, pinned_at {int} NOT NULL, held TEXT NOT NULL, held_total {int} NOT NULL);
CREATE TABLE resyncs (
    topic TEXT PRIMARY KEY, repo TEXT NOT NULL, since {int} NOT NULL, due {bool} NOT NULL);
"#,
    // When each instance's current (or last) connection was accepted: `last_seen` moves on every
    // subscribe, so it cannot say "connected since".
    r#"
ALTER TABLE instances ADD COLUMN connected_at {int};
"#,
    // Progressive rollouts (see `Store::stagings`): who a logged change is for (`audience`, NULL
    // for everyone), whether it re-sends a version already logged for the stages a promotion
    // reached (`reissue`), and each topic's rollout, active or its last.
    r#"
ALTER TABLE events ADD COLUMN audience TEXT;
ALTER TABLE events ADD COLUMN reissue {bool} NOT NULL DEFAULT false;
CREATE TABLE stagings (
    topic TEXT PRIMARY KEY, repo TEXT NOT NULL, state TEXT NOT NULL, version {int} NOT NULL,
    base_version {int} NOT NULL, base_seq {int} NOT NULL, base_commit TEXT NOT NULL,
    base_files TEXT NOT NULL, policy TEXT NOT NULL, stage {int} NOT NULL, cuts TEXT NOT NULL,
    started_at {int} NOT NULL, stage_started_at {int} NOT NULL, updated_at {int} NOT NULL,
    reason TEXT NOT NULL);
"#,
];

/// The column types a backend writes for the tokens in [`MIGRATIONS`].
pub struct ColumnTypes {
    pub int: &'static str,
    pub bool: &'static str,
    pub bytes: &'static str,
    pub serial: &'static str,
    pub random_id: &'static str,
}

impl ColumnTypes {
    /// `sql` with every type token replaced.
    pub fn ddl(&self, sql: &str) -> String {
        sql.replace("{int}", self.int)
            .replace("{bool}", self.bool)
            .replace("{bytes}", self.bytes)
            .replace("{serial}", self.serial)
            .replace("{random_id}", self.random_id)
    }
}

/// `rows_affected()` is inherent on each driver's query result, not part of `sqlx::Database`.
pub trait RowsAffected {
    fn rows(&self) -> u64;
}

/// What differs per database. Everything else is [`SqlStore`].
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    type Db: Database;

    /// The statement that opens a read transaction whose statements all see one moment of the
    /// database; `None` when a plain transaction already does (SQLite in WAL mode).
    const SNAPSHOT_BEGIN: Option<&'static str>;

    /// What the type tokens of [`MIGRATIONS`] stand for here.
    const TYPES: ColumnTypes;

    /// Runs the [`MIGRATIONS`] this database has not run yet.
    async fn migrate(&self, pool: &Pool<Self::Db>) -> Result<(), StoreError>;

    /// Called inside a publish transaction that appended up to `head`, before it commits: an
    /// error here rolls the publish back.
    async fn published(
        &self,
        tx: &mut Transaction<'static, Self::Db>,
        head: u64,
    ) -> Result<(), StoreError>;

    async fn lock_repo(&self, pool: &Pool<Self::Db>, repo: &str) -> Result<RepoLock, StoreError>;

    /// Marks disconnected what replica `node`'s previous run had connected.
    async fn reset_node(&self, pool: &Pool<Self::Db>, node: &str) -> Result<(), StoreError>;

    /// See [`Store::watch`].
    async fn watch(&self, wake: Arc<Notify>, shutdown: CancellationToken);

    /// What this database can check beyond a round trip (which [`SqlStore`] does), see
    /// [`Store::check`].
    async fn check(&self, pool: &Pool<Self::Db>) -> Result<(), StoreError>;

    /// The error a failed publish reports: the database's own, unless the backend knows a
    /// cause the operator can act on.
    fn explain(&self, error: StoreError) -> StoreError {
        error
    }
}

/// The [`Store`] over one database `B` drives.
pub struct SqlStore<B: Backend> {
    pool: Pool<B::Db>,
    backend: B,
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn nonnegative(column: &str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {column}: {v}")))
}

/// `$first, $first+1, ...` for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl<B: Backend> SqlStore<B> {
    /// Wraps an open pool and brings its schema up to date.
    pub async fn new(pool: Pool<B::Db>, backend: B) -> Result<SqlStore<B>, StoreError> {
        backend.migrate(&pool).await?;
        Ok(SqlStore { pool, backend })
    }
}

/// Reads a non-negative integer column: a negative seq or version means the table was written by
/// something other than confcast.
fn u64_at<R: Row>(row: &R, column: &str) -> Result<u64, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    nonnegative(column, row.try_get(column)?)
}

const DELETE_FILE: &str = "DELETE FROM topic_files WHERE topic = $1 AND path = $2";

const ACKS: &str = "SELECT instance, topic, version, status, error, acked_at FROM acks
     ORDER BY instance, topic";

/// One instance's acks: a search of the primary key, which an `OR` of a bound value in the
/// `WHERE` would turn into a scan of every ack (on every resuming `subscribe`).
const ACKS_OF: &str = "SELECT instance, topic, version, status, error, acked_at FROM acks
     WHERE instance = $1 ORDER BY topic";

/// The order [`Store::write_batch`] makes writes in: by instance, then the instance's own row
/// before its acks, then by topic. A stable sort by it keeps the order given among the writes of
/// one row.
fn write_order(write: &InstanceWrite) -> (&str, u8, &str) {
    match write {
        InstanceWrite::Ack {
            instance, topic, ..
        } => (instance, 1, topic),
        other => (other.instance(), 0, ""),
    }
}

const INSTANCE_COLUMNS: &str =
    "id, app, labels, subscriptions, connected, node, last_seen, connected_at";

fn instance_record<R: Row>(r: &R) -> Result<InstanceRecord, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(InstanceRecord {
        id: r.try_get("id")?,
        app: r.try_get("app")?,
        labels: serde_json::from_str(r.try_get("labels")?)
            .map_err(|e| StoreError::Corrupt(format!("instance labels: {e}")))?,
        subscriptions: subscriptions(r.try_get("subscriptions")?)?,
        connected: r.try_get("connected")?,
        node: r.try_get("node")?,
        last_seen_ms: r.try_get("last_seen")?,
        connected_at_ms: r.try_get("connected_at")?,
    })
}

fn subscriptions(json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("instance subscriptions: {e}")))
}

/// A `LIKE ... ESCAPE '\'` pattern finding `text` anywhere.
fn like_anywhere(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

fn audience_of(json: &str) -> Result<Arc<Audience>, StoreError> {
    serde_json::from_str(json)
        .map(Arc::new)
        .map_err(|e| StoreError::Corrupt(format!("logged audience: {e}")))
}

const STAGING_COLUMNS: &str = "topic, repo, state, version, base_version, base_seq, base_commit,
    base_files, policy, stage, cuts, started_at, stage_started_at, updated_at, reason";

fn staging_record<R: Row>(r: &R) -> Result<Staging, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    let corrupt =
        |what: &str, e: serde_json::Error| StoreError::Corrupt(format!("rollout {what}: {e}"));
    let state: &str = r.try_get("state")?;
    Ok(Staging {
        topic: r.try_get("topic")?,
        repo: r.try_get("repo")?,
        state: StagingState::parse(state)
            .ok_or_else(|| StoreError::Corrupt(format!("rollout state `{state}`")))?,
        version: u64_at(r, "version")?,
        base_version: u64_at(r, "base_version")?,
        base_seq: u64_at(r, "base_seq")?,
        base_commit: r.try_get("base_commit")?,
        base_files: serde_json::from_str(r.try_get("base_files")?)
            .map_err(|e| corrupt("base files", e))?,
        policy: serde_json::from_str(r.try_get("policy")?).map_err(|e| corrupt("policy", e))?,
        stage: usize::try_from(u64_at(r, "stage")?).unwrap_or(usize::MAX),
        cuts: serde_json::from_str(r.try_get("cuts")?).map_err(|e| corrupt("cuts", e))?,
        started_at_ms: r.try_get("started_at")?,
        stage_started_at_ms: r.try_get("stage_started_at")?,
        updated_at_ms: r.try_get("updated_at")?,
        reason: r.try_get("reason")?,
    })
}

/// `files` (a topic's stored rows) as a snapshot sends them, in path order.
fn snapshot_files<R: Row>(rows: &[R]) -> Result<Vec<SnapshotFile>, StoreError>
where
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    rows.iter()
        .map(|f| {
            let (content, encoding) =
                crate::protocol::encode_content(f.try_get::<&[u8], _>("content")?);
            Ok(SnapshotFile {
                path: f.try_get("path")?,
                sha: f.try_get("sha")?,
                content,
                encoding,
            })
        })
        .collect()
}

/// The change in a logged `change` frame.
fn change_of(frame: &str) -> Result<Change, StoreError> {
    match serde_json::from_str(frame) {
        Ok(ServerMessage::Change(change)) => Ok(change),
        Ok(_) => Err(StoreError::Corrupt("a logged frame is not a change".into())),
        Err(e) => Err(StoreError::Corrupt(format!("logged frame: {e}"))),
    }
}

/// What `change` says about `path`, if it touched it.
fn file_in(change: &Change, path: &str) -> Result<Option<FileBefore>, StoreError> {
    if let Some(f) = change.files.iter().find(|f| f.path == path) {
        return match (&f.status, &f.content) {
            (FileStatus::Deleted, _) | (_, None) => Ok(Some(FileBefore::Absent)),
            (_, Some(content)) => crate::protocol::decode_content(content, f.encoding)
                .map(|bytes| Some(FileBefore::Content(bytes)))
                .map_err(|e| StoreError::Corrupt(format!("logged content of {path}: {e}"))),
        };
    }
    let renamed_away = change
        .files
        .iter()
        .any(|f| f.old_path.as_deref() == Some(path));
    Ok(renamed_away.then_some(FileBefore::Absent))
}

/// How many candidate events [`Store::file_before`] reads per query, and how many queries at
/// most: `LIKE` finds candidates (the path's JSON anywhere in the file list), Rust confirms.
const FILE_BEFORE_BATCH: i64 = 16;
const FILE_BEFORE_ROUNDS: usize = 64;

fn ack_record<R: Row>(r: &R) -> Result<AckRecord, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    let status: &str = r.try_get("status")?;
    Ok(AckRecord {
        instance: r.try_get("instance")?,
        topic: r.try_get("topic")?,
        version: u64_at(r, "version")?,
        status: AckStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("ack status {status}")))?,
        error: r.try_get("error")?,
        acked_at_ms: r.try_get("acked_at")?,
    })
}

/// A command with its counts, as [`COMMANDS`] selects it.
const COMMANDS: &str =
    "SELECT c.id, c.name, c.args, c.target, c.created_by, c.created_at, c.deadline_ms,
       COALESCE(SUM(CASE WHEN ci.status = 'pending' THEN 1 ELSE 0 END), 0) AS pending,
       COALESCE(SUM(CASE WHEN ci.status = 'delivered' THEN 1 ELSE 0 END), 0) AS delivered,
       COALESCE(SUM(CASE WHEN ci.status = 'done' THEN 1 ELSE 0 END), 0) AS done,
       COALESCE(SUM(CASE WHEN ci.status = 'failed' THEN 1 ELSE 0 END), 0) AS failed
     FROM commands c LEFT JOIN command_instances ci ON ci.command = c.id";

fn json_column<R: Row>(r: &R, column: &str) -> Result<serde_json::Value, StoreError>
where
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    let text: &str = r.try_get(column)?;
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("command {column}: {e}")))
}

fn command_record<R: Row>(r: &R, now: i64) -> Result<CommandRecord, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    let deadline_ms: i64 = r.try_get("deadline_ms")?;
    let expired = deadline_ms <= now;
    let mut counts = CommandCounts {
        pending: u64_at(r, "pending")?,
        delivered: u64_at(r, "delivered")?,
        done: u64_at(r, "done")?,
        failed: u64_at(r, "failed")?,
        ..CommandCounts::default()
    };
    counts.targeted = counts.pending + counts.delivered + counts.done + counts.failed;
    if expired {
        counts.expired = counts.pending + counts.delivered;
    }
    Ok(CommandRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        args: json_column(r, "args")?,
        target: json_column(r, "target")?,
        created_by: r.try_get("created_by")?,
        created_at_ms: r.try_get("created_at")?,
        deadline_ms,
        expired,
        counts,
    })
}

fn pin_record<R: Row>(r: &R) -> Result<Pin, StoreError>
where
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(Pin {
        topic: r.try_get("topic")?,
        repo: r.try_get("repo")?,
        version: u64_at(r, "version")?,
        by: r.try_get("pinned_by")?,
        reason: r.try_get("reason")?,
        at_ms: r.try_get("pinned_at")?,
        held: serde_json::from_str(r.try_get("held")?)
            .map_err(|e| StoreError::Corrupt(format!("pin held list: {e}")))?,
        held_total: u64_at(r, "held_total")?,
    })
}

/// The progressive-rollout steps of a publish and of a promotion, inside their transactions.
impl<B> SqlStore<B>
where
    B: Backend,
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> String: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> &'q [u8]: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> i64: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> bool: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> Option<&'q str>: Encode<'q, B::Db>,
    for<'q> Option<i64>: Encode<'q, B::Db>,
    for<'r> String: Decode<'r, B::Db>,
    for<'r> &'r str: Decode<'r, B::Db>,
    for<'r> &'r [u8]: Decode<'r, B::Db>,
    for<'r> i64: Decode<'r, B::Db>,
    for<'r> bool: Decode<'r, B::Db>,
    for<'a> &'a str: ColumnIndex<<B::Db as Database>::Row>,
    <B::Db as Database>::QueryResult: RowsAffected,
{
    /// What a topic's change being published does to its rollout: returns the change's audience
    /// (as stored), and adds to `jumps` a rollout the change ends.
    #[allow(clippy::too_many_arguments)]
    async fn stage_publish(
        &self,
        tx: &mut Transaction<'static, B::Db>,
        outcome: &SyncOutcome,
        topic: &str,
        (previous_version, previous_seq, previous_commit): (u64, u64, &str),
        version: u64,
        now: i64,
        jumps: &mut Vec<Staging>,
    ) -> Result<Option<String>, StoreError> {
        let active = sqlx::query(&format!(
            "SELECT {STAGING_COLUMNS} FROM stagings WHERE topic = $1 AND state IN ('rolling', 'halted')"
        ))
        .bind(topic)
        .fetch_optional(&mut **tx)
        .await?;
        let active = active.map(|r| staging_record(&r)).transpose()?;
        let start = outcome.rollouts.get(topic);
        match (active, start) {
            (Some(staging), Some(_)) if outcome.rollback.is_none() => {
                // The change joins the rollout where it is: the stages reached get it now.
                let reason = format!(
                    "v{version} superseded v{} at stage {} of {}; the stage starts again",
                    staging.version,
                    staging.stage + 1,
                    staging.policy.stages.len()
                );
                sqlx::query(
                    "UPDATE stagings SET version = $2, state = 'rolling', stage_started_at = $3,
                       updated_at = $3, reason = $4 WHERE topic = $1",
                )
                .bind(topic)
                .bind(to_i64(version))
                .bind(now)
                .bind(reason)
                .execute(&mut **tx)
                .await?;
                Ok(Some(to_json(&Audience { cuts: staging.cuts })?))
            }
            (Some(staging), _) => {
                let (state, reason) = outcome.ends.get(topic).cloned().unwrap_or((
                    StagingState::Superseded,
                    format!("v{version} went to every instance at once"),
                ));
                // An ended rollout keeps its row (the API shows the last one) but not the base
                // files, which only an active one needs: the decider reads every row each second.
                sqlx::query(
                    "UPDATE stagings SET version = $2, state = $3, updated_at = $4, reason = $5,
                       base_files = '[]' WHERE topic = $1",
                )
                .bind(topic)
                .bind(to_i64(version))
                .bind(state.as_str())
                .bind(now)
                .bind(reason)
                .execute(&mut **tx)
                .await?;
                let audience = to_json(&Audience {
                    cuts: staging.cuts.clone(),
                })?;
                jumps.push(staging);
                Ok(Some(audience))
            }
            (None, Some(start)) if previous_version > 0 && !start.cut.everyone() => {
                // The files everyone outside the first stage keeps, read before the change
                // replaces them.
                let rows = sqlx::query(
                    "SELECT path, sha, content FROM topic_files WHERE topic = $1 ORDER BY path",
                )
                .bind(topic)
                .fetch_all(&mut **tx)
                .await?;
                let base_files = snapshot_files(&rows)?;
                let stages = start.policy.stages.len();
                let reason = format!(
                    "stage 1 of {stages} ({}) started",
                    start
                        .policy
                        .stages
                        .first()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
                let cuts = vec![start.cut.clone()];
                sqlx::query(&format!(
                    "INSERT INTO stagings ({STAGING_COLUMNS})
                     VALUES ($1, $2, 'rolling', $3, $4, $5, $6, $7, $8, 0, $9, $10, $10, $10, $11)
                     ON CONFLICT (topic) DO UPDATE SET repo = excluded.repo, state = excluded.state,
                       version = excluded.version, base_version = excluded.base_version,
                       base_seq = excluded.base_seq, base_commit = excluded.base_commit,
                       base_files = excluded.base_files, policy = excluded.policy,
                       stage = excluded.stage, cuts = excluded.cuts, started_at = excluded.started_at,
                       stage_started_at = excluded.stage_started_at,
                       updated_at = excluded.updated_at, reason = excluded.reason"
                ))
                .bind(topic)
                .bind(outcome.repo.as_str())
                .bind(to_i64(version))
                .bind(to_i64(previous_version))
                .bind(to_i64(previous_seq))
                .bind(previous_commit)
                .bind(to_json(&base_files)?)
                .bind(to_json(&start.policy)?)
                .bind(to_json(&cuts)?)
                .bind(now)
                .bind(reason)
                .execute(&mut **tx)
                .await?;
                Ok(Some(to_json(&Audience { cuts })?))
            }
            _ => Ok(None),
        }
    }

    /// Logs, at the next seq, the change from `staging`'s base version to the topic's current
    /// state, for `audience` (everyone when `None`): how instances outside the stages reached
    /// (or newly reached) get the version. Returns its seq.
    async fn log_jump(
        &self,
        tx: &mut Transaction<'static, B::Db>,
        staging: &Staging,
        audience: Option<&Audience>,
        author: &str,
        message: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let head_row = sqlx::query("UPDATE log_head SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await?;
        let seq = u64_at(&head_row, "seq")?;
        let topic = staging.topic.as_str();
        let row = sqlx::query("SELECT repo, version, commit_id FROM topics WHERE name = $1")
            .bind(topic)
            .fetch_one(&mut **tx)
            .await?;
        let repo: String = row.try_get("repo")?;
        let rows = sqlx::query(
            "SELECT path, sha, content FROM topic_files WHERE topic = $1 ORDER BY path",
        )
        .bind(topic)
        .fetch_all(&mut **tx)
        .await?;
        let change = Change {
            seq,
            topic: topic.to_string(),
            version: u64_at(&row, "version")?,
            previous_version: staging.base_version,
            commit: row.try_get("commit_id")?,
            author: author.to_string(),
            message: message.to_string(),
            files: super::jump_files(&staging.base_files, &snapshot_files(&rows)?),
        };
        let files: Vec<HistoryFile> = change.files.iter().map(HistoryFile::of).collect();
        sqlx::query(
            "INSERT INTO events (seq, topic, version, repo, commit_id, author, message, files, created_at, frame, audience, reissue)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, true)",
        )
        .bind(to_i64(seq))
        .bind(topic)
        .bind(to_i64(change.version))
        .bind(repo)
        .bind(change.commit.as_str())
        .bind(author)
        .bind(message)
        .bind(to_json(&files)?)
        .bind(now)
        .bind(to_json(&ServerMessage::Change(change.clone()))?)
        .bind(audience.map(to_json).transpose()?.as_deref())
        .execute(&mut **tx)
        .await?;
        Ok(seq)
    }
}

// The bounds below say "the driver can run these queries and bind and read these Rust types";
// both drivers meet them.
#[async_trait]
impl<B> Store for SqlStore<B>
where
    B: Backend,
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> String: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> &'q [u8]: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> i64: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> bool: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> Option<&'q str>: Encode<'q, B::Db>,
    for<'q> Option<i64>: Encode<'q, B::Db>,
    for<'r> String: Decode<'r, B::Db>,
    for<'r> &'r str: Decode<'r, B::Db>,
    for<'r> &'r [u8]: Decode<'r, B::Db>,
    for<'r> i64: Decode<'r, B::Db>,
    for<'r> bool: Decode<'r, B::Db>,
    for<'a> &'a str: ColumnIndex<<B::Db as Database>::Row>,
    <B::Db as Database>::QueryResult: RowsAffected,
{
    async fn repo_head(&self, repo: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT head FROM repos WHERE name = $1")
            .bind(repo)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("head")).transpose()?)
    }

    async fn repos(&self) -> Result<Vec<RepoRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, head, synced_at FROM repos ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RepoRecord {
                    name: r.try_get("name")?,
                    head: r.try_get("head")?,
                    synced_at_ms: r.try_get("synced_at")?,
                })
            })
            .collect()
    }

    async fn publish(&self, outcome: &SyncOutcome) -> Result<Vec<Change>, StoreError> {
        let append = async {
            let now = now_ms();
            let count = u64::try_from(outcome.topics.len()).unwrap_or(u64::MAX);
            let mut tx = self.pool.begin().await?;
            // Every publisher's first statement writes the log head's row. That takes SQLite's write
            // lock, and on PostgreSQL the row lock: a publisher elsewhere waits here until this
            // transaction ends, so sequence numbers are committed in the order they are handed out (a
            // reader never sees n + 1 without n), and a rollback gives its numbers back. Taking it
            // first, always, also keeps the order in which publishers lock other rows the same, so
            // they cannot deadlock.
            let head_row =
                sqlx::query("UPDATE log_head SET seq = seq + $1 WHERE id = 1 RETURNING seq")
                    .bind(to_i64(count))
                    .fetch_one(&mut *tx)
                    .await?;
            let head = u64_at(&head_row, "seq")?;
            let mut seq = head
                .checked_sub(count)
                .ok_or_else(|| StoreError::Corrupt(format!("log head {head} below {count}")))?;
            // A rollback restores old files; git's head is where the repo's next diff starts.
            if outcome.rollback.is_none() {
                sqlx::query(
                    "INSERT INTO repos (name, head, synced_at) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET head = excluded.head, synced_at = excluded.synced_at",
                )
                .bind(outcome.repo.as_str())
                .bind(outcome.commit.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let rollback = outcome.rollback.as_ref().map(to_json).transpose()?;
            let mut changes = Vec::with_capacity(outcome.topics.len());
            // Rollouts this publish ended: everyone outside their stages moves from the base
            // version to the new one, logged after every topic's change.
            let mut jumps: Vec<Staging> = Vec::new();
            for tc in &outcome.topics {
                // Consistent without a lock of its own: only publishers write topics, and they are
                // serialized by the log head above.
                let previous =
                    sqlx::query("SELECT version, seq, commit_id FROM topics WHERE name = $1")
                        .bind(tc.topic.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                let (previous_version, previous_seq, previous_commit) = match &previous {
                    None => (0, 0, String::new()),
                    Some(row) => (
                        u64_at(row, "version")?,
                        u64_at(row, "seq")?,
                        row.try_get("commit_id")?,
                    ),
                };
                seq += 1;
                let LogEntry {
                    change,
                    frame,
                    files,
                } = log_entry(outcome, tc, seq, previous_version)?;
                let audience = self
                    .stage_publish(
                        &mut tx,
                        outcome,
                        &tc.topic,
                        (previous_version, previous_seq, &previous_commit),
                        change.version,
                        now,
                        &mut jumps,
                    )
                    .await?;
                sqlx::query(
                    "INSERT INTO events (seq, topic, version, repo, commit_id, author, message, files, created_at, frame, rollback, audience)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(to_i64(seq))
                .bind(tc.topic.as_str())
                .bind(to_i64(change.version))
                .bind(outcome.repo.as_str())
                .bind(outcome.commit.as_str())
                .bind(outcome.author.as_str())
                .bind(outcome.message.as_str())
                .bind(files)
                .bind(now)
                .bind(frame)
                .bind(rollback.as_deref())
                .bind(audience.as_deref())
                .execute(&mut *tx)
                .await?;
                if outcome.rollback.is_some() {
                    sqlx::query(
                        "INSERT INTO resyncs (topic, repo, since, due) VALUES ($1, $2, $3, false)
                         ON CONFLICT (topic) DO NOTHING",
                    )
                    .bind(tc.topic.as_str())
                    .bind(outcome.repo.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for file in &tc.files {
                    if let Some(old) = &file.old_path {
                        sqlx::query(DELETE_FILE)
                            .bind(tc.topic.as_str())
                            .bind(old.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                    match (&file.status, &file.content) {
                        (FileStatus::Deleted, _) | (_, None) => {
                            sqlx::query(DELETE_FILE)
                                .bind(tc.topic.as_str())
                                .bind(file.path.as_str())
                                .execute(&mut *tx)
                                .await?;
                        }
                        (_, Some(content)) => {
                            sqlx::query(
                                "INSERT INTO topic_files (topic, path, sha, content) VALUES ($1, $2, $3, $4)
                                 ON CONFLICT (topic, path) DO UPDATE SET sha = excluded.sha, content = excluded.content",
                            )
                            .bind(tc.topic.as_str())
                            .bind(file.path.as_str())
                            .bind(file.sha.as_str())
                            .bind(content.as_slice())
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
                sqlx::query(
                    "INSERT INTO topics (name, repo, version, seq, commit_id, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET repo = excluded.repo, version = excluded.version,
                       seq = excluded.seq, commit_id = excluded.commit_id, updated_at = excluded.updated_at",
                )
                .bind(tc.topic.as_str())
                .bind(outcome.repo.as_str())
                .bind(to_i64(change.version))
                .bind(to_i64(seq))
                .bind(outcome.commit.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                changes.push(change);
            }
            for topic in &outcome.cleared {
                sqlx::query("DELETE FROM rejections WHERE repo = $1 AND topic = $2")
                    .bind(outcome.repo.as_str())
                    .bind(topic.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            for r in &outcome.rejected {
                sqlx::query(
                    "INSERT INTO rejections (repo, topic, base_commit, commit_id, author, path, line, message, at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (repo, topic) DO UPDATE SET commit_id = excluded.commit_id, author = excluded.author,
                       path = excluded.path, line = excluded.line, message = excluded.message, at = excluded.at",
                )
                .bind(r.repo.as_str())
                .bind(r.topic.as_str())
                .bind(r.base_commit.as_str())
                .bind(r.commit.as_str())
                .bind(r.author.as_str())
                .bind(r.path.as_str())
                .bind(r.line.map(i64::from))
                .bind(r.message.as_str())
                .bind(r.at_ms)
                .execute(&mut *tx)
                .await?;
            }
            for topic in &outcome.resynced {
                sqlx::query("DELETE FROM resyncs WHERE topic = $1")
                    .bind(topic.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            for (topic, change) in &outcome.held {
                // A pin removed meanwhile has nothing to add to: the update matches no row.
                let row = sqlx::query("SELECT held FROM pins WHERE topic = $1")
                    .bind(topic.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else { continue };
                let mut held: Vec<HeldChange> = serde_json::from_str(row.try_get("held")?)
                    .map_err(|e| StoreError::Corrupt(format!("pin held list: {e}")))?;
                held.push(change.clone());
                let excess = held.len().saturating_sub(outcome.max_held);
                held.drain(..excess);
                sqlx::query(
                    "UPDATE pins SET held = $2, held_total = held_total + 1 WHERE topic = $1",
                )
                .bind(topic.as_str())
                .bind(to_json(&held)?)
                .execute(&mut *tx)
                .await?;
            }
            let mut head = head;
            for staging in &jumps {
                head = self
                    .log_jump(
                        &mut tx,
                        staging,
                        None,
                        &outcome.author,
                        &outcome.message,
                        now,
                    )
                    .await?;
            }
            if count > 0 {
                self.backend.published(&mut tx, head).await?;
            }
            tx.commit().await?;
            Ok(changes)
        };
        // The backend may know a cause of failure the operator can act on.
        append.await.map_err(|error| self.backend.explain(error))
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, topic, frame, audience FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let audience: Option<&str> = r.try_get("audience")?;
                Ok(LoggedEvent {
                    seq: u64_at(r, "seq")?,
                    topic: r.try_get("topic")?,
                    frame: r.try_get("frame")?,
                    audience: audience.map(audience_of).transpose()?,
                })
            })
            .collect()
    }

    async fn head_seq(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT seq FROM log_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        u64_at(&row, "seq")
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT epoch FROM log_meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("epoch")?)
    }

    async fn rotate_epoch(&self, current: &str) -> Result<String, StoreError> {
        sqlx::query("UPDATE log_meta SET epoch = $1 WHERE id = 1 AND epoch = $2")
            .bind(super::new_epoch_id())
            .bind(current)
            .execute(&self.pool)
            .await?;
        self.epoch().await
    }

    async fn oldest_seq(&self) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query("SELECT seq FROM events ORDER BY seq LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| u64_at(&r, "seq")).transpose()
    }

    async fn log_bounds(&self) -> Result<LogBounds, StoreError> {
        // One statement: one moment of the log in both databases.
        let row = sqlx::query(
            "SELECT m.epoch, h.seq, (SELECT MIN(seq) FROM events) AS oldest
             FROM log_meta m, log_head h WHERE m.id = 1 AND h.id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LogBounds {
            epoch: row.try_get("epoch")?,
            head: u64_at(&row, "seq")?,
            oldest: row
                .try_get::<Option<i64>, _>("oldest")?
                .map(|seq| nonnegative("seq", seq))
                .transpose()?,
        })
    }

    async fn snapshots(
        &self,
        filter: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
    ) -> Result<(u64, Vec<Snapshot>), StoreError> {
        // One read transaction: the log head and the topic states are the same moment.
        let mut tx = match B::SNAPSHOT_BEGIN {
            Some(begin) => self.pool.begin_with(begin).await?,
            None => self.pool.begin().await?,
        };
        let head_row = sqlx::query("SELECT seq FROM log_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let head = u64_at(&head_row, "seq")?;
        let rows = sqlx::query("SELECT name, version, seq, commit_id FROM topics ORDER BY name")
            .fetch_all(&mut *tx)
            .await?;
        let mut topics = Vec::new();
        for row in &rows {
            let name: String = row.try_get("name")?;
            if filter(&name) {
                topics.push(Snapshot {
                    topic: name,
                    version: u64_at(row, "version")?,
                    seq: u64_at(row, "seq")?,
                    commit: row.try_get("commit_id")?,
                    files: Vec::new(),
                });
            }
        }
        let names: Vec<&str> = topics.iter().map(|s| s.topic.as_str()).collect();
        let mut files: BTreeMap<String, Vec<SnapshotFile>> = BTreeMap::new();
        for names in names.chunks(NAMES_PER_QUERY) {
            let sql = format!(
                "SELECT topic, path, sha, content FROM topic_files WHERE topic IN ({})
                 ORDER BY topic, path",
                placeholders(1, names.len())
            );
            let mut query = sqlx::query(&sql);
            for name in names {
                query = query.bind(*name);
            }
            for f in query.fetch_all(&mut *tx).await? {
                let (content, encoding) =
                    crate::protocol::encode_content(f.try_get::<&[u8], _>("content")?);
                files
                    .entry(f.try_get("topic")?)
                    .or_default()
                    .push(SnapshotFile {
                        path: f.try_get("path")?,
                        sha: f.try_get("sha")?,
                        content,
                        encoding,
                    });
            }
        }
        tx.commit().await?;
        for snapshot in &mut topics {
            snapshot.files = files.remove(&snapshot.topic).unwrap_or_default();
        }
        Ok((head, topics))
    }

    async fn topics(&self) -> Result<Vec<TopicSummary>, StoreError> {
        // The current version's event is found by its seq (the primary key); it is gone once
        // retention removed it.
        let rows = sqlx::query(
            "SELECT t.name, t.repo, t.version, t.seq, t.commit_id, t.updated_at, e.author, e.message
             FROM topics t LEFT JOIN events e ON e.seq = t.seq ORDER BY t.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TopicSummary {
                    topic: r.try_get("name")?,
                    repo: r.try_get("repo")?,
                    version: u64_at(r, "version")?,
                    seq: u64_at(r, "seq")?,
                    commit: r.try_get("commit_id")?,
                    updated_at_ms: r.try_get("updated_at")?,
                    author: r.try_get("author")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    async fn topic_history(
        &self,
        topic: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, version, commit_id, author, message, files, created_at, rollback FROM events
             WHERE topic = $1 AND reissue = false ORDER BY seq DESC LIMIT $2",
        )
        .bind(topic)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let files: Vec<HistoryFile> = serde_json::from_str(r.try_get("files")?)
                    .map_err(|e| StoreError::Corrupt(format!("event files: {e}")))?;
                Ok(HistoryEntry {
                    seq: u64_at(r, "seq")?,
                    version: u64_at(r, "version")?,
                    commit: r.try_get("commit_id")?,
                    author: r.try_get("author")?,
                    message: r.try_get("message")?,
                    created_at_ms: r.try_get("created_at")?,
                    files,
                    rollback: r
                        .try_get::<Option<&str>, _>("rollback")?
                        .map(serde_json::from_str)
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(format!("event rollback: {e}")))?,
                })
            })
            .collect()
    }

    async fn write_batch(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<Result<(), AckRejection>>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // The version of each acked topic, read once for the whole batch, before the transaction
        // (as a single ack always did): publishers wait for the writes below, not for this read.
        // A version published meanwhile only makes the check stricter than it needs to be.
        let mut topics: Vec<&str> = writes
            .iter()
            .filter_map(|w| match w {
                InstanceWrite::Ack { topic, .. } => Some(topic.as_str()),
                _ => None,
            })
            .collect();
        topics.sort_unstable();
        topics.dedup();
        let mut current: BTreeMap<String, u64> = BTreeMap::new();
        for names in topics.chunks(NAMES_PER_QUERY) {
            let sql = format!(
                "SELECT name, version FROM topics WHERE name IN ({})",
                placeholders(1, names.len())
            );
            let mut query = sqlx::query(&sql);
            for name in names {
                query = query.bind(*name);
            }
            for row in query.fetch_all(&self.pool).await? {
                current.insert(row.try_get("name")?, u64_at(&row, "version")?);
            }
        }
        // Every statement below writes, the first one included: SQLite takes its write lock there
        // (waiting for it, with the busy timeout), as for a publish.
        let mut tx = self.pool.begin().await?;
        // Every batch writes rows in one order (`write_order`), so batches of two replicas
        // sharing rows on PostgreSQL (an instance moving between them) lock them in the same
        // order and cannot deadlock.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by(|&a, &b| write_order(&writes[a]).cmp(&write_order(&writes[b])));
        let mut answers = vec![Ok(()); writes.len()];
        for i in order {
            match &writes[i] {
                InstanceWrite::Connected {
                    instance,
                    app,
                    labels,
                    connection,
                    node,
                } => {
                    sqlx::query(
                        "INSERT INTO instances (id, app, labels, subscriptions, connected, connection, node, last_seen, connected_at)
                         VALUES ($1, $2, $3, '[]', true, $4, $5, $6, $6)
                         ON CONFLICT (id) DO UPDATE SET app = excluded.app, labels = excluded.labels, connected = true,
                           connection = excluded.connection, node = excluded.node, last_seen = excluded.last_seen,
                           connected_at = excluded.connected_at",
                    )
                    .bind(instance.as_str())
                    .bind(app.as_deref())
                    .bind(to_json(labels)?)
                    .bind(connection.as_str())
                    .bind(node.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                InstanceWrite::Subscriptions { instance, patterns } => {
                    sqlx::query(
                        "UPDATE instances SET subscriptions = $2, last_seen = $3 WHERE id = $1",
                    )
                    .bind(instance.as_str())
                    .bind(to_json(patterns)?)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                InstanceWrite::Disconnected {
                    instance,
                    connection,
                } => {
                    sqlx::query(
                        "UPDATE instances SET connected = false, last_seen = $3 WHERE id = $1 AND connection = $2",
                    )
                    .bind(instance.as_str())
                    .bind(connection.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                InstanceWrite::Ack {
                    instance,
                    topic,
                    version,
                    status,
                    error,
                } => {
                    let Some(&current) = current.get(topic) else {
                        answers[i] = Err(AckRejection::UnknownTopic);
                        continue;
                    };
                    if *version == 0 || *version > current {
                        answers[i] = Err(AckRejection::UnknownVersion { current });
                        continue;
                    }
                    sqlx::query(
                        "INSERT INTO acks (instance, topic, version, status, error, acked_at) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (instance, topic) DO UPDATE SET version = excluded.version, status = excluded.status,
                           error = excluded.error, acked_at = excluded.acked_at
                         WHERE excluded.version >= acks.version",
                    )
                    .bind(instance.as_str())
                    .bind(topic.as_str())
                    .bind(to_i64(*version))
                    .bind(status.as_str())
                    .bind(error.as_deref())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(answers)
    }

    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(instance_record).collect()
    }

    async fn instances_page(
        &self,
        filter: &InstanceFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<InstanceRecord>, u64), StoreError> {
        // Only the filters given become clauses; every value is bound, never spliced.
        let mut clauses: Vec<String> = Vec::new();
        let mut values: Vec<String> = Vec::new();
        if let Some(app) = &filter.app {
            values.push(app.clone());
            clauses.push(format!("app = ${}", values.len()));
        }
        if let Some((key, value)) = &filter.label {
            // Labels are stored as compact JSON: `"key":"value"` appears exactly when the
            // instance has that label (quotes inside keys and values are escaped).
            values.push(like_anywhere(&format!(
                "{}:{}",
                to_json(key.as_str())?,
                to_json(value.as_str())?
            )));
            clauses.push(format!(
                "LOWER(labels) LIKE LOWER(${}) ESCAPE '\\'",
                values.len()
            ));
        }
        if let Some(text) = &filter.text {
            values.push(like_anywhere(text));
            let n = values.len();
            clauses.push(format!(
                "(LOWER(id) LIKE LOWER(${n}) ESCAPE '\\' OR LOWER(COALESCE(app, '')) LIKE LOWER(${n}) ESCAPE '\\')"
            ));
        }
        if let Some(connected) = filter.connected {
            clauses.push(format!("connected = {connected}"));
        }
        let filtered = |extra: Option<String>| {
            let all: Vec<&str> = clauses
                .iter()
                .map(String::as_str)
                .chain(extra.as_deref())
                .collect();
            if all.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", all.join(" AND "))
            }
        };
        let count_sql = format!("SELECT COUNT(*) AS n FROM instances{}", filtered(None));
        let mut count = sqlx::query(&count_sql);
        for v in &values {
            count = count.bind(v.as_str());
        }
        let total = u64_at(&count.fetch_one(&self.pool).await?, "n")?;
        let after_clause = after.map(|_| format!("id > ${}", values.len() + 1));
        let limit_at = values.len() + usize::from(after.is_some()) + 1;
        let page_sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances{} ORDER BY id LIMIT ${limit_at}",
            filtered(after_clause)
        );
        let mut page = sqlx::query(&page_sql);
        for v in &values {
            page = page.bind(v.as_str());
        }
        if let Some(after) = after {
            page = page.bind(after);
        }
        let rows = page.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        let records = rows.iter().map(instance_record).collect::<Result<_, _>>()?;
        Ok((records, total))
    }

    async fn rollout_groups(&self) -> Result<(Vec<SubscriberGroup>, Vec<AckGroup>), StoreError> {
        // One moment for both reads, so an instance is not counted in one and missed in the other.
        let mut tx = match B::SNAPSHOT_BEGIN {
            Some(begin) => self.pool.begin_with(begin).await?,
            None => self.pool.begin().await?,
        };
        let rows = sqlx::query(
            "SELECT subscriptions, connected, COUNT(*) AS n FROM instances
             GROUP BY subscriptions, connected",
        )
        .fetch_all(&mut *tx)
        .await?;
        let subscribers = rows
            .iter()
            .map(|r| {
                Ok(SubscriberGroup {
                    subscriptions: subscriptions(r.try_get("subscriptions")?)?,
                    connected: r.try_get("connected")?,
                    count: u64_at(r, "n")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let rows = sqlx::query(
            "SELECT a.topic, a.version, a.status, i.connected, i.subscriptions, COUNT(*) AS n
             FROM acks a JOIN instances i ON i.id = a.instance
             GROUP BY a.topic, a.version, a.status, i.connected, i.subscriptions",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let acks = rows
            .iter()
            .map(|r| {
                let status: &str = r.try_get("status")?;
                Ok(AckGroup {
                    topic: r.try_get("topic")?,
                    version: u64_at(r, "version")?,
                    status: AckStatus::parse(status)
                        .ok_or_else(|| StoreError::Corrupt(format!("ack status {status}")))?,
                    connected: r.try_get("connected")?,
                    subscriptions: subscriptions(r.try_get("subscriptions")?)?,
                    count: u64_at(r, "n")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((subscribers, acks))
    }

    async fn expire_instances(&self, disconnected_before_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The instances first, and their acks by the ids actually deleted: an instance that
        // reconnects meanwhile waits for (or is not matched by) this delete, so it never keeps
        // a row whose acks were taken away.
        let rows = sqlx::query(
            "DELETE FROM instances WHERE connected = false AND last_seen < $1 RETURNING id",
        )
        .bind(disconnected_before_ms)
        .fetch_all(&mut *tx)
        .await?;
        let ids = rows
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<Vec<_>, _>>()?;
        for ids in ids.chunks(NAMES_PER_QUERY) {
            let sql = format!(
                "DELETE FROM acks WHERE instance IN ({})",
                placeholders(1, ids.len())
            );
            let mut query = sqlx::query(&sql);
            for id in ids {
                query = query.bind(id.as_str());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
    }

    async fn acks(&self) -> Result<Vec<AckRecord>, StoreError> {
        let rows = sqlx::query(ACKS).fetch_all(&self.pool).await?;
        rows.iter().map(ack_record).collect()
    }

    async fn remember_delivery(
        &self,
        repo: &str,
        provider: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO deliveries (repo, provider, id, received_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (repo, provider, id) DO NOTHING",
        )
        .bind(repo)
        .bind(provider)
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows();
        if inserted == 1 {
            // Numbers can skip (rolled-back inserts), so this keeps at most, not exactly, the
            // last DELIVERIES_KEPT ids: the bound is what matters.
            sqlx::query("DELETE FROM deliveries WHERE n <= (SELECT MAX(n) FROM deliveries) - $1")
                .bind(DELIVERIES_KEPT)
                .execute(&self.pool)
                .await?;
        }
        Ok(inserted == 1)
    }

    async fn rejections(&self, repo: &str) -> Result<Vec<Rejection>, StoreError> {
        let rows = sqlx::query(
            "SELECT repo, topic, base_commit, commit_id, author, path, line, message, at FROM rejections
             WHERE repo = $1 ORDER BY topic",
        )
        .bind(repo)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Rejection {
                    repo: r.try_get("repo")?,
                    topic: r.try_get("topic")?,
                    base_commit: r.try_get("base_commit")?,
                    commit: r.try_get("commit_id")?,
                    author: r.try_get("author")?,
                    path: r.try_get("path")?,
                    line: r
                        .try_get::<Option<i64>, _>("line")?
                        .and_then(|l| u32::try_from(l).ok()),
                    message: r.try_get("message")?,
                    at_ms: r.try_get("at")?,
                })
            })
            .collect()
    }

    async fn acks_of(&self, instance: &str) -> Result<Vec<AckRecord>, StoreError> {
        let rows = sqlx::query(ACKS_OF)
            .bind(instance)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(ack_record).collect()
    }

    async fn acks_for(&self, instances: &[String]) -> Result<Vec<AckRecord>, StoreError> {
        let mut acks = Vec::new();
        for ids in instances.chunks(NAMES_PER_QUERY) {
            let sql = format!(
                "SELECT instance, topic, version, status, error, acked_at FROM acks
                 WHERE instance IN ({}) ORDER BY instance, topic",
                placeholders(1, ids.len())
            );
            let mut query = sqlx::query(&sql);
            for id in ids {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                acks.push(ack_record(&row)?);
            }
        }
        Ok(acks)
    }

    async fn topic_change(
        &self,
        topic: &str,
        version: u64,
    ) -> Result<Option<LoggedChange>, StoreError> {
        let row =
            sqlx::query("SELECT frame, created_at FROM events WHERE topic = $1 AND version = $2 AND reissue = false")
                .bind(topic)
                .bind(to_i64(version))
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(LoggedChange {
                change: change_of(r.try_get("frame")?)?,
                created_at_ms: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn file_before(
        &self,
        topic: &str,
        path: &str,
        version: u64,
    ) -> Result<FileBefore, StoreError> {
        // The file lists hold the path as a JSON string (as `path` or `old_path`): a LIKE on it
        // finds the candidates through the topic's events; decoding the frame decides.
        let pattern = like_anywhere(&to_json(path)?);
        let mut below = to_i64(version);
        for _ in 0..FILE_BEFORE_ROUNDS {
            let rows = sqlx::query(
                "SELECT version, frame FROM events
                 WHERE topic = $1 AND version < $2 AND reissue = false AND files LIKE $3 ESCAPE '\\'
                 ORDER BY version DESC LIMIT $4",
            )
            .bind(topic)
            .bind(below)
            .bind(pattern.as_str())
            .bind(FILE_BEFORE_BATCH)
            .fetch_all(&self.pool)
            .await?;
            for r in &rows {
                if let Some(found) = file_in(&change_of(r.try_get("frame")?)?, path)? {
                    return Ok(found);
                }
                below = r.try_get("version")?;
            }
            if i64::try_from(rows.len()).unwrap_or(i64::MAX) < FILE_BEFORE_BATCH {
                // No logged change below touched it: it never existed if the log still holds
                // the topic's first version, otherwise the log no longer says.
                let first = sqlx::query("SELECT MIN(version) AS v FROM events WHERE topic = $1")
                    .bind(topic)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get::<Option<i64>, _>("v")?;
                return Ok(if first == Some(1) {
                    FileBefore::Absent
                } else {
                    FileBefore::Unknown
                });
            }
        }
        Ok(FileBefore::Unknown)
    }

    async fn trim(&self, max_events: u64, max_age_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        if max_events > 0 {
            removed += sqlx::query(
                "DELETE FROM events WHERE seq <= (SELECT seq FROM log_head WHERE id = 1) - $1",
            )
            .bind(to_i64(max_events))
            .execute(&self.pool)
            .await?
            .rows();
        }
        if max_age_ms > 0 {
            removed += sqlx::query("DELETE FROM events WHERE created_at < $1")
                .bind(now_ms() - max_age_ms)
                .execute(&self.pool)
                .await?
                .rows();
        }
        Ok(removed)
    }

    async fn stagings(&self) -> Result<Vec<Staging>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {STAGING_COLUMNS} FROM stagings ORDER BY topic"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(staging_record).collect()
    }

    async fn stage_step(
        &self,
        topic: &str,
        version: u64,
        stage: usize,
        step: &StageStep,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The log head's lock first, as every publisher takes it: a promotion appends to the
        // log, and the same lock order cannot deadlock.
        sqlx::query("UPDATE log_head SET seq = seq WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!(
            "SELECT {STAGING_COLUMNS} FROM stagings WHERE topic = $1 AND version = $2
               AND stage = $3 AND state IN ('rolling', 'halted')"
        ))
        .bind(topic)
        .bind(to_i64(version))
        .bind(to_i64(stage as u64))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let staging = staging_record(&row)?;
        let now = now_ms();
        match step {
            StageStep::Promote { cut, reason } => {
                // The last stage of a policy admits everyone (`staging::Policy`).
                let completes = cut.everyone();
                let mut cuts = staging.cuts.clone();
                cuts.push(cut.clone());
                let state = if completes {
                    StagingState::Completed
                } else {
                    StagingState::Rolling
                };
                sqlx::query(
                    "UPDATE stagings SET stage = stage + 1, cuts = $2, state = $3,
                       stage_started_at = $4, updated_at = $4, reason = $5 WHERE topic = $1",
                )
                .bind(topic)
                .bind(to_json(&cuts)?)
                .bind(state.as_str())
                .bind(now)
                .bind(reason.as_str())
                .execute(&mut *tx)
                .await?;
                let original = sqlx::query(
                    "SELECT author, message FROM events WHERE topic = $1 AND version = $2 AND reissue = false",
                )
                .bind(topic)
                .bind(to_i64(version))
                .fetch_optional(&mut *tx)
                .await?;
                let (author, message) = match &original {
                    Some(r) => (r.try_get("author")?, r.try_get("message")?),
                    // Trimmed by retention: the change still goes out, without its words.
                    None => (String::new(), String::new()),
                };
                let audience = (!completes).then_some(Audience { cuts });
                let head = self
                    .log_jump(&mut tx, &staging, audience.as_ref(), &author, &message, now)
                    .await?;
                if completes {
                    // Ended: the base files are not needed any more (as in `stage_publish`).
                    sqlx::query("UPDATE stagings SET base_files = '[]' WHERE topic = $1")
                        .bind(topic)
                        .execute(&mut *tx)
                        .await?;
                }
                self.backend.published(&mut tx, head).await?;
            }
            StageStep::Halt { reason } => {
                sqlx::query(
                    "UPDATE stagings SET state = 'halted', updated_at = $2, reason = $3 WHERE topic = $1",
                )
                .bind(topic)
                .bind(now)
                .bind(reason.as_str())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn change_at(&self, topic: &str, version: u64) -> Result<Option<Change>, StoreError> {
        let row = sqlx::query(
            "SELECT frame FROM events WHERE topic = $1 AND version = $2 AND reissue = false",
        )
        .bind(topic)
        .bind(to_i64(version))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        match serde_json::from_str(row.try_get("frame")?) {
            Ok(ServerMessage::Change(change)) => Ok(Some(change)),
            Ok(_) => Err(StoreError::Corrupt(format!(
                "event of {topic} v{version} is not a change frame"
            ))),
            Err(e) => Err(StoreError::Corrupt(format!(
                "event of {topic} v{version}: {e}"
            ))),
        }
    }

    async fn pins(&self) -> Result<Vec<Pin>, StoreError> {
        let rows = sqlx::query(
            "SELECT topic, repo, version, pinned_by, reason, pinned_at, held, held_total FROM pins
             ORDER BY topic",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pin_record).collect()
    }

    async fn pin(&self, pin: &Pin) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO pins (topic, repo, version, pinned_by, reason, pinned_at, held, held_total)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (topic) DO NOTHING",
        )
        .bind(pin.topic.as_str())
        .bind(pin.repo.as_str())
        .bind(to_i64(pin.version))
        .bind(pin.by.as_str())
        .bind(pin.reason.as_str())
        .bind(pin.at_ms)
        .bind(to_json(&pin.held)?)
        .bind(to_i64(pin.held_total))
        .execute(&self.pool)
        .await?
        .rows();
        Ok(inserted == 1)
    }

    async fn unpin(&self, topic: &str) -> Result<Option<Pin>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "DELETE FROM pins WHERE topic = $1
             RETURNING topic, repo, version, pinned_by, reason, pinned_at, held, held_total",
        )
        .bind(topic)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let pin = pin_record(&row)?;
        sqlx::query(
            "INSERT INTO resyncs (topic, repo, since, due) VALUES ($1, $2, $3, true)
             ON CONFLICT (topic) DO UPDATE SET due = true",
        )
        .bind(topic)
        .bind(pin.repo.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(pin))
    }

    async fn resyncs(&self, repo: &str) -> Result<Vec<Resync>, StoreError> {
        let rows = sqlx::query(
            "SELECT topic, repo, since, due FROM resyncs WHERE repo = $1 ORDER BY topic",
        )
        .bind(repo)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Resync {
                    topic: r.try_get("topic")?,
                    repo: r.try_get("repo")?,
                    since_ms: r.try_get("since")?,
                    due: r.try_get("due")?,
                })
            })
            .collect()
    }

    async fn record_audit(&self, entry: &AuditEntry, keep: u64) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO audit (at_ms, actor, action, target, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(entry.at_ms)
        .bind(entry.actor.as_str())
        .bind(entry.action.as_str())
        .bind(entry.target.as_str())
        .bind(entry.outcome.as_str())
        .bind(entry.detail.to_string())
        .fetch_one(&self.pool)
        .await?;
        let id = u64_at(&row, "id")?;
        if keep > 0 && id > keep {
            // Ids can skip (rolled-back inserts), so this keeps at most, not exactly, `keep`.
            sqlx::query("DELETE FROM audit WHERE id <= $1")
                .bind(to_i64(id - keep))
                .execute(&self.pool)
                .await?;
        }
        Ok(id)
    }

    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, actor, action, target, outcome, detail FROM audit
             WHERE id < $1 AND ($2 = '' OR action = $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(to_i64(query.before.unwrap_or(u64::MAX)))
        .bind(query.action.as_deref().unwrap_or(""))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let detail: String = row.try_get("detail")?;
                Ok(AuditRecord {
                    id: u64_at(row, "id")?,
                    entry: AuditEntry {
                        at_ms: row.try_get("at_ms")?,
                        actor: row.try_get("actor")?,
                        action: row.try_get("action")?,
                        target: row.try_get("target")?,
                        outcome: row.try_get("outcome")?,
                        detail: serde_json::from_str(&detail)
                            .unwrap_or(serde_json::Value::String(detail)),
                    },
                })
            })
            .collect()
    }

    async fn create_command(
        &self,
        command: &NewCommand,
        targeted: &[String],
        max_active: u64,
        keep: u64,
    ) -> Result<Result<(), CommandRefusal>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Creations queue on this row (SQLite's write lock, PostgreSQL's row lock), so the cap
        // on active commands holds across replicas creating at the same moment.
        sqlx::query("UPDATE log_meta SET epoch = epoch WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM commands WHERE deadline_ms > $1")
            .bind(command.created_at_ms)
            .fetch_one(&mut *tx)
            .await?;
        let active = u64_at(&row, "n")?;
        if active >= max_active {
            return Ok(Err(CommandRefusal::TooManyActive { active }));
        }
        sqlx::query(
            "INSERT INTO commands (id, name, args, target, created_by, created_at, deadline_ms, expired)
             VALUES ($1, $2, $3, $4, $5, $6, $7, false)",
        )
        .bind(command.id.as_str())
        .bind(command.name.as_str())
        .bind(command.args.to_string())
        .bind(command.target.to_string())
        .bind(command.created_by.as_str())
        .bind(command.created_at_ms)
        .bind(command.deadline_ms)
        .execute(&mut *tx)
        .await?;
        // Three values per row: well under both databases' parameter limits.
        for chunk in targeted.chunks(NAMES_PER_QUERY) {
            let rows = (0..chunk.len())
                .map(|i| format!("($1, ${}, 'pending', 0)", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO command_instances (command, instance, status, deliveries) VALUES {rows}
                 ON CONFLICT (command, instance) DO NOTHING"
            );
            let mut query = sqlx::query(&sql).bind(command.id.as_str());
            for instance in chunk {
                query = query.bind(instance.as_str());
            }
            query.execute(&mut *tx).await?;
        }
        if keep > 0 {
            let old = sqlx::query(
                "SELECT id FROM commands WHERE n <= (SELECT MAX(n) FROM commands) - $1",
            )
            .bind(to_i64(keep))
            .fetch_all(&mut *tx)
            .await?;
            for row in old {
                let id: String = row.try_get("id")?;
                sqlx::query("DELETE FROM command_instances WHERE command = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM commands WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let head = sqlx::query("SELECT seq FROM log_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let head = u64_at(&head, "seq")?;
        // Wakes the other replicas' hubs, which look for new commands when woken.
        self.backend.published(&mut tx, head).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn active_command_count(&self, now_ms: i64) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM commands WHERE deadline_ms > $1")
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?;
        u64_at(&row, "n")
    }

    async fn active_commands(&self, now_ms: i64) -> Result<Vec<ActiveCommand>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, args, target, deadline_ms FROM commands WHERE deadline_ms > $1 ORDER BY n",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ActiveCommand {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    args: json_column(r, "args")?,
                    target: json_column(r, "target")?,
                    deadline_ms: r.try_get("deadline_ms")?,
                })
            })
            .collect()
    }

    async fn command_delivered(
        &self,
        command: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "INSERT INTO command_instances (command, instance, status, delivered_at, deliveries)
             VALUES ($1, $2, 'delivered', $3, 1)
             ON CONFLICT (command, instance) DO UPDATE SET status = 'delivered',
               delivered_at = COALESCE(command_instances.delivered_at, excluded.delivered_at),
               deliveries = command_instances.deliveries + 1
             WHERE command_instances.status IN ('pending', 'delivered')",
        )
        .bind(command)
        .bind(instance)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows();
        Ok(changed == 1)
    }

    async fn record_command_ack(
        &self,
        command: &str,
        instance: &str,
        status: CommandStatus,
        message: Option<&str>,
        now_ms: i64,
    ) -> Result<CommandAckOutcome, StoreError> {
        let changed = sqlx::query(
            "UPDATE command_instances SET status = $3, message = $4, finished_at = $5
             WHERE command = $1 AND instance = $2 AND status = 'delivered'",
        )
        .bind(command)
        .bind(instance)
        .bind(status.as_str())
        .bind(message)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows();
        if changed == 1 {
            return Ok(CommandAckOutcome::Recorded);
        }
        let row = sqlx::query(
            "SELECT status FROM command_instances WHERE command = $1 AND instance = $2",
        )
        .bind(command)
        .bind(instance)
        .fetch_optional(&self.pool)
        .await?;
        let stored = row.map(|r| r.try_get::<String, _>("status")).transpose()?;
        Ok(match stored.as_deref().and_then(CommandStatus::parse) {
            Some(first) => CommandAckOutcome::AlreadyFinished(first),
            None => CommandAckOutcome::NotDelivered,
        })
    }

    async fn commands(&self, limit: u32, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        let sql = format!(
            "{COMMANDS} GROUP BY c.n, c.id, c.name, c.args, c.target, c.created_by, c.created_at, c.deadline_ms
             ORDER BY c.n DESC LIMIT $1"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| command_record(r, now_ms)).collect()
    }

    async fn command(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<(CommandRecord, Vec<CommandInstance>)>, StoreError> {
        let sql = format!(
            "{COMMANDS} WHERE c.id = $1
             GROUP BY c.n, c.id, c.name, c.args, c.target, c.created_by, c.created_at, c.deadline_ms"
        );
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let record = command_record(&row, now_ms)?;
        let rows = sqlx::query(
            "SELECT instance, status, message, delivered_at, finished_at, deliveries
             FROM command_instances WHERE command = $1 ORDER BY instance",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let instances = rows
            .iter()
            .map(|r| {
                Ok(CommandInstance {
                    instance: r.try_get("instance")?,
                    status: r.try_get("status")?,
                    message: r.try_get("message")?,
                    delivered_at_ms: r.try_get("delivered_at")?,
                    finished_at_ms: r.try_get("finished_at")?,
                    deliveries: u64_at(r, "deliveries")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((record, instances)))
    }

    async fn expire_commands(&self, now_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "UPDATE commands SET expired = true WHERE expired = false AND deadline_ms <= $1 RETURNING id",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut expired = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let left = sqlx::query(
                "SELECT COUNT(*) AS n FROM command_instances
                 WHERE command = $1 AND status IN ('pending', 'delivered')",
            )
            .bind(id.as_str())
            .fetch_one(&self.pool)
            .await?;
            expired.push((id, u64_at(&left, "n")?));
        }
        Ok(expired)
    }

    async fn lock_repo(&self, repo: &str) -> Result<RepoLock, StoreError> {
        self.backend.lock_repo(&self.pool, repo).await
    }

    async fn reset_node(&self, node: &str) -> Result<(), StoreError> {
        self.backend.reset_node(&self.pool, node).await
    }

    async fn watch(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        self.backend.watch(wake, shutdown).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        // The backend's own checks first: their errors say what to do, where a round trip
        // through a broken setup only fails.
        let probe = async {
            self.backend.check(&self.pool).await?;
            self.head_seq().await.map(drop)
        };
        tokio::time::timeout(CHECK_TIMEOUT, probe)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unhealthy(format!(
                    "the database did not answer within {CHECK_TIMEOUT:?}"
                )))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::{placeholders, MIGRATIONS};
    use crate::store::{postgres::PgBackend, sql::Backend, sqlite::SqliteBackend};

    #[test]
    fn placeholders_number_from_the_first() {
        assert_eq!(placeholders(1, 3), "$1, $2, $3");
        assert_eq!(placeholders(4, 1), "$4");
        assert_eq!(placeholders(1, 0), "");
    }

    #[test]
    fn every_type_token_is_replaced_for_both_databases() {
        for sql in MIGRATIONS {
            for types in [SqliteBackend::TYPES, PgBackend::TYPES] {
                let ddl = types.ddl(sql);
                assert!(!ddl.contains('{') && !ddl.contains('}'), "{ddl}");
            }
        }
        // SQLite's `INTEGER PRIMARY KEY` is the rowid: the log's seq must stay that fast path.
        assert!(SqliteBackend::TYPES
            .ddl(MIGRATIONS[0])
            .contains("seq INTEGER PRIMARY KEY"));
    }
}
