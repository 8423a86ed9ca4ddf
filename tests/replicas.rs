//! Scale-out: three `confcast serve` processes sharing one PostgreSQL database, instances spread
//! across them. No version is lost or doubled through webhooks on any replica, concurrent
//! deliveries, a replica killed with its instances attached, or a cut listener connection.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use confcast::client::{Client, ClientOptions, Delivery};
use confcast::protocol::AckStatus;
use util::{config_repo, start_replicas, PgDatabase, ServerProcess, WAIT};

struct Fleet {
    clients: Vec<(String, Client)>,
    /// versions of `payments` each instance received, in order
    seen: BTreeMap<String, Vec<u64>>,
}

impl Fleet {
    /// Reads updates until every instance has `version`; fails on a gap or a repeat.
    async fn converge(&mut self, version: u64) {
        for (name, client) in &mut self.clients {
            let seen = self.seen.entry(name.clone()).or_default();
            while seen.last().copied().unwrap_or(0) < version {
                let d = tokio::time::timeout(WAIT, client.next()).await;
                let d = d
                    .unwrap_or_else(|_| panic!("{name} stuck at {seen:?}, waiting for v{version}"))
                    .expect("client running");
                if let Delivery::Update(u) = d {
                    let expected = seen.last().map_or(u.version, |v| v + 1);
                    assert_eq!(
                        u.version, expected,
                        "{name}: versions in order, none missing, none twice: {seen:?} then {}",
                        u.version
                    );
                    seen.push(u.version);
                    client
                        .ack(&u.topic, u.version, AckStatus::Applied, None)
                        .expect("ack");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_log_without_losing_or_doubling_a_version() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut replicas = start_replicas(dir.path(), &repo, &db, 3).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.ws_url()).collect();

    // Two instances on each replica; each also knows the others' URLs for failover.
    let mut fleet = Fleet {
        clients: Vec::new(),
        seen: BTreeMap::new(),
    };
    for (i, home) in urls.iter().enumerate() {
        for n in 0..2 {
            let name = format!("inst-{i}-{n}");
            let mut o = ClientOptions::new(home.clone(), name.clone(), &["payments"]);
            o.urls.extend(urls.iter().filter(|u| *u != home).cloned());
            o.backoff_initial = Duration::from_millis(50);
            o.backoff_max = Duration::from_millis(500);
            fleet
                .clients
                .push((name, Client::start(o).expect("client")));
        }
    }
    fleet.converge(1).await;
    let instances = replicas[2].get("/api/v1/instances").await;
    let listed: Vec<(&str, &str)> = instances["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| Some((i["id"].as_str()?, i["node"].as_str()?)))
        .collect();
    assert_eq!(
        listed.len(),
        6,
        "any replica shows every instance: {listed:?}"
    );
    let nodes: std::collections::BTreeSet<&str> = listed.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        nodes.len(),
        3,
        "and which replica each is connected to: {listed:?}"
    );

    // A webhook to replica A reaches the instances of all three.
    let commit = |n: u32| {
        let body = format!("port = {n}\n");
        repo.commit(
            "main",
            &[("payments/app.toml", Some(body.as_bytes()))],
            "replicated",
        )
        .expect("commit")
        .to_string()
    };
    assert_eq!(replicas[0].github_push(&commit(2)).await, 202);
    fleet.converge(2).await;

    // The same delivery to B and C at once: one sync, one version.
    let after = commit(3);
    let body = serde_json::json!({"ref": "refs/heads/main", "after": after}).to_string();
    let send = |r: &ServerProcess| {
        r.http
            .post(r.url("/webhooks/cfg"))
            .header("x-github-event", "push")
            .header("x-github-delivery", "same-delivery-on-two-replicas")
            .header(
                "x-hub-signature-256",
                util::sign_github(util::SECRET, body.as_bytes()),
            )
            .body(body.clone())
            .send()
    };
    let (x, y) = tokio::join!(send(&replicas[1]), send(&replicas[2]));
    let mut statuses = vec![
        x.expect("b")
            .json::<serde_json::Value>()
            .await
            .expect("json")["status"]
            .clone(),
        y.expect("c")
            .json::<serde_json::Value>()
            .await
            .expect("json")["status"]
            .clone(),
    ];
    statuses.sort_by_key(|s| s.to_string());
    assert_eq!(
        statuses,
        [serde_json::json!("duplicate"), serde_json::json!("queued")]
    );
    fleet.converge(3).await;
    let topic = replicas[0].get("/api/v1/topics/payments").await;
    assert_eq!(topic["version"], 3, "exactly one new version");

    // Replica B dies with its two instances attached: they move to A or C and resume.
    replicas[1].kill();
    assert_eq!(replicas[2].github_push(&commit(4)).await, 202);
    fleet.converge(4).await;

    // The listener connections are cut during a burst of pushes: every instance still gets every version.
    let (cut_tx, mut cut_rx) = tokio::sync::oneshot::channel::<()>();
    let dbname = db.url.rsplit('/').next().unwrap_or_default().to_string();
    let killer = tokio::spawn(async move {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .expect("admin");
        let mut cut = 0usize;
        for _ in 0..3 {
            // Only this test's database: other tests may be listening too.
            let killed: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()",
            )
            .bind(&dbname)
            .bind(confcast::store::postgres::LISTENER_APPLICATION_NAME)
            .fetch_all(&mut admin)
            .await
            .unwrap_or_default();
            cut += killed.iter().filter(|k| **k).count();
            tokio::select! {
                _ = &mut cut_rx => return cut,
                _ = tokio::time::sleep(Duration::from_millis(150)) => {}
            }
        }
        cut
    });
    for n in 5..=9 {
        let target = if n % 2 == 0 {
            &replicas[0]
        } else {
            &replicas[2]
        };
        assert_eq!(target.github_push(&commit(n)).await, 202);
        let v = n as u64;
        // wait for the store, not the instances, so the pushes land as separate versions
        tokio::time::timeout(WAIT, async {
            loop {
                if target.get("/api/v1/topics/payments").await["version"] == v {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("version published");
    }
    let _ = cut_tx.send(());
    let cut = killer.await.expect("killer");
    assert!(
        cut >= 2,
        "listener connections of both live replicas were cut ({cut})"
    );
    fleet.converge(9).await;
    for (name, versions) in &fleet.seen {
        assert_eq!(versions, &(1..=9).collect::<Vec<u64>>(), "{name}");
    }
}
