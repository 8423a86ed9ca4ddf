//! The connections' store writes, batched: every connection hands its instance's writes
//! (connected, subscriptions, disconnected, acks) to one task per served `App`, which makes
//! whatever has queued in one transaction ([`Store::write_batch`]) and answers each connection
//! with its own result. A batch the store refuses is made again write by write, so one bad write
//! (a value the database rejects) fails only its own connection's write.
//!
//! One transaction per write serialised a reconnect storm or an ack storm on the store's write
//! lock (SQLite) or on round trips and commits (PostgreSQL); one per batch costs the same whether
//! one write or a thousand are waiting, and costs nothing extra when only one is: the task takes
//! what has queued when it is free, without waiting for more.
//!
//! Must never: answer a write before the transaction that made it committed (a connection sends
//! `ack_recorded` only after its answer), reorder the writes of one instance (the queue is first
//! in, first out, a batch keeps each instance's order, and a connection waits for each answer
//! before its next write), or stop while a connection may still write: `serve` closes it only
//! after its tracked tasks, the connections among them, have ended, and it then makes what is
//! queued before it returns.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::protocol::AckStatus;
use crate::store::{AckRejection, InstanceWrite, Store, StoreError};
use crate::telemetry::{Metrics, StoreCall};

/// The most writes made in one transaction: a bound on how long one holds the store's write lock.
pub const MAX_BATCH: usize = 1_000;

/// Writes waiting for the task at most; a connection with a write beyond that waits to queue it.
const QUEUED: usize = 4 * MAX_BATCH;

type Answer = Result<Result<(), AckRejection>, StoreError>;

struct Queued {
    write: InstanceWrite,
    answer: oneshot::Sender<Answer>,
}

/// The handle connections write through; clones share the one task.
#[derive(Clone)]
pub struct Writes {
    queue: mpsc::Sender<Queued>,
    /// How many writes the task has taken from the queue so far (tests wait on it).
    taken: Arc<std::sync::atomic::AtomicUsize>,
}

/// Stops the task once it has made every write queued before `close`.
pub struct WritesTask {
    closed: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl WritesTask {
    /// Refuses new writes, makes those already queued, and waits for the task to end.
    pub async fn close(self) {
        self.closed.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the store writer ended abnormally");
        }
    }
}

impl Writes {
    /// Spawns the task that makes the writes in `store`.
    pub fn start(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> (Writes, WritesTask) {
        let (queue, rx) = mpsc::channel(QUEUED);
        let closed = CancellationToken::new();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(run(store, metrics, rx, closed.clone(), taken.clone()));
        (Writes { queue, taken }, WritesTask { closed, task })
    }

    /// How many writes the task has taken from the queue since it started.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues `write` and waits until its batch committed (or failed).
    pub async fn write(&self, write: InstanceWrite) -> Answer {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Queued { write, answer })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answered.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// See [`Store::instance_connected`].
    pub async fn instance_connected(
        &self,
        instance: &str,
        app: Option<&str>,
        labels: &BTreeMap<String, String>,
        connection: &str,
        node: &str,
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::connected(instance, app, labels, connection, node);
        self.write(write).await.map(drop)
    }

    /// See [`Store::instance_subscriptions`].
    pub async fn instance_subscriptions(
        &self,
        instance: &str,
        patterns: &[String],
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::subscriptions(instance, patterns);
        self.write(write).await.map(drop)
    }

    /// See [`Store::instance_disconnected`].
    pub async fn instance_disconnected(
        &self,
        instance: &str,
        connection: &str,
    ) -> Result<(), StoreError> {
        let write = InstanceWrite::disconnected(instance, connection);
        self.write(write).await.map(drop)
    }

    /// See [`Store::record_ack`].
    pub async fn record_ack(
        &self,
        instance: &str,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<&str>,
    ) -> Answer {
        let write = InstanceWrite::ack(instance, topic, version, status, error);
        self.write(write).await
    }
}

async fn run(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Queued>,
    closed: CancellationToken,
    taken: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            _ = closed.cancelled(), if !closing => {
                // What is queued is still received (then `recv_many` gives 0); nothing new is.
                rx.close();
                closing = true;
            }
            received = rx.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    return;
                }
                taken.fetch_add(received, std::sync::atomic::Ordering::Relaxed);
                write(store.as_ref(), &metrics, &mut batch).await;
            }
        }
    }
}

/// Makes `batch` in one transaction and answers each write; leaves `batch` empty.
async fn write(store: &dyn Store, metrics: &Metrics, batch: &mut Vec<Queued>) {
    let (writes, answers): (Vec<InstanceWrite>, Vec<oneshot::Sender<Answer>>) =
        batch.drain(..).map(|q| (q.write, q.answer)).unzip();
    let made = metrics
        .time_store(StoreCall::WriteBatch, store.write_batch(&writes))
        .await;
    metrics.write_batch(writes.len());
    match made {
        Ok(results) if results.len() == answers.len() => {
            for (answer, result) in answers.into_iter().zip(results) {
                // A connection that went away meanwhile no longer waits: nothing to tell.
                let _ = answer.send(Ok(result));
            }
        }
        Ok(results) => {
            let e = StoreError::Corrupt(format!(
                "a batch of {} writes was answered {} times",
                answers.len(),
                results.len()
            ));
            fail(answers, e);
        }
        Err(e) if answers.len() > 1 => {
            // One write the store refuses must not fail the others' (a batch holds up to
            // MAX_BATCH connections' writes): each is made again alone, and only the writes
            // that fail alone are answered with an error.
            tracing::warn!(writes = answers.len(), error = %e, "a batch of instance writes failed; making each alone");
            for (write, answer) in writes.into_iter().zip(answers) {
                let made = metrics
                    .time_store(
                        StoreCall::WriteBatch,
                        store.write_batch(std::slice::from_ref(&write)),
                    )
                    .await;
                metrics.write_batch(1);
                match made {
                    Ok(mut results) if results.len() == 1 => {
                        let _ = answer.send(Ok(results.remove(0)));
                    }
                    Ok(results) => fail(
                        vec![answer],
                        StoreError::Corrupt(format!(
                            "a write was answered {} times",
                            results.len()
                        )),
                    ),
                    Err(e) => fail(vec![answer], e),
                }
            }
        }
        Err(e) => fail(answers, e),
    }
}

fn fail(answers: Vec<oneshot::Sender<Answer>>, error: StoreError) {
    tracing::error!(writes = answers.len(), error = %error, "instance writes failed");
    let error = Arc::new(error);
    for answer in answers {
        let _ = answer.send(Err(StoreError::Batch(error.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SyncOutcome;
    use sqlx::Connection as _;

    /// A SQLite store with topic `payments` at version 1, and a second connection to its file.
    async fn store(dir: &std::path::Path) -> (Arc<dyn Store>, sqlx::SqliteConnection) {
        let url = format!("sqlite://{}", dir.join("confcast.db").display());
        let store = crate::store::open(&url).await.expect("open");
        store
            .publish(&SyncOutcome {
                repo: "cfg".into(),
                commit: "c1".into(),
                topics: vec![crate::store::TopicChange {
                    topic: "payments".into(),
                    files: vec![crate::store::ChangedFile {
                        path: "payments/app.toml".into(),
                        status: crate::protocol::FileStatus::Added,
                        old_path: None,
                        sha: "a".into(),
                        content: Some(b"port = 1\n".to_vec()),
                    }],
                }],
                ..Default::default()
            })
            .await
            .expect("publish");
        let other = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        (store, other)
    }

    /// Takes SQLite's write lock on `other`: the writer's next transaction waits for it.
    async fn hold_write_lock(other: &mut sqlx::SqliteConnection) {
        sqlx::Executor::execute(&mut *other, "BEGIN IMMEDIATE")
            .await
            .expect("take the write lock");
    }

    async fn release_write_lock(other: &mut sqlx::SqliteConnection) {
        sqlx::Executor::execute(&mut *other, "COMMIT")
            .await
            .expect("release the write lock");
    }

    /// Waits until the task has taken `taken` writes and `n` more wait in the queue.
    async fn queued(writes: &Writes, taken: usize, n: usize) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while writes.taken() != taken || writes.queue.capacity() != QUEUED - n {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("writes queued in time");
    }

    fn ack(writes: &Writes, instance: String, version: u64) -> tokio::task::JoinHandle<Answer> {
        let writes = writes.clone();
        tokio::spawn(async move {
            writes
                .record_ack(&instance, "payments", version, AckStatus::Applied, None)
                .await
        })
    }

    /// The line of `metrics` for `name`, e.g. `confcast_store_write_batch_size_count`.
    fn metric(metrics: &Metrics, name: &str) -> String {
        let text = metrics.render(false).expect("render");
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_while_the_store_is_busy_go_in_one_transaction_each_with_its_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut other) = store(dir.path()).await;
        let metrics = Metrics::new();
        let (writes, task) = Writes::start(store.clone(), metrics.clone());
        hold_write_lock(&mut other).await;
        let first = ack(&writes, "i-0".into(), 1);
        queued(&writes, 1, 0).await;
        // 99 more while the first one's transaction waits for the lock; every tenth for a
        // version that does not exist.
        let rest: Vec<_> = (1..100)
            .map(|i| ack(&writes, format!("i-{i}"), if i % 10 == 0 { 2 } else { 1 }))
            .collect();
        queued(&writes, 1, 99).await;
        release_write_lock(&mut other).await;

        assert_eq!(first.await.expect("task").expect("written"), Ok(()));
        for (i, answer) in (1..100).zip(rest) {
            let answer = answer.await.expect("task").expect("written");
            if i % 10 == 0 {
                assert_eq!(answer, Err(AckRejection::UnknownVersion { current: 1 }));
            } else {
                assert_eq!(answer, Ok(()), "i-{i}");
            }
        }
        assert_eq!(store.acks().await.expect("acks").len(), 91);
        assert_eq!(
            metric(&metrics, "confcast_store_write_batch_size_count"),
            "confcast_store_write_batch_size_count 2",
            "the first write alone, then the 99 that queued meanwhile"
        );
        assert_eq!(
            metric(&metrics, "confcast_store_write_batch_size_sum"),
            "confcast_store_write_batch_size_sum 100.0"
        );
        task.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_makes_every_queued_write_then_refuses_new_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut other) = store(dir.path()).await;
        let (writes, task) = Writes::start(store.clone(), Metrics::new());
        hold_write_lock(&mut other).await;
        let first = ack(&writes, "i-0".into(), 1);
        queued(&writes, 1, 0).await;
        let rest: Vec<_> = (1..10).map(|i| ack(&writes, format!("i-{i}"), 1)).collect();
        queued(&writes, 1, 9).await;
        let closing = tokio::spawn(task.close());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!closing.is_finished(), "close waits for the queued writes");
        release_write_lock(&mut other).await;
        closing.await.expect("closed");

        assert_eq!(first.await.expect("task").expect("written"), Ok(()));
        for answer in rest {
            assert_eq!(answer.await.expect("task").expect("written"), Ok(()));
        }
        assert_eq!(store.acks().await.expect("acks").len(), 10);
        let late = ack(&writes, "i-late".into(), 1).await.expect("task");
        assert!(matches!(late, Err(StoreError::WriterStopped)), "{late:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_the_store_refuses_fails_alone_and_the_rest_of_its_batch_is_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut other) = store(dir.path()).await;
        let metrics = Metrics::new();
        let (writes, task) = Writes::start(store.clone(), metrics.clone());
        // The database itself refuses one instance's ack (as PostgreSQL refuses a NUL in text).
        sqlx::Executor::execute(
            &mut other,
            "CREATE TRIGGER refuse BEFORE INSERT ON acks WHEN NEW.instance = 'i-7' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .await
        .expect("trigger");
        hold_write_lock(&mut other).await;
        let first = ack(&writes, "i-0".into(), 1);
        queued(&writes, 1, 0).await;
        let rest: Vec<_> = (1..20).map(|i| ack(&writes, format!("i-{i}"), 1)).collect();
        queued(&writes, 1, 19).await;
        release_write_lock(&mut other).await;

        assert_eq!(first.await.expect("task").expect("written"), Ok(()));
        for (i, answer) in (1..20).zip(rest) {
            let answer = answer.await.expect("task");
            if i == 7 {
                assert!(matches!(answer, Err(StoreError::Batch(_))), "{answer:?}");
            } else {
                assert_eq!(answer.expect("written"), Ok(()), "i-{i}");
            }
        }
        let mut acked: Vec<String> = store
            .acks()
            .await
            .expect("acks")
            .into_iter()
            .map(|a| a.instance)
            .collect();
        acked.sort();
        let mut expected: Vec<String> = (0..20)
            .filter(|i| *i != 7)
            .map(|i| format!("i-{i}"))
            .collect();
        expected.sort();
        assert_eq!(acked, expected);
        assert_eq!(
            metric(&metrics, "confcast_store_write_batch_size_count"),
            "confcast_store_write_batch_size_count 21",
            "the first alone, the failed batch of 19, then each of the 19 alone"
        );
        task.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_answers_every_write_in_it_with_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut other) = store(dir.path()).await;
        let (writes, task) = Writes::start(store.clone(), Metrics::new());
        hold_write_lock(&mut other).await;
        let first = ack(&writes, "i-0".into(), 1);
        queued(&writes, 1, 0).await;
        let rest: Vec<_> = (1..20).map(|i| ack(&writes, format!("i-{i}"), 1)).collect();
        queued(&writes, 1, 19).await;
        // Inside the held transaction: the table is gone when it commits.
        sqlx::Executor::execute(&mut other, "DROP TABLE acks")
            .await
            .expect("drop acks");
        release_write_lock(&mut other).await;

        for answer in std::iter::once(first).chain(rest) {
            let answer = answer.await.expect("task");
            assert!(matches!(answer, Err(StoreError::Batch(_))), "{answer:?}");
        }
        task.close().await;
    }
}
