//! `confcast status`: the topics and their rollouts as a table; `--watch` redraws it with a
//! progress bar per topic, `--json` prints it for scripts, and `--wait TOPIC@VERSION` exits 0
//! once the topic's rollout has converged on that version or a later one (the API's
//! `rollout.converged`: every instance subscribed to the topic acked the current version as
//! applied), 1 when `--timeout` passes first, 2 on an error.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::{parse_duration, topic_path, Api, ApiArgs, CliError};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Only these topics (default: every topic).
    pub topics: Vec<String>,
    /// Redraw until interrupted (with --wait: until it ends); plain lines when not on a terminal.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Wait until TOPIC has converged on VERSION or later: exit 0 then, 1 on --timeout.
    #[arg(long, value_name = "TOPIC@VERSION")]
    pub wait: Option<String>,
    /// How long --wait waits (500ms, 60s, 2m, 1h).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Time between two polls of the API.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// One topic's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub topic: String,
    pub version: u64,
    pub commit: String,
    /// Instances whose latest ack applied the current version.
    pub applied: usize,
    /// Connected instances that have not applied it yet.
    pub behind: usize,
    /// Instances whose latest ack failed.
    pub failed: usize,
    /// Disconnected instances that have not applied it (counted in the API's `behind`).
    pub offline: usize,
    pub converged: bool,
    /// `by: reason` when pinned.
    pub pinned: Option<String>,
    pub held: u64,
    /// The progressive rollout, when the topic has an active one (or had one): `state stage/of
    /// (stage text) applied/members`, and its reason.
    pub stage: Option<String>,
    pub stage_reason: Option<String>,
    /// Instances not on the current version: `id (state)`.
    pub waiting_for: Vec<String>,
}

/// Exit statuses.
const CONVERGED: u8 = 0;
const NOT_CONVERGED: u8 = 1;
const ERROR: u8 = 2;

pub async fn run(args: StatusArgs) -> ExitCode {
    let api = match Api::new(&args.api) {
        Ok(api) => api,
        Err(e) => return fail(&e),
    };
    let wait = match args.wait.as_deref().map(parse_target).transpose() {
        Ok(w) => w,
        Err(e) => return fail(&CliError::Usage(e)),
    };
    let mut topics = args.topics.clone();
    if let Some((topic, _)) = &wait {
        if !topics.is_empty() && !topics.contains(topic) {
            topics.push(topic.clone());
        }
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last_shown = String::new();
    let mut seen_server = false;
    loop {
        let rows = match rows(&api, &topics).await {
            Ok(rows) => {
                seen_server = true;
                rows
            }
            // A server that answered before and is briefly away (a restart) is waited for.
            Err(e) if seen_server && !e.is_final() && wait.is_some() => {
                if started.elapsed() >= args.timeout {
                    return fail(&e);
                }
                tokio::time::sleep(args.interval).await;
                continue;
            }
            Err(e) => return fail(&e),
        };
        let done = match &wait {
            Some((topic, version)) => match rows.iter().find(|r| r.topic == *topic) {
                Some(r) => r.version >= *version && r.converged,
                None => return fail(&CliError::Usage(format!("no topic `{topic}`"))),
            },
            None => false,
        };
        let timed_out = wait.is_some() && !done && started.elapsed() >= args.timeout;
        let shown = if args.json {
            serde_json::to_string_pretty(&serde_json::json!({ "topics": rows })).unwrap_or_default()
        } else {
            table(&rows, args.watch)
        };
        if args.watch && tty && !args.json {
            // Home, clear, draw: one frame per poll.
            print!("\x1b[H\x1b[2J{shown}");
            if let Some((topic, version)) = &wait {
                println!(
                    "\nwaiting for {topic}@{version} ({:.0?} of {:.0?})",
                    started.elapsed(),
                    args.timeout
                );
            }
            let _ = std::io::stdout().flush();
        } else if shown != last_shown {
            // Not redrawing: a new block only when something changed.
            println!("{shown}");
            last_shown = shown;
        }
        if let Some((topic, version)) = &wait {
            if done {
                eprintln!("{topic}: converged on v{version} or later");
                return ExitCode::from(CONVERGED);
            }
            if timed_out {
                if let Some(r) = rows.iter().find(|r| r.topic == *topic) {
                    eprintln!(
                        "{topic}: not converged on v{version} within {:?}: at v{}, {} applied, {} behind, {} failed, {} offline{}",
                        args.timeout,
                        r.version,
                        r.applied,
                        r.behind,
                        r.failed,
                        r.offline,
                        if r.waiting_for.is_empty() {
                            String::new()
                        } else {
                            format!("; waiting for {}", r.waiting_for.join(", "))
                        }
                    );
                }
                return ExitCode::from(NOT_CONVERGED);
            }
        } else if !args.watch {
            return ExitCode::from(CONVERGED);
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::from(CONVERGED),
        }
    }
}

fn fail(e: &CliError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(ERROR)
}

/// `payments@42` as (`payments`, 42); the last `@` splits, so a topic may contain one.
fn parse_target(text: &str) -> Result<(String, u64), String> {
    let (topic, version) = text
        .rsplit_once('@')
        .ok_or_else(|| format!("--wait {text}: expected TOPIC@VERSION, e.g. payments@42"))?;
    let version = version
        .parse()
        .map_err(|_| format!("--wait {text}: `{version}` is not a version number"))?;
    if topic.is_empty() {
        return Err(format!("--wait {text}: the topic is missing"));
    }
    Ok((topic.to_string(), version))
}

/// The rows of `only` (every topic when empty), read from the API.
async fn rows(api: &Api, only: &[String]) -> Result<Vec<Row>, CliError> {
    let list = api.get("/api/v1/topics").await?;
    let mut names: Vec<String> = list["topics"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["topic"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if !only.is_empty() {
        if let Some(missing) = only.iter().find(|t| !names.contains(t)) {
            return Err(CliError::Refused {
                url: api.base.clone(),
                status: 404,
                message: format!("no topic `{missing}`"),
            });
        }
        names.retain(|n| only.contains(n));
    }
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let topic = api.get(&topic_path(&name, "")).await?;
        rows.push(row(&name, &topic));
    }
    Ok(rows)
}

/// A topic's line from `GET /api/v1/topics/{topic}`.
fn row(name: &str, topic: &Value) -> Row {
    let rollout = &topic["rollout"];
    let list = |key: &str| rollout[key].as_array().cloned().unwrap_or_default();
    let (applied, behind, failed) = (list("applied"), list("behind"), list("failed"));
    let connected = |e: &&Value| e["connected"].as_bool().unwrap_or(false);
    let mut waiting_for: Vec<String> = Vec::new();
    for e in &behind {
        let state = if connected(&e) { "behind" } else { "offline" };
        waiting_for.push(format!(
            "{} ({state})",
            e["instance"].as_str().unwrap_or("?")
        ));
    }
    for e in &failed {
        waiting_for.push(format!(
            "{} (failed: {})",
            e["instance"].as_str().unwrap_or("?"),
            e["error"].as_str().unwrap_or("")
        ));
    }
    let pinned = &topic["pinned"];
    let stages = &topic["stages"];
    let stage = stages.is_object().then(|| {
        let at = stages["stage"].as_u64().unwrap_or(0);
        let all = stages["stages"].as_array().map_or(0, Vec::len);
        let text = usize::try_from(at)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| stages["stages"].get(i))
            .and_then(Value::as_str)
            .unwrap_or("?");
        format!(
            "v{} {} {at}/{all} ({text}) {}/{} applied, {} failed",
            stages["version"].as_u64().unwrap_or(0),
            stages["state"].as_str().unwrap_or("?"),
            stages["applied"].as_u64().unwrap_or(0),
            stages["members"].as_u64().unwrap_or(0),
            stages["failed"].as_array().map_or(0, Vec::len),
        )
    });
    let stage_reason = stages["reason"].as_str().map(str::to_string);
    Row {
        topic: name.to_string(),
        version: topic["version"].as_u64().unwrap_or(0),
        commit: topic["commit"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(10)
            .collect(),
        applied: applied.len(),
        behind: behind.iter().filter(connected).count(),
        failed: failed.len(),
        offline: behind.iter().filter(|e| !connected(e)).count(),
        converged: rollout["converged"].as_bool().unwrap_or(false),
        pinned: pinned.is_object().then(|| {
            format!(
                "{}: {}",
                pinned["by"].as_str().unwrap_or("?"),
                pinned["reason"].as_str().unwrap_or("")
            )
        }),
        held: pinned["held_total"].as_u64().unwrap_or(0),
        stage,
        stage_reason,
        waiting_for,
    }
}

/// Width of the progress bar in `--watch`.
const BAR: usize = 24;

/// The rows as an aligned table; with `bars`, a progress bar per topic.
pub fn table(rows: &[Row], bars: bool) -> String {
    let mut lines: Vec<Vec<String>> = vec![[
        "TOPIC",
        "VERSION",
        "COMMIT",
        "APPLIED",
        "BEHIND",
        "FAILED",
        "OFFLINE",
        "CONVERGED",
        "PINNED",
        "STAGES",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()];
    for r in rows {
        let pinned = match &r.pinned {
            Some(p) => format!("{} ({} held)", clip(p, 40), r.held),
            None => "-".into(),
        };
        lines.push(vec![
            r.topic.clone(),
            format!("v{}", r.version),
            r.commit.clone(),
            r.applied.to_string(),
            r.behind.to_string(),
            r.failed.to_string(),
            r.offline.to_string(),
            if r.converged { "yes" } else { "no" }.into(),
            pinned,
            r.stage.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if bars && !rows.is_empty() {
        out.push('\n');
        let name_width = rows
            .iter()
            .map(|r| r.topic.chars().count())
            .max()
            .unwrap_or(0);
        for r in rows {
            out.push_str(&format!("{:<name_width$}  {}\n", r.topic, bar(r)));
        }
    }
    for r in rows {
        if let (Some(stage), Some(reason)) = (&r.stage, &r.stage_reason) {
            out.push_str(&format!(
                "\n{}: rollout {stage}: {}\n",
                r.topic,
                clip(reason, 200)
            ));
        }
    }
    let waiting: Vec<&Row> = rows.iter().filter(|r| !r.waiting_for.is_empty()).collect();
    for r in waiting {
        let shown: Vec<&str> = r.waiting_for.iter().take(10).map(String::as_str).collect();
        let more = r.waiting_for.len().saturating_sub(shown.len());
        out.push_str(&format!(
            "{} v{} waits for {}{}\n",
            r.topic,
            r.version,
            clip(&shown.join(", "), 400),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    out
}

/// `[#########---------------]  9/24 applied` (all instances of the rollout).
fn bar(r: &Row) -> String {
    let total = r.applied + r.behind + r.failed + r.offline;
    let filled = (r.applied * BAR).checked_div(total).unwrap_or(0);
    format!(
        "[{}{}] {:>3}/{} applied{}",
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        r.applied,
        total,
        if r.converged { ", converged" } else { "" }
    )
}

/// `text` cut to `max` characters, control characters shown escaped: instance ids, errors and
/// reasons come from others and must not drive the terminal.
fn clip(text: &str, max: usize) -> String {
    let safe: String = text
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    match safe.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &safe[..end]),
        None => safe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets_name_a_topic_and_a_version() {
        assert_eq!(parse_target("payments@42"), Ok(("payments".into(), 42)));
        assert_eq!(parse_target("a@b@7"), Ok(("a@b".into(), 7)));
        assert!(parse_target("payments").is_err());
        assert!(parse_target("payments@x").is_err());
        assert!(parse_target("@3").is_err());
    }

    #[test]
    fn a_row_counts_the_rollout_and_the_table_shows_it() {
        let topic = json!({
            "topic": "payments", "version": 3, "commit": "e170f007c9238c6558d2",
            "rollout": {"version": 3, "converged": false,
                "applied": [{"instance": "a", "connected": true, "version": 3}],
                "behind": [{"instance": "b", "connected": true, "version": 2},
                           {"instance": "c", "connected": false, "version": 1}],
                "failed": [{"instance": "d\u{1b}[2J", "connected": true, "version": 3, "error": "boom"}]},
            "pinned": {"by": "operator", "reason": "freeze", "held_total": 2}
        });
        let r = row("payments", &topic);
        assert_eq!(
            (r.applied, r.behind, r.failed, r.offline, r.held),
            (1, 1, 1, 1, 2)
        );
        assert_eq!(r.commit, "e170f007c9");
        let text = table(&[r], true);
        assert!(text.contains("payments  v3"), "{text}");
        assert!(text.contains("operator: freeze (2 held)"), "{text}");
        assert!(
            text.contains("[######------------------]   1/4 applied"),
            "{text}"
        );
        assert!(text.contains("c (offline)"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "escape sequences are shown escaped: {text}"
        );
    }

    #[test]
    fn a_staged_rollout_shows_its_stage_counts_and_reason() {
        let topic = json!({
            "topic": "payments", "version": 2, "commit": "e170f007c9238c6558d2",
            "rollout": {"version": 2, "converged": false, "applied": [], "behind": [], "failed": []},
            "pinned": null,
            "stages": {"policy": "canary", "state": "halted", "version": 2, "base_version": 1,
                "stage": 1, "stages": ["10%", "50%", "all"], "members": 2, "applied": 1,
                "failed": [{"instance": "i-03", "error": "bad port"}],
                "reason": "halted at stage 1 of 3 (10%): 1 of 2 instances acked failed (i-03: bad\u{1b}[2J port)"}
        });
        let text = table(&[row("payments", &topic)], true);
        assert!(text.contains("STAGES"), "{text}");
        assert!(
            text.contains("v2 halted 1/3 (10%) 1/2 applied, 1 failed"),
            "{text}"
        );
        assert!(
            text.contains("payments: rollout v2 halted 1/3 (10%) 1/2 applied, 1 failed: halted at stage 1 of 3 (10%)"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }
}
