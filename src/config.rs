//! Configuration: a TOML file, overridden key by key from `CONFCAST_<SECTION>__<KEY>` environment
//! variables, then validated. Every error names the key it is about.
//!
//! Owns reading secrets (from an environment variable or a file); it never logs them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sync::rules::{TopicRule, TopicRules};

/// Environment variables with this prefix and a `__` in them override configuration keys.
pub const ENV_PREFIX: &str = "CONFCAST_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub repos: Vec<RepoConfig>,
}

/// How much of the event log is kept for resuming instances. An instance whose `since` is older
/// than what is kept gets a snapshot instead; topic state itself is never trimmed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep at most this many most recent events (0 = no count limit).
    pub max_events: u64,
    /// Drop events older than this many seconds (0 = no age limit).
    pub max_age_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_events: 100_000,
            max_age_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP and WebSocket listener binds.
    pub listen: SocketAddr,
    /// Where git mirrors and the default SQLite database live.
    pub data_dir: PathBuf,
    /// Largest webhook body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Seconds between WebSocket pings.
    pub heartbeat_secs: u64,
    /// A connection that sends nothing (not even a pong) for this long is dropped.
    pub keepalive_timeout_secs: u64,
    /// Live events buffered per connection before it counts as a slow consumer and is cut off.
    pub connection_queue: usize,
    /// Instances must present this token (`Authorization: Bearer ...` or `?token=`) when set:
    /// the name of the environment variable holding it.
    pub client_token_env: Option<String>,
    /// The same, read from a file.
    pub client_token_file: Option<PathBuf>,
    /// Filled in by validation.
    #[serde(skip)]
    pub client_token: Option<Secret>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            max_body_bytes: 25 * 1024 * 1024,
            heartbeat_secs: 15,
            keepalive_timeout_secs: 45,
            connection_queue: 1024,
            client_token_env: None,
            client_token_file: None,
            client_token: None,
        }
    }
}

impl ServerConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_secs(self.keepalive_timeout_secs.max(1))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://path` or `postgres://...`; default `sqlite://<data_dir>/confcast.db`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Used in the webhook URL (`/webhooks/{name}`) and the API.
    pub name: String,
    /// `https://`, `ssh://`, `git@host:path` or `file://`.
    pub url: String,
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Name of the environment variable holding the webhook secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the webhook secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Inline secret: accepted, with a warning, for experiments only.
    #[serde(default)]
    pub secret: Option<String>,
    /// Path-to-topic rules, first match wins; default: the first path segment is the topic.
    #[serde(default)]
    pub topics: Vec<TopicRule>,
    /// Filled in by validation.
    #[serde(skip)]
    pub webhook_secret: Option<Secret>,
    /// Filled in by validation.
    #[serde(skip)]
    pub rules: TopicRules,
}

fn default_branch() -> String {
    "main".to_string()
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Config {
    /// Reads `path`, applies the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, std::env::vars(), base, &|name| {
            std::env::var(name).ok()
        })
    }

    /// Parses TOML `text`, applies `CONFCAST_*__*` overrides from `env`, and validates.
    /// Relative `secret_file` paths are taken from `base`; `lookup` resolves `secret_env`.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        base: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut root = toml::Value::Table(table);
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        overrides.sort();
        for (name, value) in overrides {
            apply_override(&mut root, &name, &value)?;
        }
        let mut config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::key(
                if path == "." {
                    "(top level)".to_string()
                } else {
                    path
                },
                e.into_inner().to_string(),
            )
        })?;
        config.validate(base, lookup)?;
        Ok(config)
    }

    fn validate(
        &mut self,
        base: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::key(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.server.connection_queue == 0 {
            return Err(ConfigError::key(
                "server.connection_queue",
                "must be greater than 0",
            ));
        }
        if self.server.keepalive_timeout_secs <= self.server.heartbeat_secs {
            return Err(ConfigError::key(
                "server.keepalive_timeout_secs",
                "must be longer than server.heartbeat_secs",
            ));
        }
        self.server.client_token = match (
            &self.server.client_token_env,
            &self.server.client_token_file,
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::key(
                    "server.client_token_env",
                    "give only one of client_token_env, client_token_file",
                ))
            }
            (Some(var), None) => Some(
                lookup(var)
                    .and_then(|v| non_empty(v.into_bytes()))
                    .ok_or_else(|| {
                        ConfigError::key(
                            "server.client_token_env",
                            format!("environment variable {var} is not set or empty"),
                        )
                    })?,
            ),
            (None, Some(file)) => Some(
                read_secret_file(&base.join(file))
                    .map_err(|m| ConfigError::key("server.client_token_file", m))?,
            ),
            (None, None) => None,
        };
        if let Some(url) = &self.store.url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return Err(ConfigError::key(
                    "store.url",
                    "must start with sqlite: or postgres://",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, repo) in self.repos.iter_mut().enumerate() {
            let key = |k: &str| format!("repos[{i}].{k}");
            if repo.name.is_empty()
                || !repo
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(ConfigError::key(
                    key("name"),
                    "use letters, digits, `-`, `_` or `.`",
                ));
            }
            if !seen.insert(repo.name.clone()) {
                return Err(ConfigError::key(
                    key("name"),
                    format!("repo `{}` is configured twice", repo.name),
                ));
            }
            if repo.url.is_empty() {
                return Err(ConfigError::key(key("url"), "must not be empty"));
            }
            if repo.branch.is_empty() || repo.branch.starts_with("refs/") {
                return Err(ConfigError::key(
                    key("branch"),
                    "give the branch name, such as `main`",
                ));
            }
            repo.webhook_secret =
                resolve_secret(repo, base, lookup).map_err(|(k, m)| ConfigError::key(key(k), m))?;
            repo.rules = TopicRules::compile(&repo.topics)
                .map_err(|(j, m)| ConfigError::key(format!("repos[{i}].topics[{j}]"), m))?;
        }
        Ok(())
    }

    /// The store URL in force: the configured one or the SQLite file under `data_dir`.
    pub fn store_url(&self) -> String {
        match &self.store.url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.server.data_dir.join("confcast.db").display()
            ),
        }
    }

    pub fn repo(&self, name: &str) -> Option<&RepoConfig> {
        self.repos.iter().find(|r| r.name == name)
    }
}

fn resolve_secret(
    repo: &RepoConfig,
    base: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, (&'static str, String)> {
    let given = [
        repo.secret_env.is_some(),
        repo.secret_file.is_some(),
        repo.secret.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err((
            "secret_env",
            "give only one of secret_env, secret_file, secret".into(),
        ));
    }
    if let Some(var) = &repo.secret_env {
        let value = lookup(var).ok_or((
            "secret_env",
            format!("environment variable {var} is not set"),
        ))?;
        return non_empty(value.into_bytes())
            .map(Some)
            .ok_or(("secret_env", format!("environment variable {var} is empty")));
    }
    if let Some(file) = &repo.secret_file {
        return read_secret_file(&base.join(file))
            .map(Some)
            .map_err(|m| ("secret_file", m));
    }
    if let Some(secret) = &repo.secret {
        tracing::warn!(repo = %repo.name, "webhook secret given inline in the config; prefer secret_env or secret_file");
        return non_empty(secret.clone().into_bytes())
            .map(Some)
            .ok_or(("secret", "is empty".into()));
    }
    tracing::warn!(repo = %repo.name, "no webhook secret configured: every webhook for this repo will be refused (401)");
    Ok(None)
}

/// Reads a secret from a file, without its trailing newline.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    non_empty(bytes).ok_or_else(|| format!("{} is empty", path.display()))
}

fn non_empty(bytes: Vec<u8>) -> Option<Secret> {
    (!bytes.is_empty()).then(|| Secret::new(bytes))
}

/// `CONFCAST_SERVER__LISTEN=...` sets `server.listen`; `CONFCAST_REPOS__0__BRANCH` sets `repos[0].branch`.
/// The value is read as a TOML value when it is one (`8080`, `true`, `"quoted"`), else as a string.
fn apply_override(root: &mut toml::Value, name: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let dotted = path.join(".");
    let bad = |m: &str| {
        ConfigError::key(
            dotted.clone(),
            format!("from environment variable {name}: {m}"),
        )
    };
    let (last, parents) = path.split_last().ok_or_else(|| bad("empty key"))?;
    let mut cursor = root;
    for part in parents {
        cursor = step(cursor, part, true)
            .ok_or_else(|| bad(&format!("cannot descend into `{part}`")))?;
    }
    match cursor {
        toml::Value::Table(t) => {
            t.insert(last.clone(), value);
        }
        toml::Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| bad("expected an array index"))?;
            match a.get_mut(i) {
                Some(slot) => *slot = value,
                None => return Err(bad("array index out of range")),
            }
        }
        _ => return Err(bad("not a table")),
    }
    Ok(())
}

fn step<'a>(value: &'a mut toml::Value, part: &str, create: bool) -> Option<&'a mut toml::Value> {
    match value {
        toml::Value::Table(t) => {
            if create && !t.contains_key(part) {
                t.insert(part.to_string(), toml::Value::Table(toml::Table::new()));
            }
            t.get_mut(part)
        }
        toml::Value::Array(a) => part.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:9000"

[[repos]]
name = "cfg"
url = "file:///tmp/x.git"
secret_env = "HOOK_SECRET"
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |name: &str| (name == "HOOK_SECRET").then(|| "s3cret".to_string());
        Config::parse(text, env, Path::new("."), &lookup)
    }

    #[test]
    fn defaults_and_secret_from_env() {
        let c = parse(BASE, &[]).expect("valid");
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.repos[0].branch, "main");
        assert_eq!(
            c.repos[0].webhook_secret.as_ref().map(Secret::expose),
            Some(b"s3cret".as_slice())
        );
        assert_eq!(c.store_url(), "sqlite://./data/confcast.db");
        assert_eq!(
            format!("{:?}", c.repos[0].webhook_secret),
            "Some(Secret(***))"
        );
    }

    #[test]
    fn environment_overrides_keys_including_array_entries() {
        let c = parse(
            BASE,
            &[
                ("CONFCAST_SERVER__LISTEN", "0.0.0.0:7000"),
                ("CONFCAST_SERVER__HEARTBEAT_SECS", "5"),
                ("CONFCAST_REPOS__0__BRANCH", "production"),
                ("CONFCAST_STORE__URL", "sqlite:///var/lib/c.db"),
                (
                    "CONFCAST_WEBHOOK_SECRET",
                    "not an override: no double underscore",
                ),
            ],
        )
        .expect("valid");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.server.heartbeat_secs, 5);
        assert_eq!(c.repos[0].branch, "production");
        assert_eq!(c.store_url(), "sqlite:///var/lib/c.db");
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = parse(
            &BASE
                .replace("branch", "x")
                .replace("secret_env", "secret_envv"),
            &[],
        )
        .expect_err("unknown key");
        assert!(unknown.to_string().contains("repos[0]"), "{unknown}");
        assert!(unknown.to_string().contains("secret_envv"), "{unknown}");

        let bad_type =
            parse(BASE, &[("CONFCAST_SERVER__LISTEN", "not-an-address")]).expect_err("bad listen");
        assert!(bad_type.to_string().contains("server.listen"), "{bad_type}");

        let missing =
            parse(&BASE.replace("HOOK_SECRET", "UNSET_VAR"), &[]).expect_err("unset secret");
        assert!(
            missing.to_string().contains("repos[0].secret_env"),
            "{missing}"
        );

        let rule = format!("{BASE}\n[[repos.topics]]\npattern = \"a/*\"\ntopic = \"{{3}}\"\n");
        let bad_rule = parse(&rule, &[]).expect_err("bad rule");
        assert!(
            bad_rule.to_string().contains("repos[0].topics[0]"),
            "{bad_rule}"
        );

        let dup =
            format!("{BASE}\n[[repos]]\nname = \"cfg\"\nurl = \"file:///y\"\nsecret = \"x\"\n");
        assert!(parse(&dup, &[])
            .expect_err("duplicate")
            .to_string()
            .contains("repos[1].name"));
    }
}
