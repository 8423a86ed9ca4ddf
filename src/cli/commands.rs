//! `confcast command send|show|list`: the CLI over `POST/GET /api/v1/commands`, for operators and
//! scripts. Glue only (HTTP through [`Api`]); the rules live in the server.

use std::time::Duration;

use serde_json::{json, Value};

use super::{parse_duration, Api, ApiArgs, CliError};

/// The exit status of `send --wait` when not every targeted instance acked `done`.
pub const NOT_ALL_DONE: u8 = 4;

#[derive(clap::Subcommand)]
pub enum CommandCli {
    /// Send a command to instances; prints its id (with --wait, each instance's outcome).
    Send(Box<SendArgs>),
    /// Show one command and each targeted instance.
    Show {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the newest commands with their counts.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["all", "instance", "app", "label", "topics"])))]
pub struct SendArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The command's name, e.g. refresh-cache.
    #[arg(long)]
    name: String,
    /// Every instance.
    #[arg(long)]
    all: bool,
    /// An instance id; repeatable.
    #[arg(long)]
    instance: Vec<String>,
    /// Instances whose hello named this app.
    #[arg(long)]
    app: Option<String>,
    /// A label as key=value; repeatable: instances with all of them.
    #[arg(long)]
    label: Vec<String>,
    /// Instances subscribed to a topic this pattern matches.
    #[arg(long)]
    topics: Option<String>,
    /// Arguments as JSON, handed to the instance as is.
    #[arg(long)]
    args: Option<String>,
    /// How long the command is delivered to instances that connect later: 90s, 5m, 1h.
    #[arg(long, value_parser = parse_duration)]
    deadline: Option<Duration>,
    /// Wait until every targeted instance acked, the deadline passed or --timeout.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    timeout: Duration,
}

/// Runs the subcommand; `Ok(false)` when `send --wait` saw not every instance done.
pub async fn run(cli: CommandCli) -> Result<bool, CliError> {
    match cli {
        CommandCli::Send(args) => send(*args).await,
        CommandCli::Show { id, api } => {
            let api = Api::new(&api)?;
            let command = api.get(&format!("/api/v1/commands/{id}")).await?;
            print_command(&command);
            Ok(true)
        }
        CommandCli::List { limit, api } => {
            let api = Api::new(&api)?;
            let list = api.get(&format!("/api/v1/commands?limit={limit}")).await?;
            println!(
                "{:<32}  {:<20}  {:<10}  {:>8} {:>8} {:>9} {:>6} {:>6}",
                "ID", "NAME", "BY", "TARGETED", "PENDING", "DELIVERED", "DONE", "FAILED"
            );
            for c in list["commands"].as_array().into_iter().flatten() {
                let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0);
                println!(
                    "{:<32}  {:<20}  {:<10}  {:>8} {:>8} {:>9} {:>6} {:>6}{}",
                    c["id"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("?"),
                    c["created_by"].as_str().unwrap_or("?"),
                    n("targeted"),
                    n("pending"),
                    n("delivered"),
                    n("done"),
                    n("failed"),
                    if c["expired"].as_bool() == Some(true) {
                        "  (expired)"
                    } else {
                        ""
                    }
                );
            }
            Ok(true)
        }
    }
}

async fn send(args: SendArgs) -> Result<bool, CliError> {
    let api = Api::new(&args.api)?;
    let target = if args.all {
        json!({"all": true})
    } else if !args.instance.is_empty() {
        json!({"instances": args.instance})
    } else if let Some(app) = &args.app {
        json!({"app": app})
    } else if !args.label.is_empty() {
        let mut labels = serde_json::Map::new();
        for l in &args.label {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("--label {l}: expected key=value")))?;
            labels.insert(k.to_string(), Value::String(v.to_string()));
        }
        json!({"labels": labels})
    } else if let Some(topics) = &args.topics {
        json!({"topics": topics})
    } else {
        return Err(CliError::Usage(
            "give a target: --all, --instance, --app, --label or --topics".into(),
        ));
    };
    let command_args: Value = match &args.args {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| CliError::Usage(format!("--args is not valid JSON: {e}")))?,
        None => Value::Null,
    };
    let mut body = json!({"target": target, "name": args.name, "args": command_args});
    if let Some(d) = args.deadline {
        body["deadline_secs"] = json!(d.as_secs().max(1));
    }
    let created = api
        .send(reqwest::Method::POST, "/api/v1/commands", Some(body))
        .await?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| CliError::Usage("the server did not answer an id".into()))?;
    println!("{id}");
    if !args.wait {
        return Ok(true);
    }
    let until = tokio::time::Instant::now() + args.timeout;
    loop {
        let command = api.get(&format!("/api/v1/commands/{id}")).await?;
        let n = |k: &str| command["counts"][k].as_u64().unwrap_or(0);
        let settled = n("targeted") > 0 && n("pending") + n("delivered") == 0;
        let expired = command["expired"].as_bool() == Some(true);
        if settled || expired || tokio::time::Instant::now() >= until {
            print_command(&command);
            let all_done = n("targeted") > 0 && n("done") == n("targeted");
            if !all_done {
                let why = if settled {
                    "some instances failed"
                } else if expired {
                    "the deadline passed before every instance acked"
                } else if n("targeted") == 0 {
                    "no instance was targeted before --timeout"
                } else {
                    "--timeout passed before every instance acked"
                };
                eprintln!("not done everywhere: {why}");
            }
            return Ok(all_done);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_command(c: &Value) {
    let created = c["created_at_ms"].as_i64().unwrap_or(0);
    println!(
        "command {}  name {}  by {}  target {}  args {}",
        c["id"].as_str().unwrap_or("?"),
        c["name"].as_str().unwrap_or("?"),
        c["created_by"].as_str().unwrap_or("?"),
        c["target"],
        c["args"]
    );
    let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0);
    println!(
        "targeted {}  pending {}  delivered {}  done {}  failed {}{}",
        n("targeted"),
        n("pending"),
        n("delivered"),
        n("done"),
        n("failed"),
        if c["expired"].as_bool() == Some(true) {
            format!("  expired {} (deadline passed)", n("expired"))
        } else {
            String::new()
        }
    );
    let Some(instances) = c["instances"].as_array() else {
        return;
    };
    println!(
        "{:<30}  {:<9}  {:>10}  {:>10}  MESSAGE",
        "INSTANCE", "STATUS", "DELIVERED", "FINISHED"
    );
    let after = |v: &Value| {
        v.as_i64()
            .map_or("-".to_string(), |t| format!("+{}ms", t - created))
    };
    for i in instances {
        println!(
            "{:<30}  {:<9}  {:>10}  {:>10}  {}",
            i["instance"].as_str().unwrap_or("?"),
            i["status"].as_str().unwrap_or("?"),
            after(&i["delivered_at_ms"]),
            after(&i["finished_at_ms"]),
            i["message"].as_str().unwrap_or("")
        );
    }
}
