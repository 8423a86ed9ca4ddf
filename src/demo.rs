//! `confcast demo`: the embedded-default tour, and [`ConfigRepo`], the small git helper it shares
//! with the tests (a bare repo that commits files without a working tree).
//!
//! The demo is real end to end: a real bare repo, the real server on SQLite, three real WebSocket
//! instances, a properly signed GitHub webhook over real HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use git2::{Index, IndexEntry, IndexTime, Oid, Repository, Signature};
use tokio::sync::Mutex;

use crate::client::{Identity, Session};
use crate::config::Config;
use crate::protocol::{AckStatus, ServerMessage};

/// The demo config repo's files, built into the binary so the demo runs from anywhere.
pub const DEMO_FILES: &[(&str, &str)] = &[
    (
        "payments/app.toml",
        include_str!("../fixtures/demo-repo/payments/app.toml"),
    ),
    (
        "payments/limits.json",
        include_str!("../fixtures/demo-repo/payments/limits.json"),
    ),
    (
        "billing/plans.yaml",
        include_str!("../fixtures/demo-repo/billing/plans.yaml"),
    ),
    (
        "web/features.json",
        include_str!("../fixtures/demo-repo/web/features.json"),
    ),
];

/// A bare git repository that commits straight into a branch: the "forge" side of demos and tests.
pub struct ConfigRepo {
    repo: Repository,
    path: PathBuf,
}

impl ConfigRepo {
    /// Creates an empty bare repo at `path`.
    pub fn init(path: &Path) -> Result<ConfigRepo, git2::Error> {
        let repo = Repository::init_bare(path)?;
        Ok(ConfigRepo {
            repo,
            path: path.to_path_buf(),
        })
    }

    /// `file://` URL of the repo.
    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits on `branch`: `Some(bytes)` writes a file, `None` deletes it; other files stay.
    /// Returns the new commit id.
    pub fn commit(
        &self,
        branch: &str,
        changes: &[(&str, Option<&[u8]>)],
        message: &str,
    ) -> Result<Oid, git2::Error> {
        let refname = format!("refs/heads/{branch}");
        let parent = self
            .repo
            .find_reference(&refname)
            .ok()
            .and_then(|r| r.peel_to_commit().ok());
        let mut index = Index::new()?;
        if let Some(p) = &parent {
            index.read_tree(&p.tree()?)?;
        }
        for (path, content) in changes {
            match content {
                Some(bytes) => index.add(&entry(path, bytes.len(), self.repo.blob(bytes)?))?,
                None => index.remove_path(Path::new(path))?,
            }
        }
        self.write_commit(&refname, &mut index, parent.as_ref(), message)
    }

    /// Commits with a rename of `from` to `to` (content unchanged) plus other `changes`.
    pub fn rename(
        &self,
        branch: &str,
        from: &str,
        to: &str,
        message: &str,
    ) -> Result<Oid, git2::Error> {
        let refname = format!("refs/heads/{branch}");
        let parent = self.repo.find_reference(&refname)?.peel_to_commit()?;
        let tree = parent.tree()?;
        let blob = tree
            .get_path(Path::new(from))?
            .to_object(&self.repo)?
            .peel_to_blob()?;
        let content = blob.content();
        let mut index = Index::new()?;
        index.read_tree(&tree)?;
        index.remove_path(Path::new(from))?;
        index.add(&entry(to, content.len(), blob.id()))?;
        self.write_commit(&refname, &mut index, Some(&parent), message)
    }

    /// Commits `changes` on `branch` as a merge of `other` (two parents): the caller passes the
    /// files the merge brings in.
    pub fn merge(
        &self,
        branch: &str,
        other: &str,
        changes: &[(&str, Option<&[u8]>)],
        message: &str,
    ) -> Result<Oid, git2::Error> {
        let refname = format!("refs/heads/{branch}");
        let ours = self.repo.find_reference(&refname)?.peel_to_commit()?;
        let theirs = self
            .repo
            .find_reference(&format!("refs/heads/{other}"))?
            .peel_to_commit()?;
        let mut index = Index::new()?;
        index.read_tree(&ours.tree()?)?;
        for (path, content) in changes {
            match content {
                Some(bytes) => index.add(&entry(path, bytes.len(), self.repo.blob(bytes)?))?,
                None => index.remove_path(Path::new(path))?,
            }
        }
        let tree = self.repo.find_tree(index.write_tree_to(&self.repo)?)?;
        let sig = Signature::now("Ada Config", "ada@example.com")?;
        let oid = self
            .repo
            .commit(None, &sig, &sig, message, &tree, &[&ours, &theirs])?;
        self.repo.reference(&refname, oid, true, message)?;
        Ok(oid)
    }

    /// Creates `branch` at `commit`.
    pub fn branch(&self, branch: &str, commit: Oid) -> Result<(), git2::Error> {
        self.repo
            .reference(&format!("refs/heads/{branch}"), commit, false, "branch")?;
        Ok(())
    }

    /// Deletes `branch`.
    pub fn delete_branch(&self, branch: &str) -> Result<(), git2::Error> {
        self.repo
            .find_reference(&format!("refs/heads/{branch}"))?
            .delete()
    }

    /// Commits with no change at all (same tree as the parent).
    pub fn empty_commit(&self, branch: &str, message: &str) -> Result<Oid, git2::Error> {
        self.commit(branch, &[], message)
    }

    /// Points `branch` at `commit` (a force push when it is not a descendant).
    pub fn reset(&self, branch: &str, commit: Oid) -> Result<(), git2::Error> {
        self.repo
            .reference(&format!("refs/heads/{branch}"), commit, true, "force push")?;
        Ok(())
    }

    fn write_commit(
        &self,
        refname: &str,
        index: &mut Index,
        parent: Option<&git2::Commit<'_>>,
        message: &str,
    ) -> Result<Oid, git2::Error> {
        let tree_id = index.write_tree_to(&self.repo)?;
        let tree = self.repo.find_tree(tree_id)?;
        let sig = Signature::now("Ada Config", "ada@example.com")?;
        let parents: Vec<&git2::Commit<'_>> = parent.into_iter().collect();
        // Commit without updating a ref first, then move the ref: works for new and existing branches.
        let oid = self
            .repo
            .commit(None, &sig, &sig, message, &tree, &parents)?;
        self.repo.reference(refname, oid, true, message)?;
        if self.repo.head().is_err() {
            self.repo.set_head(refname)?;
        }
        Ok(oid)
    }
}

fn entry(path: &str, len: usize, id: Oid) -> IndexEntry {
    IndexEntry {
        ctime: IndexTime::new(0, 0),
        mtime: IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        file_size: u32::try_from(len).unwrap_or(u32::MAX),
        id,
        flags: 0,
        flags_extended: 0,
        path: path.as_bytes().to_vec(),
    }
}

/// Options of `confcast demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    /// Where the demo keeps its repo and database; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    pub exit_when_converged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("server: {0}")]
    Serve(#[from] crate::ServeError),
    #[error("instance: {0}")]
    Client(#[from] crate::client::ClientError),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Stuck(String),
}

const SECRET_ENV: &str = "CONFCAST_DEMO_SECRET";

/// Runs the tour; with `exit_when_converged` returns once the rollout converged, otherwise serves
/// until `shutdown` completes.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("confcast-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let origin_path = dir.join("origin.git");
    let origin = if origin_path.join("HEAD").exists() {
        ConfigRepo {
            repo: Repository::open_bare(&origin_path)?,
            path: origin_path.clone(),
        }
    } else {
        let origin = ConfigRepo::init(&origin_path)?;
        let files: Vec<(&str, Option<&[u8]>)> = DEMO_FILES
            .iter()
            .map(|(p, c)| (*p, Some(c.as_bytes())))
            .collect();
        origin.commit("main", &files, "Initial configuration")?;
        origin
    };
    let secret = random_secret();
    let toml = format!(
        "[server]\nlisten = \"{listen}\"\ndata_dir = \"{data}\"\n\n[[repos]]\nname = \"demo\"\nurl = \"{url}\"\nbranch = \"main\"\nsecret_env = \"{SECRET_ENV}\"\n",
        listen = opts.listen,
        data = dir.join("data").display(),
        url = origin.url(),
    );
    let lookup_secret = secret.clone();
    let config = Config::parse(&toml, std::iter::empty(), &dir, &move |name| {
        (name == SECRET_ENV).then(|| lookup_secret.clone())
    })?;

    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, config, async move {
        let _ = stop_rx.await;
    }));

    println!("confcast demo");
    println!("  data directory : {}", dir.display());
    println!("  config repo    : {} (branch main)", origin.url());
    println!("  API            : {base}/api/v1/topics   {base}/api/v1/instances");
    println!("  rollout        : {base}/api/v1/topics/payments");
    println!("  metrics        : {base}/metrics   (Prometheus)");
    println!("  dashboard      : {base}/ (open in a browser)");
    println!("  WebSocket      : ws://{addr}/ws");
    println!("  webhook        : POST {base}/webhooks/demo (GitHub-signed)");
    println!();

    let ws = format!("ws://{addr}/ws");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut instances = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let identity = Identity {
            instance: name.into(),
            app: Some("shop".into()),
            labels: BTreeMap::from([("zone".into(), "demo".into())]),
        };
        let mut session = Session::connect(&ws, &identity).await?;
        session
            .subscribe(&["payments".into(), "billing".into(), "web".into()], None)
            .await?;
        instances.push(tokio::spawn(instance_loop(name, session, log.clone())));
    }

    let http = reqwest::Client::new();
    let started = Instant::now();
    let v1 = wait_converged(&http, &base, "payments", None).await?;
    println!(
        "rollout converged: 3/3 instances applied payments v{v1} ({} ms)",
        started.elapsed().as_millis()
    );
    println!();

    let new_toml = DEMO_FILES[0]
        .1
        .replace("timeout_ms = 2500", "timeout_ms = 1500");
    let commit = origin.commit(
        "main",
        &[("payments/app.toml", Some(new_toml.as_bytes()))],
        "payments: lower timeout to 1500 ms",
    )?;
    println!("committed {commit}: payments: lower timeout to 1500 ms");
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": commit.to_string(),
        "repository": {"full_name": "demo/config", "clone_url": origin.url()},
    })
    .to_string();
    let pushed = Instant::now();
    let reply = http
        .post(format!("{base}/webhooks/demo"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", format!("demo-{}", commit))
        .header(
            "x-hub-signature-256",
            crate::webhook::github::sign(secret.as_bytes(), body.as_bytes()),
        )
        .body(body)
        .send()
        .await?;
    println!("sent signed GitHub push webhook: HTTP {}", reply.status());
    let v2 = wait_converged(&http, &base, "payments", Some(v1)).await?;
    println!(
        "rollout converged: 3/3 instances applied payments v{v2}, {} ms from webhook to last ack",
        pushed.elapsed().as_millis()
    );
    println!();

    if opts.exit_when_converged {
        let _ = stop_tx.send(());
    } else {
        println!("Still serving. Try: curl {base}/api/v1/instances");
        println!("Send a command: confcast command send --name refresh-cache --all --wait");
        println!("Push more: git clone {} ; edit ; commit ; git push ; then curl -X POST {base}/api/v1/repos/demo/sync", origin.url());
        println!("Ctrl-C to stop.");
        shutdown.await;
        let _ = stop_tx.send(());
    }
    match server.await {
        Ok(result) => result?,
        Err(e) => return Err(DemoError::Stuck(format!("server task failed: {e}"))),
    }
    for i in instances {
        i.abort();
    }
    Ok(())
}

async fn instance_loop(name: &'static str, mut session: Session, log: Arc<Mutex<Vec<String>>>) {
    loop {
        let message = match session.next().await {
            Ok(m) => m,
            Err(e) => {
                println!("  {name}: disconnected ({e})");
                return;
            }
        };
        let (topic, version, what) = match message {
            ServerMessage::Snapshot(s) => (
                s.topic,
                s.version,
                format!("snapshot, {} files", s.files.len()),
            ),
            ServerMessage::Change(c) => {
                let files: Vec<String> = c
                    .files
                    .iter()
                    .map(|f| format!("{} {:?}", f.path, f.status).to_lowercase())
                    .collect();
                (
                    c.topic,
                    c.version,
                    format!("change seq {} ({})", c.seq, files.join(", ")),
                )
            }
            ServerMessage::Command {
                id, name: command, ..
            } => {
                // The second job: a command such as refresh-cache, done at once and acked.
                let line = format!("  {name}: command {command} ({id}) -> done, ack sent");
                println!("{line}");
                log.lock().await.push(line);
                if session
                    .ack_command(&id, crate::protocol::CommandStatus::Done, None)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            _ => continue,
        };
        let line = format!("  {name}: {topic} v{version} {what} -> applied, ack sent");
        println!("{line}");
        log.lock().await.push(line);
        if session
            .ack(&topic, version, AckStatus::Applied, None)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Polls the rollout of `topic` until every subscribed instance applied a version newer than `after`.
async fn wait_converged(
    http: &reqwest::Client,
    base: &str,
    topic: &str,
    after: Option<u64>,
) -> Result<u64, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(reply) = http
            .get(format!("{base}/api/v1/topics/{topic}"))
            .send()
            .await
        {
            if let Ok(v) = reply.json::<serde_json::Value>().await {
                let version = v["version"].as_u64().unwrap_or(0);
                let applied = v["rollout"]["applied"].as_array().map_or(0, Vec::len);
                if v["rollout"]["converged"] == true
                    && applied == 3
                    && after.is_none_or(|a| version > a)
                {
                    return Ok(version);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(DemoError::Stuck(format!(
        "topic {topic} did not converge within 60 s"
    )))
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}
