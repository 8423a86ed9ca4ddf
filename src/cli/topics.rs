//! `confcast rollback`, `confcast pin` and `confcast unpin`: the topic writes of the API
//! (`admin` token), each printing what the server did.

use serde_json::{json, Value};

use super::{topic_path, Api, ApiArgs, CliError};

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// The topic to roll back.
    pub topic: String,
    /// The earlier version whose files are published again, as a new version.
    #[arg(long = "to", value_name = "VERSION")]
    pub to: u64,
    /// Why (recorded in the change, its history and the audit log).
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct PinArgs {
    /// The topic to hold at its version.
    pub topic: String,
    /// Why (shown with the pin and recorded in the audit log).
    #[arg(long)]
    pub reason: String,
    /// Roll back to this version first, then pin there.
    #[arg(long, value_name = "VERSION")]
    pub version: Option<u64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct UnpinArgs {
    /// The topic to release.
    pub topic: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub async fn rollback(args: RollbackArgs) -> Result<(), CliError> {
    let api = Api::new(&args.api)?;
    let body = json!({"version": args.to, "reason": args.reason});
    let reply = api
        .send(
            reqwest::Method::POST,
            &topic_path(&args.topic, "/rollback"),
            Some(body),
        )
        .await?;
    match reply["status"].as_str() {
        Some("unchanged") => println!(
            "{}: version {} already has the files of v{}; nothing published",
            args.topic,
            num(&reply["version"]),
            args.to
        ),
        _ => println!(
            "{}: v{} published with the files of v{} (seq {}, {})",
            args.topic,
            num(&reply["version"]),
            args.to,
            num(&reply["seq"]),
            count(&reply["files"], "file changed", "files changed")
        ),
    }
    Ok(())
}

pub async fn pin(args: PinArgs) -> Result<(), CliError> {
    let api = Api::new(&args.api)?;
    let mut body = json!({"reason": args.reason});
    if let Some(v) = args.version {
        body["version"] = json!(v);
    }
    let reply = api
        .send(
            reqwest::Method::PUT,
            &topic_path(&args.topic, "/pin"),
            Some(body),
        )
        .await?;
    if reply["rollback"]["status"] == "published" {
        println!(
            "{}: rolled back to the files of v{} as v{}",
            args.topic,
            num(&reply["rollback"]["rollback_of"]),
            num(&reply["rollback"]["version"])
        );
    }
    println!(
        "{}: pinned at v{}; later pushes are held back until `confcast unpin {}`",
        args.topic,
        num(&reply["version"]),
        args.topic
    );
    Ok(())
}

pub async fn unpin(args: UnpinArgs) -> Result<(), CliError> {
    let api = Api::new(&args.api)?;
    let reply = api
        .send(
            reqwest::Method::DELETE,
            &topic_path(&args.topic, "/pin"),
            None,
        )
        .await?;
    println!(
        "{}: unpinned ({} held); the next sync publishes its git state if it differs from v{}",
        args.topic,
        count(&reply["held_total"], "change was", "changes were"),
        num(&reply["version"])
    );
    Ok(())
}

/// `1 file changed`, `2 files changed`.
fn count(v: &Value, one: &str, many: &str) -> String {
    match v.as_u64() {
        Some(1) => format!("1 {one}"),
        Some(n) => format!("{n} {many}"),
        None => format!("? {many}"),
    }
}

fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".into(), |n| n.to_string())
}
