//! Acks per second into SQLite (issue 13): written one transaction each through the store, as a
//! connection wrote them before `hub::writes`, against the same acks from the same number of
//! connections through `hub::writes`, which makes whatever has queued in one transaction.
//!
//! Each iteration is 1,000 acks (`applied`, version 1 of one topic) from `connections` tasks, each
//! sending its share one after another and waiting for each answer, as a connection does; the
//! database is a real SQLite file in a temporary directory, opened as `confcast serve` opens it.
//! Criterion's throughput is acks per second.
//!
//! Run with `cargo bench --bench ack_batching`. Nothing here asserts a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use confcast::hub::writes::Writes;
use confcast::protocol::{AckStatus, FileStatus};
use confcast::store::{self, ChangedFile, Store, SyncOutcome, TopicChange};
use confcast::telemetry::Metrics;

const ACKS: usize = 1_000;

async fn sqlite(dir: &std::path::Path) -> Arc<dyn Store> {
    let store = store::open(&format!("sqlite://{}", dir.join("confcast.db").display()))
        .await
        .expect("open sqlite");
    store
        .publish(&SyncOutcome {
            repo: "cfg".into(),
            commit: "c1".into(),
            topics: vec![TopicChange {
                topic: "payments".into(),
                files: vec![ChangedFile {
                    path: "payments/app.toml".into(),
                    status: FileStatus::Added,
                    old_path: None,
                    sha: "a".into(),
                    content: Some(b"port = 8443\n".to_vec()),
                }],
            }],
            ..Default::default()
        })
        .await
        .expect("publish");
    store
}

/// How one connection's ack is written.
#[derive(Clone)]
enum Path {
    /// `Store::record_ack`: a transaction per ack.
    Store(Arc<dyn Store>),
    /// `hub::writes`: queued, batched with the other connections' acks.
    Batched(Writes),
}

impl Path {
    async fn ack(&self, instance: &str) {
        let recorded = match self {
            Path::Store(store) => {
                store
                    .record_ack(instance, "payments", 1, AckStatus::Applied, None)
                    .await
            }
            Path::Batched(writes) => {
                writes
                    .record_ack(instance, "payments", 1, AckStatus::Applied, None)
                    .await
            }
        };
        assert_eq!(recorded.expect("written"), Ok(()));
    }
}

/// `ACKS` acks from `connections` tasks; how long until the last was answered.
async fn storm(path: &Path, connections: usize) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let path = path.clone();
            tokio::spawn(async move {
                for i in (c..ACKS).step_by(connections) {
                    path.ack(&format!("i-{i}")).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("connection task");
    }
    started.elapsed()
}

fn acks(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = runtime.block_on(sqlite(dir.path()));
    let (writes, writer) = runtime.block_on(async { Writes::start(store.clone(), Metrics::new()) });
    let mut group = c.benchmark_group("acks_sqlite");
    group.throughput(Throughput::Elements(ACKS as u64));
    group.sample_size(10);
    for connections in [1, 100, 1_000] {
        for (name, path) in [
            ("store_record_ack", Path::Store(store.clone())),
            ("hub_writes_batched", Path::Batched(writes.clone())),
        ] {
            group.bench_with_input(BenchmarkId::new(name, connections), &path, |b, path| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut took = Duration::ZERO;
                        for _ in 0..iters {
                            took += storm(path, connections).await;
                        }
                        took
                    })
                })
            });
        }
    }
    group.finish();
    runtime.block_on(writer.close());
}

criterion_group!(benches, acks);
criterion_main!(benches);
