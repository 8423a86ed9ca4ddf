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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
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
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| {
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
            for repo in &config.repos {
                println!("repo {}:", repo.name);
                println!("  url     : {}", confcast::sync::git::redact_url(&repo.url));
                println!("  branch  : {}", repo.branch);
                println!(
                    "  webhook : POST /webhooks/{} (secret {})",
                    repo.name,
                    if repo.webhook_secret.is_some() {
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
