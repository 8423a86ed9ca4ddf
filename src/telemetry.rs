//! Telemetry: every Prometheus metric confcast exports, defined here and nowhere else, with small
//! typed methods the rest of the code calls (`app.metrics.ack(status, topic)`), and the rollout
//! convergence watcher that feeds one histogram.
//!
//! Each served `App` owns its own [`Metrics`] (its own registry): no global recorder, so several
//! servers in one process (the tests) never see each other's counts. Every metric counts what
//! *this replica* did; with several replicas, sum over them in PostgreSQL setups.
//!
//! Must never: put an instance id, a topic or anything else a client chooses into a label (label
//! values come from fixed lists, or from the configured repo names), or cost a lock or a map lookup
//! per frame sent on the fan-out path (deliveries are one atomic add on a counter held here).
//!
//! The names, their labels and what exactly each counts are listed in docs/OPERATIONS.md
//! ("Monitoring"); keep that list and `deploy/grafana/confcast.json` in step with this file (a test
//! checks the dashboard against a live `/metrics`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::protocol::{close, AckStatus};
use crate::store::{in_rollout, AckRecord, InstanceRecord, Standing, Store, TopicSummary};

/// `Content-Type` of the Prometheus text format (0.0.4), served unless OpenMetrics is asked for.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of the OpenMetrics text format, served when the `Accept` header asks for it.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long the convergence watcher gathers acks before it looks at the rollouts they touched:
/// one read of instances and acks per batch, however many acks arrived.
const CONVERGENCE_BATCH: Duration = Duration::from_secs(1);

type Static1 = [(&'static str, &'static str); 1];
type Static2 = [(&'static str, &'static str); 2];
type RepoLabel = [(&'static str, String); 1];
type RolloutLabel = [(&'static str, String); 1];
type RolloutCountLabel = [(&'static str, String); 2];

/// An active rollout's place for [`Metrics::rollout_stages`].
pub struct StageFigures<'a> {
    pub topic: &'a str,
    /// 1-based.
    pub stage: usize,
    pub members: u64,
    pub applied: u64,
    pub failed: u64,
}
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Which kind of frame carried a change to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// From the live ring, as it was published.
    Live,
    /// From the log, answering a `subscribe` with `since`.
    Replay,
    /// A topic's full state (`snapshot` frame).
    Snapshot,
}

/// How a `subscribe` was answered (`subscribed.mode`, with the fallback told apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeMode {
    /// No `since`: snapshots.
    Snapshot,
    /// `since` honoured: the missed changes from the log.
    Replay,
    /// `since` given but not usable (another epoch, older than the log kept, ahead of the head):
    /// snapshots instead.
    Resync,
}

impl SubscribeMode {
    const ALL: [SubscribeMode; 3] = [Self::Snapshot, Self::Replay, Self::Resync];

    fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Replay => "replay",
            Self::Resync => "resync",
        }
    }
}

/// What became of one `POST /webhooks/{repo}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// A push to the synced branch (or one that does not say which): sync queued (202).
    Queued,
    /// A delivery id seen before (200).
    Duplicate,
    /// The forge's test event (200).
    Ping,
    /// Verified but not acted on: another branch, a tag, a deleted branch, another event (202).
    Ignored,
    /// Signature missing, wrong or stale, or no secret configured (401).
    RefusedSignature,
    /// Signature valid but the payload or its delivery id is unusable (400).
    Malformed,
    /// Body over `server.max_body_bytes` (413).
    TooLarge,
    /// `limits.webhook_bytes_in_flight` in use (503 with `Retry-After`).
    Busy,
    /// The body did not arrive within `limits.body_read_timeout_secs` (408).
    Timeout,
    /// No repo of that name is configured (404).
    UnknownRepo,
    /// The store failed while remembering the delivery (503).
    Unavailable,
}

impl WebhookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Duplicate => "duplicate",
            Self::Ping => "ping",
            Self::Ignored => "ignored",
            Self::RefusedSignature => "refused_signature",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::UnknownRepo => "unknown_repo",
            Self::Unavailable => "unavailable",
        }
    }
}

/// What became of a command for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The `command` frame was written to the instance's connection.
    Delivered,
    /// The instance acked it `done`.
    Done,
    /// The instance acked it `failed`.
    Failed,
    /// Its deadline passed before the instance acked it.
    Expired,
}

impl CommandOutcome {
    const ALL: [CommandOutcome; 4] = [Self::Delivered, Self::Done, Self::Failed, Self::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }
}

/// A timed store call (label `op` of `confcast_store_call_duration_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCall {
    Publish,
    /// One ack, from the connection's point of view: queued, written with its batch, answered.
    RecordAck,
    EventsAfter,
    Snapshots,
    /// One transaction of the connections' batched writes (`hub::writes`).
    WriteBatch,
}

impl StoreCall {
    const ALL: [StoreCall; 5] = [
        Self::Publish,
        Self::RecordAck,
        Self::EventsAfter,
        Self::Snapshots,
        Self::WriteBatch,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::RecordAck => "record_ack",
            Self::EventsAfter => "events_after",
            Self::Snapshots => "snapshots",
            Self::WriteBatch => "write_batch",
        }
    }
}

/// Why a WebSocket connection ended (label `reason` of `confcast_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The server closed it with this code (`protocol::close`).
    Code(u16),
    /// The client closed it or the socket failed.
    ClientGone,
    /// The peer stopped reading: a write waited past the keepalive timeout and the connection was
    /// dropped without a close frame.
    Stalled,
}

impl Closed {
    const REASONS: [&'static str; 11] = [
        "going_away",
        "message_too_big",
        "slow_consumer",
        "keepalive_timeout",
        "replaced",
        "hello_timeout",
        "epoch_changed",
        "credential_expired",
        "client_gone",
        "write_stalled",
        "other",
    ];

    fn reason(self) -> &'static str {
        match self {
            Closed::Code(close::GOING_AWAY) => "going_away",
            Closed::Code(close::MESSAGE_TOO_BIG) => "message_too_big",
            Closed::Code(close::SLOW_CONSUMER) => "slow_consumer",
            Closed::Code(close::KEEPALIVE_TIMEOUT) => "keepalive_timeout",
            Closed::Code(close::REPLACED) => "replaced",
            Closed::Code(close::HELLO_TIMEOUT) => "hello_timeout",
            Closed::Code(close::EPOCH_CHANGED) => "epoch_changed",
            Closed::Code(close::CREDENTIAL_EXPIRED) => "credential_expired",
            Closed::Code(_) => "other",
            Closed::ClientGone => "client_gone",
            Closed::Stalled => "write_stalled",
        }
    }
}

/// One server's metrics: the registry `/metrics` renders and a handle on every metric in it.
pub struct Metrics {
    registry: Registry,
    connected: Gauge,
    changes: Family<RepoLabel, Counter>,
    live: Counter,
    replayed: Counter,
    snapshots: Counter,
    applied: Counter,
    failed: Counter,
    convergence: Histogram,
    webhooks: Family<Static2, Counter>,
    sync_duration: HistogramFamily<RepoLabel>,
    sync_errors: Family<RepoLabel, Counter>,
    subscribes: Family<Static1, Counter>,
    closed: Family<Static1, Counter>,
    store: HistogramFamily<Static1>,
    write_batch: Histogram,
    commands: Family<Static1, Counter>,
    rollouts: Family<Static1, Gauge>,
    rollout_decisions: Family<Static1, Counter>,
    rollout_stage: Family<RolloutLabel, Gauge>,
    rollout_stage_instances: Family<RolloutCountLabel, Gauge>,
    /// Topics with stage series, to remove when their rollout ends.
    staged_topics: Mutex<HashSet<String>>,
    /// Topics with an `applied` ack since the convergence watcher last looked.
    acked_topics: Mutex<HashSet<String>>,
    acked: Notify,
}

fn sync_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

fn store_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut r = Registry::default();
        let connected = Gauge::default();
        r.register(
            "confcast_connected_instances",
            "Instances connected to this replica (a hello accepted, the connection still open)",
            connected.clone(),
        );
        let changes = Family::<RepoLabel, Counter>::default();
        r.register(
            "confcast_changes_published",
            "Topic changes this replica's syncers committed to the log, by repo",
            changes.clone(),
        );
        let deliveries = Family::<Static1, Counter>::default();
        r.register(
            "confcast_deliveries",
            "Change and snapshot frames written to instance connections, by kind (live, replay, snapshot)",
            deliveries.clone(),
        );
        let acks = Family::<Static1, Counter>::default();
        r.register(
            "confcast_acks",
            "Acks recorded from instances connected to this replica, by status",
            acks.clone(),
        );
        let convergence = Histogram::new([
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
        ]);
        r.register(
            "confcast_rollout_convergence_seconds",
            "From a topic version's publish to the last applied ack of its rollout, observed once per version when this replica's acks complete it",
            convergence.clone(),
        );
        let webhooks = Family::<Static2, Counter>::default();
        r.register(
            "confcast_webhooks",
            "Webhook requests received, by provider and outcome",
            webhooks.clone(),
        );
        let sync_duration: HistogramFamily<RepoLabel> =
            Family::new_with_constructor(sync_histogram);
        r.register(
            "confcast_sync_duration_seconds",
            "Duration of each sync (lock, fetch, diff, validate, publish), failed ones included, by repo",
            sync_duration.clone(),
        );
        let sync_errors = Family::<RepoLabel, Counter>::default();
        r.register(
            "confcast_sync_errors",
            "Syncs that failed, by repo",
            sync_errors.clone(),
        );
        let subscribes = Family::<Static1, Counter>::default();
        r.register(
            "confcast_subscribes",
            "Subscribes answered, by mode (snapshot, replay, resync: a since that could not be replayed)",
            subscribes.clone(),
        );
        let closed = Family::<Static1, Counter>::default();
        r.register(
            "confcast_connections_closed",
            "WebSocket connections ended, by reason (slow_consumer and write_stalled: dropped for not keeping up)",
            closed.clone(),
        );
        let store: HistogramFamily<Static1> = Family::new_with_constructor(store_histogram);
        r.register(
            "confcast_store_call_duration_seconds",
            "Duration of store calls, by operation",
            store.clone(),
        );
        let write_batch =
            Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]);
        r.register(
            "confcast_store_write_batch_size",
            "Connection writes (instance connected, subscriptions, disconnected, acks) made in one store transaction",
            write_batch.clone(),
        );
        let commands = Family::<Static1, Counter>::default();
        r.register(
            "confcast_commands",
            "Commands for one instance each, by outcome (delivered, done, failed, expired)",
            commands.clone(),
        );
        let rollouts = Family::<Static1, Gauge>::default();
        r.register(
            "confcast_rollouts",
            "Topics whose progressive rollout is active, by state (rolling, halted), as this replica last read them",
            rollouts.clone(),
        );
        let rollout_decisions = Family::<Static1, Counter>::default();
        r.register(
            "confcast_rollout_decisions",
            "Progressive rollout steps this replica made, by decision (promote, halt, abort; an operator's included)",
            rollout_decisions.clone(),
        );
        let rollout_stage = Family::<RolloutLabel, Gauge>::default();
        r.register(
            "confcast_rollout_stage",
            "The current stage (1-based) of each topic's active progressive rollout; set by the replica deciding rollouts, every second",
            rollout_stage.clone(),
        );
        let rollout_stage_instances = Family::<RolloutCountLabel, Gauge>::default();
        r.register(
            "confcast_rollout_stage_instances",
            "Each active rollout's stage members and how many of them applied or failed the rolling version (status: members, applied, failed); set by the replica deciding rollouts",
            rollout_stage_instances.clone(),
        );
        for state in ["rolling", "halted"] {
            rollouts.get_or_create_owned(&[("state", state)]);
        }
        for decision in ["promote", "halt", "abort"] {
            rollout_decisions.get_or_create_owned(&[("decision", decision)]);
        }
        let build = Family::<Static1, Gauge>::default();
        r.register(
            "confcast_build_info",
            "Always 1; the version label names the running build",
            build.clone(),
        );
        build
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register_collector(Box::new(ProcessCollector));

        // Every fixed label value exists from the start (at 0), so rates and alerts see a series
        // before the first event, and the hot paths hold their counter instead of looking it up.
        for mode in SubscribeMode::ALL {
            subscribes.get_or_create_owned(&[("mode", mode.as_str())]);
        }
        for reason in Closed::REASONS {
            closed.get_or_create_owned(&[("reason", reason)]);
        }
        for call in StoreCall::ALL {
            store.get_or_create_owned(&[("op", call.as_str())]);
        }
        for outcome in CommandOutcome::ALL {
            commands.get_or_create_owned(&[("outcome", outcome.as_str())]);
        }
        let kind = |k| deliveries.get_or_create_owned(&[("kind", k)]);
        let status = |s: AckStatus| acks.get_or_create_owned(&[("status", s.as_str())]);
        Arc::new(Metrics {
            connected,
            changes,
            live: kind("live"),
            replayed: kind("replay"),
            snapshots: kind("snapshot"),
            applied: status(AckStatus::Applied),
            failed: status(AckStatus::Failed),
            convergence,
            webhooks,
            sync_duration,
            sync_errors,
            subscribes,
            closed,
            store,
            write_batch,
            commands,
            rollouts,
            rollout_decisions,
            rollout_stage,
            rollout_stage_instances,
            staged_topics: Mutex::new(HashSet::new()),
            registry: r,
            acked_topics: Mutex::new(HashSet::new()),
            acked: Notify::new(),
        })
    }

    /// The whole registry as text: OpenMetrics when `openmetrics`, else Prometheus text 0.0.4.
    pub fn render(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }

    /// A configured repo: its per-repo series exist (at 0) before its first sync.
    pub fn repo_configured(&self, repo: &str) {
        let label = [("repo", repo.to_string())];
        self.changes.get_or_create_owned(&label);
        self.sync_errors.get_or_create_owned(&label);
        self.sync_duration.get_or_create_owned(&label);
    }

    /// An instance's `hello` was accepted.
    pub fn instance_connected(&self) {
        self.connected.inc();
    }

    /// A connection whose `hello` was accepted ended.
    pub fn instance_disconnected(&self) {
        self.connected.dec();
    }

    /// A connection ended, for `why`.
    pub fn connection_closed(&self, why: Closed) {
        self.closed.get_or_create(&[("reason", why.reason())]).inc();
    }

    /// `n` frames of `kind` were written to one connection. One atomic add: no lookup.
    pub fn delivered(&self, kind: Delivery, n: u64) {
        let counter = match kind {
            Delivery::Live => &self.live,
            Delivery::Replay => &self.replayed,
            Delivery::Snapshot => &self.snapshots,
        };
        counter.inc_by(n);
    }

    /// A `subscribe` was answered in `mode`.
    pub fn subscribed(&self, mode: SubscribeMode) {
        self.subscribes
            .get_or_create(&[("mode", mode.as_str())])
            .inc();
    }

    /// An ack was recorded. An `applied` one asks the convergence watcher to look at `topic`.
    pub fn ack(&self, status: AckStatus, topic: &str) {
        match status {
            AckStatus::Applied => {
                self.applied.inc();
                if let Ok(mut topics) = self.acked_topics.lock() {
                    if !topics.contains(topic) {
                        topics.insert(topic.to_string());
                    }
                }
                self.acked.notify_one();
            }
            AckStatus::Failed => {
                self.failed.inc();
            }
        }
    }

    /// `n` topic changes of `repo` were committed to the log.
    pub fn published(&self, repo: &str, n: usize) {
        self.changes
            .get_or_create(&[("repo", repo.to_string())])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// A sync of `repo` ended after `took`, successfully or not.
    pub fn sync_finished(&self, repo: &str, took: Duration, ok: bool) {
        let label = [("repo", repo.to_string())];
        self.sync_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if !ok {
            self.sync_errors.get_or_create(&label).inc();
        }
    }

    /// A webhook request for a repo whose forge is `provider` ended with `outcome`.
    pub fn webhook(&self, provider: &'static str, outcome: WebhookOutcome) {
        self.webhooks
            .get_or_create(&[("provider", provider), ("outcome", outcome.as_str())])
            .inc();
    }

    /// A command reached `outcome` for one instance.
    pub fn command(&self, outcome: CommandOutcome, n: u64) {
        self.commands
            .get_or_create(&[("outcome", outcome.as_str())])
            .inc_by(n);
    }

    /// How many topics' rollouts are `rolling` and `halted`.
    pub fn rollouts(&self, rolling: i64, halted: i64) {
        self.rollouts
            .get_or_create(&[("state", "rolling")])
            .set(rolling);
        self.rollouts
            .get_or_create(&[("state", "halted")])
            .set(halted);
    }

    /// The active rollouts' stages and counts, as the decider just judged them; the series of
    /// topics no longer listed (their rollout ended) are removed.
    pub fn rollout_stages(&self, figures: &[StageFigures<'_>]) {
        let Ok(mut staged) = self.staged_topics.lock() else {
            return;
        };
        let now: HashSet<String> = figures.iter().map(|f| f.topic.to_string()).collect();
        for gone in staged.difference(&now) {
            self.rollout_stage.remove(&[("topic", gone.clone())]);
            for status in ["members", "applied", "failed"] {
                self.rollout_stage_instances
                    .remove(&[("topic", gone.clone()), ("status", status.to_string())]);
            }
        }
        for f in figures {
            self.rollout_stage
                .get_or_create(&[("topic", f.topic.to_string())])
                .set(i64::try_from(f.stage).unwrap_or(i64::MAX));
            for (status, n) in [
                ("members", f.members),
                ("applied", f.applied),
                ("failed", f.failed),
            ] {
                self.rollout_stage_instances
                    .get_or_create(&[
                        ("topic", f.topic.to_string()),
                        ("status", status.to_string()),
                    ])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        *staged = now;
    }

    /// This replica made a rollout step: `promote`, `halt` or `abort`.
    pub fn rollout_decision(&self, decision: &'static str) {
        self.rollout_decisions
            .get_or_create(&[("decision", decision)])
            .inc();
    }

    /// `n` connection writes were made in one transaction.
    pub fn write_batch(&self, n: usize) {
        self.write_batch.observe(n as f64);
    }

    /// Runs the store call `call` and records how long it took (failures included).
    pub async fn time_store<T>(&self, call: StoreCall, run: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = run.await;
        self.store
            .get_or_create(&[("op", call.as_str())])
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Watches rollouts until `shutdown`: after `applied` acks recorded on this replica, it looks
    /// at the rollouts of the topics they were for, and observes `confcast_rollout_convergence_seconds`
    /// for each version that has just converged, with the same rule as the API's `rollout`
    /// (every instance subscribed to the topic, or that acked it, acked its current version
    /// `applied`, none failed, at least one). The value is the latest of those acks' times minus
    /// the time the version was published; each version is observed at most once per process,
    /// and versions already current when the watcher started never are.
    pub async fn watch_rollouts(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) {
        // topic -> the highest version observed (or current at start): never observed again.
        let mut done: Option<HashMap<String, u64>> = None;
        loop {
            if done.is_none() {
                match store.topics().await {
                    Ok(topics) => {
                        done = Some(topics.into_iter().map(|t| (t.topic, t.version)).collect());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rollout watcher cannot read the topics yet")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.acked.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CONVERGENCE_BATCH) => {}
            }
            let topics: HashSet<String> = match self.acked_topics.lock() {
                Ok(mut t) => std::mem::take(&mut *t),
                Err(_) => continue,
            };
            let Some(done) = done.as_mut() else { continue };
            if let Err(e) = self.observe_converged(store.as_ref(), &topics, done).await {
                tracing::warn!(error = %e, "rollout watcher could not read the rollouts");
            }
        }
    }

    async fn observe_converged(
        &self,
        store: &dyn Store,
        acked: &HashSet<String>,
        done: &mut HashMap<String, u64>,
    ) -> Result<(), crate::store::StoreError> {
        let topics: Vec<TopicSummary> = store
            .topics()
            .await?
            .into_iter()
            .filter(|t| acked.contains(&t.topic) && done.get(&t.topic) < Some(&t.version))
            .collect();
        if topics.is_empty() {
            return Ok(());
        }
        let instances = store.instances().await?;
        let acks = store.acks().await?;
        for t in topics {
            if let Some(last_ack_ms) = converged_at(&t, &instances, &acks) {
                let ms = last_ack_ms.saturating_sub(t.updated_at_ms).max(0);
                // Whole milliseconds, well inside f64's exact range.
                #[allow(clippy::cast_precision_loss)]
                self.convergence.observe(ms as f64 / 1000.0);
                done.insert(t.topic, t.version);
            }
        }
        Ok(())
    }
}

/// When `topic`'s rollout of its current version converged (the latest applied ack's time, ms),
/// or `None` while it has not: the rule of the API's `rollout`.
fn converged_at(
    topic: &TopicSummary,
    instances: &[InstanceRecord],
    acks: &[AckRecord],
) -> Option<i64> {
    let acks: HashMap<&str, &AckRecord> = acks
        .iter()
        .filter(|a| a.topic == topic.topic)
        .map(|a| (a.instance.as_str(), a))
        .collect();
    let mut last = None;
    for i in instances {
        let ack = acks.get(i.id.as_str());
        if !in_rollout(&i.subscriptions, &topic.topic, ack.is_some()) {
            continue;
        }
        match ack {
            Some(a)
                if Standing::of(Some((a.status, a.version)), topic.version)
                    == Standing::Applied =>
            {
                last = last.max(Some(a.acked_at_ms));
            }
            // Behind or failed: not converged (`store::converged`).
            _ => return None,
        }
    }
    // At least one applied, as `store::converged` asks.
    last
}

/// Process basics from `/proc/self` (Linux), read at each scrape; elsewhere nothing.
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc` times: `USER_HZ`, 100 on every Linux architecture
/// confcast builds for.
const USER_HZ: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        };
        let mut gauge = |name: &str, help: &str, value: Option<i64>| {
            if let Some(v) = value {
                let metric = ConstGauge::new(v);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            kib("VmRSS:").map(|k| k.saturating_mul(1024)),
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            kib("VmSize:").map(|k| k.saturating_mul(1024)),
        )?;
        gauge("process_threads", "OS threads", kib("Threads:"))?;
        let fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| i64::try_from(d.count()).unwrap_or(i64::MAX));
        gauge("process_open_fds", "Open file descriptors", fds)?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<i64>().ok())
            });
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors",
            max_fds,
        )?;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n).and_then(|v| v.parse::<u64>().ok());
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after `) state`.
        if let (Some(user), Some(system)) = (field(11), field(12)) {
            #[allow(clippy::cast_precision_loss)]
            let metric = ConstCounter::new(user.saturating_add(system) as f64 / USER_HZ);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(boot), Some(start)) = (boot, field(19)) {
            #[allow(clippy::cast_precision_loss)]
            let metric = ConstGauge::new(boot as f64 + start as f64 / USER_HZ);
            metric.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// `provider` label of a webhook: the forge's name, `unknown` when neither the repo's
/// configuration nor the request's headers say.
pub fn provider_label(provider: Option<crate::config::Provider>) -> &'static str {
    use crate::config::Provider;
    match provider {
        Some(Provider::Github) => "github",
        Some(Provider::Gitlab) => "gitlab",
        Some(Provider::Gitea) => "gitea",
        Some(Provider::Forgejo) => "forgejo",
        Some(Provider::Gogs) => "gogs",
        Some(Provider::BitbucketCloud | Provider::BitbucketServer) => "bitbucket",
        Some(Provider::Generic) => "generic",
        Some(Provider::Auto) | None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    fn topic(version: u64) -> TopicSummary {
        TopicSummary {
            topic: "payments".into(),
            repo: "cfg".into(),
            version,
            seq: version,
            commit: "c".into(),
            updated_at_ms: 1_000,
            author: None,
            message: None,
        }
    }

    fn instance(id: &str, pattern: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            app: None,
            labels: BTreeMap::new(),
            subscriptions: vec![pattern.into()],
            connected: true,
            node: None,
            last_seen_ms: 0,
            connected_at_ms: None,
        }
    }

    fn ack(id: &str, version: u64, status: AckStatus, at: i64) -> AckRecord {
        AckRecord {
            instance: id.into(),
            topic: "payments".into(),
            version,
            status,
            error: None,
            acked_at_ms: at,
        }
    }

    #[test]
    fn a_rollout_converges_at_its_last_applied_ack() {
        let instances = [
            instance("a", "payments"),
            instance("b", "*"),
            instance("c", "billing"),
        ];
        let t = topic(2);
        assert_eq!(converged_at(&t, &instances, &[]), None, "nobody acked");
        let one = [ack("a", 2, AckStatus::Applied, 1_500)];
        assert_eq!(converged_at(&t, &instances, &one), None, "b is behind");
        let old = [one[0].clone(), ack("b", 1, AckStatus::Applied, 1_200)];
        assert_eq!(converged_at(&t, &instances, &old), None, "b runs version 1");
        let failed = [one[0].clone(), ack("b", 2, AckStatus::Failed, 1_700)];
        assert_eq!(converged_at(&t, &instances, &failed), None, "b failed");
        let both = [one[0].clone(), ack("b", 2, AckStatus::Applied, 1_900)];
        assert_eq!(converged_at(&t, &instances, &both), Some(1_900));
        // An instance that acked the topic counts even when no pattern of it matches any more.
        let mut moved = instances.clone();
        moved[1].subscriptions = vec!["billing".into()];
        let behind = [one[0].clone(), ack("b", 1, AckStatus::Applied, 1_200)];
        assert_eq!(converged_at(&t, &moved, &behind), None);
    }

    #[test]
    fn close_codes_map_to_bounded_reasons() {
        assert_eq!(Closed::Code(close::SLOW_CONSUMER).reason(), "slow_consumer");
        assert_eq!(Closed::Code(4999).reason(), "other");
        for c in [
            Closed::Code(close::GOING_AWAY),
            Closed::Code(close::MESSAGE_TOO_BIG),
            Closed::Code(close::KEEPALIVE_TIMEOUT),
            Closed::Code(close::REPLACED),
            Closed::Code(close::HELLO_TIMEOUT),
            Closed::Code(close::EPOCH_CHANGED),
            Closed::Code(close::CREDENTIAL_EXPIRED),
            Closed::ClientGone,
            Closed::Stalled,
        ] {
            assert!(Closed::REASONS.contains(&c.reason()), "{c:?}");
        }
    }

    #[test]
    fn every_family_renders_in_both_formats() {
        let m = Metrics::new();
        m.repo_configured("cfg");
        m.webhook("github", WebhookOutcome::Queued);
        m.delivered(Delivery::Live, 3);
        let text = m.render(false).expect("render");
        assert!(
            text.contains("confcast_deliveries_total{kind=\"live\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("confcast_changes_published_total{repo=\"cfg\"} 0\n"));
        assert!(text.contains("# TYPE confcast_rollout_convergence_seconds histogram\n"));
        let om = m.render(true).expect("render");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let mut names = String::new();
        for line in om.lines().filter(|l| l.starts_with("# TYPE ")) {
            let _ = writeln!(names, "{line}");
        }
        assert!(
            names.contains("# TYPE confcast_webhooks counter"),
            "{names}"
        );
    }
}
