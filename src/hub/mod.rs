//! The hub: fans logged changes out to every connection, in sequence order, one shared frame each.
//!
//! A single feeder reads the log after the last sequence it sent (woken by a local publish, and on a
//! timer as a safety net), looks each event's topic up in the [`subscriptions`] index and queues the
//! one shared frame in the bounded inbox of each connection subscribed to it. A connection whose
//! inbox is full is cut off as a slow consumer instead of growing memory or slowing anyone else.
//! Reading from the log, never from the publisher's hands, keeps the order gap-free whoever
//! published.

pub mod commands;
pub mod connection;
pub mod rollouts;
pub mod stages;
pub mod subscriptions;
pub mod writes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::telemetry::{Metrics, StoreCall};

/// A change as it travels to connections: encoded once, the same bytes for every subscriber.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    pub topic: String,
    pub text: Utf8Bytes,
    /// Only for the instances it admits (a progressive rollout's stages); `None`: everyone.
    pub audience: Option<Arc<crate::staging::Audience>>,
}

struct Holder {
    connection: u64,
    /// Told when the id is taken over by a newer connection.
    replaced: Arc<Notify>,
    /// The credential it connected with: only the same credential may take the id over.
    credential: String,
}

pub struct Hub {
    /// Who receives which topic's changes on this replica.
    pub subscriptions: subscriptions::Subscriptions,
    wake: Arc<Notify>,
    /// instance id -> the connection holding it on this replica
    live: Mutex<HashMap<String, Holder>>,
    next_connection: std::sync::atomic::AtomicU64,
    /// The live rollout board of the dashboards, stirred by what happens here.
    pub rollouts: Arc<rollouts::Rollouts>,
    /// The commands whose deadline is ahead (see [`commands`]).
    commands: tokio::sync::watch::Sender<Arc<Vec<commands::Dispatched>>>,
    /// Wakes the command dispatcher.
    command_wake: Notify,
    /// Every topic's progressive rollout as read after the log was fed up to the seq kept with
    /// it: what snapshots use instead of reading the store when that seq covers their read.
    stagings: Mutex<(u64, Arc<Vec<crate::store::Staging>>)>,
}

impl Hub {
    /// A hub whose connections each queue at most `queue` changes before they are cut off.
    pub fn new(queue: usize) -> Arc<Hub> {
        Arc::new(Hub {
            subscriptions: subscriptions::Subscriptions::new(queue),
            wake: Arc::new(Notify::new()),
            live: Mutex::new(HashMap::new()),
            next_connection: std::sync::atomic::AtomicU64::new(1),
            rollouts: rollouts::Rollouts::new(),
            commands: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            command_wake: Notify::new(),
            stagings: Mutex::new((0, Arc::new(Vec::new()))),
        })
    }

    /// The rollouts as read after the log was fed up to the returned seq.
    pub fn stagings(&self) -> (u64, Arc<Vec<crate::store::Staging>>) {
        match self.stagings.lock() {
            Ok(held) => (held.0, held.1.clone()),
            Err(_) => (0, Arc::new(Vec::new())),
        }
    }

    /// Reads the rollouts again: the log has been fed up to `fed`.
    async fn refresh_stagings(&self, store: &dyn Store, metrics: &Metrics, fed: u64) {
        match store.stagings().await {
            Ok(read) => {
                let count = |state| read.iter().filter(|s| s.state == state).count() as i64;
                metrics.rollouts(
                    count(crate::store::StagingState::Rolling),
                    count(crate::store::StagingState::Halted),
                );
                if let Ok(mut held) = self.stagings.lock() {
                    *held = (fed, Arc::new(read));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the rollouts"),
        }
    }

    /// Reads the rollouts again after a step that logs nothing (a halt) or before the feeder
    /// gets to it: the copy stays valid for the log position it had, being newer.
    pub async fn refresh_rollouts(&self, store: &dyn Store, metrics: &Metrics) {
        let fed = self.stagings().0;
        self.refresh_stagings(store, metrics, fed).await;
    }

    /// Tells the feeder the log has grown.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What wakes the feeder, for a store that learns of other replicas' writes.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs the feeder until `shutdown`: log order in, inboxes out.
    pub async fn feed(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut sent = match store.head_seq().await {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, "hub cannot read the log head; starting from 0");
                0
            }
        };
        self.refresh_stagings(store.as_ref(), &metrics, sent).await;
        loop {
            loop {
                let read = store.events_after(sent, 512);
                match metrics.time_store(StoreCall::EventsAfter, read).await {
                    Ok(events) if events.is_empty() => break,
                    Ok(events) => {
                        for e in events {
                            sent = e.seq;
                            // No subscriber is fine: nobody listens to that topic here.
                            self.subscriptions.deliver(&Arc::new(Frame {
                                seq: e.seq,
                                topic: e.topic,
                                text: Utf8Bytes::from(e.frame),
                                audience: e.audience,
                            }));
                        }
                        // Every change of who runs what comes with a logged change.
                        self.refresh_stagings(store.as_ref(), &metrics, sent).await;
                        // A new version changes every rollout of its topic.
                        self.rollouts.stir();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, after = sent, "hub cannot read the log; retrying");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // Another replica's notification may be for a new command: the dispatcher looks.
                _ = self.wake.notified() => self.command_wake.notify_one(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Registers `instance` on a new connection; an older connection of the same id is told to
    /// close. `None` when the id is held by a connection with another credential: a client cannot
    /// push an instance it does not hold the credential of off its connection.
    fn claim(&self, instance: &str, credential: &str) -> Option<(u64, Arc<Notify>)> {
        let id = self
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let signal = Arc::new(Notify::new());
        let mut live = self.live.lock().ok()?;
        if live
            .get(instance)
            .is_some_and(|held| held.credential != credential)
        {
            return None;
        }
        let holder = Holder {
            connection: id,
            replaced: signal.clone(),
            credential: credential.to_string(),
        };
        if let Some(old) = live.insert(instance.to_string(), holder) {
            old.replaced.notify_one();
        }
        Some((id, signal))
    }

    fn release(&self, instance: &str, connection: u64) {
        if let Ok(mut live) = self.live.lock() {
            if live
                .get(instance)
                .is_some_and(|h| h.connection == connection)
            {
                live.remove(instance);
            }
        }
    }
}
