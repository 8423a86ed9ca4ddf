//! The embedded SQLite store: one file under `data_dir`, WAL mode, zero set-up.
//!
//! Only what SQLite does its own way is here: the connection settings, `PRAGMA user_version` as
//! the migration counter, in-process repo locks (one process owns the file), and the health of
//! the file itself. The queries are in [`super::sql`].
//!
//! Open connections keep working on a database file that was deleted or replaced under them,
//! so nothing fails by itself: every write would go to a file no one will see again. The file's
//! identity (device and inode) is therefore remembered at open, and [`Store::check`] and every
//! publish compare it with what the path names now.
//!
//! [`Store::check`]: super::Store::check

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
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
pub struct SqliteBackend {
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The database file as opened; `None` for an in-memory database.
    file: Option<DatabaseFile>,
}

/// Which file the pool's connections have open: its path and its identity then.
#[derive(Debug, Clone)]
struct DatabaseFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

/// Bytes the write probe writes next to the database: one page of WAL growth is the least a
/// publish needs; a few pages show there is some room, not that a large change fits.
const PROBE_BYTES: usize = 64 * 1024;

impl DatabaseFile {
    fn identify(path: &Path) -> Result<DatabaseFile, StoreError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            StoreError::Unhealthy(format!(
                "cannot read the database file {}: {e}",
                path.display()
            ))
        })?;
        Ok(DatabaseFile {
            path: path.to_path_buf(),
            device: meta.dev(),
            inode: meta.ino(),
        })
    }

    /// Whether the path still names the file the connections have open.
    fn still_there(&self) -> Result<(), StoreError> {
        let path = self.path.display();
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == (self.device, self.inode) => Ok(()),
            Ok(_) => Err(StoreError::Unhealthy(format!(
                "database file {path} was replaced by another file while confcast had it open: \
                 writes would go to the old one; restart confcast to use the new one"
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::Unhealthy(format!(
                    "database file {path} was deleted or moved away while confcast had it open: \
                 writes would be lost at the next restart; put it back or restart confcast"
                )))
            }
            Err(e) => Err(StoreError::Unhealthy(format!(
                "cannot check the database file {path}: {e}"
            ))),
        }
    }

    /// Writes (and removes) a small file next to the database. A write into the database
    /// itself would prove little: WAL frames reuse space already allocated, so a full disk shows
    /// only when the WAL or the file must grow, mid-publish. A new file needs new blocks, so this
    /// fails on a full disk, a read-only filesystem or a directory we may no longer write.
    fn probe_write(&self) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let failed = |e: std::io::Error| {
            StoreError::Unhealthy(format!(
                "cannot write {PROBE_BYTES} bytes in {}, the database's directory \
                 (disk full or read-only?): {e}",
                dir.display()
            ))
        };
        let mut probe = tempfile::Builder::new()
            .prefix(".confcast-write-probe")
            .tempfile_in(dir)
            .map_err(failed)?;
        probe.write_all(&[0u8; PROBE_BYTES]).map_err(failed)?;
        probe.flush().map_err(failed)?;
        probe.close().map_err(failed)
    }
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
    let in_memory = path.is_empty() || path.starts_with(":memory:") || url.contains("mode=memory");
    let options = SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL in WAL mode survives a process crash; only an OS crash can lose the last commits.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    // Only the first connection may create the file. The pool opens more later (on demand, or
    // while a dropped one is still being rolled back); if the file has gone from its path by
    // then, such a connection must fail, not make an empty database there that every later
    // query would silently read ("no such table") and a restore would be renamed over.
    let options = if in_memory {
        options.create_if_missing(true)
    } else {
        let first = options.clone().create_if_missing(true);
        sqlx::Connection::close(
            <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&first).await?,
        )
        .await?;
        options.create_if_missing(false)
    };
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        // A ping before each use guards against a dropped network connection, which an
        // in-process database does not have; here it doubled the round trips to the connection's
        // worker thread, the largest cost of a reconnect storm.
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    let file = if in_memory {
        None
    } else {
        Some(DatabaseFile::identify(Path::new(path))?)
    };
    let backend = SqliteBackend {
        repo_locks: Mutex::default(),
        file,
    };
    SqlStore::new(pool, backend).await
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
        random_id: "lower(hex(randomblob(16)))",
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
        // One process writes the file and its hub reads the log itself: nobody to wake. But a
        // publish into a file that is no longer at its path would hand out sequence numbers
        // that vanish at the next restart: refuse it, and the sync retries. (One stat; the
        // write probe is left to `check`.)
        match &self.file {
            Some(file) => file.still_there(),
            None => Ok(()),
        }
    }

    async fn lock_repo(&self, _pool: &Pool<Sqlite>, repo: &str) -> Result<RepoLock, StoreError> {
        let lock = match self.repo_locks.lock() {
            Ok(mut map) => map.entry(repo.to_string()).or_default().clone(),
            Err(_) => return Err(StoreError::Corrupt("repo lock table poisoned".into())),
        };
        Ok(RepoLock::new(lock.lock_owned().await))
    }

    async fn reset_node(&self, pool: &Pool<Sqlite>, _node: &str) -> Result<(), StoreError> {
        // One process owns a SQLite file: every connection it recorded belonged to it. They
        // ended with that process, about now: expiry counts from here, not from their connect.
        sqlx::query("UPDATE instances SET connected = false, last_seen = $1 WHERE connected")
            .bind(super::now_ms())
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn watch(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // A single writer: the hub already reads everything this process appends.
        let _ = (wake, shutdown);
    }

    /// The file is still the one opened, and its directory takes a write. Not covered: the
    /// file made read-only while open (the open connections keep writing; the error comes when
    /// the pool opens a new one), and bad sectors in pages the round trip does not read.
    async fn check(&self, _pool: &Pool<Sqlite>) -> Result<(), StoreError> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        // Filesystem calls can block (a hung network mount): not on the runtime's threads.
        tokio::task::spawn_blocking(move || {
            file.still_there()?;
            file.probe_write()
        })
        .await
        .map_err(|e| StoreError::Unhealthy(format!("the file check did not finish: {e}")))?
    }

    /// A publish that failed because the file left its path (a new connection cannot open it)
    /// says so, rather than "unable to open database file".
    fn explain(&self, error: StoreError) -> StoreError {
        match self.file.as_ref().map(DatabaseFile::still_there) {
            Some(Err(gone)) => gone,
            _ => error,
        }
    }
}
