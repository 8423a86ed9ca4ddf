//! The store contract, written once against `Arc<dyn Store>` and run on SQLite and on PostgreSQL,
//! then what only replicas sharing one PostgreSQL database can show: concurrent publishers leave
//! no gap, a repo lock excludes another replica, and a publish wakes the other replicas' hubs even
//! after their listener connection was cut.
//!
//! PostgreSQL tests use `CONFCAST_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`)
//! to create a fresh database per test. When it is unreachable they are skipped, unless `CI=true`,
//! where they fail: CI must not go green without having run them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use confcast::protocol::{decode_content, AckStatus, Change, FileStatus, ServerMessage};
use confcast::store::{
    self, rewind, AckRejection, AuditEntry, AuditQuery, ChangedFile, CommandAckOutcome,
    CommandRefusal, HeldChange, InstanceWrite, NewCommand, Pin, Rejection, Rollback, Store,
    SyncOutcome, TopicChange,
};
use sqlx::{Connection, PgConnection};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Long enough for a loaded 2-core machine; a healthy run never waits this long.
const WAIT: Duration = Duration::from_secs(15);
/// How long a waiter must stay blocked to count as excluded.
const EXCLUDED: Duration = Duration::from_millis(500);

// ---- building sync outcomes -------------------------------------------------------------------

fn file(path: &str, status: FileStatus, content: &[u8]) -> ChangedFile {
    ChangedFile {
        path: path.into(),
        status,
        old_path: None,
        sha: format!("sha-{}", content.len()),
        content: Some(content.to_vec()),
    }
}

fn added(path: &str, content: &[u8]) -> ChangedFile {
    file(path, FileStatus::Added, content)
}

fn modified(path: &str, content: &[u8]) -> ChangedFile {
    file(path, FileStatus::Modified, content)
}

fn renamed(old: &str, path: &str, content: &[u8]) -> ChangedFile {
    ChangedFile {
        old_path: Some(old.into()),
        ..file(path, FileStatus::Renamed, content)
    }
}

fn deleted(path: &str) -> ChangedFile {
    ChangedFile {
        path: path.into(),
        status: FileStatus::Deleted,
        old_path: None,
        sha: "0".repeat(40),
        content: None,
    }
}

fn outcome(repo: &str, commit: &str, topics: Vec<(&str, Vec<ChangedFile>)>) -> SyncOutcome {
    SyncOutcome {
        repo: repo.into(),
        commit: commit.into(),
        author: "Ada <ada@example.com>".into(),
        message: format!("commit {commit}"),
        topics: topics
            .into_iter()
            .map(|(topic, files)| TopicChange {
                topic: topic.into(),
                files,
            })
            .collect(),
        ..Default::default()
    }
}

fn rejection(topic: &str, base: &str, commit: &str, line: Option<u32>) -> Rejection {
    Rejection {
        repo: "cfg".into(),
        topic: topic.into(),
        base_commit: base.into(),
        commit: commit.into(),
        author: "Ada <ada@example.com>".into(),
        path: format!("{topic}/app.toml"),
        line,
        message: "expected `=`".into(),
        at_ms: 1_700_000_000_000,
    }
}

fn seqs(changes: &[Change]) -> Vec<(u64, &str, u64, u64)> {
    changes
        .iter()
        .map(|c| (c.seq, c.topic.as_str(), c.version, c.previous_version))
        .collect()
}

/// Each snapshot's files as (path, content bytes), so binary and text compare alike.
fn snapshot_files(snapshot: &confcast::protocol::Snapshot) -> Vec<(String, Vec<u8>)> {
    snapshot
        .files
        .iter()
        .map(|f| {
            let bytes = decode_content(&f.content, f.encoding).expect("valid content encoding");
            (f.path.clone(), bytes)
        })
        .collect()
}

fn owned(files: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    files
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_vec()))
        .collect()
}

/// Waits for a repo lock in a task of its own, so a test can watch whether it is granted.
fn lock_in_background(
    store: &Arc<dyn Store>,
    repo: &'static str,
) -> oneshot::Receiver<store::RepoLock> {
    let (tx, rx) = oneshot::channel();
    let store = store.clone();
    tokio::spawn(async move {
        let lock = store.lock_repo(repo).await.expect("lock_repo");
        let _ = tx.send(lock);
    });
    rx
}

// ---- the contract, one function per behaviour, run on every store -----------------------------

mod contract {
    use super::*;

    pub async fn publish_numbers_changes_consecutively_and_versions_each_topic(
        store: Arc<dyn Store>,
    ) {
        assert_eq!(store.head_seq().await.expect("head"), 0);
        assert_eq!(store.oldest_seq().await.expect("oldest"), None);
        assert_eq!(store.repo_head("cfg").await.expect("repo_head"), None);

        let first = store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![
                    ("payments", vec![added("payments/app.toml", b"port = 1\n")]),
                    ("search", vec![added("search/a.yaml", b"a: 1\n")]),
                ],
            ))
            .await
            .expect("publish c1");
        assert_eq!(seqs(&first), [(1, "payments", 1, 0), (2, "search", 1, 0)]);
        let second = store
            .publish(&outcome(
                "cfg",
                "c2",
                vec![(
                    "payments",
                    vec![modified("payments/app.toml", b"port = 2\n")],
                )],
            ))
            .await
            .expect("publish c2");
        assert_eq!(seqs(&second), [(3, "payments", 2, 1)]);
        let third = store
            .publish(&outcome(
                "other",
                "c3",
                vec![
                    ("billing", vec![added("billing/x.json", b"{}")]),
                    ("search", vec![modified("search/a.yaml", b"a: 2\n")]),
                ],
            ))
            .await
            .expect("publish c3");
        assert_eq!(seqs(&third), [(4, "billing", 1, 0), (5, "search", 2, 1)]);
        assert_eq!(third[0].commit, "c3");
        assert_eq!(third[0].author, "Ada <ada@example.com>");
        assert_eq!(third[0].message, "commit c3");

        assert_eq!(store.head_seq().await.expect("head"), 5);
        assert_eq!(store.oldest_seq().await.expect("oldest"), Some(1));
        assert_eq!(
            store.repo_head("cfg").await.expect("repo_head").as_deref(),
            Some("c2")
        );
        let repos: Vec<(String, String)> = store
            .repos()
            .await
            .expect("repos")
            .into_iter()
            .map(|r| (r.name, r.head))
            .collect();
        assert_eq!(
            repos,
            [("cfg".into(), "c2".into()), ("other".into(), "c3".into())]
        );
        let topics: Vec<(String, String, u64, u64, String)> = store
            .topics()
            .await
            .expect("topics")
            .into_iter()
            .map(|t| (t.topic, t.repo, t.version, t.seq, t.commit))
            .collect();
        assert_eq!(
            topics,
            [
                ("billing".into(), "other".into(), 1, 4, "c3".into()),
                ("payments".into(), "cfg".into(), 2, 3, "c2".into()),
                ("search".into(), "other".into(), 2, 5, "c3".into()),
            ]
        );

        // The logged frame is exactly the change publish returned, ready to send as is.
        let logged = store.events_after(0, 100).await.expect("events");
        let all: Vec<Change> = first.into_iter().chain(second).chain(third).collect();
        assert_eq!(logged.len(), all.len());
        for (event, change) in logged.iter().zip(&all) {
            assert_eq!(
                (event.seq, event.topic.as_str()),
                (change.seq, change.topic.as_str())
            );
            let frame: ServerMessage = serde_json::from_str(&event.frame).expect("frame is JSON");
            assert_eq!(frame, ServerMessage::Change(change.clone()));
        }

        let history = store.topic_history("payments", 10).await.expect("history");
        let summary: Vec<(u64, u64, &str)> = history
            .iter()
            .map(|h| (h.seq, h.version, h.commit.as_str()))
            .collect();
        assert_eq!(summary, [(3, 2, "c2"), (1, 1, "c1")]);
        assert_eq!(history[0].message, "commit c2");
        assert_eq!(history[0].files.len(), 1);
        assert_eq!(history[0].files[0].path, "payments/app.toml");
        assert_eq!(history[0].files[0].status, FileStatus::Modified);
        let latest = store.topic_history("payments", 1).await.expect("history");
        assert_eq!(latest.iter().map(|h| h.seq).collect::<Vec<_>>(), [3]);
        assert!(store
            .topic_history("nope", 10)
            .await
            .expect("history")
            .is_empty());
    }

    pub async fn events_after_pages_through_the_log_in_order(store: Arc<dyn Store>) {
        for i in 1..=7 {
            let topic = if i % 2 == 0 { "even" } else { "odd" };
            let content = format!("n = {i}\n");
            store
                .publish(&outcome(
                    "cfg",
                    &format!("c{i}"),
                    vec![(topic, vec![added("x.toml", content.as_bytes())])],
                ))
                .await
                .expect("publish");
        }
        let mut after = 0;
        let mut pages = Vec::new();
        loop {
            let page = store.events_after(after, 3).await.expect("events");
            if page.is_empty() {
                break;
            }
            after = page.last().map_or(after, |e| e.seq);
            pages.push(page.iter().map(|e| e.seq).collect::<Vec<_>>());
        }
        assert_eq!(pages, [vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        let tail = store.events_after(5, 100).await.expect("events");
        let tail: Vec<(u64, &str)> = tail.iter().map(|e| (e.seq, e.topic.as_str())).collect();
        assert_eq!(tail, [(6, "even"), (7, "odd")]);
        assert!(store.events_after(7, 100).await.expect("events").is_empty());
    }

    pub async fn snapshots_follow_adds_modifies_renames_and_deletes(store: Arc<dyn Store>) {
        let binary: &[u8] = &[0, 159, 146, 150, 0];
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![
                    (
                        "app",
                        vec![
                            added("app/a.toml", b"a = 1\n"),
                            added("app/b.toml", b"b = 1\n"),
                            added("app/blob.bin", binary),
                        ],
                    ),
                    ("other", vec![added("other/x", b"x")]),
                ],
            ))
            .await
            .expect("publish c1");
        let (head, snaps) = store.snapshots(&|t| t == "app").await.expect("snapshots");
        assert_eq!(head, 2);
        assert_eq!(snaps.len(), 1);
        assert_eq!((snaps[0].version, snaps[0].seq), (1, 1));
        assert_eq!(
            snapshot_files(&snaps[0]),
            owned(&[
                ("app/a.toml", b"a = 1\n"),
                ("app/b.toml", b"b = 1\n"),
                ("app/blob.bin", binary),
            ])
        );

        store
            .publish(&outcome(
                "cfg",
                "c2",
                vec![(
                    "app",
                    vec![
                        modified("app/a.toml", b"a = 2\n"),
                        renamed("app/b.toml", "app/c.toml", b"b = 1\n"),
                    ],
                )],
            ))
            .await
            .expect("publish c2");
        store
            .publish(&outcome(
                "cfg",
                "c3",
                vec![("app", vec![deleted("app/blob.bin")])],
            ))
            .await
            .expect("publish c3");

        let (head, snaps) = store.snapshots(&|_| true).await.expect("snapshots");
        assert_eq!(head, 4);
        let names: Vec<&str> = snaps.iter().map(|s| s.topic.as_str()).collect();
        assert_eq!(names, ["app", "other"]);
        let app = &snaps[0];
        assert_eq!((app.version, app.seq, app.commit.as_str()), (3, 4, "c3"));
        assert_eq!(
            snapshot_files(app),
            owned(&[("app/a.toml", b"a = 2\n"), ("app/c.toml", b"b = 1\n")])
        );
        assert_eq!(snapshot_files(&snaps[1]), owned(&[("other/x", b"x")]));

        let (head, none) = store.snapshots(&|_| false).await.expect("snapshots");
        assert_eq!((head, none.len()), (4, 0));
    }

    /// More topics than one query binds: every snapshot still carries its own files, and the
    /// filter decides which topics are read.
    pub async fn snapshots_of_many_topics_carry_each_topics_files(store: Arc<dyn Store>) {
        let names: Vec<String> = (0..1_203).map(|i| format!("t{i:04}")).collect();
        let topics = names
            .iter()
            .map(|n| {
                let path = format!("{n}/c.toml");
                (
                    n.as_str(),
                    vec![added(&path, format!("n = \"{n}\"\n").as_bytes())],
                )
            })
            .collect();
        store
            .publish(&outcome("cfg", "c1", topics))
            .await
            .expect("publish");
        let (head, all) = store.snapshots(&|_| true).await.expect("snapshots");
        assert_eq!(head, 1_203);
        assert_eq!(all.len(), 1_203);
        for snapshot in &all {
            assert_eq!(
                snapshot_files(snapshot),
                vec![(
                    format!("{}/c.toml", snapshot.topic),
                    format!("n = \"{}\"\n", snapshot.topic).into_bytes()
                )],
            );
        }
        let (_, some) = store
            .snapshots(&|t| t.ends_with('7'))
            .await
            .expect("filtered snapshots");
        assert_eq!(some.len(), 120);
        assert!(some
            .iter()
            .all(|s| s.topic.ends_with('7') && s.files.len() == 1));
    }

    pub async fn acks_are_checked_against_the_topic_version(store: Arc<dyn Store>) {
        for commit in ["c1", "c2"] {
            store
                .publish(&outcome(
                    "cfg",
                    commit,
                    vec![("payments", vec![added("p.toml", commit.as_bytes())])],
                ))
                .await
                .expect("publish");
        }
        let ack = |instance: &'static str, topic: &'static str, version, status, error| {
            let store = store.clone();
            async move {
                store
                    .record_ack(instance, topic, version, status, error)
                    .await
                    .expect("record_ack")
            }
        };
        assert_eq!(
            ack("web-1", "nope", 1, AckStatus::Applied, None).await,
            Err(AckRejection::UnknownTopic)
        );
        assert_eq!(
            ack("web-1", "payments", 0, AckStatus::Applied, None).await,
            Err(AckRejection::UnknownVersion { current: 2 })
        );
        assert_eq!(
            ack("web-1", "payments", 3, AckStatus::Applied, None).await,
            Err(AckRejection::UnknownVersion { current: 2 })
        );
        assert!(
            store.acks().await.expect("acks").is_empty(),
            "refused acks are not kept"
        );

        assert_eq!(
            ack("web-1", "payments", 1, AckStatus::Applied, None).await,
            Ok(())
        );
        // The latest word of an instance on a topic is the one that counts.
        assert_eq!(
            ack("web-1", "payments", 2, AckStatus::Failed, Some("bad port")).await,
            Ok(())
        );
        assert_eq!(
            ack("web-2", "payments", 2, AckStatus::Applied, None).await,
            Ok(())
        );
        // A late ack for an older version does not move an instance back in the rollout.
        assert_eq!(
            ack("web-2", "payments", 1, AckStatus::Applied, None).await,
            Ok(())
        );

        let acks: Vec<(String, u64, AckStatus, Option<String>)> = store
            .acks()
            .await
            .expect("acks")
            .into_iter()
            .map(|a| (a.instance, a.version, a.status, a.error))
            .collect();
        assert_eq!(
            acks,
            [
                (
                    "web-1".into(),
                    2,
                    AckStatus::Failed,
                    Some("bad port".into())
                ),
                ("web-2".into(), 2, AckStatus::Applied, None),
            ]
        );
        let of_web_2 = store.acks_of("web-2").await.expect("acks_of");
        assert_eq!(of_web_2.len(), 1);
        assert_eq!(
            (of_web_2[0].topic.as_str(), of_web_2[0].version),
            ("payments", 2)
        );
        assert!(store.acks_of("web-9").await.expect("acks_of").is_empty());
    }

    /// The epoch is made with the store, kept across reopenings, and replaced by exactly one
    /// rotation however many callers saw the same old epoch.
    pub async fn the_log_epoch_rotates_once_from_a_given_epoch(store: Arc<dyn Store>) {
        let first = store.epoch().await.expect("epoch");
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first}");
        assert_eq!(store.epoch().await.expect("epoch"), first, "stable");
        let second = store.rotate_epoch(&first).await.expect("rotate");
        assert_ne!(second, first);
        // A second replica that noticed the same restore finds the rotation done.
        assert_eq!(store.rotate_epoch(&first).await.expect("rotate"), second);
        assert_eq!(store.epoch().await.expect("epoch"), second);
        // Positions are untouched: the log goes on numbering where it was.
        store
            .publish(&outcome("cfg", "c1", vec![("t", vec![added("x", b"1")])]))
            .await
            .expect("publish");
        assert_eq!(store.head_seq().await.expect("head"), 1);
    }

    pub async fn remember_delivery_detects_a_redelivery(store: Arc<dyn Store>) {
        let seen = |repo: &'static str, provider: &'static str, id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .remember_delivery(repo, provider, id)
                    .await
                    .expect("remember_delivery")
            }
        };
        assert!(seen("cfg", "github", "d-1").await, "first delivery is new");
        assert!(
            !seen("cfg", "github", "d-1").await,
            "the same id again is a redelivery"
        );
        assert!(seen("cfg", "gitlab", "d-1").await, "ids are per provider");
        assert!(seen("other", "github", "d-1").await, "ids are per repo");
        assert!(seen("cfg", "github", "d-2").await);
    }

    pub async fn trim_keeps_the_most_recent_events_and_all_topic_state(store: Arc<dyn Store>) {
        for i in 1..=5 {
            let topic = if i % 2 == 0 { "even" } else { "odd" };
            store
                .publish(&outcome(
                    "cfg",
                    &format!("c{i}"),
                    vec![(topic, vec![added("x", format!("{i}").as_bytes())])],
                ))
                .await
                .expect("publish");
        }
        let before = store.snapshots(&|_| true).await.expect("snapshots");
        assert_eq!(store.trim(2, 0).await.expect("trim"), 3);
        let kept: Vec<u64> = store
            .events_after(0, 100)
            .await
            .expect("events")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(kept, [4, 5]);
        assert_eq!(store.oldest_seq().await.expect("oldest"), Some(4));
        assert_eq!(store.head_seq().await.expect("head"), 5);
        assert_eq!(store.trim(2, 0).await.expect("trim"), 0);
        assert_eq!(
            store.trim(0, 60_000).await.expect("trim"),
            0,
            "nothing is a minute old"
        );
        assert_eq!(store.trim(0, 0).await.expect("trim"), 0);

        let after = store.snapshots(&|_| true).await.expect("snapshots");
        assert_eq!(after, before, "retention never touches topic state");
        let next = store
            .publish(&outcome("cfg", "c6", vec![("odd", vec![added("x", b"6")])]))
            .await
            .expect("publish");
        assert_eq!(seqs(&next), [(6, "odd", 4, 3)]);
    }

    pub async fn rejections_are_written_and_cleared_by_publish(store: Arc<dyn Store>) {
        let held = SyncOutcome {
            rejected: vec![rejection("payments", "c0", "c1", Some(3))],
            ..outcome("cfg", "c1", vec![])
        };
        assert!(store.publish(&held).await.expect("publish").is_empty());
        assert_eq!(
            store.head_seq().await.expect("head"),
            0,
            "a rejection takes no seq"
        );
        assert_eq!(
            store.repo_head("cfg").await.expect("repo_head").as_deref(),
            Some("c1")
        );
        let found = store.rejections("cfg").await.expect("rejections");
        assert_eq!(found.len(), 1);
        let r = &found[0];
        assert_eq!(
            (
                r.topic.as_str(),
                r.base_commit.as_str(),
                r.commit.as_str(),
                r.line
            ),
            ("payments", "c0", "c1", Some(3))
        );
        assert_eq!(
            (r.path.as_str(), r.message.as_str()),
            ("payments/app.toml", "expected `=`")
        );
        assert_eq!(r.at_ms, 1_700_000_000_000);
        assert!(store
            .rejections("other")
            .await
            .expect("rejections")
            .is_empty());

        // Still broken at the next commit: the same row, still diffed from the last good commit.
        let still = SyncOutcome {
            rejected: vec![rejection("payments", "c1", "c2", None)],
            ..outcome("cfg", "c2", vec![])
        };
        store.publish(&still).await.expect("publish");
        let found = store.rejections("cfg").await.expect("rejections");
        assert_eq!(found.len(), 1);
        assert_eq!(
            (
                found[0].base_commit.as_str(),
                found[0].commit.as_str(),
                found[0].line
            ),
            ("c0", "c2", None)
        );

        let fixed = SyncOutcome {
            cleared: vec!["payments".into()],
            ..outcome(
                "cfg",
                "c3",
                vec![("payments", vec![added("payments/app.toml", b"port = 1\n")])],
            )
        };
        let published = store.publish(&fixed).await.expect("publish");
        assert_eq!(seqs(&published), [(1, "payments", 1, 0)]);
        assert!(store
            .rejections("cfg")
            .await
            .expect("rejections")
            .is_empty());
    }

    pub async fn instances_follow_their_newest_connection_and_reset_node(store: Arc<dyn Store>) {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let before = now_ms();
        store
            .instance_connected("web-1", Some("web"), &labels, "conn-1", "node-a")
            .await
            .expect("connected");
        let connected_at = store.instances().await.expect("instances")[0].connected_at_ms;
        assert!(
            connected_at.is_some_and(|t| t >= before && t <= now_ms()),
            "{connected_at:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        store
            .instance_subscriptions("web-1", &["payments".into(), "search/*".into()])
            .await
            .expect("subscriptions");
        store
            .instance_connected("web-2", None, &BTreeMap::new(), "conn-2", "node-b")
            .await
            .expect("connected");

        let all = store.instances().await.expect("instances");
        assert_eq!(all.len(), 2);
        let web1 = &all[0];
        assert_eq!(web1.id, "web-1");
        assert_eq!(web1.app.as_deref(), Some("web"));
        assert_eq!(web1.labels, labels);
        assert_eq!(web1.subscriptions, ["payments", "search/*"]);
        assert_eq!(web1.node.as_deref(), Some("node-a"));
        assert!(web1.connected);
        // A subscribe moves last_seen, not the time the connection was accepted.
        assert_eq!(web1.connected_at_ms, connected_at);
        assert!(Some(web1.last_seen_ms) > connected_at);
        assert_eq!((all[1].id.as_str(), all[1].app.as_deref()), ("web-2", None));

        let connected = |store: Arc<dyn Store>, id: &'static str| async move {
            store
                .instances()
                .await
                .expect("instances")
                .into_iter()
                .find(|i| i.id == id)
                .map(|i| i.connected)
        };
        // A newer connection took web-1 over: the old one closing does not disconnect it.
        store
            .instance_connected("web-1", Some("web"), &labels, "conn-3", "node-a")
            .await
            .expect("connected");
        store
            .instance_disconnected("web-1", "conn-1")
            .await
            .expect("disconnected");
        assert_eq!(connected(store.clone(), "web-1").await, Some(true));
        store
            .instance_disconnected("web-1", "conn-3")
            .await
            .expect("disconnected");
        assert_eq!(connected(store.clone(), "web-1").await, Some(false));

        store
            .instance_connected("web-1", Some("web"), &labels, "conn-4", "node-a")
            .await
            .expect("connected");
        store.reset_node("node-a").await.expect("reset_node");
        assert_eq!(connected(store.clone(), "web-1").await, Some(false));
    }

    pub async fn expire_instances_forgets_long_disconnected_ones_with_their_acks(
        store: Arc<dyn Store>,
    ) {
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![("payments", vec![added("payments/app.toml", b"port = 1\n")])],
            ))
            .await
            .expect("publish");
        for id in ["gone", "late", "live"] {
            store
                .instance_connected(id, None, &BTreeMap::new(), &format!("conn-{id}"), "node-a")
                .await
                .expect("connected");
            store
                .record_ack(id, "payments", 1, AckStatus::Applied, None)
                .await
                .expect("record_ack")
                .expect("ack accepted");
        }
        let ids = |store: Arc<dyn Store>| async move {
            let instances = store.instances().await.expect("instances");
            let acks = store.acks().await.expect("acks");
            (
                instances.into_iter().map(|i| i.id).collect::<Vec<_>>(),
                acks.into_iter().map(|a| a.instance).collect::<Vec<_>>(),
            )
        };
        store
            .instance_disconnected("gone", "conn-gone")
            .await
            .expect("disconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cutoff = now_ms();
        tokio::time::sleep(Duration::from_millis(20)).await;
        store
            .instance_disconnected("late", "conn-late")
            .await
            .expect("disconnected");

        assert_eq!(store.expire_instances(cutoff).await.expect("expire"), 1);
        let kept = vec!["late".to_string(), "live".to_string()];
        assert_eq!(ids(store.clone()).await, (kept.clone(), kept));
        assert!(store.acks_of("gone").await.expect("acks_of").is_empty());
        assert_eq!(store.expire_instances(cutoff).await.expect("expire"), 0);

        // However old its last word, a connected instance stays.
        let later = now_ms() + 60_000;
        assert_eq!(store.expire_instances(later).await.expect("expire"), 1);
        let live = vec!["live".to_string()];
        assert_eq!(ids(store.clone()).await, (live.clone(), live.clone()));

        // A restart's reset is when its instances left: expiry counts from it, not from when
        // they connected (else a long-connected instance would be forgotten at once).
        let before_reset = now_ms();
        store.reset_node("node-a").await.expect("reset_node");
        assert_eq!(
            store.expire_instances(before_reset).await.expect("expire"),
            0
        );
        let instances = store.instances().await.expect("instances");
        assert!(!instances[0].connected);
        assert!(instances[0].last_seen_ms >= before_reset);
        assert_eq!(ids(store.clone()).await, (live.clone(), live));
    }

    pub async fn check_passes_on_a_healthy_store(store: Arc<dyn Store>) {
        store.check().await.expect("a fresh store is healthy");
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![("payments", vec![added("payments/app.toml", b"port = 1\n")])],
            ))
            .await
            .expect("publish");
        store.check().await.expect("still healthy after a publish");
    }

    pub async fn the_audit_log_keeps_the_newest_and_filters_by_action(store: Arc<dyn Store>) {
        let entry = |action: &str, n: i64| AuditEntry {
            at_ms: 1_000 + n,
            actor: "operator".into(),
            action: action.into(),
            target: format!("t{n}"),
            outcome: "ok".into(),
            detail: serde_json::json!({ "n": n, "why": "a reason with 'quotes' and ünïcode" }),
        };
        let mut ids = Vec::new();
        for n in 0..6 {
            let action = if n % 2 == 0 { "pin" } else { "sync" };
            ids.push(
                store
                    .record_audit(&entry(action, n), 4)
                    .await
                    .expect("record"),
            );
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let all = store
            .audit(&AuditQuery {
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .expect("audit");
        // The four newest, newest first, exactly as written.
        let targets: Vec<&str> = all.iter().map(|r| r.entry.target.as_str()).collect();
        assert_eq!(targets, ["t5", "t4", "t3", "t2"]);
        assert_eq!(all[0].entry, entry("sync", 5));
        let pins = store
            .audit(&AuditQuery {
                action: Some("pin".into()),
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .expect("audit pins");
        let targets: Vec<&str> = pins.iter().map(|r| r.entry.target.as_str()).collect();
        assert_eq!(targets, ["t4", "t2"]);
        let older = store
            .audit(&AuditQuery {
                before: Some(all[1].id),
                limit: 1,
                ..AuditQuery::default()
            })
            .await
            .expect("audit page");
        assert_eq!(older.len(), 1);
        assert_eq!(older[0].entry.target, "t3");
    }

    pub async fn pins_list_their_newest_held_changes_and_unpin_marks_a_resync(
        store: Arc<dyn Store>,
    ) {
        store
            .publish(&outcome("cfg", "c1", vec![("a", vec![added("a/x", b"1")])]))
            .await
            .expect("publish");
        let pin = Pin {
            topic: "a".into(),
            repo: "cfg".into(),
            version: 1,
            by: "operator".into(),
            reason: "freeze".into(),
            at_ms: 1_700_000_000_000,
            held: Vec::new(),
            held_total: 0,
        };
        assert!(store.pin(&pin).await.expect("pin"));
        let other = Pin {
            by: "someone else".into(),
            ..pin.clone()
        };
        assert!(
            !store.pin(&other).await.expect("pin again"),
            "the first pin stays"
        );
        assert_eq!(store.pins().await.expect("pins"), vec![pin.clone()]);

        let held = |n: u32| HeldChange {
            commit: format!("c{n}"),
            author: "Ada <ada@example.com>".into(),
            message: format!("commit c{n}"),
            at_ms: i64::from(n),
            files: 1,
        };
        for n in 2..=4 {
            let mut sync = outcome("cfg", &format!("c{n}"), vec![]);
            // A held change of a topic without a pin is dropped, never makes a pin.
            sync.held = vec![("a".into(), held(n)), ("b".into(), held(n))];
            sync.max_held = 2;
            store.publish(&sync).await.expect("publish");
        }
        let pins = store.pins().await.expect("pins");
        assert_eq!(pins.len(), 1, "{pins:?}");
        assert_eq!(
            pins[0].held,
            vec![held(3), held(4)],
            "the newest two, oldest first"
        );
        assert_eq!(pins[0].held_total, 3);
        assert!(store.resyncs("cfg").await.expect("resyncs").is_empty());

        let removed = store.unpin("a").await.expect("unpin");
        assert_eq!(removed.map(|p| p.held_total), Some(3));
        assert!(store.pins().await.expect("pins").is_empty());
        assert_eq!(store.unpin("a").await.expect("unpin again"), None);
        let resyncs = store.resyncs("cfg").await.expect("resyncs");
        assert_eq!(resyncs.len(), 1);
        assert_eq!((resyncs[0].topic.as_str(), resyncs[0].due), ("a", true));
        assert!(store.resyncs("other").await.expect("resyncs").is_empty());

        // A sync that compared the topic with git clears the mark, with or without a change.
        let mut sync = outcome("cfg", "c5", vec![]);
        sync.resynced = vec!["a".into()];
        store.publish(&sync).await.expect("publish");
        assert!(store.resyncs("cfg").await.expect("resyncs").is_empty());
    }

    pub async fn a_rollback_keeps_the_repo_head_and_records_what_it_restored(
        store: Arc<dyn Store>,
    ) {
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![("a", vec![added("a/x", b"one"), added("a/y", b"y")])],
            ))
            .await
            .expect("publish");
        store
            .publish(&outcome(
                "cfg",
                "c2",
                vec![(
                    "a",
                    vec![modified("a/x", b"two!"), deleted("a/y"), added("a/z", b"z")],
                )],
            ))
            .await
            .expect("publish");
        let logged = store
            .change_at("a", 1)
            .await
            .expect("change_at")
            .expect("v1 logged");
        assert_eq!((logged.version, logged.files.len()), (1, 2));
        assert_eq!(store.change_at("a", 3).await.expect("change_at"), None);

        let rewound = rewind::files_at(store.as_ref(), "a", 1)
            .await
            .expect("rewind");
        assert_eq!(
            (rewound.current_version, rewound.commit.as_str()),
            (2, "c1")
        );
        let target: Vec<(&str, &[u8])> = rewound
            .target
            .iter()
            .map(|(p, f)| (p.as_str(), f.content.as_slice()))
            .collect();
        assert_eq!(
            target,
            [("a/x", b"one".as_slice()), ("a/y", b"y".as_slice())]
        );
        let files = rewind::change_to(&rewound.current, &rewound.target);
        let statuses: Vec<(&str, FileStatus)> =
            files.iter().map(|f| (f.path.as_str(), f.status)).collect();
        assert_eq!(
            statuses,
            [
                ("a/x", FileStatus::Modified),
                ("a/y", FileStatus::Added),
                ("a/z", FileStatus::Deleted)
            ]
        );
        let why = Rollback {
            rollback_of: 1,
            requested_by: "operator".into(),
            reason: "two broke it".into(),
        };
        let mut back = outcome("cfg", &rewound.commit, vec![("a", files)]);
        back.rollback = Some(why.clone());
        let changes = store.publish(&back).await.expect("publish rollback");
        assert_eq!(seqs(&changes), [(3, "a", 3, 2)]);
        // git's head stays where the next diff starts; the topic differs from it until then.
        assert_eq!(
            store.repo_head("cfg").await.expect("head").as_deref(),
            Some("c2")
        );
        let resyncs = store.resyncs("cfg").await.expect("resyncs");
        assert_eq!((resyncs.len(), resyncs[0].due), (1, false));
        let history = store.topic_history("a", 10).await.expect("history");
        assert_eq!(history[0].rollback, Some(why));
        assert_eq!(history[1].rollback, None);
        let (_, snapshots) = store.snapshots(&|t| t == "a").await.expect("snapshots");
        assert_eq!(
            snapshot_files(&snapshots[0]),
            owned(&[("a/x", b"one"), ("a/y", b"y")])
        );
    }

    pub async fn lock_repo_lets_one_holder_at_a_time(store: Arc<dyn Store>) {
        let held = store.lock_repo("cfg").await.expect("lock_repo");
        let mut waiting = lock_in_background(&store, "cfg");
        assert!(
            tokio::time::timeout(EXCLUDED, &mut waiting).await.is_err(),
            "a second holder of `cfg` must wait"
        );
        let other = tokio::time::timeout(WAIT, store.lock_repo("other"))
            .await
            .expect("another repo is not blocked")
            .expect("lock_repo");
        drop(other);
        drop(held);
        let _next = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the waiter gets `cfg` once it is released")
            .expect("lock task");
    }

    /// 10,000 instances written through the store; one page of them is read with the right
    /// rows and the count of all that match, for each filter the dashboard offers.
    pub async fn instances_page_filters_and_counts_ten_thousand(store: Arc<dyn Store>) {
        let n = 10_000usize;
        // Written by a few tasks at once: PostgreSQL round trips overlap, SQLite queues them.
        let mut tasks = Vec::new();
        for part in 0..4usize {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in (part..n).step_by(4) {
                    let id = format!("inst-{i:05}");
                    let labels = BTreeMap::from([
                        ("zone".to_string(), format!("z{}", i % 4)),
                        (
                            "team".to_string(),
                            if i == 77 {
                                "a\"b%_".into()
                            } else {
                                "core".into()
                            },
                        ),
                    ]);
                    let app = format!("app{}", i % 10);
                    store
                        .instance_connected(&id, Some(&app), &labels, &format!("c{i}"), "node-a")
                        .await
                        .expect("connected");
                    if i % 3 == 0 {
                        store
                            .instance_disconnected(&id, &format!("c{i}"))
                            .await
                            .expect("disconnected");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
        let page = |filter: store::InstanceFilter, after: Option<&'static str>, limit: u32| {
            let store = store.clone();
            async move {
                let (rows, total) = store
                    .instances_page(&filter, after, limit)
                    .await
                    .expect("instances_page");
                let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
                (ids, total, rows)
            }
        };
        let all = store::InstanceFilter::default();
        let (ids, total, rows) = page(all.clone(), None, 100).await;
        assert_eq!(total, 10_000);
        let expected: Vec<String> = (0..100).map(|i| format!("inst-{i:05}")).collect();
        assert_eq!(ids, expected);
        assert_eq!(rows[3].app.as_deref(), Some("app3"));
        assert_eq!(rows[3].labels["zone"], "z3");
        assert!(!rows[3].connected && rows[4].connected);
        let (ids, total, _) = page(all.clone(), Some("inst-09950"), 100).await;
        assert_eq!(total, 10_000, "the count ignores `after`");
        let expected: Vec<String> = (9951..10_000).map(|i| format!("inst-{i:05}")).collect();
        assert_eq!(ids, expected);

        let by_app = store::InstanceFilter {
            app: Some("app3".into()),
            ..Default::default()
        };
        let (ids, total, _) = page(by_app, None, 5).await;
        assert_eq!(total, 1000);
        assert_eq!(
            ids,
            [
                "inst-00003",
                "inst-00013",
                "inst-00023",
                "inst-00033",
                "inst-00043"
            ]
        );

        // i % 4 == 1 and i % 10 == 3: i = 13 (mod 20).
        let zone_and_app = store::InstanceFilter {
            app: Some("app3".into()),
            label: Some(("zone".into(), "z1".into())),
            ..Default::default()
        };
        let (ids, total, _) = page(zone_and_app, Some("inst-00013"), 2).await;
        assert_eq!(total, 500);
        assert_eq!(ids, ["inst-00033", "inst-00053"]);

        let offline = store::InstanceFilter {
            connected: Some(false),
            ..Default::default()
        };
        let (ids, total, _) = page(offline, None, 3).await;
        assert_eq!(total, 3334);
        assert_eq!(ids, ["inst-00000", "inst-00003", "inst-00006"]);

        let text = store::InstanceFilter {
            text: Some("ST-0999".into()),
            ..Default::default()
        };
        let (ids, total, _) = page(text, None, 100).await;
        assert_eq!(total, 10, "ids are searched without case");
        assert_eq!(ids.first().map(String::as_str), Some("inst-09990"));

        // Quotes, `%` and `_` in a filter are literal characters, not wildcards.
        let odd = store::InstanceFilter {
            label: Some(("team".into(), "a\"b%_".into())),
            ..Default::default()
        };
        let (ids, total, _) = page(odd, None, 100).await;
        assert_eq!(
            (ids.as_slice(), total),
            (["inst-00077".to_string()].as_slice(), 1)
        );
        for wildcard in ["%", "_", "a%"] {
            let f = store::InstanceFilter {
                label: Some(("team".into(), wildcard.into())),
                ..Default::default()
            };
            assert_eq!(page(f, None, 10).await.1, 0, "label value {wildcard}");
            let f = store::InstanceFilter {
                text: Some(format!("inst{wildcard}")),
                ..Default::default()
            };
            assert_eq!(page(f, None, 10).await.1, 0, "text {wildcard}");
        }

        // The acks of a page's instances only.
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![("payments", vec![added("a", b"1")])],
            ))
            .await
            .expect("publish");
        for id in ["inst-00001", "inst-00002", "inst-00500"] {
            store
                .record_ack(id, "payments", 1, AckStatus::Applied, None)
                .await
                .expect("ack")
                .expect("accepted");
        }
        let acks = store
            .acks_for(&["inst-00001".into(), "inst-00500".into(), "ghost".into()])
            .await
            .expect("acks_for");
        let who: Vec<&str> = acks.iter().map(|a| a.instance.as_str()).collect();
        assert_eq!(who, ["inst-00001", "inst-00500"]);
    }

    /// The grouped reads the rollout board is computed from.
    pub async fn rollout_groups_count_alike_instances_and_acks_together(store: Arc<dyn Store>) {
        store
            .publish(&outcome(
                "cfg",
                "c1",
                vec![("payments", vec![added("a", b"1")])],
            ))
            .await
            .expect("publish");
        let none = BTreeMap::new();
        for (id, connected) in [("p1", true), ("p2", true), ("p3", false)] {
            store
                .instance_connected(id, None, &none, id, "node-a")
                .await
                .expect("connected");
            store
                .instance_subscriptions(id, &["payments".into()])
                .await
                .expect("subscriptions");
            if !connected {
                store.instance_disconnected(id, id).await.expect("gone");
            }
        }
        for id in ["p1", "p3"] {
            store
                .record_ack(id, "payments", 1, AckStatus::Applied, None)
                .await
                .expect("ack")
                .expect("accepted");
        }
        let (subscribers, acks) = store.rollout_groups().await.expect("rollout_groups");
        let mut subscribers: Vec<(bool, u64)> =
            subscribers.iter().map(|g| (g.connected, g.count)).collect();
        subscribers.sort();
        assert_eq!(subscribers, [(false, 1), (true, 2)]);
        let mut acks: Vec<(&str, u64, bool, u64)> = acks
            .iter()
            .map(|a| (a.topic.as_str(), a.version, a.connected, a.count))
            .collect();
        acks.sort();
        assert_eq!(acks, [("payments", 1, false, 1), ("payments", 1, true, 1)]);
    }

    /// A logged version reads back whole, and each file's content before it is found through
    /// adds, modifications, renames and deletions, or said to be unknown once trimmed away.
    pub async fn topic_change_and_file_before_read_the_log(store: Arc<dyn Store>) {
        let steps = vec![
            vec![added("a.toml", b"a = 1\n"), added("b.toml", b"b = 1\n")],
            vec![modified("a.toml", b"a = 2\n")],
            vec![renamed("b.toml", "c.toml", b"b = 1\n")],
            vec![deleted("a.toml"), modified("c.toml", b"c = 3\n")],
            vec![added("a.toml", b"a = 5\n")],
        ];
        for (i, files) in steps.into_iter().enumerate() {
            store
                .publish(&outcome(
                    "cfg",
                    &format!("c{}", i + 1),
                    vec![("svc", files)],
                ))
                .await
                .expect("publish");
            // Another topic's changes in between must not be mistaken for this one's.
            store
                .publish(&outcome(
                    "cfg",
                    &format!("o{}", i + 1),
                    vec![("other", vec![added("a.toml", b"other")])],
                ))
                .await
                .expect("publish other");
        }
        let v2 = store
            .topic_change("svc", 2)
            .await
            .expect("topic_change")
            .expect("version 2 is logged");
        assert_eq!((v2.change.version, v2.change.commit.as_str()), (2, "c2"));
        assert_eq!(v2.change.files[0].content.as_deref(), Some("a = 2\n"));
        assert!(v2.created_at_ms > 0);
        assert!(store.topic_change("svc", 6).await.expect("read").is_none());

        let before = |path: &'static str, version: u64| {
            let store = store.clone();
            async move {
                store
                    .file_before("svc", path, version)
                    .await
                    .expect("file_before")
            }
        };
        use store::FileBefore::{Absent, Content, Unknown};
        assert_eq!(
            before("a.toml", 1).await,
            Absent,
            "nothing before the first version"
        );
        assert_eq!(before("a.toml", 2).await, Content(b"a = 1\n".to_vec()));
        assert_eq!(before("a.toml", 4).await, Content(b"a = 2\n".to_vec()));
        assert_eq!(before("a.toml", 5).await, Absent, "deleted in version 4");
        assert_eq!(before("b.toml", 3).await, Content(b"b = 1\n".to_vec()));
        assert_eq!(
            before("b.toml", 4).await,
            Absent,
            "renamed away in version 3"
        );
        assert_eq!(before("c.toml", 4).await, Content(b"b = 1\n".to_vec()));
        assert_eq!(before("c.toml", 3).await, Absent);
        assert_eq!(before("nope.toml", 5).await, Absent);

        // Versions 1 and 2 (and what sat between) leave the log: what a.toml held before
        // version 4 is no longer known; c.toml's history is still whole from version 3.
        store.trim(6, 0).await.expect("trim");
        assert!(store.topic_change("svc", 2).await.expect("read").is_none());
        assert_eq!(before("a.toml", 4).await, Unknown);
        assert_eq!(before("c.toml", 5).await, Content(b"c = 3\n".to_vec()));
    }

    fn new_command(id: &str, now: i64, deadline_ms: i64) -> NewCommand {
        NewCommand {
            id: id.into(),
            name: "refresh-cache".into(),
            args: serde_json::json!({"scope": "all"}),
            target: serde_json::json!({"all": true}),
            created_by: "operator".into(),
            created_at_ms: now,
            deadline_ms,
        }
    }

    pub async fn commands_track_each_instance_and_keep_the_first_verdict(store: Arc<dyn Store>) {
        use confcast::protocol::CommandStatus;
        let now = super::now_ms();
        let targeted = ["web-1".to_string(), "web-2".to_string()];
        store
            .create_command(&new_command("c1", now, now + 60_000), &targeted, 10, 0)
            .await
            .expect("create")
            .expect("under the cap");
        let (c, rows) = store.command("c1", now).await.expect("read").expect("c1");
        assert_eq!(c.args, serde_json::json!({"scope": "all"}));
        assert_eq!((c.counts.targeted, c.counts.pending), (2, 2));
        assert!(rows
            .iter()
            .all(|r| r.status == "pending" && r.delivered_at_ms.is_none()));

        // An ack before delivery is refused and changes nothing.
        let refused = store
            .record_command_ack("c1", "web-1", CommandStatus::Done, None, now)
            .await
            .expect("ack");
        assert_eq!(refused, CommandAckOutcome::NotDelivered);

        // Delivered twice (two connections), acked once; the second verdict does not count.
        assert!(store
            .command_delivered("c1", "web-1", now + 1)
            .await
            .expect("deliver"));
        assert!(store
            .command_delivered("c1", "web-1", now + 2)
            .await
            .expect("deliver"));
        let first = store
            .record_command_ack("c1", "web-1", CommandStatus::Failed, Some("boom"), now + 3)
            .await
            .expect("ack");
        assert_eq!(first, CommandAckOutcome::Recorded);
        let again = store
            .record_command_ack("c1", "web-1", CommandStatus::Done, None, now + 4)
            .await
            .expect("ack");
        assert_eq!(
            again,
            CommandAckOutcome::AlreadyFinished(CommandStatus::Failed)
        );
        assert!(
            !store
                .command_delivered("c1", "web-1", now + 5)
                .await
                .expect("deliver"),
            "an acked command is not delivered again"
        );
        // An instance that was not known at creation is added when it receives it.
        assert!(store
            .command_delivered("c1", "web-3", now + 6)
            .await
            .expect("deliver"));
        let (c, rows) = store
            .command("c1", now + 7)
            .await
            .expect("read")
            .expect("c1");
        assert_eq!(
            (
                c.counts.targeted,
                c.counts.pending,
                c.counts.delivered,
                c.counts.failed
            ),
            (3, 1, 1, 1)
        );
        let web1 = rows.iter().find(|r| r.instance == "web-1").expect("web-1");
        assert_eq!(web1.status, "failed");
        assert_eq!(web1.message.as_deref(), Some("boom"));
        assert_eq!(
            (web1.delivered_at_ms, web1.finished_at_ms),
            (Some(now + 1), Some(now + 3))
        );
        assert_eq!(web1.deliveries, 2);
        assert!(!c.expired && c.counts.expired == 0);

        // Past the deadline: no longer active, expired once, undelivered ones counted.
        let active = store.active_commands(now).await.expect("active");
        assert_eq!(
            active.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["c1"]
        );
        assert!(store
            .active_commands(now + 60_000)
            .await
            .expect("active")
            .is_empty());
        let expired = store.expire_commands(now + 60_000).await.expect("expire");
        assert_eq!(expired, vec![("c1".to_string(), 2)]);
        assert!(store
            .expire_commands(now + 60_001)
            .await
            .expect("expire")
            .is_empty());
        let (c, _) = store
            .command("c1", now + 60_000)
            .await
            .expect("read")
            .expect("c1");
        assert!(c.expired);
        assert_eq!(c.counts.expired, 2);
    }

    pub async fn commands_are_capped_listed_newest_first_and_kept_bounded(store: Arc<dyn Store>) {
        let now = super::now_ms();
        for id in ["a", "b"] {
            store
                .create_command(&new_command(id, now, now + 60_000), &[], 2, 3)
                .await
                .expect("create")
                .expect("under the cap");
        }
        let refused = store
            .create_command(&new_command("c", now, now + 60_000), &[], 2, 3)
            .await
            .expect("create");
        assert_eq!(refused, Err(CommandRefusal::TooManyActive { active: 2 }));
        assert!(
            store.command("c", now).await.expect("read").is_none(),
            "nothing stored"
        );
        assert_eq!(store.active_command_count(now).await.expect("count"), 2);
        assert_eq!(
            store
                .active_command_count(now + 60_000)
                .await
                .expect("count"),
            0
        );
        // The oldest beyond `keep` are forgotten, with their rows.
        for id in ["d", "e", "f"] {
            store
                .create_command(&new_command(id, now, now + 1), &["x".to_string()], 10, 3)
                .await
                .expect("create")
                .expect("under the cap");
        }
        let listed: Vec<String> = store
            .commands(10, now + 2)
            .await
            .expect("list")
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(listed, ["f", "e", "d"]);
        assert!(store.command("a", now).await.expect("read").is_none());
        assert_eq!(store.commands(1, now).await.expect("list").len(), 1);
    }

    fn connected(instance: &str, connection: &str) -> InstanceWrite {
        InstanceWrite::Connected {
            instance: instance.into(),
            app: Some("web".into()),
            labels: BTreeMap::from([("zone".to_string(), "eu-1".to_string())]),
            connection: connection.into(),
            node: "node-a".into(),
        }
    }

    fn subscriptions(instance: &str, patterns: &[&str]) -> InstanceWrite {
        InstanceWrite::Subscriptions {
            instance: instance.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn disconnected(instance: &str, connection: &str) -> InstanceWrite {
        InstanceWrite::Disconnected {
            instance: instance.into(),
            connection: connection.into(),
        }
    }

    fn ack(
        instance: &str,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<&str>,
    ) -> InstanceWrite {
        InstanceWrite::Ack {
            instance: instance.into(),
            topic: topic.into(),
            version,
            status,
            error: error.map(Into::into),
        }
    }

    pub async fn log_bounds_read_the_epoch_head_and_oldest_kept_together(store: Arc<dyn Store>) {
        let epoch = store.epoch().await.expect("epoch");
        let bounds = store.log_bounds().await.expect("log_bounds");
        assert_eq!(
            (bounds.epoch.as_str(), bounds.head, bounds.oldest),
            (epoch.as_str(), 0, None)
        );
        for commit in ["c1", "c2", "c3"] {
            store
                .publish(&outcome(
                    "cfg",
                    commit,
                    vec![("payments", vec![added("p.toml", commit.as_bytes())])],
                ))
                .await
                .expect("publish");
        }
        let bounds = store.log_bounds().await.expect("log_bounds");
        assert_eq!((bounds.head, bounds.oldest), (3, Some(1)));
        store.trim(1, 0).await.expect("trim");
        let rotated = store.rotate_epoch(&epoch).await.expect("rotate");
        let bounds = store.log_bounds().await.expect("log_bounds");
        assert_eq!(
            (bounds.epoch.as_str(), bounds.head, bounds.oldest),
            (rotated.as_str(), 3, Some(3))
        );
        assert_ne!(rotated, epoch);
        // The same as the three reads it replaces.
        assert_eq!(store.head_seq().await.expect("head"), bounds.head);
        assert_eq!(store.oldest_seq().await.expect("oldest"), bounds.oldest);
    }

    pub async fn a_write_batch_answers_each_write_and_keeps_each_instances_order(
        store: Arc<dyn Store>,
    ) {
        for commit in ["c1", "c2"] {
            store
                .publish(&outcome(
                    "cfg",
                    commit,
                    vec![("payments", vec![added("p.toml", commit.as_bytes())])],
                ))
                .await
                .expect("publish");
        }
        store
            .publish(&outcome(
                "cfg",
                "c3",
                vec![("billing", vec![added("b.toml", b"plans = 1\n")])],
            ))
            .await
            .expect("publish");
        assert!(store
            .write_batch(&[])
            .await
            .expect("empty batch")
            .is_empty());

        let unknown_version = Err(AckRejection::UnknownVersion { current: 2 });
        let batch = [
            // web-1's row, written over and over: only the order given leaves it like this.
            connected("web-1", "conn-1"),
            subscriptions("web-1", &["payments"]),
            subscriptions("web-1", &["payments", "billing"]),
            connected("web-1", "conn-2"),
            disconnected("web-1", "conn-1"),
            disconnected("web-1", "conn-2"),
            // web-2 connects again and stays; its older connection's end changes nothing.
            connected("web-2", "conn-3"),
            disconnected("web-2", "conn-old"),
            subscriptions("web-2", &["billing"]),
            // Acks: refused ones among good ones, for their senders only.
            ack("web-1", "payments", 2, AckStatus::Applied, None),
            ack("web-1", "nope", 1, AckStatus::Applied, None),
            ack("web-2", "payments", 3, AckStatus::Applied, None),
            ack("web-2", "payments", 0, AckStatus::Applied, None),
            // An older version never replaces a newer one, even in the same batch.
            ack("web-1", "payments", 1, AckStatus::Applied, None),
            // For one version, the latest verdict wins.
            ack("web-2", "payments", 2, AckStatus::Applied, None),
            ack("web-2", "payments", 2, AckStatus::Failed, Some("bad port")),
            ack("web-3", "billing", 1, AckStatus::Failed, Some("no plans")),
            ack("web-3", "billing", 1, AckStatus::Applied, None),
        ];
        let answers = store.write_batch(&batch).await.expect("write_batch");
        let mut expected = vec![Ok(()); batch.len()];
        expected[10] = Err(AckRejection::UnknownTopic);
        expected[11] = unknown_version.clone();
        expected[12] = unknown_version;
        assert_eq!(answers, expected);

        let instances: Vec<(String, bool, Vec<String>, Option<String>)> = store
            .instances()
            .await
            .expect("instances")
            .into_iter()
            .map(|i| (i.id, i.connected, i.subscriptions, i.app))
            .collect();
        let web = Some("web".to_string());
        assert_eq!(
            instances,
            [
                (
                    "web-1".into(),
                    false,
                    vec!["payments".into(), "billing".into()],
                    web.clone()
                ),
                ("web-2".into(), true, vec!["billing".into()], web),
            ],
            "web-3 only acked: an ack writes no instance row"
        );
        let acks: Vec<(String, String, u64, AckStatus, Option<String>)> = store
            .acks()
            .await
            .expect("acks")
            .into_iter()
            .map(|a| (a.instance, a.topic, a.version, a.status, a.error))
            .collect();
        assert_eq!(
            acks,
            [
                (
                    "web-1".into(),
                    "payments".into(),
                    2,
                    AckStatus::Applied,
                    None
                ),
                (
                    "web-2".into(),
                    "payments".into(),
                    2,
                    AckStatus::Failed,
                    Some("bad port".into())
                ),
                (
                    "web-3".into(),
                    "billing".into(),
                    1,
                    AckStatus::Applied,
                    None
                ),
            ]
        );

        // The single writes are batches of one, with the same answers.
        assert_eq!(
            store
                .record_ack("web-1", "payments", 3, AckStatus::Applied, None)
                .await
                .expect("record_ack"),
            Err(AckRejection::UnknownVersion { current: 2 })
        );
        store
            .instance_connected("web-1", None, &BTreeMap::new(), "conn-4", "node-b")
            .await
            .expect("connected");
        let web1 = store.instances().await.expect("instances").remove(0);
        assert_eq!(
            (
                web1.connected,
                web1.node.as_deref(),
                web1.subscriptions.len()
            ),
            (true, Some("node-b"), 2),
            "a new connection keeps the subscriptions until the next subscribe"
        );

        // A storm: more acks than one statement holds, one instance twice (adjacent once
        // sorted, so it splits a statement), and a refused one in the middle.
        let mut storm: Vec<_> = (0..1200)
            .map(|n| {
                ack(
                    &format!("fleet-{n:04}"),
                    "payments",
                    2,
                    AckStatus::Applied,
                    None,
                )
            })
            .collect();
        storm.push(ack(
            "fleet-0500",
            "payments",
            2,
            AckStatus::Failed,
            Some("late no"),
        ));
        storm.push(ack("fleet-0700", "payments", 9, AckStatus::Applied, None));
        let answers = store.write_batch(&storm).await.expect("storm");
        assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 1201);
        assert_eq!(
            answers[1201],
            Err(AckRejection::UnknownVersion { current: 2 })
        );
        let fleet: Vec<_> = store
            .acks()
            .await
            .expect("acks")
            .into_iter()
            .filter(|a| a.instance.starts_with("fleet-"))
            .collect();
        assert_eq!(fleet.len(), 1200);
        assert!(fleet.iter().all(|a| a.version == 2));
        let failed: Vec<&str> = fleet
            .iter()
            .filter(|a| a.status == AckStatus::Failed)
            .map(|a| a.instance.as_str())
            .collect();
        assert_eq!(failed, ["fleet-0500"], "the later of two acks wins");
    }
}

/// A batch whose transaction fails makes none of its writes: `drop_acks` takes the `acks` table
/// away behind the store's back, so the batch's ack fails, and its other writes with it.
async fn a_failed_write_batch_makes_none_of_its_writes<F>(store: Arc<dyn Store>, drop_acks: F)
where
    F: std::future::Future<Output = ()>,
{
    store
        .publish(&outcome(
            "cfg",
            "c1",
            vec![("payments", vec![added("p.toml", b"port = 1\n")])],
        ))
        .await
        .expect("publish");
    drop_acks.await;
    let batch = [
        InstanceWrite::Connected {
            instance: "web-1".into(),
            app: None,
            labels: BTreeMap::new(),
            connection: "conn-1".into(),
            node: "node-a".into(),
        },
        InstanceWrite::Ack {
            instance: "web-1".into(),
            topic: "payments".into(),
            version: 1,
            status: AckStatus::Applied,
            error: None,
        },
    ];
    assert!(store.write_batch(&batch).await.is_err());
    assert!(
        store.instances().await.expect("instances").is_empty(),
        "the instance row went with the failed ack"
    );
    // Without the ack, the same instance write goes through.
    store.write_batch(&batch[..1]).await.expect("write_batch");
    assert_eq!(store.instances().await.expect("instances").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failed_write_batch_makes_none_of_its_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_sqlite(dir.path()).await;
    let file = dir.path().join("confcast.db");
    a_failed_write_batch_makes_none_of_its_writes(store, async move {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
            .await
            .expect("second connection");
        sqlx::Executor::execute(&mut conn, "DROP TABLE acks")
            .await
            .expect("drop acks");
        let _ = conn.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_failed_write_batch_makes_none_of_its_writes() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let url = db.url.clone();
    a_failed_write_batch_makes_none_of_its_writes(db.open().await, async move {
        let mut conn = PgConnection::connect(&url)
            .await
            .expect("second connection");
        sqlx::Executor::execute(&mut conn, "DROP TABLE acks")
            .await
            .expect("drop acks");
        let _ = conn.close().await;
    })
    .await;
}

// ---- the two backends -------------------------------------------------------------------------

async fn open_sqlite(dir: &std::path::Path) -> Arc<dyn Store> {
    store::open(&format!("sqlite://{}", dir.join("confcast.db").display()))
        .await
        .expect("open sqlite store")
}

/// A database of its own for one test, dropped when the test ends, pass or fail.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDb {
    /// `None` (after saying why) when PostgreSQL is not there to test against, outside CI.
    async fn create() -> Option<PgDb> {
        let admin_url = std::env::var("CONFCAST_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("confcast_t_{:016x}", rand::random::<u64>());
        let created = async {
            let mut admin =
                tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&admin_url))
                    .await
                    .map_err(|_| format!("connecting to {admin_url} timed out"))?
                    .map_err(|e| format!("cannot connect to {admin_url}: {e}"))?;
            sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
                .await
                .map_err(|e| format!("cannot create database {name}: {e}"))?;
            let _ = admin.close().await;
            Ok::<_, String>(())
        };
        if let Err(reason) = created.await {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL store tests must run in CI (CI=true): {reason}"
            );
            eprintln!("skipping PostgreSQL store tests: {reason}");
            return None;
        }
        // Same server and credentials, the new database instead of the admin one.
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url.as_str(), String::new()),
        };
        let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
        let url = format!("{server}/{name}{query}");
        Some(PgDb {
            admin_url,
            name,
            url,
        })
    }

    /// One more replica's store on this database.
    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).await.expect("open postgres store")
    }

    /// A session on the admin database, for what cannot be done from inside this one.
    async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to the admin database")
    }

    /// Terminates this database's listener sessions (as a proxy or failover would); how many.
    async fn cut_listeners(&self, admin: &mut PgConnection) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
        )
        .bind(&self.name)
        .bind(store::postgres::LISTENER_APPLICATION_NAME)
        .fetch_one(admin)
        .await
        .expect("terminate the listener")
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Best effort, on a thread with its own runtime: Drop cannot await, and it also runs
        // while a failed test unwinds. FORCE ends the sessions the test's stores still hold.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::Executor::execute(&mut admin, sql.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<_, String>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs each contract function as a test on SQLite and as a test on PostgreSQL.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    super::contract::$name(super::open_sqlite(dir.path()).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::PgDb::create().await else { return };
                    super::contract::$name(db.open().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    publish_numbers_changes_consecutively_and_versions_each_topic,
    events_after_pages_through_the_log_in_order,
    snapshots_follow_adds_modifies_renames_and_deletes,
    snapshots_of_many_topics_carry_each_topics_files,
    acks_are_checked_against_the_topic_version,
    a_write_batch_answers_each_write_and_keeps_each_instances_order,
    remember_delivery_detects_a_redelivery,
    the_log_epoch_rotates_once_from_a_given_epoch,
    trim_keeps_the_most_recent_events_and_all_topic_state,
    rejections_are_written_and_cleared_by_publish,
    instances_follow_their_newest_connection_and_reset_node,
    lock_repo_lets_one_holder_at_a_time,
    expire_instances_forgets_long_disconnected_ones_with_their_acks,
    check_passes_on_a_healthy_store,
    the_audit_log_keeps_the_newest_and_filters_by_action,
    instances_page_filters_and_counts_ten_thousand,
    rollout_groups_count_alike_instances_and_acks_together,
    topic_change_and_file_before_read_the_log,
    commands_track_each_instance_and_keep_the_first_verdict,
    commands_are_capped_listed_newest_first_and_kept_bounded,
    pins_list_their_newest_held_changes_and_unpin_marks_a_resync,
    a_rollback_keeps_the_repo_head_and_records_what_it_restored,
    log_bounds_read_the_epoch_head_and_oldest_kept_together,
);

fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_millis()).expect("ms fit in i64")
}

// ---- health: what `check` sees that a round trip does not ------------------------------------

mod health {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_file_moved_away_or_replaced_fails_check_and_publish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_sqlite(dir.path()).await;
        store.check().await.expect("healthy at first");
        let db = dir.path().join("confcast.db");
        let aside = dir.path().join("aside.db");
        let change = |commit: &str| {
            outcome(
                "cfg",
                commit,
                vec![("payments", vec![added("payments/app.toml", b"port = 1\n")])],
            )
        };

        // The open connections still read and write the file; only its path is gone. A read may
        // still fail: when the pool's one idle connection is still being handed back (sqlx does
        // that asynchronously), the pool opens a new one, which cannot open a file that is gone.
        std::fs::rename(&db, &aside).expect("move the database away");
        if let Ok(head) = store.head_seq().await {
            assert_eq!(head, 0, "read from the file the store opened");
        }
        // Enough queries at once that the pool opens new connections: those fail (or the
        // query waits for an open one), but none makes an empty database at the path.
        let mut reads = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let store = store.clone();
            reads.spawn(async move { store.head_seq().await });
        }
        while let Some(read) = reads.join_next().await {
            if let Ok(head) = read.expect("read task") {
                assert_eq!(head, 0, "read from the file the store opened");
            }
        }
        assert!(!db.exists(), "no new, empty database at the path");
        let moved = store.check().await.expect_err("moved away");
        assert!(
            moved.to_string().contains("deleted or moved away"),
            "{moved}"
        );
        // A publish would hand out numbers that vanish with the file: refused, rolled back.
        let refused = store.publish(&change("c1")).await.expect_err("refused");
        assert!(
            refused.to_string().contains("deleted or moved away"),
            "{refused}"
        );

        // Read back once the file is at its path again: a connection the pool opened meanwhile
        // (it may, while the refused one is rolled back) fails rather than making an empty
        // database there, so every connection still reads the one file.
        std::fs::rename(&aside, &db).expect("put it back");
        store.check().await.expect("healthy once back");
        assert_eq!(store.head_seq().await.expect("head"), 0, "rolled back");
        let published = store.publish(&change("c2")).await.expect("publishes again");
        let seqs: Vec<u64> = published.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![1], "no number was lost");

        // Another file at the path (a restore from backup): the connections keep the old one.
        std::fs::copy(&db, &aside).expect("copy");
        std::fs::rename(&aside, &db).expect("replace");
        let replaced = store.check().await.expect_err("replaced");
        assert!(replaced.to_string().contains("replaced"), "{replaced}");
        let refused = store.publish(&change("c3")).await.expect_err("refused");
        assert!(refused.to_string().contains("replaced"), "{refused}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_read_only_sessions_fail_check() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let writable = db.open().await;
        writable.check().await.expect("healthy at first");
        // What a failover to a standby looks like to new sessions: every write would fail.
        let mut admin = db.admin().await;
        sqlx::Executor::execute(
            &mut admin,
            format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on",
                db.name
            )
            .as_str(),
        )
        .await
        .expect("make the database read-only");
        let read_only = db.open().await;
        let error = read_only.check().await.expect_err("read-only");
        assert!(error.to_string().contains("read-only"), "{error}");
    }
}

// ---- several replicas on one PostgreSQL database ----------------------------------------------

mod replicas {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_starting_together_migrate_the_schema_once() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let url = db.url.clone();
        let opening: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { store::open(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for task in opening {
            stores.push(task.await.expect("open task").expect("every replica opens"));
        }
        let applied: i64 = sqlx::query_scalar("SELECT applied FROM confcast_schema")
            .fetch_one(&mut db.connect().await)
            .await
            .expect("schema row");
        assert_eq!(applied, confcast::store::sql::MIGRATIONS.len() as i64);
        // One log, one epoch: every replica names the same one.
        let epoch = stores[0].epoch().await.expect("epoch");
        assert_eq!(epoch.len(), 32, "{epoch}");
        for s in &stores {
            assert_eq!(s.epoch().await.expect("epoch"), epoch);
        }
        stores[0]
            .publish(&outcome("cfg", "c1", vec![("t", vec![added("x", b"1")])]))
            .await
            .expect("publish");
        assert_eq!(stores[3].head_seq().await.expect("head"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_publishing_at_once_leave_no_gap_and_no_duplicate() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let replicas = [db.open().await, db.open().await];
        // Both start together, so their publishes really contend for the log head.
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = replicas
            .iter()
            .zip(["left", "right"])
            .map(|(store, name)| {
                let (store, start) = (store.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let mut seqs = Vec::new();
                    for i in 1..=50 {
                        let content = format!("n = {i}\n");
                        let changes = store
                            .publish(&outcome(
                                name,
                                &format!("{name}-{i}"),
                                vec![(name, vec![added("x.toml", content.as_bytes())])],
                            ))
                            .await
                            .expect("publish");
                        assert_eq!(changes.len(), 1);
                        assert_eq!(changes[0].version, i, "{name}: versions follow each other");
                        seqs.push(changes[0].seq);
                    }
                    seqs
                })
            })
            .collect();
        let mut handed_out = Vec::new();
        for task in tasks {
            handed_out.extend(task.await.expect("publisher task"));
        }
        handed_out.sort_unstable();
        assert_eq!(handed_out, (1..=100).collect::<Vec<u64>>());

        let log = replicas[1].events_after(0, 1000).await.expect("events");
        assert_eq!(
            log.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<u64>>(),
            "the log is 1..=100 with no gap"
        );
        let switches = log.windows(2).filter(|w| w[0].topic != w[1].topic).count();
        assert!(
            switches >= 2,
            "the two publishers must have interleaved for this to prove anything"
        );
        let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for event in &log {
            let ServerMessage::Change(change) =
                serde_json::from_str(&event.frame).expect("frame is JSON")
            else {
                panic!("frame {} is not a change", event.seq);
            };
            assert_eq!(change.seq, event.seq, "the frame carries its own seq");
            versions
                .entry(change.topic)
                .or_default()
                .push(change.version);
        }
        for (topic, v) in &versions {
            assert_eq!(
                v,
                &(1..=50).collect::<Vec<u64>>(),
                "{topic}: versions in log order"
            );
        }
        assert_eq!(replicas[0].head_seq().await.expect("head"), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repo_lock_excludes_another_replica_until_released_or_its_holder_dies() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let (a, b) = (db.open().await, db.open().await);

        let held = a.lock_repo("cfg").await.expect("lock_repo");
        let mut waiting = lock_in_background(&b, "cfg");
        assert!(
            tokio::time::timeout(EXCLUDED, &mut waiting).await.is_err(),
            "replica b must wait while a syncs `cfg`"
        );
        drop(
            tokio::time::timeout(WAIT, b.lock_repo("other"))
                .await
                .expect("other repos stay free")
                .expect("lock_repo"),
        );
        drop(held);
        let held_by_b = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("b gets `cfg` once a releases it")
            .expect("lock task");

        // Now a waits on b, and b's session dies without a word (a crashed replica).
        let mut waiting = lock_in_background(&a, "cfg");
        assert!(tokio::time::timeout(EXCLUDED, &mut waiting).await.is_err());
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut db.connect().await)
        .await
        .expect("terminate the lock holder");
        assert_eq!(killed, 1, "exactly one session holds `cfg`");
        let _held_by_a = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("a dead holder loses the lock")
            .expect("lock task");
        drop(held_by_b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_wakes_on_another_replicas_publish_and_after_its_listener_is_cut() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let (publisher, watcher) = (db.open().await, db.open().await);
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let watching = tokio::spawn({
            let (watcher, wake, shutdown) = (watcher.clone(), wake.clone(), shutdown.clone());
            async move { watcher.watch(wake, shutdown).await }
        });
        let woken = |why: &'static str| {
            let wake = wake.clone();
            async move {
                tokio::time::timeout(WAIT, wake.notified())
                    .await
                    .unwrap_or_else(|_| panic!("no wake: {why}"));
            }
        };
        woken("once the listener is connected").await;

        publisher
            .publish(&outcome("cfg", "c1", vec![("t", vec![added("x", b"1")])]))
            .await
            .expect("publish");
        woken("the other replica published").await;

        // Cut the listener's connection, as a proxy or failover would.
        let mut admin = db.admin().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Retried: another test cutting every LISTEN session may have cut ours just now.
            if db.cut_listeners(&mut admin).await > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no listener session to cut"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        woken("the listener reconnected; what it missed is only in the log").await;

        publisher
            .publish(&outcome(
                "cfg",
                "c2",
                vec![("t", vec![modified("x", b"2")])],
            ))
            .await
            .expect("publish");
        woken("the reconnected listener hears the next publish").await;

        shutdown.cancel();
        tokio::time::timeout(WAIT, watching)
            .await
            .expect("watch returns on shutdown")
            .expect("watch task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_keeps_retrying_while_the_database_refuses_connections() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let (publisher, watcher) = (db.open().await, db.open().await);
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let watching = tokio::spawn({
            let (watcher, wake, shutdown) = (watcher.clone(), wake.clone(), shutdown.clone());
            async move { watcher.watch(wake, shutdown).await }
        });
        tokio::time::timeout(WAIT, wake.notified())
            .await
            .expect("a wake once the listener is connected");

        // The listener is cut and cannot come back: no wake may claim it did.
        let mut admin = db.admin().await;
        let refuse = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false", db.name);
        sqlx::Executor::execute(&mut admin, refuse.as_str())
            .await
            .expect("refuse connections");
        assert_eq!(db.cut_listeners(&mut admin).await, 1);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), wake.notified())
                .await
                .is_err(),
            "no wake while the listener cannot reconnect"
        );

        let allow = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true", db.name);
        sqlx::Executor::execute(&mut admin, allow.as_str())
            .await
            .expect("allow connections");
        tokio::time::timeout(WAIT, wake.notified())
            .await
            .expect("a wake once the listener is back");
        publisher
            .publish(&outcome("cfg", "c1", vec![("t", vec![added("x", b"1")])]))
            .await
            .expect("publish");
        tokio::time::timeout(WAIT, wake.notified())
            .await
            .expect("the listener hears publishes again");

        shutdown.cancel();
        tokio::time::timeout(WAIT, watching)
            .await
            .expect("watch returns on shutdown, even mid-backoff")
            .expect("watch task");
    }

    /// `sslmode=require` in the store URL is honoured: every connection the store opens is TLS
    /// (the machine's PostgreSQL serves TLS with its own certificate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sslmode_in_the_url_is_honoured() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let mut admin = db.admin().await;
        let server_ssl: String = sqlx::query_scalar("SHOW ssl")
            .fetch_one(&mut admin)
            .await
            .expect("SHOW ssl");
        if server_ssl != "on" {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the CI PostgreSQL must serve TLS (ssl = on) for this test"
            );
            eprintln!("skipping: this PostgreSQL has ssl = off");
            return;
        }
        let sep = if db.url.contains('?') { '&' } else { '?' };
        let store = store::open(&format!("{}{sep}sslmode=require", db.url))
            .await
            .expect("open over TLS");
        store.head_seq().await.expect("a query over TLS");
        let (total, tls): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'confcast'",
        )
        .bind(&db.name)
        .fetch_one(&mut admin)
        .await
        .expect("pg_stat_ssl");
        assert!(total > 0, "the store has connections open");
        assert_eq!(tls, total, "every store connection uses TLS");
        let plain = store::open(&format!("{}{sep}sslmode=disable", db.url))
            .await
            .expect("open without TLS");
        plain.head_seq().await.expect("query");
        let (total, tls): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'confcast'",
        )
        .bind(&db.name)
        .fetch_one(&mut admin)
        .await
        .expect("pg_stat_ssl");
        assert!(tls < total, "sslmode=disable opens plain connections");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_node_leaves_other_replicas_instances_connected() {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let store = db.open().await;
        for (id, node) in [("web-1", "node-a"), ("web-2", "node-b")] {
            store
                .instance_connected(id, None, &BTreeMap::new(), &format!("conn-{id}"), node)
                .await
                .expect("connected");
        }
        store.reset_node("node-a").await.expect("reset_node");
        let state: Vec<(String, bool)> = store
            .instances()
            .await
            .expect("instances")
            .into_iter()
            .map(|i| (i.id, i.connected))
            .collect();
        assert_eq!(state, [("web-1".into(), false), ("web-2".into(), true)]);
    }
}
