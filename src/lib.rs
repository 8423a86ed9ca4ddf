//! confcast turns a git repository into a live configuration channel.
//!
//! The data path, one module per stage:
//! - [`webhook`]: verify a forge's signed push, then wake the repo's syncer (never waits for git).
//! - [`sync`]: one worker per repo fetches with git2, diffs the last published commit against the
//!   new head and maps changed files to topics ([`sync::rules`]).
//! - [`store`]: the event log with a gap-free sequence, topic state, instances and acks, written
//!   once in [`store::sql`] (SQLite embedded, PostgreSQL for several replicas: LISTEN/NOTIFY wakes
//!   the others, an advisory lock keeps one syncer per repo).
//! - [`hub`]: reads the log in order and fans each change out as one shared frame; runs each
//!   instance's WebSocket ([`hub::connection`]).
//! - [`app`]: the shared state and the one error type, below every handler.
//! - [`telemetry`]: every Prometheus metric, one registry per served `App` (`GET /metrics`).
//! - [`api`]: on top: the router (webhooks, `/ws`, the JSON query API, health probes).
//!
//! Layers point one way, each using only those below it:
//! 1. `api::router`, which mounts the handlers;
//! 2. the handlers: `api`'s query handlers, `webhook::handle`, `hub::connection` (the `/ws` handler);
//! 3. [`app`]: `App` and `AppError`;
//! 4. `sync` → `hub` (the fan-out core: `Hub`, `Frame`) → `telemetry` → `store` → `protocol`,
//!    `config`.
//! - [`protocol`]: the wire messages shared with [`client`], the embeddable client.
//! - [`agent`]: `confcast agent`, files on disk plus a reload command, built on the client.
//!
//! [`serve`] is what the binary, the demo and the tests all call.
#![forbid(unsafe_code)]

pub mod protocol;
#[cfg(feature = "server")]
pub mod staging;

#[cfg(feature = "client")]
pub mod agent;
#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod demo;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod sync;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod webhook;

#[cfg(feature = "server")]
pub use listener::listen;
#[cfg(feature = "server")]
pub use server::{serve, ServeError};

#[cfg(feature = "server")]
mod listener;

#[cfg(feature = "server")]
mod server {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use crate::api::router;
    use crate::app::App;
    use crate::auth::Authenticator;
    use crate::config::{Config, ConfigError};
    use crate::hub::writes::Writes;
    use crate::hub::Hub;
    use crate::store::{self, StoreError};
    use crate::sync::Syncers;
    use crate::telemetry::Metrics;

    #[derive(Debug, thiserror::Error)]
    pub enum ServeError {
        #[error("store: {0}")]
        Store(#[from] StoreError),
        #[error("cannot create data_dir {path}: {source}")]
        DataDir {
            path: String,
            source: std::io::Error,
        },
        #[error("http server: {0}")]
        Http(#[from] std::io::Error),
        #[error("{0}")]
        Config(#[from] ConfigError),
        /// A non-loopback listener without credentials (see `Config::exposure_problem`).
        #[error("{0}")]
        Exposed(String),
        #[error("server.tls: {0}")]
        Tls(String),
    }

    /// How long `serve` waits for the first sync of every repo before it answers anyone.
    const FIRST_SYNC_WAIT: Duration = Duration::from_secs(30);

    /// Runs confcast on an already bound `listener` until `shutdown` completes, then closes every
    /// WebSocket with "going away", flushes acks the instances already sent, and returns.
    pub async fn serve(
        listener: TcpListener,
        config: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = listener.local_addr()?;
        if let Some(problem) = config.exposure_problem(addr) {
            return Err(ServeError::Exposed(problem));
        }
        if config.auth.allow_anonymous && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "auth.allow_anonymous is set: whatever has no credential configured is open to anyone who reaches this port");
        }
        let auth = Authenticator::new(&config.auth, config.server.client_token.as_ref())?;
        // Every instance holds a socket: take all the open files the system allows, and say so
        // when that is fewer than the connections configured, instead of failing accept later.
        let files = crate::listener::raise_open_file_limit();
        if (files as usize) < config.limits.max_connections.saturating_add(1024) {
            tracing::warn!(
                open_files = files,
                max_connections = config.limits.max_connections,
                "the open-file limit holds fewer connections than limits.max_connections: raise it (ulimit -n, LimitNOFILE=) or lower limits.max_connections"
            );
        }
        let tls = config
            .server
            .tls
            .as_ref()
            .map(crate::listener::tls_acceptor)
            .transpose()
            .map_err(ServeError::Tls)?;
        let data_dir = config.server.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let store = store::open(&config.store_url()).await?;
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: closing sockets and flushing acks");
            stop.cancel();
        });
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        let hub = Hub::new(config.server.connection_queue);
        tracker.spawn(
            hub.clone()
                .feed(store.clone(), metrics.clone(), token.clone()),
        );
        tracker.spawn(metrics.clone().watch_rollouts(store.clone(), token.clone()));
        tracker.spawn(hub.rollouts.clone().run(store.clone(), token.clone()));
        tracker.spawn(crate::hub::stages::decide(
            store.clone(),
            hub.clone(),
            metrics.clone(),
            token.clone(),
        ));
        tracker.spawn(
            hub.clone()
                .dispatch_commands(store.clone(), metrics.clone(), token.clone()),
        );
        {
            let (store, wake, token) = (store.clone(), hub.waker(), token.clone());
            tracker.spawn(async move { store.watch(wake, token).await });
        }
        let expiry = Duration::from_secs(config.limits.instance_expiry_secs);
        store::upkeep::start(&tracker, &store, expiry, &token);
        store::witness::check_at_start(store.as_ref(), &data_dir).await?;
        tracker.spawn(store::witness::keep(
            store.clone(),
            data_dir.clone(),
            token.clone(),
        ));
        let syncers = Syncers::start(
            &config,
            store.clone(),
            hub.clone(),
            metrics.clone(),
            &tracker,
            token.clone(),
        );
        // Git is the truth: bring the store up to the branches before the first instance is
        // answered, so none is shown what the store held before (a restored backup, a long stop).
        let synced = tokio::select! {
            synced = syncers.first_round(FIRST_SYNC_WAIT) => synced,
            // A shutdown while waiting: the accept loop below then returns at once.
            _ = token.cancelled() => true,
        };
        if !synced {
            tracing::warn!(
                waited_secs = FIRST_SYNC_WAIT.as_secs(),
                "first sync of every repo not done in time; serving what the store has"
            );
        }
        let port = addr.port();
        // The replica's name: the host's (the environment may not say: systemd sets no HOSTNAME).
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "confcast".into());
        let node = format!("{host}:{port}");
        // Connections recorded by a previous run of this replica died with it.
        store.reset_node(&node).await?;
        tracing::info!(%addr, %node, tls = tls.is_some(), repos = config.repos.len(), "confcast serving");
        let limits = config.limits.clone();
        // Not tracked: it must outlive the connections, which are (see below).
        let (writes, writer) = Writes::start(store.clone(), metrics.clone());
        let app = Arc::new(App {
            webhook_bytes: Arc::new(Semaphore::new(
                limits.webhook_bytes_in_flight.min(Semaphore::MAX_PERMITS),
            )),
            config,
            store,
            writes,
            hub,
            syncers,
            node,
            shutdown: token.clone(),
            tracker: tracker.clone(),
            auth,
            refusals: Default::default(),
            metrics,
        });
        crate::listener::accept(listener, router(app), tls, &limits, &tracker, token.clone()).await;
        token.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 10 s");
        }
        // The connections have ended (or were given up on): make every write they queued.
        writer.close().await;
        Ok(())
    }
}
