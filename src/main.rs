//! The `confcast` binary: parses the command line and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "confcast",
    version,
    about = "A git repository as a live configuration channel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        #[arg(long, default_value = "config/confcast.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print what it would serve.
    CheckConfig {
        #[arg(long, default_value = "config/confcast.toml")]
        config: PathBuf,
    },
    /// Print the store's log epoch; with --new, start a new one (every instance then starts over
    /// from snapshots). For after restoring a backup by hand, or whenever the log must not be trusted.
    Epoch {
        #[arg(long, default_value = "config/confcast.toml")]
        config: PathBuf,
        /// Start a new epoch.
        #[arg(long)]
        new: bool,
    },
    /// Materialize topics as files under a directory and run a reload command on each new version.
    Agent(Box<AgentArgs>),
    /// Send commands to instances (refresh-cache, ...) and see what each made of them.
    #[command(name = "command", subcommand)]
    Cmd(confcast::cli::commands::CommandCli),
    /// Measure: replay speed, fan-out latency, agent apply time. Prints figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The embedded-default tour: a local repo, the server on SQLite, three instances, a signed push.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Keep the demo's repo and database here instead of a fresh temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Exit 0 as soon as the rollout has converged (for scripts).
        #[arg(long)]
        exit_when_converged: bool,
    },
    /// Publish a topic's files of an earlier version as its next version (API, admin token).
    Rollback(confcast::cli::topics::RollbackArgs),
    /// Hold a topic at its version: pushes are synced and listed, not published (API, admin).
    Pin(confcast::cli::topics::PinArgs),
    /// Release a pinned topic: its git state is published if it differs (API, admin token).
    Unpin(confcast::cli::topics::UnpinArgs),
    /// Topics and rollouts as a table; --watch, --json, --wait TOPIC@VERSION (API, read token).
    /// Exit status with --wait: 0 converged, 1 timed out, 2 error.
    Status(confcast::cli::status::StatusArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Changes per second replayed to a reconnecting instance.
    Replay {
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// File content size per change, in bytes.
        #[arg(long, default_value_t = 200)]
        bytes: usize,
    },
    /// Webhook-to-last-instance latency, server CPU per change, memory per connection and
    /// connect rate for N instances, beside a raw WebSocket broadcaster (the floor) in the same
    /// run; both servers run as child processes. --storms adds an ack storm, a burst of pushes and
    /// a restart with every instance resuming.
    Fanout {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Only confcast, no raw broadcaster.
        #[arg(long)]
        no_baseline: bool,
    },
    /// Time for the agent to receive and apply one topic of many files.
    Agent {
        #[arg(long, default_value_t = 100_000)]
        files: usize,
    },
    /// A bench server: confcast on SQLite in --dir with repo `bench` (dir/origin.git, topic
    /// `payments`, webhook secret `bench-secret-not-a-secret`), or with --baseline the raw broadcaster.
    /// Prints `ready ADDR pid PID` once it accepts connections.
    Serve {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Size of the topic's file.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        #[arg(long)]
        baseline: bool,
    },
    /// The simulated instances of `fanout`, against a `bench serve` started elsewhere.
    Instances {
        /// The bench server's address (host:port, as `bench serve` printed it).
        #[arg(long)]
        server: std::net::SocketAddr,
        /// The bench server's --dir (its repo is pushed to).
        #[arg(long)]
        dir: PathBuf,
        /// The bench server's pid, for its memory and CPU figures.
        #[arg(long)]
        pid: Option<u32>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

#[derive(clap::Args)]
struct FleetArgs {
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Size of the changed file, in bytes.
    #[arg(long, default_value_t = 1024)]
    bytes: usize,
    /// WebSocket handshakes in flight at once while the fleet connects.
    #[arg(long, default_value_t = 256)]
    parallel: usize,
    /// Also the ack storm, the push burst and (fanout) the restart storm.
    #[arg(long)]
    storms: bool,
    /// Pushes in the burst.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Seconds the burst is spread over.
    #[arg(long, default_value_t = 10)]
    burst_secs: u64,
}

impl FleetArgs {
    fn options(self, no_baseline: bool) -> confcast::bench::fanout::Options {
        confcast::bench::fanout::Options {
            instances: self.instances,
            changes: self.changes,
            bytes: self.bytes,
            parallel: self.parallel,
            storms: self.storms,
            burst: self.burst,
            burst_secs: self.burst_secs,
            no_baseline,
        }
    }
}

#[derive(clap::Args)]
struct AgentArgs {
    /// TOML file with the same settings (flags given here override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Server WebSocket URL; repeat for several servers (tried in turn).
    #[arg(long = "server")]
    servers: Vec<String>,
    #[arg(long)]
    instance: Option<String>,
    #[arg(long)]
    app: Option<String>,
    /// A label as key=value; repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// A topic pattern; repeatable.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Where the files go.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Check command, run with `sh -c` on a new version's files before they are swapped in
    /// (`CONFCAST_DIR` is the new generation); a failure acks the version `failed` with its output.
    #[arg(long)]
    check: Option<String>,
    /// Reload command, run with `sh -c` after each new version whose files changed.
    #[arg(long)]
    exec: Option<String>,
    /// Seconds the check command, the reload command or a command may take.
    #[arg(long)]
    exec_timeout: Option<u64>,
    /// Put the previous files back when the reload command fails.
    #[arg(long)]
    rollback_on_failure: bool,
    /// Environment variable holding the client token.
    #[arg(long)]
    token_env: Option<String>,
    /// Where the agent keeps its resume state (default DIR/.confcast/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A command the server may send, as NAME=SHELL (run with `sh -c`); repeatable.
    #[arg(long = "command")]
    commands: Vec<String>,
    /// Largest server message accepted, in bytes (default 64 MiB); at least the server's
    /// `max_frame_bytes` when its `[limits]` are raised.
    #[arg(long)]
    max_frame_bytes: Option<usize>,
}

/// The agent's TOML file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    #[serde(default)]
    servers: Vec<String>,
    instance: Option<String>,
    app: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    topics: Vec<String>,
    dir: Option<PathBuf>,
    check: Option<String>,
    exec: Option<String>,
    exec_timeout_secs: Option<u64>,
    #[serde(default)]
    rollback_on_failure: bool,
    token_env: Option<String>,
    state_dir: Option<PathBuf>,
    /// `[commands]`: command name = shell command.
    #[serde(default)]
    commands: std::collections::BTreeMap<String, String>,
    max_frame_bytes: Option<usize>,
}

fn agent_options(args: AgentArgs) -> anyhow::Result<confcast::agent::AgentOptions> {
    let file: AgentFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?
        }
        None => AgentFile::default(),
    };
    let servers = if args.servers.is_empty() {
        file.servers
    } else {
        args.servers
    };
    anyhow::ensure!(
        !servers.is_empty(),
        "give at least one --server ws://host:port/ws (or `servers` in the file)"
    );
    let instance = args
        .instance
        .or(file.instance)
        .context("give --instance (or `instance` in the file)")?;
    let dir = args
        .dir
        .or(file.dir)
        .context("give --dir (or `dir` in the file)")?;
    let topics = if args.topics.is_empty() {
        file.topics
    } else {
        args.topics
    };
    anyhow::ensure!(
        !topics.is_empty(),
        "give at least one --topic (or `topics` in the file)"
    );
    let mut labels = file.labels;
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l}: expected key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let token = match args.token_env.or(file.token_env) {
        Some(var) => Some(
            std::env::var(&var)
                .with_context(|| format!("token environment variable {var} is not set"))?,
        ),
        None => None,
    };
    let mut client = confcast::client::ClientOptions::new(servers[0].clone(), instance, &[]);
    client.urls = servers;
    client.topics = topics;
    client.identity.app = args.app.or(file.app);
    client.identity.labels = labels;
    client.token = token;
    client.state_dir = args.state_dir.or(file.state_dir);
    if let Some(max) = args.max_frame_bytes.or(file.max_frame_bytes) {
        client.max_frame_bytes = max;
    }
    let mut commands = file.commands;
    for c in &args.commands {
        let (name, shell) = c
            .split_once('=')
            .with_context(|| format!("--command {c}: expected NAME=SHELL"))?;
        commands.insert(name.to_string(), shell.to_string());
    }
    Ok(confcast::agent::AgentOptions {
        client,
        dir,
        check: args.check.or(file.check),
        exec: args.exec.or(file.exec),
        exec_timeout: std::time::Duration::from_secs(
            args.exec_timeout.or(file.exec_timeout_secs).unwrap_or(30),
        ),
        rollback_on_failure: args.rollback_on_failure || file.rollback_on_failure,
        commands,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo { .. }
        | Command::Bench(_)
        | Command::Rollback(_)
        | Command::Pin(_)
        | Command::Unpin(_)
        | Command::Status(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Status(args) = cli.command {
        return runtime.block_on(confcast::cli::status::run(args));
    }
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = confcast::config::Config::load(&config)?;
            let listener = confcast::listen(config.server.listen).with_context(|| {
                format!("cannot listen on {} (server.listen)", config.server.listen)
            })?;
            confcast::serve(listener, config, shutdown_signal()).await?;
            Ok(())
        }
        Command::CheckConfig { config: path } => {
            let config = confcast::config::Config::load(&path)?;
            println!("{}: ok", path.display());
            println!("listen   : {}", config.server.listen);
            println!("data_dir : {}", config.server.data_dir.display());
            println!("store    : {}", redact_store(&config.store_url()));
            print_access(&config);
            for repo in &config.repos {
                println!("repo {}:", repo.name);
                println!("  url     : {}", confcast::sync::git::redact_url(&repo.url));
                println!("  branch  : {}", repo.branch);
                println!(
                    "  webhook : POST /webhooks/{} (secret {})",
                    repo.name,
                    if !repo.webhook_secrets.is_empty() {
                        "set"
                    } else {
                        "MISSING: every webhook gets 401"
                    }
                );
                if repo.topics.is_empty() {
                    println!("  topics  : first path segment (default rule */** -> {{1}})");
                }
                for rule in &repo.topics {
                    println!("  topics  : {} -> {}", rule.pattern, rule.topic);
                }
            }
            for policy in config.rollout_policies() {
                let stages: Vec<String> = policy.stages.iter().map(ToString::to_string).collect();
                let topics = if policy.topics.is_empty() {
                    "only pushes that name it (Confcast-Rollout trailer)".to_string()
                } else {
                    policy.topics.join(", ")
                };
                println!("rollout {}:", policy.name);
                println!("  topics  : {topics}");
                println!(
                    "  stages  : {} (bake {} s each)",
                    stages.join(" -> "),
                    policy.bake_secs
                );
                let halt = match policy.halt_failed_percent {
                    0 => "on any failed ack".to_string(),
                    p => format!("above {p}% failed"),
                };
                println!(
                    "  health  : promote at {}% applied; halt {halt}{}",
                    policy.promote_applied_percent,
                    if policy.auto_revert {
                        "; auto_revert"
                    } else {
                        ""
                    }
                );
            }
            if let Some(problem) = config.exposure_problem(config.server.listen) {
                eprintln!("error: {problem}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Epoch { config: path, new } => {
            let config = confcast::config::Config::load(&path)?;
            let store = confcast::store::open(&config.store_url()).await?;
            let epoch = store.epoch().await?;
            if new {
                let rotated = store.rotate_epoch(&epoch).await?;
                tracing::warn!(old = %epoch, new = %rotated, "new log epoch started by hand");
                println!("{rotated} (was {epoch}): instances start over from snapshots when they reconnect");
            } else {
                println!("{epoch}");
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Replay { events, bytes }) => {
            confcast::bench::replay(events, bytes).await?;
            Ok(())
        }
        Command::Bench(BenchCommand::Fanout { fleet, no_baseline }) => {
            confcast::bench::fanout::fanout(fleet.options(no_baseline)).await?;
            Ok(())
        }
        Command::Bench(BenchCommand::Serve {
            dir,
            listen,
            bytes,
            baseline,
        }) => {
            confcast::bench::fanout::serve(dir, listen, bytes, baseline, shutdown_signal()).await?;
            Ok(())
        }
        Command::Bench(BenchCommand::Instances {
            server,
            dir,
            pid,
            fleet,
        }) => {
            confcast::bench::fanout::instances(server, &dir, pid, fleet.options(true)).await?;
            Ok(())
        }
        Command::Bench(BenchCommand::Agent { files }) => {
            confcast::bench::agent(files).await?;
            Ok(())
        }
        Command::Cmd(cli) => {
            if !confcast::cli::commands::run(cli).await? {
                std::process::exit(i32::from(confcast::cli::commands::NOT_ALL_DONE));
            }
            Ok(())
        }
        Command::Agent(args) => {
            let opts = agent_options(*args)?;
            if let Err(e) = confcast::agent::run(opts, shutdown_signal()).await {
                eprintln!("error: {e}");
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Demo {
            listen,
            data_dir,
            exit_when_converged,
        } => {
            let opts = confcast::demo::DemoOptions {
                listen,
                dir: data_dir,
                exit_when_converged,
            };
            confcast::demo::run(opts, shutdown_signal()).await?;
            Ok(())
        }
        Command::Rollback(args) => Ok(confcast::cli::topics::rollback(args).await?),
        Command::Pin(args) => Ok(confcast::cli::topics::pin(args).await?),
        Command::Unpin(args) => Ok(confcast::cli::topics::unpin(args).await?),
        // Run before the others, for its own exit statuses.
        Command::Status(_) => Ok(()),
    }
}

fn redact_store(url: &str) -> String {
    confcast::sync::git::redact_url(url)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The credentials in force, by name only: never a token or a digest.
fn print_access(config: &confcast::config::Config) {
    let auth = &config.auth;
    println!(
        "tls      : {}",
        if config.server.tls.is_some() {
            "on"
        } else {
            "off"
        }
    );
    if auth.instance_tokens.is_empty() && auth.jwt.is_none() && config.server.client_token.is_none()
    {
        println!("instances: anonymous (anyone who reaches /ws reads every topic)");
    }
    for t in &auth.instance_tokens {
        println!(
            "instances: token `{}` may claim `{}` and read {}",
            t.name,
            t.instances,
            t.topics.join(", ")
        );
    }
    if auth.jwt.is_some() {
        println!("instances: JWTs (`sub` = instance id or pattern)");
    }
    if config.server.client_token.is_some() {
        println!("instances: server.client_token (any instance id, every topic)");
    }
    if auth.api_tokens.is_empty() {
        println!("api      : open (no [[auth.api_tokens]])");
    }
    for t in &auth.api_tokens {
        println!("api      : token `{}` ({})", t.name, t.scope.as_str());
    }
}
