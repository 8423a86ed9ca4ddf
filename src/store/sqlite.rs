//! The embedded SQLite store: one file under `data_dir`, WAL mode, zero set-up.
//!
//! Writes that hand out sequence numbers start with a write statement, so SQLite takes its write lock
//! first and two writers never interleave between reading the log head and advancing it.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::RepoLock;
use super::{
    now_ms, AckRecord, AckRejection, HistoryEntry, HistoryFile, InstanceRecord, LoggedEvent,
    Rejection, RepoRecord, Store, StoreError, SyncOutcome, TopicSummary,
};
use crate::protocol::{AckStatus, Change, FileStatus, Snapshot, SnapshotFile};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE log_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
INSERT INTO log_head (id, seq) VALUES (1, 0);
CREATE TABLE repos (name TEXT PRIMARY KEY, head TEXT NOT NULL, synced_at INTEGER NOT NULL);
CREATE TABLE topics (
    name TEXT PRIMARY KEY, repo TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    commit_id TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE topic_files (
    topic TEXT NOT NULL, path TEXT NOT NULL, sha TEXT NOT NULL, content BLOB NOT NULL,
    PRIMARY KEY (topic, path));
CREATE TABLE events (
    seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, version INTEGER NOT NULL, repo TEXT NOT NULL,
    commit_id TEXT NOT NULL, author TEXT NOT NULL, message TEXT NOT NULL, files TEXT NOT NULL,
    created_at INTEGER NOT NULL, frame TEXT NOT NULL);
CREATE INDEX events_by_topic ON events (topic, seq);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, app TEXT, labels TEXT NOT NULL, subscriptions TEXT NOT NULL,
    connected INTEGER NOT NULL, connection TEXT, node TEXT, last_seen INTEGER NOT NULL);
CREATE TABLE acks (
    instance TEXT NOT NULL, topic TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    error TEXT, acked_at INTEGER NOT NULL, PRIMARY KEY (instance, topic));
"#,
    r#"
CREATE TABLE deliveries (
    n INTEGER PRIMARY KEY AUTOINCREMENT, repo TEXT NOT NULL, provider TEXT NOT NULL, id TEXT NOT NULL,
    received_at INTEGER NOT NULL, UNIQUE (repo, provider, id));
"#,
    r#"
CREATE TABLE rejections (
    repo TEXT NOT NULL, topic TEXT NOT NULL, base_commit TEXT NOT NULL, commit_id TEXT NOT NULL,
    author TEXT NOT NULL, path TEXT NOT NULL, line INTEGER, message TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (repo, topic));
"#,
];

/// How many webhook delivery ids are remembered for redelivery detection.
const DELIVERIES_KEPT: i64 = 10_000;

pub struct SqliteStore {
    pool: SqlitePool,
    /// One process writes a SQLite file: per-repo locks are in-process mutexes.
    repo_locks:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteStore {
    async fn ack_rows(&self, instance: Option<&str>) -> Result<Vec<AckRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance, topic, version, status, error, acked_at FROM acks
             WHERE ?1 IS NULL OR instance = ?1 ORDER BY instance, topic",
        )
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.get("status");
                Ok(AckRecord {
                    instance: r.get("instance"),
                    topic: r.get("topic"),
                    version: to_u64(r.get("version")),
                    status: AckStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("ack status {status}")))?,
                    error: r.get("error"),
                    acked_at_ms: r.get("acked_at"),
                })
            })
            .collect()
    }

    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let path = url
            .trim_start_matches("sqlite:")
            .trim_start_matches("//")
            .split('?')
            .next()
            .unwrap_or_default();
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a process crash; only an OS crash can lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let store = SqliteStore {
            pool,
            repo_locks: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    // Boxed so the future is proven Send here, where the sqlx executor lifetimes are concrete.
    fn migrate(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
    {
        Box::pin(async move {
            let done: i64 = sqlx::query_scalar("PRAGMA user_version")
                .fetch_one(&self.pool)
                .await?;
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(to_u64(done) as usize) {
                let mut tx = self.pool.begin().await?;
                sqlx::Executor::execute(&mut *tx, *sql).await?;
                let bump = format!("PRAGMA user_version = {}", i + 1);
                sqlx::Executor::execute(&mut *tx, bump.as_str()).await?;
                tx.commit().await?;
                tracing::info!(migration = i + 1, "sqlite schema migrated");
            }
            Ok(())
        })
    }

    async fn apply_files(
        tx: &mut Transaction<'_, Sqlite>,
        topic: &str,
        files: &[super::ChangedFile],
    ) -> Result<(), StoreError> {
        for file in files {
            if let Some(old) = &file.old_path {
                sqlx::query("DELETE FROM topic_files WHERE topic = ?1 AND path = ?2")
                    .bind(topic)
                    .bind(old)
                    .execute(&mut **tx)
                    .await?;
            }
            match (&file.status, &file.content) {
                (FileStatus::Deleted, _) | (_, None) => {
                    sqlx::query("DELETE FROM topic_files WHERE topic = ?1 AND path = ?2")
                        .bind(topic)
                        .bind(&file.path)
                        .execute(&mut **tx)
                        .await?;
                }
                (_, Some(content)) => {
                    sqlx::query(
                        "INSERT INTO topic_files (topic, path, sha, content) VALUES (?1, ?2, ?3, ?4)
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
}

#[async_trait]
impl Store for SqliteStore {
    async fn repo_head(&self, repo: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT head FROM repos WHERE name = ?1")
            .bind(repo)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn repos(&self) -> Result<Vec<RepoRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, head, synced_at FROM repos ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| RepoRecord {
                name: r.get("name"),
                head: r.get("head"),
                synced_at_ms: r.get("synced_at"),
            })
            .collect())
    }

    async fn publish(&self, outcome: &SyncOutcome) -> Result<Vec<Change>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // First statement writes: takes SQLite's write lock before the log head is read.
        sqlx::query(
            "INSERT INTO repos (name, head, synced_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET head = excluded.head, synced_at = excluded.synced_at",
        )
        .bind(&outcome.repo)
        .bind(&outcome.commit)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut seq = to_u64(
            sqlx::query_scalar("SELECT seq FROM log_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?,
        );
        let mut changes = Vec::with_capacity(outcome.topics.len());
        for tc in &outcome.topics {
            let previous: Option<i64> =
                sqlx::query_scalar("SELECT version FROM topics WHERE name = ?1")
                    .bind(&tc.topic)
                    .fetch_optional(&mut *tx)
                    .await?;
            let previous_version = previous.map_or(0, to_u64);
            seq += 1;
            let super::LogEntry {
                change,
                frame,
                files,
            } = super::log_entry(outcome, tc, seq, previous_version)?;
            sqlx::query(
                "INSERT INTO events (seq, topic, version, repo, commit_id, author, message, files, created_at, frame)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                "INSERT INTO topics (name, repo, version, seq, commit_id, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
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
            sqlx::query("DELETE FROM rejections WHERE repo = ?1 AND topic = ?2")
                .bind(&outcome.repo)
                .bind(topic)
                .execute(&mut *tx)
                .await?;
        }
        for r in &outcome.rejected {
            sqlx::query(
                "INSERT INTO rejections (repo, topic, base_commit, commit_id, author, path, line, message, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
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
        sqlx::query("UPDATE log_head SET seq = ?1 WHERE id = 1")
            .bind(to_i64(seq))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(changes)
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, topic, frame FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| LoggedEvent {
                seq: to_u64(r.get("seq")),
                topic: r.get("topic"),
                frame: r.get("frame"),
            })
            .collect())
    }

    async fn head_seq(&self) -> Result<u64, StoreError> {
        Ok(to_u64(
            sqlx::query_scalar("SELECT seq FROM log_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        ))
    }

    async fn oldest_seq(&self) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.map(to_u64))
    }

    async fn snapshots(
        &self,
        filter: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
    ) -> Result<(u64, Vec<Snapshot>), StoreError> {
        // One read transaction: the log head and the topic states are the same moment.
        let mut tx = self.pool.begin().await?;
        let head = to_u64(
            sqlx::query_scalar("SELECT seq FROM log_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?,
        );
        let topics = sqlx::query("SELECT name, version, seq, commit_id FROM topics ORDER BY name")
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::new();
        for row in topics {
            let name: String = row.get("name");
            if !filter(&name) {
                continue;
            }
            let files = sqlx::query(
                "SELECT path, sha, content FROM topic_files WHERE topic = ?1 ORDER BY path",
            )
            .bind(&name)
            .fetch_all(&mut *tx)
            .await?;
            let files = files
                .iter()
                .map(|f| {
                    let (content, encoding) =
                        crate::protocol::encode_content(f.get::<&[u8], _>("content"));
                    SnapshotFile {
                        path: f.get("path"),
                        sha: f.get("sha"),
                        content,
                        encoding,
                    }
                })
                .collect();
            out.push(Snapshot {
                topic: name,
                version: to_u64(row.get("version")),
                seq: to_u64(row.get("seq")),
                commit: row.get("commit_id"),
                files,
            });
        }
        tx.commit().await?;
        Ok((head, out))
    }

    async fn topics(&self) -> Result<Vec<TopicSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, repo, version, seq, commit_id, updated_at FROM topics ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| TopicSummary {
                topic: r.get("name"),
                repo: r.get("repo"),
                version: to_u64(r.get("version")),
                seq: to_u64(r.get("seq")),
                commit: r.get("commit_id"),
                updated_at_ms: r.get("updated_at"),
            })
            .collect())
    }

    async fn topic_history(
        &self,
        topic: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, version, commit_id, author, message, files, created_at FROM events
             WHERE topic = ?1 ORDER BY seq DESC LIMIT ?2",
        )
        .bind(topic)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let files: Vec<HistoryFile> = serde_json::from_str(r.get::<&str, _>("files"))
                    .map_err(|e| StoreError::Corrupt(format!("event files: {e}")))?;
                Ok(HistoryEntry {
                    seq: to_u64(r.get("seq")),
                    version: to_u64(r.get("version")),
                    commit: r.get("commit_id"),
                    author: r.get("author"),
                    message: r.get("message"),
                    created_at_ms: r.get("created_at"),
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
        let labels =
            serde_json::to_string(labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO instances (id, app, labels, subscriptions, connected, connection, node, last_seen)
             VALUES (?1, ?2, ?3, '[]', 1, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET app = excluded.app, labels = excluded.labels, connected = 1,
               connection = excluded.connection, node = excluded.node, last_seen = excluded.last_seen",
        )
        .bind(instance)
        .bind(app)
        .bind(labels)
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
        let patterns =
            serde_json::to_string(patterns).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("UPDATE instances SET subscriptions = ?2, last_seen = ?3 WHERE id = ?1")
            .bind(instance)
            .bind(patterns)
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
            "UPDATE instances SET connected = 0, last_seen = ?3 WHERE id = ?1 AND connection = ?2",
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
                    id: r.get("id"),
                    app: r.get("app"),
                    labels: serde_json::from_str(r.get::<&str, _>("labels"))
                        .map_err(|e| StoreError::Corrupt(format!("instance labels: {e}")))?,
                    subscriptions: serde_json::from_str(r.get::<&str, _>("subscriptions"))
                        .map_err(|e| StoreError::Corrupt(format!("instance subscriptions: {e}")))?,
                    connected: r.get::<i64, _>("connected") != 0,
                    node: r.get("node"),
                    last_seen_ms: r.get("last_seen"),
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
        let current: Option<i64> = sqlx::query_scalar("SELECT version FROM topics WHERE name = ?1")
            .bind(topic)
            .fetch_optional(&self.pool)
            .await?;
        let Some(current) = current.map(to_u64) else {
            return Ok(Err(AckRejection::UnknownTopic));
        };
        if version == 0 || version > current {
            return Ok(Err(AckRejection::UnknownVersion { current }));
        }
        sqlx::query(
            "INSERT INTO acks (instance, topic, version, status, error, acked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
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

    async fn remember_delivery(
        &self,
        repo: &str,
        provider: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO deliveries (repo, provider, id, received_at) VALUES (?1, ?2, ?3, ?4)
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
            sqlx::query("DELETE FROM deliveries WHERE n <= (SELECT MAX(n) FROM deliveries) - ?1")
                .bind(DELIVERIES_KEPT)
                .execute(&self.pool)
                .await?;
        }
        Ok(inserted == 1)
    }

    async fn lock_repo(&self, repo: &str) -> Result<RepoLock, StoreError> {
        let lock = match self.repo_locks.lock() {
            Ok(mut map) => map.entry(repo.to_string()).or_default().clone(),
            Err(_) => return Err(StoreError::Corrupt("repo lock table poisoned".into())),
        };
        Ok(RepoLock::new(lock.lock_owned().await))
    }

    async fn reset_node(&self, _node: &str) -> Result<(), StoreError> {
        // One process owns a SQLite file: every connection it recorded belonged to it.
        sqlx::query("UPDATE instances SET connected = 0 WHERE connected = 1")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn rejections(&self, repo: &str) -> Result<Vec<Rejection>, StoreError> {
        let rows = sqlx::query(
            "SELECT repo, topic, base_commit, commit_id, author, path, line, message, at FROM rejections
             WHERE repo = ?1 ORDER BY topic",
        )
        .bind(repo)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Rejection {
                repo: r.get("repo"),
                topic: r.get("topic"),
                base_commit: r.get("base_commit"),
                commit: r.get("commit_id"),
                author: r.get("author"),
                path: r.get("path"),
                line: r
                    .get::<Option<i64>, _>("line")
                    .and_then(|l| u32::try_from(l).ok()),
                message: r.get("message"),
                at_ms: r.get("at"),
            })
            .collect())
    }

    async fn acks(&self) -> Result<Vec<AckRecord>, StoreError> {
        self.ack_rows(None).await
    }

    async fn acks_of(&self, instance: &str) -> Result<Vec<AckRecord>, StoreError> {
        self.ack_rows(Some(instance)).await
    }

    async fn trim(&self, max_events: u64, max_age_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        if max_events > 0 {
            removed += sqlx::query(
                "DELETE FROM events WHERE seq <= (SELECT seq FROM log_head WHERE id = 1) - ?1",
            )
            .bind(to_i64(max_events))
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        if max_age_ms > 0 {
            removed += sqlx::query("DELETE FROM events WHERE created_at < ?1")
                .bind(now_ms() - max_age_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(removed)
    }
}
