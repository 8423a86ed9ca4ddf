//! The PostgreSQL store: one database shared by several confcast replicas.
//!
//! It keeps the same tables and answers as the SQLite store; what it adds is what several writers
//! need. Publishers serialize on the `log_head` row, so sequence numbers are handed out and
//! committed in order with no gap even across replicas. Each publish notifies `confcast_log` on
//! commit, which wakes the other replicas' hubs. A repo is synced by one replica at a time under a
//! session advisory lock held on a connection of its own, so the lock dies with its holder.
//!
//! It must never hand out a sequence number outside the transaction that writes the event, and
//! never trust a notification's payload: the log is the only source of what changed.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    log_entry, now_ms, AckRecord, AckRejection, ChangedFile, HistoryEntry, HistoryFile,
    InstanceRecord, LogEntry, LoggedEvent, Rejection, RepoLock, RepoRecord, Store, StoreError,
    SyncOutcome, TopicSummary,
};
use crate::protocol::{AckStatus, Change, FileStatus, Snapshot, SnapshotFile};

/// Schema migrations, applied in order; `confcast_schema.applied` records how many ran. They
/// follow the SQLite ones step for step so a later change lands in both with the same number.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE log_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL);
INSERT INTO log_head (id, seq) VALUES (1, 0);
CREATE TABLE repos (name TEXT PRIMARY KEY, head TEXT NOT NULL, synced_at BIGINT NOT NULL);
CREATE TABLE topics (
    name TEXT PRIMARY KEY, repo TEXT NOT NULL, version BIGINT NOT NULL, seq BIGINT NOT NULL,
    commit_id TEXT NOT NULL, updated_at BIGINT NOT NULL);
CREATE TABLE topic_files (
    topic TEXT NOT NULL, path TEXT NOT NULL, sha TEXT NOT NULL, content BYTEA NOT NULL,
    PRIMARY KEY (topic, path));
CREATE TABLE events (
    seq BIGINT PRIMARY KEY, topic TEXT NOT NULL, version BIGINT NOT NULL, repo TEXT NOT NULL,
    commit_id TEXT NOT NULL, author TEXT NOT NULL, message TEXT NOT NULL, files TEXT NOT NULL,
    created_at BIGINT NOT NULL, frame TEXT NOT NULL);
CREATE INDEX events_by_topic ON events (topic, seq);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, app TEXT, labels TEXT NOT NULL, subscriptions TEXT NOT NULL,
    connected BOOLEAN NOT NULL, connection TEXT, node TEXT, last_seen BIGINT NOT NULL);
CREATE TABLE acks (
    instance TEXT NOT NULL, topic TEXT NOT NULL, version BIGINT NOT NULL, status TEXT NOT NULL,
    error TEXT, acked_at BIGINT NOT NULL, PRIMARY KEY (instance, topic));
"#,
    r#"
CREATE TABLE deliveries (
    n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, repo TEXT NOT NULL, provider TEXT NOT NULL,
    id TEXT NOT NULL, received_at BIGINT NOT NULL, UNIQUE (repo, provider, id));
"#,
    r#"
CREATE TABLE rejections (
    repo TEXT NOT NULL, topic TEXT NOT NULL, base_commit TEXT NOT NULL, commit_id TEXT NOT NULL,
    author TEXT NOT NULL, path TEXT NOT NULL, line BIGINT, message TEXT NOT NULL, at BIGINT NOT NULL,
    PRIMARY KEY (repo, topic));
"#,
];

/// How many webhook delivery ids are remembered for redelivery detection.
const DELIVERIES_KEPT: i64 = 10_000;

/// The channel a publish notifies on commit; its payload (the new log head) is only a hint.
const CHANNEL: &str = "confcast_log";

/// Names the listener's session in `pg_stat_activity`, so an operator (or a test) can find it.
pub const LISTENER_APPLICATION_NAME: &str = "confcast-listen";

const LISTEN_RETRY_MIN: Duration = Duration::from_millis(100);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

pub struct PgStore {
    pool: PgPool,
    /// Kept to open the listener's connection outside the pool: it is held for good and must not
    /// take one of the pool's connections away from queries.
    options: PgConnectOptions,
}

/// A stable advisory lock key for `name`. Advisory keys are one shared space per database, so
/// every key confcast takes is a hash of a prefixed name, away from other applications' small
/// integer keys.
fn advisory_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads a non-negative BIGINT column: a negative seq or version means the table was written by
/// something other than confcast.
fn get_u64(row: &PgRow, column: &str) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(column)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {column}: {v}")))
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The connection that holds a repo's advisory lock; the lock lives as long as the session.
struct HeldRepo(Option<PgConnection>);

impl Drop for HeldRepo {
    fn drop(&mut self) {
        let Some(conn) = self.0.take() else { return };
        // A clean close ends the session at once, and with it the lock, without the server
        // logging an unexpected EOF. Outside a runtime (process exit) the socket just drops,
        // which the server also takes as the end of the session.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = conn.close().await {
                    tracing::debug!(error = %e, "closing a repo lock connection");
                }
            });
        }
    }
}

impl PgStore {
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("confcast");
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(options.clone())
            .await?;
        let store = PgStore { pool, options };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the missing migrations in one transaction under a transaction-level advisory lock:
    /// replicas starting together queue here, and the first one migrates for all.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(advisory_key("confcast-schema"))
            .execute(&mut *tx)
            .await?;
        // Checked rather than CREATE ... IF NOT EXISTS, whose notice sqlx would log at info on
        // every start.
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('confcast_schema') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            sqlx::Executor::execute(
                &mut *tx,
                "CREATE TABLE confcast_schema (id INTEGER PRIMARY KEY CHECK (id = 1), applied BIGINT NOT NULL);
                 INSERT INTO confcast_schema (id, applied) VALUES (1, 0);",
            )
            .await?;
        }
        let applied: i64 = sqlx::query_scalar("SELECT applied FROM confcast_schema WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let applied = usize::try_from(applied)
            .map_err(|_| StoreError::Corrupt(format!("confcast_schema.applied = {applied}")))?;
        if applied > MIGRATIONS.len() {
            tracing::warn!(
                applied,
                known = MIGRATIONS.len(),
                "postgres schema is newer than this confcast"
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            sqlx::Executor::execute(&mut *tx, *sql).await?;
            sqlx::query("UPDATE confcast_schema SET applied = $1 WHERE id = 1")
                .bind(i64::try_from(i + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            tracing::info!(migration = i + 1, "postgres schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn apply_files(
        tx: &mut Transaction<'_, Postgres>,
        topic: &str,
        files: &[ChangedFile],
    ) -> Result<(), StoreError> {
        for file in files {
            if let Some(old) = &file.old_path {
                sqlx::query("DELETE FROM topic_files WHERE topic = $1 AND path = $2")
                    .bind(topic)
                    .bind(old)
                    .execute(&mut **tx)
                    .await?;
            }
            match (&file.status, &file.content) {
                (FileStatus::Deleted, _) | (_, None) => {
                    sqlx::query("DELETE FROM topic_files WHERE topic = $1 AND path = $2")
                        .bind(topic)
                        .bind(&file.path)
                        .execute(&mut **tx)
                        .await?;
                }
                (_, Some(content)) => {
                    sqlx::query(
                        "INSERT INTO topic_files (topic, path, sha, content) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (topic, path) DO UPDATE SET sha = excluded.sha, content = excluded.content",
                    )
                    .bind(topic)
                    .bind(&file.path)
                    .bind(&file.sha)
                    .bind(content.as_slice())
                    .execute(&mut **tx)
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn ack_rows(&self, instance: Option<&str>) -> Result<Vec<AckRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance, topic, version, status, error, acked_at FROM acks
             WHERE $1::TEXT IS NULL OR instance = $1 ORDER BY instance, topic",
        )
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status")?;
                Ok(AckRecord {
                    instance: r.try_get("instance")?,
                    topic: r.try_get("topic")?,
                    version: get_u64(r, "version")?,
                    status: AckStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("ack status {status}")))?,
                    error: r.try_get("error")?,
                    acked_at_ms: r.try_get("acked_at")?,
                })
            })
            .collect()
    }

    /// Listens on [`CHANNEL`] until the listener fails, waking `wake` on every notification and
    /// after every (re)connect: notifications sent while nobody listened are lost, so a fresh
    /// listener makes the hub read the log once. Returns only the error that ended it.
    async fn listen(&self, wake: &Notify, retry: &mut Duration) -> sqlx::Error {
        let run = async {
            // A pool of one, as PgListener::connect builds, but from our options (TLS, password,
            // application name) rather than a URL. sqlx keeps retrying a refused connection until
            // the acquire timeout: a short one hands an outage back to our backoff and warning.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(LISTEN_RETRY_MAX)
                .connect_with(
                    self.options
                        .clone()
                        .application_name(LISTENER_APPLICATION_NAME),
                )
                .await?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            *retry = LISTEN_RETRY_MIN;
            tracing::debug!(channel = CHANNEL, "listening for other replicas' changes");
            wake.notify_one();
            loop {
                // `None`: the connection was lost and PgListener has already reconnected and
                // listens again; what was published in between is only in the log.
                if listener.try_recv().await?.is_none() {
                    tracing::info!(channel = CHANNEL, "postgres listener reconnected");
                }
                wake.notify_one();
            }
        };
        let result: Result<std::convert::Infallible, sqlx::Error> = run.await;
        match result {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn repo_head(&self, repo: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT head FROM repos WHERE name = $1")
            .bind(repo)
            .fetch_optional(&self.pool)
            .await?)
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
        let now = now_ms();
        let count = u64::try_from(outcome.topics.len()).unwrap_or(u64::MAX);
        let mut tx = self.pool.begin().await?;
        // Every publisher's first statement takes the log head's row lock. A publisher on another
        // replica waits here until this transaction ends, so sequence numbers are committed in
        // the order they are handed out (a reader never sees n + 1 without n), and a rollback
        // gives its numbers back. Taking it first, always, also keeps the order in which
        // publishers lock the other rows the same, so they cannot deadlock.
        let head: i64 =
            sqlx::query_scalar("UPDATE log_head SET seq = seq + $1 WHERE id = 1 RETURNING seq")
                .bind(to_i64(count))
                .fetch_one(&mut *tx)
                .await?;
        let head = u64::try_from(head)
            .map_err(|_| StoreError::Corrupt(format!("negative log head {head}")))?;
        let mut seq = head
            .checked_sub(count)
            .ok_or_else(|| StoreError::Corrupt(format!("log head {head} below {count}")))?;
        sqlx::query(
            "INSERT INTO repos (name, head, synced_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET head = excluded.head, synced_at = excluded.synced_at",
        )
        .bind(&outcome.repo)
        .bind(&outcome.commit)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut changes = Vec::with_capacity(outcome.topics.len());
        for tc in &outcome.topics {
            // Consistent without a lock of its own: only publishers write topics, and they are
            // serialized by the log head above.
            let previous: Option<i64> =
                sqlx::query_scalar("SELECT version FROM topics WHERE name = $1")
                    .bind(&tc.topic)
                    .fetch_optional(&mut *tx)
                    .await?;
            let previous_version = match previous {
                None => 0,
                Some(v) => u64::try_from(v).map_err(|_| {
                    StoreError::Corrupt(format!("topic {} has version {v}", tc.topic))
                })?,
            };
            seq += 1;
            let LogEntry {
                change,
                frame,
                files,
            } = log_entry(outcome, tc, seq, previous_version)?;
            sqlx::query(
                "INSERT INTO events (seq, topic, version, repo, commit_id, author, message, files, created_at, frame)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(to_i64(seq))
            .bind(&tc.topic)
            .bind(to_i64(change.version))
            .bind(&outcome.repo)
            .bind(&outcome.commit)
            .bind(&outcome.author)
            .bind(&outcome.message)
            .bind(files)
            .bind(now)
            .bind(frame)
            .execute(&mut *tx)
            .await?;
            Self::apply_files(&mut tx, &tc.topic, &tc.files).await?;
            sqlx::query(
                "INSERT INTO topics (name, repo, version, seq, commit_id, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET repo = excluded.repo, version = excluded.version,
                   seq = excluded.seq, commit_id = excluded.commit_id, updated_at = excluded.updated_at",
            )
            .bind(&tc.topic)
            .bind(&outcome.repo)
            .bind(to_i64(change.version))
            .bind(to_i64(seq))
            .bind(&outcome.commit)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            changes.push(change);
        }
        for topic in &outcome.cleared {
            sqlx::query("DELETE FROM rejections WHERE repo = $1 AND topic = $2")
                .bind(&outcome.repo)
                .bind(topic)
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
            .bind(&r.repo)
            .bind(&r.topic)
            .bind(&r.base_commit)
            .bind(&r.commit)
            .bind(&r.author)
            .bind(&r.path)
            .bind(r.line.map(i64::from))
            .bind(&r.message)
            .bind(r.at_ms)
            .execute(&mut *tx)
            .await?;
        }
        if count > 0 {
            // Postgres delivers a notification only when its transaction commits, so no replica
            // is woken for a change it cannot read yet.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(head.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(changes)
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, topic, frame FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LoggedEvent {
                    seq: get_u64(r, "seq")?,
                    topic: r.try_get("topic")?,
                    frame: r.try_get("frame")?,
                })
            })
            .collect()
    }

    async fn head_seq(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT seq FROM log_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        get_u64(&row, "seq")
    }

    async fn oldest_seq(&self) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM events")
            .fetch_one(&self.pool)
            .await?;
        v.map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative seq {v}"))))
            .transpose()
    }

    async fn snapshots(
        &self,
        filter: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
    ) -> Result<(u64, Vec<Snapshot>), StoreError> {
        // One snapshot of the database: without REPEATABLE READ each statement would see the
        // commits made since the previous one, and the head would not match the topic states.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let head_row = sqlx::query("SELECT seq FROM log_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let head = get_u64(&head_row, "seq")?;
        let rows = sqlx::query("SELECT name, version, seq, commit_id FROM topics ORDER BY name")
            .fetch_all(&mut *tx)
            .await?;
        let mut topics = Vec::new();
        for row in &rows {
            let name: String = row.try_get("name")?;
            if filter(&name) {
                topics.push(Snapshot {
                    topic: name,
                    version: get_u64(row, "version")?,
                    seq: get_u64(row, "seq")?,
                    commit: row.try_get("commit_id")?,
                    files: Vec::new(),
                });
            }
        }
        // One round trip for the files of every accepted topic, not one per topic.
        let names: Vec<&str> = topics.iter().map(|s| s.topic.as_str()).collect();
        let file_rows = sqlx::query(
            "SELECT topic, path, sha, content FROM topic_files WHERE topic = ANY($1)
             ORDER BY topic, path",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut files: BTreeMap<String, Vec<SnapshotFile>> = BTreeMap::new();
        for f in &file_rows {
            let content: &[u8] = f.try_get("content")?;
            let (content, encoding) = crate::protocol::encode_content(content);
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
        for snapshot in &mut topics {
            snapshot.files = files.remove(&snapshot.topic).unwrap_or_default();
        }
        Ok((head, topics))
    }

    async fn topics(&self) -> Result<Vec<TopicSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, repo, version, seq, commit_id, updated_at FROM topics ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TopicSummary {
                    topic: r.try_get("name")?,
                    repo: r.try_get("repo")?,
                    version: get_u64(r, "version")?,
                    seq: get_u64(r, "seq")?,
                    commit: r.try_get("commit_id")?,
                    updated_at_ms: r.try_get("updated_at")?,
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
            "SELECT seq, version, commit_id, author, message, files, created_at FROM events
             WHERE topic = $1 ORDER BY seq DESC LIMIT $2",
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
                    seq: get_u64(r, "seq")?,
                    version: get_u64(r, "version")?,
                    commit: r.try_get("commit_id")?,
                    author: r.try_get("author")?,
                    message: r.try_get("message")?,
                    created_at_ms: r.try_get("created_at")?,
                    files,
                })
            })
            .collect()
    }

    async fn instance_connected(
        &self,
        instance: &str,
        app: Option<&str>,
        labels: &BTreeMap<String, String>,
        connection: &str,
        node: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO instances (id, app, labels, subscriptions, connected, connection, node, last_seen)
             VALUES ($1, $2, $3, '[]', true, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET app = excluded.app, labels = excluded.labels, connected = true,
               connection = excluded.connection, node = excluded.node, last_seen = excluded.last_seen",
        )
        .bind(instance)
        .bind(app)
        .bind(to_json(labels)?)
        .bind(connection)
        .bind(node)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn instance_subscriptions(
        &self,
        instance: &str,
        patterns: &[String],
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE instances SET subscriptions = $2, last_seen = $3 WHERE id = $1")
            .bind(instance)
            .bind(to_json(patterns)?)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn instance_disconnected(
        &self,
        instance: &str,
        connection: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE instances SET connected = false, last_seen = $3 WHERE id = $1 AND connection = $2",
        )
        .bind(instance)
        .bind(connection)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, app, labels, subscriptions, connected, node, last_seen FROM instances ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceRecord {
                    id: r.try_get("id")?,
                    app: r.try_get("app")?,
                    labels: serde_json::from_str(r.try_get("labels")?)
                        .map_err(|e| StoreError::Corrupt(format!("instance labels: {e}")))?,
                    subscriptions: serde_json::from_str(r.try_get("subscriptions")?)
                        .map_err(|e| StoreError::Corrupt(format!("instance subscriptions: {e}")))?,
                    connected: r.try_get("connected")?,
                    node: r.try_get("node")?,
                    last_seen_ms: r.try_get("last_seen")?,
                })
            })
            .collect()
    }

    async fn record_ack(
        &self,
        instance: &str,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<&str>,
    ) -> Result<Result<(), AckRejection>, StoreError> {
        let current: Option<i64> = sqlx::query_scalar("SELECT version FROM topics WHERE name = $1")
            .bind(topic)
            .fetch_optional(&self.pool)
            .await?;
        let Some(current) = current else {
            return Ok(Err(AckRejection::UnknownTopic));
        };
        let current = u64::try_from(current)
            .map_err(|_| StoreError::Corrupt(format!("topic {topic} has version {current}")))?;
        if version == 0 || version > current {
            return Ok(Err(AckRejection::UnknownVersion { current }));
        }
        sqlx::query(
            "INSERT INTO acks (instance, topic, version, status, error, acked_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (instance, topic) DO UPDATE SET version = excluded.version, status = excluded.status,
               error = excluded.error, acked_at = excluded.acked_at
             WHERE excluded.version >= acks.version",
        )
        .bind(instance)
        .bind(topic)
        .bind(to_i64(version))
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(Ok(()))
    }

    async fn acks(&self) -> Result<Vec<AckRecord>, StoreError> {
        self.ack_rows(None).await
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
        .rows_affected();
        if inserted == 1 {
            // Identity values can skip (rolled-back inserts), so this keeps at most, not exactly,
            // the last DELIVERIES_KEPT ids: the bound is what matters.
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
        self.ack_rows(Some(instance)).await
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
            .rows_affected();
        }
        if max_age_ms > 0 {
            removed += sqlx::query("DELETE FROM events WHERE created_at < $1")
                .bind(now_ms() - max_age_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(removed)
    }

    async fn lock_repo(&self, repo: &str) -> Result<RepoLock, StoreError> {
        // A session lock on a connection taken out of the pool: the lock lives exactly as long
        // as that session, so dropping the guard, cancelling this wait, or the replica dying all
        // release the repo, and the pool never gets back a connection still holding a lock.
        let mut conn = self.pool.acquire().await?.detach();
        // If the replica's host vanishes without closing the socket, the server notices within
        // about a minute instead of the OS default of hours, and the repo is free again.
        sqlx::Executor::execute(
            &mut conn,
            "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3;",
        )
        .await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(advisory_key(&format!("confcast-repo:{repo}")))
            .execute(&mut conn)
            .await?;
        Ok(RepoLock::new(HeldRepo(Some(conn))))
    }

    async fn reset_node(&self, node: &str) -> Result<(), StoreError> {
        // Other replicas share the table: only the connections this replica recorded died with
        // its previous run.
        sqlx::query("UPDATE instances SET connected = false WHERE node = $1 AND connected")
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn watch(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut retry = LISTEN_RETRY_MIN;
        loop {
            let error = tokio::select! {
                _ = shutdown.cancelled() => return,
                error = self.listen(&wake, &mut retry) => error,
            };
            tracing::warn!(
                error = %error,
                retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                "postgres listener failed; the hub polls the log until it is back"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(LISTEN_RETRY_MAX);
        }
    }
}
