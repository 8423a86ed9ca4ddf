//! Commands on the hub side: which instances a target names, the replica's list of active
//! commands that its connections deliver from, and the one place command outcomes pass through.
//!
//! A command is not a log entry: it has no position and is not replayed. The store holds it and,
//! per targeted instance, whether it is pending, delivered, done or failed; each replica keeps
//! the commands whose deadline is ahead in a `watch` channel, refreshed when woken (a local
//! creation, another replica's notification through the hub feeder) and every second, so a lost
//! notification delays a delivery by at most that. Each connection delivers what matches it,
//! at most once per connection, until the instance acks or the deadline passes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::config::LimitsConfig;
use crate::protocol::{self, ServerMessage};
use crate::store::{now_ms, ActiveCommand, Store};
use crate::telemetry::Metrics;

/// Which instances a command is for. On the wire (API) one of `{"all": true}`,
/// `{"instances": [..]}`, `{"app": ".."}`, `{"labels": {..}}`, `{"topics": "pattern"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandTarget {
    All(bool),
    Instances(Vec<String>),
    App(String),
    /// Every label given must be on the instance with that value.
    Labels(BTreeMap<String, String>),
    /// Instances holding a subscription that shares a topic with this pattern.
    Topics(String),
}

/// What a target is matched against: what the instance said in `hello` and what it subscribed.
pub struct Candidate<'a> {
    pub instance: &'a str,
    pub app: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
    pub subscriptions: &'a [String],
}

impl CommandTarget {
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        match self {
            CommandTarget::All(all) => *all,
            CommandTarget::Instances(ids) => ids.iter().any(|id| id == c.instance),
            CommandTarget::App(app) => c.app == Some(app.as_str()),
            CommandTarget::Labels(wanted) => wanted
                .iter()
                .all(|(k, v)| c.labels.get(k).is_some_and(|have| have == v)),
            CommandTarget::Topics(pattern) => c
                .subscriptions
                .iter()
                .any(|held| patterns_overlap(pattern, held)),
        }
    }

    /// Checks a target against `[limits]`; the message names the cap.
    pub fn check(&self, limits: &LimitsConfig) -> Result<(), String> {
        match self {
            CommandTarget::All(true) => Ok(()),
            CommandTarget::All(false) => {
                Err("target `all` must be true (to name fewer, use another target)".into())
            }
            CommandTarget::Instances(ids) => {
                if ids.is_empty() {
                    return Err("target `instances` needs at least one instance id".into());
                }
                if ids.len() > limits.max_command_instances {
                    return Err(format!(
                        "target `instances` names {} instances; at most {} (limits.max_command_instances)",
                        ids.len(),
                        limits.max_command_instances
                    ));
                }
                if ids
                    .iter()
                    .any(|id| id.is_empty() || id.len() > limits.max_instance_id_bytes)
                {
                    return Err(format!(
                        "each instance id must be 1 to {} bytes (limits.max_instance_id_bytes)",
                        limits.max_instance_id_bytes
                    ));
                }
                Ok(())
            }
            CommandTarget::App(app) => {
                if app.is_empty() || app.len() > limits.max_label_bytes {
                    return Err(format!(
                        "target `app` must be 1 to {} bytes (limits.max_label_bytes)",
                        limits.max_label_bytes
                    ));
                }
                Ok(())
            }
            CommandTarget::Labels(labels) => {
                if labels.is_empty() || labels.len() > limits.max_labels {
                    return Err(format!(
                        "target `labels` needs 1 to {} labels (limits.max_labels)",
                        limits.max_labels
                    ));
                }
                if labels.iter().any(|(k, v)| {
                    k.len() > limits.max_label_bytes || v.len() > limits.max_label_bytes
                }) {
                    return Err(format!(
                        "label keys and values must be at most {} bytes (limits.max_label_bytes)",
                        limits.max_label_bytes
                    ));
                }
                Ok(())
            }
            CommandTarget::Topics(pattern) => {
                if pattern.len() > limits.max_pattern_bytes {
                    return Err(format!(
                        "target `topics` pattern is {} bytes; at most {} (limits.max_pattern_bytes)",
                        pattern.len(),
                        limits.max_pattern_bytes
                    ));
                }
                protocol::validate_pattern(pattern).map_err(|e| format!("target `topics`: {e}"))
            }
        }
    }
}

/// Whether some topic matches both patterns (each `*`, a name, or `prefix/*`).
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    match (a.strip_suffix("/*"), b.strip_suffix("/*")) {
        _ if a == "*" || b == "*" => true,
        (None, None) => a == b,
        (Some(_), None) => protocol::topic_matches(a, b),
        (None, Some(_)) => protocol::topic_matches(b, a),
        (Some(p), Some(q)) => {
            p == q || p.starts_with(&format!("{q}/")) || q.starts_with(&format!("{p}/"))
        }
    }
}

/// Rules for a command name: 1 to `max` bytes of `[A-Za-z0-9._-]`, starting with a letter or
/// digit, so it can be shown, logged and mapped to a shell command without quoting.
pub fn check_name(name: &str, max: usize) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > max || !plain || !first {
        return Err(format!(
            "command name must be 1 to {max} bytes of letters, digits, `.`, `_` and `-`, starting with a letter or digit (limits.max_command_name_bytes)"
        ));
    }
    Ok(())
}

/// The `command` frame for `c`.
/// An active command as connections deliver it: its target parsed and its frame encoded once
/// per replica by the dispatcher, not once per connection.
#[derive(Debug)]
pub struct Dispatched {
    pub command: ActiveCommand,
    /// `None` when the stored target does not parse (it then reaches nobody).
    pub target: Option<CommandTarget>,
    /// The `command` message, encoded; every recipient gets these bytes.
    pub frame: axum::extract::ws::Utf8Bytes,
}

impl Dispatched {
    fn new(command: ActiveCommand) -> Dispatched {
        let target = serde_json::from_value(command.target.clone()).ok();
        let frame = serde_json::to_string(&frame(&command))
            .unwrap_or_default()
            .into();
        Dispatched {
            command,
            target,
            frame,
        }
    }
}

pub fn frame(c: &ActiveCommand) -> ServerMessage {
    ServerMessage::Command {
        id: c.id.clone(),
        name: c.name.clone(),
        args: c.args.clone(),
        deadline_ms: Some(c.deadline_ms),
        seq: 0,
    }
}

/// What happened to a command for one instance (or, for `Expired`, for `n` of them).
pub use crate::telemetry::CommandOutcome as Outcome;

/// Every command outcome passes through here, `n` at a time, and is counted in
/// `confcast_commands_total{outcome}`. `Expired` is counted by the one replica that marks the
/// command expired.
pub fn outcome(metrics: &Metrics, command: &str, what: Outcome, n: u64) {
    tracing::debug!(command, outcome = what.as_str(), n, "command outcome");
    metrics.command(what, n);
}

/// How often the active commands are read even without a wake: what a lost notification costs.
const REFRESH: Duration = Duration::from_secs(1);

impl Hub {
    /// Tells the dispatcher that commands were created (here or on another replica).
    pub fn wake_commands(&self) {
        self.command_wake.notify_one();
    }

    /// The commands whose deadline is ahead, as last read; changes when the set does.
    pub fn active_commands(&self) -> tokio::sync::watch::Receiver<Arc<Vec<Dispatched>>> {
        self.commands.subscribe()
    }

    /// Runs until `shutdown`: reads the active commands when woken and every second, publishes
    /// them to the connections when the set changed, and marks passed deadlines expired.
    pub async fn dispatch_commands(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        // Once at start (commands that passed their deadline while this replica was down), then
        // only when a command it holds is due: no write statement every second for nothing.
        let mut expire_due = true;
        loop {
            let now = now_ms();
            expire_due |= self
                .commands
                .borrow()
                .iter()
                .any(|c| c.command.deadline_ms <= now);
            if expire_due {
                expire_due = false;
                match store.expire_commands(now).await {
                    Ok(expired) => {
                        for (id, left) in expired {
                            tracing::info!(command = %id, never_acked = left, "command deadline passed");
                            outcome(&metrics, &id, Outcome::Expired, left);
                        }
                    }
                    Err(e) => {
                        expire_due = true;
                        tracing::warn!(error = %e, "could not expire commands");
                    }
                }
            }
            match store.active_commands(now).await {
                Ok(active) => {
                    self.commands.send_if_modified(|held| {
                        if held.iter().map(|d| &d.command).eq(active.iter()) {
                            return false;
                        }
                        *held = Arc::new(active.into_iter().map(Dispatched::new).collect());
                        true
                    });
                }
                Err(e) => tracing::warn!(error = %e, "could not read active commands; retrying"),
            }
            // The nearest deadline drops its command from the list in time.
            let next = self
                .commands
                .borrow()
                .iter()
                .map(|c| c.command.deadline_ms)
                .min()
                .map(|d| Duration::from_millis(u64::try_from(d.saturating_sub(now)).unwrap_or(0)))
                .map_or(REFRESH, |d| d.min(REFRESH));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.command_wake.notified() => {}
                _ = tokio::time::sleep(next) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_overlap_when_a_topic_matches_both() {
        assert!(patterns_overlap("*", "payments"));
        assert!(patterns_overlap("payments", "payments"));
        assert!(!patterns_overlap("payments", "billing"));
        assert!(patterns_overlap("billing/*", "billing/eu"));
        assert!(patterns_overlap("billing/eu", "billing/*"));
        assert!(!patterns_overlap("billing/*", "billing"));
        assert!(patterns_overlap("a/*", "a/b/*"));
        assert!(patterns_overlap("a/b/*", "a/*"));
        assert!(!patterns_overlap("a/*", "ab/*"));
    }

    #[test]
    fn targets_match_what_the_instance_said() {
        let labels = BTreeMap::from([("zone".to_string(), "eu".to_string())]);
        let subs = vec!["payments".to_string()];
        let c = Candidate {
            instance: "web-1",
            app: Some("web"),
            labels: &labels,
            subscriptions: &subs,
        };
        assert!(CommandTarget::All(true).matches(&c));
        assert!(CommandTarget::Instances(vec!["web-1".into()]).matches(&c));
        assert!(!CommandTarget::Instances(vec!["web-2".into()]).matches(&c));
        assert!(CommandTarget::App("web".into()).matches(&c));
        assert!(!CommandTarget::App("api".into()).matches(&c));
        assert!(CommandTarget::Labels(labels.clone()).matches(&c));
        let other = BTreeMap::from([("zone".to_string(), "us".to_string())]);
        assert!(!CommandTarget::Labels(other).matches(&c));
        assert!(CommandTarget::Topics("*".into()).matches(&c));
        assert!(!CommandTarget::Topics("billing".into()).matches(&c));
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("refresh-cache", 64).is_ok());
        assert!(check_name("v1.flush_all", 64).is_ok());
        assert!(check_name("", 64).is_err());
        assert!(check_name("-x", 64).is_err());
        assert!(check_name("a b", 64).is_err());
        assert!(check_name("a;rm", 64).is_err());
        assert!(check_name(&"a".repeat(65), 64).is_err());
    }

    #[test]
    fn targets_parse_from_the_api_shape() {
        let t: CommandTarget = serde_json::from_str(r#"{"labels":{"zone":"eu"}}"#).unwrap();
        assert!(matches!(t, CommandTarget::Labels(_)));
        assert!(serde_json::from_str::<CommandTarget>(r#"{"all":true,"app":"x"}"#).is_err());
        assert!(serde_json::from_str::<CommandTarget>(r#"{"nope":1}"#).is_err());
    }
}
