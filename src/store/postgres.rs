//! The PostgreSQL store: one database shared by several confcast replicas.
//!
//! The queries are in [`super::sql`]; what is here is what several writers need. Each publish
//! notifies `confcast_log` on commit, which wakes the other replicas' hubs. A repo is synced by one
//! replica at a time under a session advisory lock held on a connection of its own, so the lock
//! dies with its holder. Migrations run under a transaction-level advisory lock, once for all
//! replicas starting together.
//!
//! It must never trust a notification's payload: the log is the only source of what changed.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgQueryResult};
use sqlx::{Connection, PgConnection, Pool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::sql::{Backend, ColumnTypes, RowsAffected, SqlStore, MIGRATIONS};
use super::{RepoLock, StoreError};

/// The channel a publish notifies on commit; its payload (the new log head) is only a hint.
const CHANNEL: &str = "confcast_log";

/// Names the listener's session in `pg_stat_activity`, so an operator (or a test) can find it.
pub const LISTENER_APPLICATION_NAME: &str = "confcast-listen";

const LISTEN_RETRY_MIN: Duration = Duration::from_millis(100);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

pub type PgStore = SqlStore<PgBackend>;

pub struct PgBackend {
    /// Kept to open the listener's connection outside the pool: it is held for good and must not
    /// take one of the pool's connections away from queries.
    options: PgConnectOptions,
}

impl RowsAffected for PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
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

/// Opens the PostgreSQL database named by a `postgres://` url and brings its schema up to date.
pub async fn open(url: &str) -> Result<PgStore, StoreError> {
    let options = PgConnectOptions::from_str(url)?.application_name("confcast");
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect_with(options.clone())
        .await?;
    SqlStore::new(pool, PgBackend { options }).await
}

impl PgBackend {
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
impl Backend for PgBackend {
    type Db = Postgres;

    // Without REPEATABLE READ each statement would see the commits made since the previous one,
    // and the head would not match the topic states.
    const SNAPSHOT_BEGIN: Option<&'static str> =
        Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");

    const TYPES: ColumnTypes = ColumnTypes {
        int: "BIGINT",
        bool: "BOOLEAN",
        bytes: "BYTEA",
        serial: "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        // md5 of random material: 32 hex digits with no extension needed.
        random_id: "md5(random()::text || clock_timestamp()::text)",
    };

    /// Applies the missing migrations in one transaction under a transaction-level advisory lock:
    /// replicas starting together queue here, and the first one migrates for all.
    async fn migrate(&self, pool: &Pool<Postgres>) -> Result<(), StoreError> {
        let mut tx = pool.begin().await?;
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
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            sqlx::Executor::execute(&mut *tx, Self::TYPES.ddl(migration).as_str()).await?;
            sqlx::query("UPDATE confcast_schema SET applied = $1 WHERE id = 1")
                .bind(i64::try_from(i + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            tracing::info!(migration = i + 1, "postgres schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn published(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        head: u64,
    ) -> Result<(), StoreError> {
        // Postgres delivers a notification only when its transaction commits, so no replica is
        // woken for a change it cannot read yet.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(head.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn lock_repo(&self, pool: &Pool<Postgres>, repo: &str) -> Result<RepoLock, StoreError> {
        // A session lock on a connection taken out of the pool: the lock lives exactly as long
        // as that session, so dropping the guard, cancelling this wait, or the replica dying all
        // release the repo, and the pool never gets back a connection still holding a lock.
        let mut conn = pool.acquire().await?.detach();
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

    async fn reset_node(&self, pool: &Pool<Postgres>, node: &str) -> Result<(), StoreError> {
        // Other replicas share the table: only the connections this replica recorded died with
        // its previous run, about now (expiry counts from here).
        sqlx::query(
            "UPDATE instances SET connected = false, last_seen = $2 WHERE node = $1 AND connected",
        )
        .bind(node)
        .bind(super::now_ms())
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The round trip (done by the caller) shows the server is reachable. What a replica can
    /// also see cheaply is whether its sessions may write: after a failover to a standby, or
    /// with `default_transaction_read_only`, every publish would fail. A full disk on the
    /// server is not visible from here; it fails the publish, which the sync reports.
    async fn check(&self, pool: &Pool<Postgres>) -> Result<(), StoreError> {
        let read_only: String =
            sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
                .fetch_one(pool)
                .await?;
        if read_only == "on" {
            return Err(StoreError::Unhealthy(
                "PostgreSQL sessions are read-only (connected to a standby, or \
                 default_transaction_read_only is on): publishes would fail"
                    .into(),
            ));
        }
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
