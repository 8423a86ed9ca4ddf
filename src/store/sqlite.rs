//! The embedded SQLite store: one file under `data_dir`, WAL mode, zero set-up.
//!
//! Only what SQLite does its own way is here: the connection settings, `PRAGMA user_version` as
//! the migration counter, and in-process repo locks (one process owns the file). The queries are
//! in [`super::sql`].

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Pool, Sqlite, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::sql::{Backend, ColumnTypes, RowsAffected, SqlStore, MIGRATIONS};
use super::{RepoLock, StoreError};

pub type SqliteStore = SqlStore<SqliteBackend>;

/// One process writes a SQLite file: per-repo locks are in-process mutexes.
#[derive(Default)]
pub struct SqliteBackend {
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl RowsAffected for SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

/// Opens (creating when missing) the SQLite database named by a `sqlite:` url.
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
    SqlStore::new(pool, SqliteBackend::default()).await
}

#[async_trait]
impl Backend for SqliteBackend {
    type Db = Sqlite;

    // In WAL mode a read transaction sees one snapshot from its first read on.
    const SNAPSHOT_BEGIN: Option<&'static str> = None;

    const TYPES: ColumnTypes = ColumnTypes {
        int: "INTEGER",
        bool: "INTEGER",
        bytes: "BLOB",
        serial: "INTEGER PRIMARY KEY AUTOINCREMENT",
    };

    async fn migrate(&self, pool: &Pool<Sqlite>) -> Result<(), StoreError> {
        let done: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(pool)
            .await?;
        let done = usize::try_from(done)
            .map_err(|_| StoreError::Corrupt(format!("PRAGMA user_version = {done}")))?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
            let mut tx = pool.begin().await?;
            sqlx::Executor::execute(&mut *tx, Self::TYPES.ddl(migration).as_str()).await?;
            let bump = format!("PRAGMA user_version = {}", i + 1);
            sqlx::Executor::execute(&mut *tx, bump.as_str()).await?;
            tx.commit().await?;
            tracing::info!(migration = i + 1, "sqlite schema migrated");
        }
        Ok(())
    }

    async fn published(
        &self,
        _tx: &mut Transaction<'static, Sqlite>,
        _head: u64,
    ) -> Result<(), StoreError> {
        // One process writes the file and its hub reads the log itself: nobody to wake.
        Ok(())
    }

    async fn lock_repo(&self, _pool: &Pool<Sqlite>, repo: &str) -> Result<RepoLock, StoreError> {
        let lock = match self.repo_locks.lock() {
            Ok(mut map) => map.entry(repo.to_string()).or_default().clone(),
            Err(_) => return Err(StoreError::Corrupt("repo lock table poisoned".into())),
        };
        Ok(RepoLock::new(lock.lock_owned().await))
    }

    async fn reset_node(&self, pool: &Pool<Sqlite>, _node: &str) -> Result<(), StoreError> {
        // One process owns a SQLite file: every connection it recorded belonged to it.
        sqlx::query("UPDATE instances SET connected = false WHERE connected")
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn watch(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // A single writer: the hub already reads everything this process appends.
        let _ = (wake, shutdown);
    }
}
