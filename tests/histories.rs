//! Awkward histories: the git state decides, whatever the webhooks said.

mod util;

use std::time::Duration;

use confcast::protocol::FileStatus;
use util::{commit_raw, config_repo, Instance, TestServer, SECRET};

async fn sync(server: &TestServer) {
    let before = server.get("/api/v1/repos").await.1["repos"][0]["syncs"]
        .as_u64()
        .unwrap_or(0);
    let reply = server
        .http
        .post(server.url("/api/v1/repos/cfg/sync"))
        .send()
        .await
        .expect("POST sync");
    assert_eq!(reply.status().as_u16(), 202);
    server.wait_syncs(before + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_push_diffs_from_the_last_published_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let base = server.wait_syncs(1).await["head"]
        .as_str()
        .expect("head")
        .to_string();
    let (mut i, _) = Instance::subscribed(&server, "f", &["payments"]).await;
    let b = repo
        .commit(
            "main",
            &[
                ("payments/app.toml", Some(b"port = 2\n".as_slice())),
                ("payments/extra.toml", Some(b"x = 1\n".as_slice())),
            ],
            "B",
        )
        .expect("B");
    server.github_push("main", &b.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.version, 2);

    // Rewrite history: main goes back to the base and gets a different commit C.
    repo.reset("main", git2::Oid::from_str(&base).expect("oid"))
        .expect("reset");
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 3\n".as_slice()))],
            "C",
        )
        .expect("C");
    // The payload's `before` lies (it names the base); it is ignored.
    server.github_push("main", &c.to_string(), SECRET).await;
    let change = i.next_change().await;
    assert_eq!((change.version, change.previous_version), (3, 2));
    let mut files: Vec<(String, FileStatus)> = change
        .files
        .iter()
        .map(|f| (f.path.clone(), f.status))
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        files,
        [
            ("payments/app.toml".to_string(), FileStatus::Modified),
            ("payments/extra.toml".to_string(), FileStatus::Deleted)
        ],
        "B's extra file is gone in C"
    );
    let topic = server.wait_topic("payments", |v| v["version"] == 3).await;
    let paths: Vec<&str> = topic["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(paths, ["payments/app.toml", "payments/limits.json"]);
}

/// Packs in the server's mirror of `cfg`: one more per fetch until they are consolidated.
fn mirror_packs(server: &TestServer) -> usize {
    let dir = confcast::sync::git::mirror_path(&server.data_dir, "cfg").join("objects/pack");
    std::fs::read_dir(dir)
        .expect("mirror pack dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "pack"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_keeps_few_packs_over_many_pushes_and_still_diffs_a_force_push() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let base = server.wait_syncs(1).await["head"]
        .as_str()
        .expect("head")
        .to_string();
    let (mut i, _) = Instance::subscribed(&server, "p", &["payments"]).await;
    let pushes = confcast::sync::git::PACK_LIMIT + 10;
    let mut most = 0;
    for n in 1..=pushes {
        let body = format!("port = {n}\n");
        repo.commit("main", &[("payments/app.toml", Some(body.as_bytes()))], "n")
            .expect("commit");
        sync(&server).await;
        assert_eq!(i.next_change().await.version, n as u64 + 1);
        most = most.max(mirror_packs(&server));
    }
    assert!(
        most <= confcast::sync::git::PACK_LIMIT + 1,
        "the mirror grew to {most} packs"
    );
    assert!(
        mirror_packs(&server) < pushes / 2,
        "packs were consolidated"
    );
    // History rewritten to the first commit plus one: the diff still starts from the last
    // published commit, which only the consolidated packs hold now.
    repo.reset("main", git2::Oid::from_str(&base).expect("oid"))
        .expect("reset");
    repo.commit(
        "main",
        &[("payments/app.toml", Some(b"port = 0\n".as_slice()))],
        "C",
    )
    .expect("C");
    sync(&server).await;
    let change = i.next_change().await;
    assert_eq!(change.version, pushes as u64 + 2);
    assert_eq!(change.files.len(), 1);
    assert_eq!(change.files[0].content.as_deref(), Some("port = 0\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_then_recreated_branch_keeps_topics_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let head = server.wait_syncs(1).await["head"]
        .as_str()
        .expect("head")
        .to_string();
    let (mut i, _) = Instance::subscribed(&server, "d", &["payments", "billing"]).await;

    repo.delete_branch("main").expect("delete");
    sync(&server).await;
    let (_, repos) = server.get("/api/v1/repos").await;
    let error = repos["repos"][0]["last_error"]
        .as_str()
        .expect("error recorded");
    assert!(error.contains("branch `main` does not exist"), "{error}");
    assert_eq!(repos["repos"][0]["head"], head, "nothing published");
    assert!(i.maybe_next(Duration::from_millis(200)).await.is_none());

    // Re-created from scratch (no common history), with one file changed and one gone.
    repo.branch("main", git2::Oid::from_str(&head).expect("oid"))
        .expect("recreate");
    let c = repo
        .commit(
            "main",
            &[
                ("billing/plans.yaml", Some(b"plans: [new]\n".as_slice())),
                ("payments/limits.json", None),
            ],
            "recreated",
        )
        .expect("commit");
    let syncs = repos["repos"][0]["syncs"].as_u64().unwrap_or(0);
    server.github_push("main", &c.to_string(), SECRET).await;
    let (a, b) = (i.next_change().await, i.next_change().await);
    assert_eq!(
        (a.topic.as_str(), a.files[0].status),
        ("billing", FileStatus::Modified)
    );
    assert_eq!(
        (b.topic.as_str(), b.files[0].status),
        ("payments", FileStatus::Deleted)
    );
    // The change reaches instances before the worker records its status: wait for the sync.
    assert!(server.wait_syncs(syncs + 1).await["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_commit_brings_the_merged_branch_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let head = server.wait_syncs(1).await["head"]
        .as_str()
        .expect("head")
        .to_string();
    let (mut i, _) = Instance::subscribed(&server, "m", &["*"]).await;
    repo.branch("feature", git2::Oid::from_str(&head).expect("oid"))
        .expect("branch");
    repo.commit(
        "feature",
        &[("web/flags.json", Some(b"{\"beta\": true}".as_slice()))],
        "feature work",
    )
    .expect("feature");
    let main_side = repo
        .commit(
            "main",
            &[("billing/plans.yaml", Some(b"plans: [b]\n".as_slice()))],
            "main work",
        )
        .expect("main");
    server
        .github_push("main", &main_side.to_string(), SECRET)
        .await;
    assert_eq!(i.next_change().await.topic, "billing");
    let merge = repo
        .merge(
            "main",
            "feature",
            &[("web/flags.json", Some(b"{\"beta\": true}".as_slice()))],
            "Merge feature",
        )
        .expect("merge");
    server.github_push("main", &merge.to_string(), SECRET).await;
    let c = i.next_change().await;
    assert_eq!(
        (c.topic.as_str(), c.version, c.files[0].status),
        ("web", 1, FileStatus::Added)
    );
    assert_eq!(c.message, "Merge feature");
    assert!(
        i.maybe_next(Duration::from_millis(200)).await.is_none(),
        "billing is unchanged by the merge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_commit_publishes_nothing_and_the_next_one_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "e", &["*"]).await;
    let empty = repo.empty_commit("main", "nothing").expect("empty");
    server.github_push("main", &empty.to_string(), SECRET).await;
    let synced = server.wait_syncs(2).await;
    assert_eq!(synced["head"], empty.to_string(), "the head moves");
    assert!(
        i.maybe_next(Duration::from_millis(200)).await.is_none(),
        "no change is sent"
    );
    let next = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 5\n".as_slice()))],
            "real",
        )
        .expect("commit");
    server.github_push("main", &next.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_ten_thousand_files_arrives_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "bulk", &["bulk"]).await;
    let contents: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|n| {
            (
                format!("bulk/dir{}/file{n}.json", n % 100),
                format!("{{\"n\": {n}}}").into_bytes(),
            )
        })
        .collect();
    let changes: Vec<(&str, Option<&[u8]>)> = contents
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_slice())))
        .collect();
    let c = repo
        .commit("main", &changes, "ten thousand files")
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    let change = i.next_change().await;
    assert_eq!((change.topic.as_str(), change.version), ("bulk", 1));
    assert_eq!(change.files.len(), 10_000);
    assert!(change.files.iter().all(|f| f.status == FileStatus::Added));
    let f = change
        .files
        .iter()
        .find(|f| f.path == "bulk/dir7/file9907.json")
        .expect("a file in the middle");
    assert_eq!(f.content.as_deref(), Some("{\"n\": 9907}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_holds_its_topic_back_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "v", &["payments", "billing"]).await;

    // One commit: a broken TOML in payments (plus a valid JSON change there), a valid billing change.
    let bad = repo
        .commit(
            "main",
            &[
                (
                    "payments/app.toml",
                    Some(b"port = 9000\ntimeout = = 3\n".as_slice()),
                ),
                (
                    "payments/limits.json",
                    Some(br#"{"daily": 200}"#.as_slice()),
                ),
                ("billing/plans.yaml", Some(b"plans: [x]\n".as_slice())),
            ],
            "half broken",
        )
        .expect("commit");
    server.github_push("main", &bad.to_string(), SECRET).await;
    let c = i.next_change().await;
    assert_eq!(c.topic, "billing", "the valid topic is published");
    assert!(
        i.maybe_next(Duration::from_millis(300)).await.is_none(),
        "payments is held back"
    );
    let topic = server
        .wait_topic("payments", |v| !v["rejected"].is_null())
        .await;
    assert_eq!(
        topic["version"], 1,
        "instances stay on the last good version"
    );
    let r = &topic["rejected"];
    assert_eq!(r["path"], "payments/app.toml");
    assert_eq!(r["line"], 2);
    assert_eq!(r["commit"], bad.to_string());
    assert!(r["author"].as_str().expect("author").contains("Ada Config"));
    assert!(!r["message"].as_str().expect("parser message").is_empty());
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(repos["repos"][0]["rejections"][0]["topic"], "payments");

    // An unrelated commit keeps it held back; the fix publishes everything since the last good state.
    let other = repo
        .commit(
            "main",
            &[("billing/plans.yaml", Some(b"plans: [y]\n".as_slice()))],
            "billing again",
        )
        .expect("commit");
    server.github_push("main", &other.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.topic, "billing");
    let fix = repo
        .commit(
            "main",
            &[(
                "payments/app.toml",
                Some(b"port = 9000\ntimeout = 3\n".as_slice()),
            )],
            "fix",
        )
        .expect("fix");
    server.github_push("main", &fix.to_string(), SECRET).await;
    let c = i.next_change().await;
    assert_eq!(
        (c.topic.as_str(), c.version, c.previous_version),
        ("payments", 2, 1)
    );
    let mut paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["payments/app.toml", "payments/limits.json"],
        "the JSON change from the broken commit is not lost"
    );
    let topic = server
        .wait_topic("payments", |v| v["rejected"].is_null())
        .await;
    assert_eq!(topic["version"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repos_cannot_publish_the_same_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = config_repo(dir.path());
    let two = util::ConfigRepo::init(&dir.path().join("two.git")).expect("second repo");
    two.commit(
        "main",
        &[("other/x.toml", Some(b"x = 1\n".as_slice()))],
        "two",
    )
    .expect("commit");
    let data = dir.path().join("data");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n[[repos]]\nname = \"two\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        data.display(),
        one.url(),
        two.url()
    );
    let server = TestServer::start_toml(data, toml).await;
    server.wait_topic("other", |v| v["version"] == 1).await;
    server.wait_topic("payments", |v| v["version"] == 1).await;
    let (mut i, _) = Instance::subscribed(&server, "t", &["payments"]).await;
    // Repo `two` now writes into `payments`, which repo `cfg` publishes.
    two.commit(
        "main",
        &[("payments/evil.toml", Some(b"port = 1\n".as_slice()))],
        "collide",
    )
    .expect("commit");
    let reply = server
        .http
        .post(server.url("/api/v1/repos/two/sync"))
        .send()
        .await
        .expect("sync");
    assert_eq!(reply.status().as_u16(), 202);
    let repos = tokio::time::timeout(util::WAIT, async {
        loop {
            let (_, v) = server.get("/api/v1/repos").await;
            if v["repos"][1]["rejections"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the collision is recorded");
    let r = &repos["repos"][1]["rejections"][0];
    assert_eq!(repos["repos"][1]["name"], "two");
    assert_eq!(r["topic"], "payments");
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .contains("published by repo `cfg`"),
        "{r}"
    );
    assert!(
        i.maybe_next(Duration::from_millis(300)).await.is_none(),
        "nothing from repo two reached payments"
    );
    let topic = server.wait_topic("payments", |_| true).await;
    assert_eq!(
        (topic["version"].as_u64(), topic["repo"].as_str()),
        (Some(1), Some("cfg"))
    );
}

/// The rejection of `topic` in `GET /api/v1/repos`, if any.
async fn rejection(server: &TestServer, topic: &str) -> Option<serde_json::Value> {
    let (_, repos) = server.get("/api/v1/repos").await;
    repos["repos"][0]["rejections"]
        .as_array()?
        .iter()
        .find(|r| r["topic"] == topic)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_hold_their_topic_back_until_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "h", &["payments", "billing"]).await;

    // Each path on its own: the rejection names it (escaped) and why; removing it releases the topic.
    let cases: [(&[u8], &str, &str); 7] = [
        (b"payments/../x", "payments/../x", "`..` component"),
        (b"payments/a\\b", "payments/a\\\\b", "backslash"),
        (
            b"payments/.git/config",
            "payments/.git/config",
            "`.git` component",
        ),
        (
            b"payments/.GIT/hooks/x",
            "payments/.GIT/hooks/x",
            "`.git` component",
        ),
        (
            b"payments/ctl\x1b[2J.toml",
            "payments/ctl\\u{1b}[2J.toml",
            "control character",
        ),
        (
            "payments/cod\u{202e}lmx.toml".as_bytes(),
            "payments/cod\\u{202e}lmx.toml",
            "bidirectional",
        ),
        (
            b"payments/\xff\xfe.toml",
            "payments/\\xff\\xfe.toml",
            "not valid UTF-8",
        ),
    ];
    for (raw, shown, why) in cases {
        commit_raw(
            &repo,
            "main",
            &[(raw, Some(b"x = 1\n".as_slice()))],
            "hostile",
        );
        sync(&server).await;
        let r = rejection(&server, "payments")
            .await
            .unwrap_or_else(|| panic!("{shown} is held back"));
        assert_eq!(r["path"], shown);
        let message = r["message"].as_str().expect("message");
        assert!(
            message.contains(shown) && message.contains(why),
            "{message}"
        );
        commit_raw(&repo, "main", &[(raw, None)], "removed");
        sync(&server).await;
        assert!(
            rejection(&server, "payments").await.is_none(),
            "{shown}: released"
        );
    }
    assert!(
        i.maybe_next(Duration::from_millis(200)).await.is_none(),
        "nothing of it was broadcast"
    );

    // All at once, two names that are not UTF-8 (they used to collide) and a valid change of
    // payments: payments waits, billing from the same commit is published.
    let hostile: [&[u8]; 7] = [
        b"payments/../x",
        b"payments/a\\b",
        b"payments/.git/config",
        b"payments/.GIT/hooks/x",
        b"payments/ctl\x01.toml",
        b"payments/\xff.toml",
        b"payments/\xfe.toml",
    ];
    let mut files: Vec<(&[u8], Option<&[u8]>)> = hostile
        .iter()
        .map(|p| {
            (
                *p,
                Some(b"[core]\n\tfsmonitor = touch /tmp/pwned\n".as_slice()),
            )
        })
        .collect();
    files.push((b"payments/app.toml", Some(b"port = 7000\n".as_slice())));
    files.push((b"billing/plans.yaml", Some(b"plans: [h]\n".as_slice())));
    commit_raw(&repo, "main", &files, "hostile and good");
    sync(&server).await;
    assert_eq!(i.next_change().await.topic, "billing");
    assert!(
        i.maybe_next(Duration::from_millis(300)).await.is_none(),
        "payments is held back"
    );
    assert!(rejection(&server, "payments").await.is_some());
    let topic = server.wait_topic("payments", |_| true).await;
    assert_eq!(topic["version"], 1);

    // Removing the hostile files publishes everything good since the last published state.
    let removals: Vec<(&[u8], Option<&[u8]>)> = hostile.iter().map(|p| (*p, None)).collect();
    commit_raw(&repo, "main", &removals, "clean");
    sync(&server).await;
    let c = i.next_change().await;
    assert_eq!(
        (c.topic.as_str(), c.version, c.previous_version),
        ("payments", 2, 1)
    );
    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["payments/app.toml"]);
    assert!(rejection(&server, "payments").await.is_none());
}

/// Asserts that payments is held back because of `path`, with `why` in the message.
async fn expect_held(server: &TestServer, why: &str, path: &str) {
    let r = rejection(server, "payments")
        .await
        .expect("payments is held back");
    assert_eq!(r["path"], path);
    let message = r["message"].as_str().expect("message");
    assert!(message.contains(why), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_topics_over_the_size_caps_are_held_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // payments starts with two files of 26 bytes in all.
    let limits = "[limits]\nmax_file_bytes = 1000\nmax_topic_bytes = 3000\nmax_topic_files = 6\nmax_path_bytes = 64\n";
    let server = TestServer::start_with(dir.path(), &repo, limits, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "s", &["payments", "billing"]).await;
    let kb = |n: usize| vec![b'x'; n];

    // One file over max_file_bytes; billing in the same commit is published.
    let (big, ok) = (kb(1001), kb(900));
    repo.commit(
        "main",
        &[
            ("payments/big.bin", Some(big.as_slice())),
            ("billing/plans.yaml", Some(b"plans: [s]\n".as_slice())),
        ],
        "too big",
    )
    .expect("commit");
    sync(&server).await;
    expect_held(
        &server,
        "file is 1001 bytes, over limits.max_file_bytes = 1000",
        "payments/big.bin",
    )
    .await;
    assert_eq!(i.next_change().await.topic, "billing");

    // Under the caps (1826 bytes in 4 files): published, without the big file.
    repo.commit(
        "main",
        &[
            ("payments/big.bin", None),
            ("payments/a.txt", Some(ok.as_slice())),
            ("payments/b.txt", Some(ok.as_slice())),
        ],
        "fits",
    )
    .expect("commit");
    sync(&server).await;
    let c = i.next_change().await;
    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        (c.topic.as_str(), c.version, paths),
        ("payments", 2, vec!["payments/a.txt", "payments/b.txt"])
    );

    // Each file fits, the topic does not: 3626 bytes in the new tree.
    repo.commit(
        "main",
        &[
            ("payments/c.txt", Some(ok.as_slice())),
            ("payments/d.txt", Some(ok.as_slice())),
        ],
        "topic too big",
    )
    .expect("commit");
    sync(&server).await;
    expect_held(
        &server,
        "topic `payments` files total 3626 bytes, over limits.max_topic_bytes = 3000",
        "payments/c.txt",
    )
    .await;
    assert!(i.maybe_next(Duration::from_millis(300)).await.is_none());
    repo.commit("main", &[("payments/d.txt", None)], "smaller")
        .expect("commit");
    sync(&server).await;
    let c = i.next_change().await;
    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!((c.version, paths), (3, vec!["payments/c.txt"]));

    // Six files is the cap; a seventh, however small, holds the topic back.
    repo.commit(
        "main",
        &[
            ("payments/e.txt", Some(b"e".as_slice())),
            ("payments/f.txt", Some(b"f".as_slice())),
        ],
        "seventh",
    )
    .expect("commit");
    sync(&server).await;
    expect_held(
        &server,
        "topic `payments` has 7 files, over limits.max_topic_files = 6",
        "payments/e.txt",
    )
    .await;

    // A path over max_path_bytes.
    let long = format!("payments/{}.txt", "p".repeat(60));
    repo.commit(
        "main",
        &[
            ("payments/e.txt", None),
            ("payments/f.txt", None),
            (long.as_str(), Some(b"p".as_slice())),
        ],
        "long path",
    )
    .expect("commit");
    sync(&server).await;
    let r = rejection(&server, "payments").await.expect("held back");
    assert_eq!(r["path"], long.as_str());
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .contains("is 73 bytes, over limits.max_path_bytes = 64"),
        "{r}"
    );
    assert!(i.maybe_next(Duration::from_millis(300)).await.is_none());
    let topic = server.wait_topic("payments", |_| true).await;
    assert_eq!(
        topic["version"], 3,
        "instances stay on the last good version"
    );
}
