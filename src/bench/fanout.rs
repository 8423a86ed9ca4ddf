//! `confcast bench fanout | serve | instances`: webhook-to-last-instance latency, server CPU per
//! change, memory per connection and connect rate for a fleet of N instances, side by side with
//! the raw broadcaster of [`super::baseline`] in the same run; optionally the storms (acks of a
//! whole fleet at once, a burst of pushes, a restart with every instance resuming).
//!
//! The servers run as child processes (`confcast bench serve`), so the memory and CPU figures are
//! theirs alone, read from `/proc`; the instances run here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use super::fleet::{Fleet, Speaks, Target};
use super::{os, BenchError};
use crate::config::Config;
use crate::demo::ConfigRepo;

/// Webhook secret of the bench server's repo (a benchmark, not a secret).
const SECRET: &str = "bench-secret-not-a-secret";
const TOPIC_FILE: &str = "payments/app.toml";

/// What `bench fanout` and `bench instances` do.
#[derive(Debug, Clone)]
pub struct Options {
    pub instances: usize,
    pub changes: usize,
    /// Size of the changed file.
    pub bytes: usize,
    /// Handshakes in flight at once while the fleet connects.
    pub parallel: usize,
    /// Also run the ack storm, the push burst and (for `fanout`) the restart storm.
    pub storms: bool,
    /// Pushes of the burst, sent over `burst_secs`.
    pub burst: usize,
    pub burst_secs: u64,
    /// Skip the raw broadcaster (`fanout` only).
    pub no_baseline: bool,
}

/// The figures of one server under one fleet.
#[derive(Debug, Default, Clone)]
struct Figures {
    latencies: Vec<Duration>,
    cpu_per_change: Option<Duration>,
    rss_per_connection_kib: Option<f64>,
    connect_rate: f64,
}

impl Figures {
    fn pct(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return f64::NAN;
        }
        let at = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[at.min(l.len() - 1)].as_secs_f64() * 1e3
    }

    fn print(&self, name: &str) {
        println!(
            "  {name:<9} webhook->last instance p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms | CPU/change {} | RSS/conn {} | connect {:.0}/s",
            self.pct(0.5),
            self.pct(0.99),
            self.pct(1.0),
            self.cpu_per_change
                .map_or("n/a".into(), |c| format!("{:.1} ms", c.as_secs_f64() * 1e3)),
            self.rss_per_connection_kib
                .map_or("n/a".into(), |k| format!("{k:.1} KiB")),
            self.connect_rate
        );
    }
}

/// A server child process.
struct Child {
    process: tokio::process::Child,
    addr: SocketAddr,
}

impl Child {
    /// Starts `confcast bench serve` with `args` and waits for its `ready` line.
    async fn spawn(args: &[String]) -> Result<Child, BenchError> {
        let exe = std::env::current_exe()?;
        let mut process = tokio::process::Command::new(exe)
            .arg("bench")
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = process
            .stdout
            .take()
            .ok_or_else(|| BenchError::Stalled("no stdout from bench serve".into()))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| BenchError::Stalled("bench serve did not start in 60 s".into()))??
            .ok_or_else(|| BenchError::Stalled("bench serve exited".into()))?;
        let addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::Stalled(format!("bench serve said `{line}`")))?;
        // Keep reading, so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Child { process, addr })
    }

    fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// SIGTERM (a clean shutdown, as a restart would do), then waits for the exit.
    async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(pid) = self.pid() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
        Ok(())
    }
}

/// A free loopback port (bound and released; the child binds it right after).
fn free_port() -> Result<u16, BenchError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `confcast bench fanout`: the raw broadcaster, then confcast, with the same fleet size, and the
/// ratio of the two.
pub async fn fanout(options: Options) -> Result<(), BenchError> {
    if options.instances == 0 || options.changes == 0 {
        return Err(BenchError::Stalled(
            "give at least one instance and one change".into(),
        ));
    }
    // This process holds the instances' sockets; each server child holds as many.
    let limit = os::raise_fd_limit(options.instances as u64 + 1024)?;
    println!(
        "fanout: {} instances, {} changes of {} B, open-file limit {limit}",
        options.instances, options.changes, options.bytes
    );
    let baseline = if options.no_baseline {
        None
    } else {
        let port = free_port()?;
        let child = Child::spawn(&[
            "--baseline".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ])
        .await?;
        let figures = measure_baseline(&child, &options).await?;
        child.stop().await?;
        figures.print("raw");
        Some(figures)
    };
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let args = vec![
        "--dir".into(),
        dir.path().display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--bytes".into(),
        options.bytes.to_string(),
    ];
    let child = Child::spawn(&args).await?;
    let repo = ConfigRepo::init(&dir.path().join("origin.git"))?;
    let mut run = ConfcastRun::connect(child.addr, child.pid(), repo, &options).await?;
    let figures = run.measure(&options).await?;
    figures.print("confcast");
    if let Some(raw) = &baseline {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let cpu = match (figures.cpu_per_change, raw.cpu_per_change) {
            // Below one 10 ms tick per change for the floor: no ratio to speak of.
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.2}x", ratio(a.as_secs_f64(), b.as_secs_f64()))
            }
            _ => "n/a".into(),
        };
        println!(
            "  ratio confcast/raw: p50 {:.2}x, p99 {:.2}x, CPU/change {cpu}",
            ratio(figures.pct(0.5), raw.pct(0.5)),
            ratio(figures.pct(0.99), raw.pct(0.99)),
        );
    }
    if options.storms {
        run.ack_storm().await?;
        run.burst(&options).await?;
        // The restart storm: the same server, stopped cleanly and started again on its data.
        child.stop().await?;
        let stopped = Instant::now();
        let resumed_before = run.fleet.state.resumed.load(Ordering::Acquire);
        let child = Child::spawn(&args).await?;
        let ready = Instant::now();
        let cpu0 = child.pid().and_then(os::cpu_secs);
        let own0 = os::cpu_secs(std::process::id());
        let s = run.fleet.state.clone();
        let n = options.instances;
        let first = {
            let s = s.clone();
            tokio::spawn(async move {
                let _ = s
                    .wait(Duration::from_secs(300), String::new, || {
                        s.resumed.load(Ordering::Acquire) > resumed_before
                    })
                    .await;
                ready.elapsed()
            })
        };
        s.wait(
            Duration::from_secs(300),
            || {
                format!(
                    "restart: {} of {n} resumed after 300 s",
                    s.resumed.load(Ordering::Acquire) - resumed_before
                )
            },
            || s.resumed.load(Ordering::Acquire) - resumed_before >= n,
        )
        .await?;
        let took = ready.elapsed();
        let cpu = match (cpu0, child.pid().and_then(os::cpu_secs)) {
            (Some(a), Some(b)) => format!("{:.1} s", b - a),
            _ => "n/a".into(),
        };
        let own = match (own0, os::cpu_secs(std::process::id())) {
            (Some(a), Some(b)) => format!("{:.1} s", b - a),
            _ => "n/a".into(),
        };
        let first = first.await.unwrap_or_default();
        println!(
            "  restart storm: {n} instances resumed with `since` {:.2} s after the new server process started ({:.2} s after the old one stopped; first resumed at {:.2} s); server CPU {cpu}, instances' CPU {own}; gaps {}",
            took.as_secs_f64(),
            stopped.elapsed().as_secs_f64(),
            first.as_secs_f64(),
            s.gaps.load(Ordering::Acquire)
        );
        run.fleet.close().await;
        child.stop().await?;
    } else {
        run.fleet.close().await;
        child.stop().await?;
    }
    Ok(())
}

/// The raw broadcaster under the same fleet.
async fn measure_baseline(child: &Child, options: &Options) -> Result<Figures, BenchError> {
    let pid = child.pid();
    let rss0 = pid.and_then(os::rss_kib);
    let target = Target {
        addr: child.addr,
        path: "/ws".into(),
        speaks: Speaks::Nothing,
    };
    let connecting = Instant::now();
    let fleet = Fleet::connect(
        target,
        options.instances,
        options.changes as u64 + 1,
        options.parallel,
        Duration::from_secs(600),
    )
    .await?;
    let connect_rate = options.instances as f64 / connecting.elapsed().as_secs_f64();
    // Let the server settle (allocator, lazily grown buffers) before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = pid.and_then(os::rss_kib);
    let http = reqwest::Client::new();
    let cpu0 = pid.and_then(os::cpu_secs);
    let mut latencies = Vec::new();
    for n in 1..=options.changes as u64 {
        let frame = change_frame(n, options.bytes);
        let sent = Instant::now();
        http.post(format!("http://{}/broadcast", child.addr))
            .body(frame)
            .send()
            .await?;
        let s = &fleet.state;
        s.all_hold(n, Duration::from_secs(60), "raw").await?;
        let last = s.last_arrival(n).unwrap_or(sent);
        latencies.push(last.saturating_duration_since(sent));
    }
    let cpu1 = pid.and_then(os::cpu_secs);
    fleet.close().await;
    Ok(Figures {
        latencies,
        cpu_per_change: cpu_per_change(cpu0, cpu1, options.changes),
        rss_per_connection_kib: rss_per_connection(rss0, rss1, options.instances),
        connect_rate,
    })
}

/// A change frame of the size confcast sends for a `bytes`-byte file, for the raw broadcaster.
fn change_frame(version: u64, bytes: usize) -> String {
    serde_json::json!({
        "type": "change", "seq": version, "topic": "payments", "version": version,
        "previous_version": version - 1, "commit": format!("{version:040x}"),
        "author": "Bench <bench@example.com>", "message": "bench",
        "files": [{"path": TOPIC_FILE, "status": "modified", "sha": format!("{version:040x}"),
                   "content": file_content(version, bytes)}]
    })
    .to_string()
}

/// A valid TOML file of about `bytes` bytes (the topic's files are validated as TOML).
fn file_content(n: u64, bytes: usize) -> String {
    let head = format!("change = {n}\npad = \"");
    let fill = bytes.saturating_sub(head.len() + 2);
    format!("{head}{}\"\n", "x".repeat(fill))
}

fn cpu_per_change(before: Option<f64>, after: Option<f64>, changes: usize) -> Option<Duration> {
    let spent = after? - before?;
    Some(Duration::from_secs_f64(
        spent.max(0.0) / changes.max(1) as f64,
    ))
}

fn rss_per_connection(before: Option<u64>, after: Option<u64>, n: usize) -> Option<f64> {
    Some((after? as f64 - before? as f64) / n.max(1) as f64)
}

/// A confcast server with a connected fleet, pushed to through its repo and webhook.
struct ConfcastRun {
    addr: SocketAddr,
    pid: Option<u32>,
    repo: ConfigRepo,
    http: reqwest::Client,
    fleet: Fleet,
    /// The topic's version now.
    version: u64,
    connect_rate: f64,
    rss_before: Option<u64>,
    pushes: u64,
}

impl ConfcastRun {
    async fn connect(
        addr: SocketAddr,
        pid: Option<u32>,
        repo: ConfigRepo,
        options: &Options,
    ) -> Result<ConfcastRun, BenchError> {
        let http = reqwest::Client::new();
        let version = wait_version(&http, addr, |v| v >= 1, Duration::from_secs(60)).await?;
        let rss_before = pid.and_then(os::rss_kib);
        let target = Target {
            addr,
            path: "/ws".into(),
            speaks: Speaks::Confcast,
        };
        let versions = version + options.changes as u64 + options.burst as u64 + 8;
        let connecting = Instant::now();
        let fleet = Fleet::connect(
            target,
            options.instances,
            versions,
            options.parallel,
            Duration::from_secs(600),
        )
        .await?;
        let connect_rate = options.instances as f64 / connecting.elapsed().as_secs_f64();
        Ok(ConfcastRun {
            addr,
            pid,
            repo,
            http,
            fleet,
            version,
            connect_rate,
            rss_before,
            pushes: 0,
        })
    }

    /// Commits a new version of the file and sends the signed webhook; returns when it was sent.
    async fn push(&mut self, bytes: usize) -> Result<(git2::Oid, Instant), BenchError> {
        self.pushes += 1;
        let content = file_content(1_000_000 + self.pushes, bytes);
        let commit =
            self.repo
                .commit("main", &[(TOPIC_FILE, Some(content.as_bytes()))], "bench")?;
        let payload =
            serde_json::json!({"ref": "refs/heads/main", "after": commit.to_string()}).to_string();
        let sent = Instant::now();
        let answer = self
            .http
            .post(format!("http://{}/webhooks/bench", self.addr))
            .header("x-github-event", "push")
            .header(
                "x-hub-signature-256",
                crate::webhook::github::sign(SECRET.as_bytes(), payload.as_bytes()),
            )
            .body(payload)
            .send()
            .await?;
        if !answer.status().is_success() {
            return Err(BenchError::Stalled(format!(
                "webhook answered {}",
                answer.status()
            )));
        }
        Ok((commit, sent))
    }

    async fn measure(&mut self, options: &Options) -> Result<Figures, BenchError> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss1 = self.pid.and_then(os::rss_kib);
        let cpu0 = self.pid.and_then(os::cpu_secs);
        let mut latencies = Vec::new();
        for _ in 0..options.changes {
            let (_, sent) = self.push(options.bytes).await?;
            self.version += 1;
            let want = self.version;
            let s = &self.fleet.state;
            s.all_hold(want, Duration::from_secs(60), "fan-out").await?;
            let last = s.last_arrival(want).unwrap_or(sent);
            latencies.push(last.saturating_duration_since(sent));
        }
        let cpu1 = self.pid.and_then(os::cpu_secs);
        Ok(Figures {
            latencies,
            cpu_per_change: cpu_per_change(cpu0, cpu1, options.changes),
            rss_per_connection_kib: rss_per_connection(self.rss_before, rss1, options.instances),
            connect_rate: self.connect_rate,
        })
    }

    /// Every instance acks one version at once: time from the last ack sent until the rollout
    /// shows them all applied.
    async fn ack_storm(&mut self) -> Result<(), BenchError> {
        let s = self.fleet.state.clone();
        let n = self.fleet_size();
        s.acking.store(true, Ordering::Release);
        let recorded_before = s.acks_recorded.load(Ordering::Acquire);
        let (_, sent) = self.push(64).await?;
        self.version += 1;
        let want = self.version;
        s.all_hold(want, Duration::from_secs(60), "ack storm")
            .await?;
        // Poll the rollout as an operator would, until every instance shows as applied.
        let seen = loop {
            let applied = rollout_applied(&self.http, self.addr, want).await?;
            if applied >= n {
                break Instant::now();
            }
            if sent.elapsed() > Duration::from_secs(120) {
                return Err(BenchError::Stalled(format!(
                    "ack storm: rollout shows {applied} of {n} applied after 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let last_ack = s.started + Duration::from_nanos(s.last_ack_ns.load(Ordering::Acquire));
        let last_recorded =
            s.started + Duration::from_nanos(s.last_recorded_ns.load(Ordering::Acquire));
        s.acking.store(false, Ordering::Release);
        println!(
            "  ack storm: {n} acks of one version; the last ack_recorded (stored) came {:.0} ms and the rollout showed all applied {:.0} ms after the last ack was sent ({} ack_recorded so far)",
            last_recorded.saturating_duration_since(last_ack).as_secs_f64() * 1e3,
            seen.saturating_duration_since(last_ack).as_secs_f64() * 1e3,
            s.acks_recorded.load(Ordering::Acquire) - recorded_before
        );
        Ok(())
    }

    /// `burst` pushes spread over `burst_secs`: every instance must end on the last version with
    /// no version skipped.
    async fn burst(&mut self, options: &Options) -> Result<(), BenchError> {
        let s = self.fleet.state.clone();
        let n = self.fleet_size();
        let gaps_before = s.gaps.load(Ordering::Acquire);
        let every =
            Duration::from_secs_f64(options.burst_secs as f64 / options.burst.max(1) as f64);
        let started = Instant::now();
        let mut last = None;
        for i in 0..options.burst {
            let at = started + every * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(at.into()).await;
            last = Some(self.push(options.bytes).await?.0);
        }
        let pushed = started.elapsed();
        let Some(last) = last else { return Ok(()) };
        // Pushes during a sync coalesce: the last version is whatever the server published for
        // the last commit.
        let deadline = Instant::now() + Duration::from_secs(120);
        let version = loop {
            let topic = topic_state(&self.http, self.addr).await?;
            if topic.1 == last.to_string() {
                break topic.0;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Stalled("burst: last push never synced".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let published = version - self.version;
        self.version = version;
        s.all_hold(version, Duration::from_secs(120), "burst")
            .await?;
        println!(
            "  burst: {} pushes in {:.1} s -> {published} versions; all {n} instances at v{version} {:.0} ms after the last push; versions skipped: {}",
            options.burst,
            pushed.as_secs_f64(),
            s.last_arrival(version)
                .map_or(0.0, |t| t.saturating_duration_since(started + pushed).as_secs_f64() * 1e3),
            s.gaps.load(Ordering::Acquire) - gaps_before
        );
        Ok(())
    }

    fn fleet_size(&self) -> usize {
        self.fleet.state.size
    }
}

/// `GET /api/v1/topics/payments` (null until the topic exists).
async fn topic_json(
    http: &reqwest::Client,
    addr: SocketAddr,
) -> Result<serde_json::Value, BenchError> {
    Ok(http
        .get(format!("http://{addr}/api/v1/topics/payments"))
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default())
}

/// The topic's (version, commit).
async fn topic_state(
    http: &reqwest::Client,
    addr: SocketAddr,
) -> Result<(u64, String), BenchError> {
    let v = topic_json(http, addr).await?;
    Ok((
        v["version"].as_u64().unwrap_or(0),
        v["commit"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn wait_version(
    http: &reqwest::Client,
    addr: SocketAddr,
    done: impl Fn(u64) -> bool,
    limit: Duration,
) -> Result<u64, BenchError> {
    let started = Instant::now();
    loop {
        let (version, _) = topic_state(http, addr).await?;
        if done(version) {
            return Ok(version);
        }
        if started.elapsed() > limit {
            return Err(BenchError::Stalled(format!(
                "topic at version {version} after {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Instances the rollout of `payments` shows as having applied `version`.
async fn rollout_applied(
    http: &reqwest::Client,
    addr: SocketAddr,
    version: u64,
) -> Result<usize, BenchError> {
    let v = topic_json(http, addr).await?;
    let applied = v["rollout"]["applied"].as_array().map_or(0, |a| {
        a.iter()
            .filter(|i| i["version"].as_u64() == Some(version))
            .count()
    });
    Ok(applied)
}

/// `confcast bench instances --server URL`: the fleet against a server started elsewhere (with
/// `confcast bench serve`, whose `--dir` holds the repo pushed to). Memory and CPU figures need
/// the server's `--pid`.
pub async fn instances(
    server: SocketAddr,
    dir: &Path,
    pid: Option<u32>,
    options: Options,
) -> Result<(), BenchError> {
    let limit = os::raise_fd_limit(options.instances as u64 + 1024)?;
    println!(
        "instances: {} against {server}, {} changes of {} B, open-file limit {limit}",
        options.instances, options.changes, options.bytes
    );
    let repo = ConfigRepo::init(&dir.join("origin.git"))?;
    let mut run = ConfcastRun::connect(server, pid, repo, &options).await?;
    let figures = run.measure(&options).await?;
    figures.print("confcast");
    if options.storms {
        run.ack_storm().await?;
        run.burst(&options).await?;
    }
    run.fleet.close().await;
    Ok(())
}

/// `confcast bench serve`: a confcast server on SQLite in `dir` with one repo (`dir/origin.git`,
/// topic `payments`, webhook `/webhooks/bench` with the secret `bench-secret-not-a-secret`), or with
/// `baseline`, the raw broadcaster. Prints `ready <addr> pid <pid>` once it accepts connections.
pub async fn serve(
    dir: Option<PathBuf>,
    listen: SocketAddr,
    bytes: usize,
    baseline: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), BenchError> {
    let files = crate::listener::raise_open_file_limit();
    let listener = crate::listen(listen)?;
    let addr = listener.local_addr()?;
    if baseline {
        println!("ready {addr} pid {} files {files}", std::process::id());
        return Ok(super::baseline::serve(listener, shutdown).await?);
    }
    let kept;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            kept = tempfile::tempdir()?;
            kept.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let repo = ConfigRepo::init(&dir.join("origin.git"))?;
    if git2::Repository::open_bare(repo.path())?
        .find_reference("refs/heads/main")
        .is_err()
    {
        let content = file_content(0, bytes);
        repo.commit("main", &[(TOPIC_FILE, Some(content.as_bytes()))], "initial")?;
    }
    let toml = format!(
        "[server]\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n[limits]\nmax_connections = {}\n[[repos]]\nname = \"bench\"\nurl = \"{}\"\nsecret_env = \"BENCH_SECRET\"\n",
        dir.join("data").display(),
        files.saturating_sub(1024),
        repo.url()
    );
    let config = Config::parse(&toml, std::iter::empty(), &dir, &|_| Some(SECRET.into()))?;
    println!(
        "ready {addr} pid {} files {files} dir {}",
        std::process::id(),
        dir.display()
    );
    crate::serve(listener, config, shutdown)
        .await
        .map_err(|e| BenchError::Stalled(format!("server: {e}")))?;
    Ok(())
}
