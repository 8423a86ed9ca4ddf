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
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub repos: Vec<RepoConfig>,
    /// Progressive rollout policies (`[[rollouts]]`, CONFIGURATION.md section 14).
    #[serde(default)]
    pub rollouts: Vec<RolloutConfig>,
}

/// Most `[[rollouts]]` policies, and most stages in one.
pub const MAX_ROLLOUT_POLICIES: usize = 64;
pub const MAX_ROLLOUT_STAGES: usize = 16;

/// One `[[rollouts]]` policy as written; [`Config::rollout_policies`] gives it validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    pub name: String,
    #[serde(default)]
    pub topics: Vec<String>,
    pub stages: Vec<String>,
    #[serde(default = "default_bake_secs")]
    pub bake_secs: u64,
    #[serde(default = "default_promote_applied_percent")]
    pub promote_applied_percent: u32,
    #[serde(default)]
    pub halt_failed_percent: u32,
    #[serde(default)]
    pub auto_revert: bool,
    /// The policy, filled in by validation.
    #[serde(skip)]
    policy: Option<crate::staging::Policy>,
}

fn default_bake_secs() -> u64 {
    60
}

fn default_promote_applied_percent() -> u32 {
    100
}

impl RolloutConfig {
    /// Checks the policy at `rollouts[i]` and keeps it, its stages parsed, ending with `all`.
    fn validate(&mut self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("rollouts[{i}].{k}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok || self.name == crate::staging::IMMEDIATE {
            return Err(ConfigError::key(
                key("name"),
                format!(
                    "must be 1 to 64 of a-z, 0-9, `-`, `_`, and not `{}` (the trailer value that skips staging)",
                    crate::staging::IMMEDIATE
                ),
            ));
        }
        for (j, pattern) in self.topics.iter().enumerate() {
            crate::protocol::validate_pattern(pattern)
                .map_err(|e| ConfigError::key(format!("rollouts[{i}].topics[{j}]"), e))?;
        }
        if self.stages.is_empty() || self.stages.len() > MAX_ROLLOUT_STAGES {
            return Err(ConfigError::key(
                key("stages"),
                format!("give 1 to {MAX_ROLLOUT_STAGES} stages, such as [\"10%\", \"50%\"]"),
            ));
        }
        let mut stages = Vec::with_capacity(self.stages.len() + 1);
        for (j, text) in self.stages.iter().enumerate() {
            let stage: crate::staging::Stage = text
                .parse()
                .map_err(|e: String| ConfigError::key(format!("rollouts[{i}].stages[{j}]"), e))?;
            stages.push(stage);
        }
        // Stages only widen: of two stages with the same labels, the later must be larger (a
        // count and a percentage cannot be compared, and are let through).
        for j in 1..stages.len() {
            use crate::staging::Size;
            let (before, now) = (&stages[j - 1], &stages[j]);
            let narrower = before.labels == now.labels
                && match (&before.size, &now.size) {
                    (Size::Percent(a), Size::Percent(b)) => b <= a,
                    (Size::Count(a), Size::Count(b)) => b <= a,
                    (Size::All, _) => true,
                    _ => false,
                };
            if narrower {
                return Err(ConfigError::key(
                    format!("rollouts[{i}].stages[{j}]"),
                    format!(
                        "`{now}` does not widen `{before}`: each stage must reach more instances than the one before"
                    ),
                ));
            }
        }
        let everyone = crate::staging::Stage::everyone();
        if let Some(j) = stages[..stages.len() - 1]
            .iter()
            .position(|s| *s == everyone)
        {
            return Err(ConfigError::key(
                format!("rollouts[{i}].stages[{j}]"),
                "`all` can only be the last stage (it is added when the list does not end with it)",
            ));
        }
        if stages.last() != Some(&everyone) {
            stages.push(everyone);
        }
        if stages.len() > MAX_ROLLOUT_STAGES {
            return Err(ConfigError::key(
                key("stages"),
                format!(
                    "give 1 to {MAX_ROLLOUT_STAGES} stages, counting the `all` added at the end"
                ),
            ));
        }
        if self.bake_secs > 86_400 {
            return Err(ConfigError::key(
                key("bake_secs"),
                "must be at most 86400 (a day)",
            ));
        }
        if !(1..=100).contains(&self.promote_applied_percent) {
            return Err(ConfigError::key(
                key("promote_applied_percent"),
                "must be 1 to 100",
            ));
        }
        if self.halt_failed_percent > 100 {
            return Err(ConfigError::key(
                key("halt_failed_percent"),
                "must be 0 (any failure halts) to 100",
            ));
        }
        if self.halt_failed_percent + self.promote_applied_percent > 100 {
            // Failures the halt rule tolerates would keep the stage below the promote rule: the
            // rollout could neither promote nor halt.
            return Err(ConfigError::key(
                key("halt_failed_percent"),
                format!(
                    "halt_failed_percent {} with promote_applied_percent {} can leave a stage neither promoting nor halting: make the two add up to at most 100",
                    self.halt_failed_percent, self.promote_applied_percent
                ),
            ));
        }
        self.policy = Some(crate::staging::Policy {
            name: self.name.clone(),
            topics: self.topics.clone(),
            stages,
            bake_secs: self.bake_secs,
            promote_applied_percent: self.promote_applied_percent,
            halt_failed_percent: self.halt_failed_percent,
            auto_revert: self.auto_revert,
        });
        Ok(())
    }
}

/// Who may connect and what they may do. Every credential is given as a SHA-256 digest, an
/// environment variable or a file, and only its digest is kept in memory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lets a non-loopback listener start with no instance and API credentials. Off by default:
    /// without it, such a start is refused with a message naming the keys to set.
    pub allow_anonymous: bool,
    /// Static instance credentials, each bound to instance ids and topic patterns.
    pub instance_tokens: Vec<InstanceToken>,
    /// Credentials for the HTTP API.
    pub api_tokens: Vec<ApiToken>,
    /// JWTs minted per instance by an orchestrator.
    pub jwt: Option<JwtConfig>,
}

/// A static credential for instances: which ids it may claim and which topics it may read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceToken {
    /// Shown in logs and the API instead of the token.
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub token_sha256: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Instance ids this token may claim: `*` stands for any run of characters.
    #[serde(default = "any_pattern")]
    pub instances: String,
    /// Topic patterns it may subscribe to and ack (the subscription pattern syntax).
    #[serde(default = "any_topics")]
    pub topics: Vec<String>,
    /// Filled in by validation.
    #[serde(skip)]
    pub digest: Option<[u8; 32]>,
}

/// A credential for the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub name: String,
    pub token_sha256: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub scope: ApiScope,
    /// Filled in by validation.
    #[serde(skip)]
    pub digest: Option<[u8; 32]>,
}

/// `read`: the query API and the dashboard. `admin`: read, plus every write (force sync, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiScope {
    Read,
    Admin,
}

impl ApiScope {
    /// The name used in the configuration and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiScope::Read => "read",
            ApiScope::Admin => "admin",
        }
    }
}

/// JWT verification for instance credentials. Exactly one key is given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub hs256_secret_env: Option<String>,
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key for RS256.
    pub rs256_public_key_file: Option<PathBuf>,
    /// PEM public key for EdDSA (Ed25519).
    pub eddsa_public_key_file: Option<PathBuf>,
    /// When set, the `iss` claim must equal it.
    pub issuer: Option<String>,
    /// When set, the `aud` claim must contain it.
    pub audience: Option<String>,
    /// The claim listing the topic patterns the token may read (default `topics`).
    #[serde(default = "default_topics_claim")]
    pub topics_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Filled in by validation: the key material.
    #[serde(skip)]
    pub key: Option<Secret>,
}

fn any_pattern() -> String {
    "*".to_string()
}

fn any_topics() -> Vec<String> {
    vec!["*".to_string()]
}

fn default_topics_claim() -> String {
    "topics".to_string()
}

fn default_leeway() -> u64 {
    30
}

/// Caps on what any peer can make the server hold. Every one has a default meant for production.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// TCP connections held at once; beyond it new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    pub header_read_timeout_secs: u64,
    /// Time a client has to send a whole webhook body.
    pub body_read_timeout_secs: u64,
    /// Webhook body bytes being read at once, over all requests; beyond it: 503 + Retry-After.
    pub webhook_bytes_in_flight: usize,
    /// Longest webhook delivery id accepted (400 beyond).
    pub max_delivery_id_bytes: usize,
    /// Time a WebSocket has from the upgrade to its `hello`.
    pub hello_timeout_secs: u64,
    /// Largest message an instance may send.
    pub max_client_message_bytes: usize,
    /// Bytes queued for one WebSocket that does not read before it is dropped, on top of one frame.
    pub ws_write_buffer_bytes: usize,
    /// Distinct topic patterns one connection may subscribe to, over all its `subscribe`s.
    pub max_subscriptions: usize,
    pub max_pattern_bytes: usize,
    pub max_instance_id_bytes: usize,
    pub max_labels: usize,
    /// Longest label key or value, and longest `app`.
    pub max_label_bytes: usize,
    /// Longest error text kept from a `failed` ack.
    pub max_ack_error_bytes: usize,
    /// Largest file a topic may hold; larger is held back with the reason in the API.
    pub max_file_bytes: u64,
    /// Largest total of a topic's files; bounds every change and snapshot frame.
    pub max_topic_bytes: u64,
    /// Most files one topic may hold.
    pub max_topic_files: usize,
    /// Longest path of a file in the repo.
    pub max_path_bytes: usize,
    /// Instances disconnected longer than this are forgotten, with their acks (0 = never).
    pub instance_expiry_secs: u64,
    /// Audit log entries kept, newest first (0 = all).
    pub max_audit_entries: u64,
    /// Refused credentials recorded one by one per minute, per replica; beyond it they are
    /// counted and recorded as one summary entry, so a flood cannot grow the database.
    pub audit_refusals_per_minute: u32,
    /// Dashboard event streams (`GET /api/v1/events`) open at once; beyond it: 503 + Retry-After.
    pub max_event_streams: usize,
    /// Longest command name (`[A-Za-z0-9._-]`, starting with a letter or digit).
    pub max_command_name_bytes: usize,
    /// Largest command `args`, as compact JSON.
    pub max_command_args_bytes: usize,
    /// Most instance ids one command may name in an `instances` target.
    pub max_command_instances: usize,
    /// Deadline of a command sent without one.
    pub default_command_deadline_secs: u64,
    /// Longest deadline a command may ask for.
    pub max_command_deadline_secs: u64,
    /// Commands whose deadline has not passed, at once; beyond it `POST /api/v1/commands` is
    /// refused until one expires.
    pub max_active_commands: u64,
    /// Commands kept with their per-instance outcomes, newest first; older ones are forgotten.
    pub max_commands_kept: u64,
    /// Longest `reason` a rollback or pin may carry (it is stored and shown).
    pub max_reason_bytes: usize,
    /// Held-back changes a pinned topic lists, newest kept; older ones are only counted.
    pub max_held_changes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 65_536,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            webhook_bytes_in_flight: 64 * 1024 * 1024,
            max_delivery_id_bytes: 256,
            hello_timeout_secs: 10,
            max_client_message_bytes: 64 * 1024,
            ws_write_buffer_bytes: 1024 * 1024,
            max_subscriptions: 64,
            max_pattern_bytes: 256,
            max_instance_id_bytes: 200,
            max_labels: 32,
            max_label_bytes: 256,
            max_ack_error_bytes: 4096,
            max_file_bytes: 8 * 1024 * 1024,
            max_topic_bytes: 16 * 1024 * 1024,
            max_topic_files: 10_000,
            max_path_bytes: 1024,
            instance_expiry_secs: 7 * 24 * 3600,
            max_audit_entries: 100_000,
            audit_refusals_per_minute: 60,
            max_event_streams: 256,
            max_command_name_bytes: 64,
            max_command_args_bytes: 16 * 1024,
            max_command_instances: 1000,
            default_command_deadline_secs: 300,
            max_command_deadline_secs: 24 * 3600,
            max_active_commands: 100,
            max_commands_kept: 1000,
            max_reason_bytes: 1024,
            max_held_changes: 100,
        }
    }
}

impl LimitsConfig {
    /// The largest frame the server can send; clients must accept this much. A topic's files at
    /// their encoded size (base64 at worst, 4/3: `protocol::encode_content` never sends text that
    /// JSON-escapes larger), plus per file up to two paths, its own and the one it replaces
    /// (`old_path` or a `deleted` entry), each at twice its length (`"` escapes to two bytes;
    /// control characters and backslashes never pass `protocol::check_path`), with sha, status and
    /// JSON framing; plus 64 KiB for topic, commit, author and message (sync cuts the latter two).
    pub fn max_frame_bytes(&self) -> u64 {
        let content = self.max_topic_bytes.div_ceil(3) * 4;
        let per_file = u64::try_from(self.max_path_bytes.saturating_mul(4).saturating_add(256))
            .unwrap_or(u64::MAX);
        let files = u64::try_from(self.max_topic_files).unwrap_or(u64::MAX);
        let changes = content
            .saturating_add(per_file.saturating_mul(files))
            .saturating_add(64 * 1024);
        // A `command` frame: its args exactly as measured (compact JSON, which the frame
        // repeats byte for byte), its name, and 4 KiB for the id, deadline and framing.
        let command = u64::try_from(
            self.max_command_args_bytes
                .saturating_add(self.max_command_name_bytes)
                .saturating_add(4096),
        )
        .unwrap_or(u64::MAX);
        changes.max(command)
    }
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
    /// Serve `https://` and `wss://` with these PEM files.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert_file: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
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
            tls: None,
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
    /// Environment variable(s) holding the webhook secret. Several are all valid at once, for
    /// rotation: `secret_env = ["HOOK_NEW", "HOOK_OLD"]`.
    #[serde(default)]
    pub secret_env: OneOrMany<String>,
    /// File(s) holding the webhook secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: OneOrMany<PathBuf>,
    /// Inline secret: accepted, with a warning, for experiments only.
    #[serde(default)]
    pub secret: Option<String>,
    /// Path-to-topic rules, first match wins; default: the first path segment is the topic.
    #[serde(default)]
    pub topics: Vec<TopicRule>,
    /// How webhooks for this repo are verified.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// How confcast authenticates to the git remote.
    #[serde(default)]
    pub auth: GitAuth,
    /// Fetch this often even without a webhook, so a lost webhook still converges (0 = never).
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// Filled in by validation: every secret currently accepted.
    #[serde(skip)]
    pub webhook_secrets: Vec<Secret>,
    /// Filled in by validation.
    #[serde(skip)]
    pub rules: TopicRules,
}

fn default_branch() -> String {
    "main".to_string()
}

fn default_poll() -> u64 {
    300
}

/// Credentials and trust for fetching. https: a token (sent as the password of `username`);
/// ssh: a private key, and the remote's host key must be in `known_hosts_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitAuth {
    /// User name for https tokens (default `x-access-token`, which GitHub and GitLab accept) or ssh (default `git`).
    pub username: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_passphrase_env: Option<String>,
    /// OpenSSH known_hosts file checked for ssh remotes; there is no "accept any host" mode.
    pub known_hosts_file: Option<PathBuf>,
    /// A fetch taking longer than this is abandoned and retried with backoff (default 120).
    pub fetch_timeout_secs: Option<u64>,
    /// Filled in by validation.
    #[serde(skip)]
    pub token: Option<Secret>,
    #[serde(skip)]
    pub ssh_passphrase: Option<Secret>,
}

/// A value given as one item or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl<T> OneOrMany<T> {
    pub fn items(&self) -> &[T] {
        match self {
            OneOrMany::One(t) => std::slice::from_ref(t),
            OneOrMany::Many(v) => v,
        }
    }
}

/// Which forge signs this repo's webhooks and how. `auto` tells the forge by its event header;
/// the algorithm is always fixed here, never chosen by what a request claims.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub provider: Provider,
    /// Accept GitHub's legacy `X-Hub-Signature` (HMAC-SHA1) when no SHA-256 signature is sent.
    pub github_legacy_sha1: bool,
    /// Standard Webhooks (GitLab signing tokens): how far `webhook-timestamp` may be from now.
    pub timestamp_tolerance_secs: Option<u64>,
    /// For `provider = "generic"`.
    pub generic: Option<GenericWebhook>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    #[default]
    Auto,
    Github,
    Gitlab,
    Gitea,
    Forgejo,
    Gogs,
    BitbucketCloud,
    BitbucketServer,
    Generic,
}

/// A receiver for any forge that signs with an HMAC in one header.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericWebhook {
    /// Header carrying the signature, such as `X-Signature`.
    pub header: String,
    #[serde(default)]
    pub algorithm: HmacAlgorithm,
    #[serde(default)]
    pub encoding: SignatureEncoding,
    /// Text before the signature, such as `sha256=`.
    #[serde(default)]
    pub prefix: String,
    /// JSON pointer to the pushed ref in the body (default `/ref`).
    #[serde(default)]
    pub ref_pointer: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HmacAlgorithm {
    #[default]
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
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
        let limits = &self.limits;
        if limits.default_command_deadline_secs == 0
            || limits.default_command_deadline_secs > limits.max_command_deadline_secs
        {
            return Err(ConfigError::key(
                "limits.default_command_deadline_secs",
                "must be at least 1 and at most limits.max_command_deadline_secs",
            ));
        }
        // A rollback's reason goes into its change's message, which must stay within the
        // fixed part of `max_frame_bytes` (sync::git::MAX_MESSAGE_BYTES).
        if !(1..=4096).contains(&self.limits.max_reason_bytes) {
            return Err(ConfigError::key(
                "limits.max_reason_bytes",
                "must be 1 to 4096 (a rollback or pin must say why, and its change message is capped)",
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
        if let Some(token) = &self.server.client_token {
            let file = self.server.client_token_file.as_ref().map(|f| base.join(f));
            let source = file.as_ref().map_or_else(
                || self.server.client_token_env.clone().unwrap_or_default(),
                |f| f.display().to_string(),
            );
            warn_weak_secret("server.client_token", &source, token, file.as_deref());
        }
        self.resolve_auth_config(base, lookup)?;
        if let Some(tls) = &mut self.server.tls {
            // Relative to the config file, like every other file key; checked here so
            // check-config reports a missing file, not only serve.
            for (key, path) in [
                ("server.tls.cert_file", &mut tls.cert_file),
                ("server.tls.key_file", &mut tls.key_file),
            ] {
                *path = base.join(&*path);
                if !path.is_file() {
                    return Err(ConfigError::key(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
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
            repo.webhook_secrets = resolve_secrets(repo, base, lookup)
                .map_err(|(k, m)| ConfigError::key(key(k), m))?;
            resolve_auth(&mut repo.auth, base, lookup)
                .map_err(|(k, m)| ConfigError::key(key(&format!("auth.{k}")), m))?;
            let is_ssh = repo.url.starts_with("ssh://")
                || (!repo.url.contains("://") && repo.url.contains('@'));
            if is_ssh && repo.auth.known_hosts_file.is_none() {
                return Err(ConfigError::key(
                    key("auth.known_hosts_file"),
                    "an ssh remote needs a known_hosts file to check the server's host key",
                ));
            }
            if repo.webhook.provider == Provider::Generic && repo.webhook.generic.is_none() {
                return Err(ConfigError::key(
                    key("webhook.generic"),
                    "provider = \"generic\" needs a [repos.webhook.generic] table with at least `header`",
                ));
            }
            repo.rules = TopicRules::compile(&repo.topics)
                .map_err(|(j, m)| ConfigError::key(format!("repos[{i}].topics[{j}]"), m))?;
        }
        Ok(())
    }

    /// Resolves every `[auth]` credential to its digest or key, and checks names and patterns.
    fn resolve_auth_config(
        &mut self,
        base: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.auth.instance_tokens.iter_mut().enumerate() {
            let key = format!("auth.instance_tokens[{i}]");
            crate::auth::check_instance_token(&key, t)?;
            let given = (&t.name, &t.token_sha256, &t.token_env, &t.token_file);
            t.digest = Some(static_token(&key, "i", given, &mut names, base, lookup)?);
        }
        for (i, t) in self.auth.api_tokens.iter_mut().enumerate() {
            let key = format!("auth.api_tokens[{i}]");
            let given = (&t.name, &t.token_sha256, &t.token_env, &t.token_file);
            t.digest = Some(static_token(&key, "a", given, &mut names, base, lookup)?);
        }
        if let Some(jwt) = &mut self.auth.jwt {
            let given = [
                jwt.hs256_secret_env.is_some(),
                jwt.hs256_secret_file.is_some(),
                jwt.rs256_public_key_file.is_some(),
                jwt.eddsa_public_key_file.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ConfigError::key(
                    "auth.jwt",
                    "give exactly one of hs256_secret_env, hs256_secret_file, rs256_public_key_file, eddsa_public_key_file",
                ));
            }
            jwt.key = Some(if let Some(var) = &jwt.hs256_secret_env {
                lookup(var)
                    .and_then(|v| non_empty(v.into_bytes()))
                    .ok_or_else(|| {
                        ConfigError::key(
                            "auth.jwt.hs256_secret_env",
                            format!("environment variable {var} is not set or empty"),
                        )
                    })?
            } else if let Some(file) = &jwt.hs256_secret_file {
                read_secret_file(&base.join(file))
                    .map_err(|m| ConfigError::key("auth.jwt.hs256_secret_file", m))?
            } else {
                let (k, file) = match (&jwt.rs256_public_key_file, &jwt.eddsa_public_key_file) {
                    (Some(f), _) => ("auth.jwt.rs256_public_key_file", f),
                    (None, Some(f)) => ("auth.jwt.eddsa_public_key_file", f),
                    (None, None) => unreachable_key()?,
                };
                read_secret_file(&base.join(file)).map_err(|m| ConfigError::key(k, m))?
            });
            if let (Some(secret), true) = (
                &jwt.key,
                jwt.rs256_public_key_file.is_none() && jwt.eddsa_public_key_file.is_none(),
            ) {
                let file = jwt.hs256_secret_file.as_ref().map(|f| base.join(f));
                let source = file.as_ref().map_or_else(
                    || jwt.hs256_secret_env.clone().unwrap_or_default(),
                    |f| f.display().to_string(),
                );
                warn_weak_secret("auth.jwt", &source, secret, file.as_deref());
            }
            if jwt.topics_claim.is_empty() {
                return Err(ConfigError::key(
                    "auth.jwt.topics_claim",
                    "must not be empty",
                ));
            }
        }
        if self.rollouts.len() > MAX_ROLLOUT_POLICIES {
            return Err(ConfigError::key(
                "rollouts",
                format!("at most {MAX_ROLLOUT_POLICIES} policies"),
            ));
        }
        for i in 0..self.rollouts.len() {
            self.rollouts[i].validate(i)?;
            if self.rollouts[..i]
                .iter()
                .any(|r| r.name == self.rollouts[i].name)
            {
                return Err(ConfigError::key(
                    format!("rollouts[{i}].name"),
                    format!("`{}` names two policies", self.rollouts[i].name),
                ));
            }
        }
        // Builds the checker once so a bad key fails here, at start, naming its key.
        crate::auth::Authenticator::new(&self.auth, self.server.client_token.as_ref())?;
        Ok(())
    }

    /// Why serving on `addr` would expose topics or the API to anyone who can reach it, if it would:
    /// a non-loopback address needs instance and API credentials unless `auth.allow_anonymous`.
    pub fn exposure_problem(&self, addr: SocketAddr) -> Option<String> {
        if addr.ip().is_loopback() || self.auth.allow_anonymous {
            return None;
        }
        let mut missing = Vec::new();
        if self.auth.instance_tokens.is_empty()
            && self.auth.jwt.is_none()
            && self.server.client_token.is_none()
        {
            missing.push("instance credentials ([[auth.instance_tokens]] or [auth.jwt])");
        }
        if self.auth.api_tokens.is_empty() {
            missing.push("API credentials ([[auth.api_tokens]])");
        }
        (!missing.is_empty()).then(|| {
            format!(
                "refusing to listen on {addr} without {}: anyone who reaches the port could read every topic \
                 or act as any instance. Configure them (docs/OPERATIONS.md, section 8), listen on a loopback \
                 address, or set auth.allow_anonymous = true to accept the risk",
                missing.join(" and ")
            )
        })
    }

    /// The `[[rollouts]]` policies, validated, in the order written.
    pub fn rollout_policies(&self) -> Vec<crate::staging::Policy> {
        self.rollouts
            .iter()
            .filter_map(|r| r.policy.clone())
            .collect()
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

fn resolve_secrets(
    repo: &RepoConfig,
    base: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Secret>, (&'static str, String)> {
    let mut secrets = Vec::new();
    for var in repo.secret_env.items() {
        let value = lookup(var).ok_or((
            "secret_env",
            format!("environment variable {var} is not set"),
        ))?;
        let secret = non_empty(value.into_bytes())
            .ok_or(("secret_env", format!("environment variable {var} is empty")))?;
        warn_weak_secret("repos[..].secret_env", var, &secret, None);
        secrets.push(secret);
    }
    for file in repo.secret_file.items() {
        let path = base.join(file);
        let secret = read_secret_file(&path).map_err(|m| ("secret_file", m))?;
        warn_weak_secret(
            "repos[..].secret_file",
            &path.display().to_string(),
            &secret,
            Some(&path),
        );
        secrets.push(secret);
    }
    if let Some(secret) = &repo.secret {
        tracing::warn!(repo = %repo.name, "webhook secret given inline in the config; prefer secret_env or secret_file");
        let secret =
            non_empty(secret.clone().into_bytes()).ok_or(("secret", "is empty".to_string()))?;
        warn_weak_secret(
            "repos[..].secret",
            &format!("repo `{}`", repo.name),
            &secret,
            None,
        );
        secrets.push(secret);
    }
    if secrets.is_empty() {
        tracing::warn!(repo = %repo.name, "no webhook secret configured: every webhook for this repo will be refused (401)");
    }
    Ok(secrets)
}

fn resolve_auth(
    auth: &mut GitAuth,
    base: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (&'static str, String)> {
    if auth.token_env.is_some() && auth.token_file.is_some() {
        return Err(("token_env", "give only one of token_env, token_file".into()));
    }
    if let Some(var) = &auth.token_env {
        let value = lookup(var).ok_or((
            "token_env",
            format!("environment variable {var} is not set"),
        ))?;
        let token = non_empty(value.into_bytes())
            .ok_or(("token_env", format!("environment variable {var} is empty")))?;
        warn_weak_secret("repos[..].auth.token_env", var, &token, None);
        auth.token = Some(token);
    }
    if let Some(file) = &auth.token_file {
        let path = base.join(file);
        let token = read_secret_file(&path).map_err(|m| ("token_file", m))?;
        warn_weak_secret(
            "repos[..].auth.token_file",
            &path.display().to_string(),
            &token,
            Some(&path),
        );
        auth.token = Some(token);
    }
    if let Some(var) = &auth.ssh_passphrase_env {
        let value = lookup(var).ok_or((
            "ssh_passphrase_env",
            format!("environment variable {var} is not set"),
        ))?;
        auth.ssh_passphrase = Some(Secret::new(value.into_bytes()));
    }
    if let Some(key) = &auth.ssh_key_file {
        let path = base.join(key);
        if !path.is_file() {
            return Err((
                "ssh_key_file",
                format!("{} is not a readable file", path.display()),
            ));
        }
        for problem in secret_problems(None, file_mode(&path)) {
            tracing::warn!(key = "repos[..].auth.ssh_key_file", source = %path.display(), "{problem}");
        }
        auth.ssh_key_file = Some(path);
    }
    if let Some(kh) = &auth.known_hosts_file {
        let path = base.join(kh);
        if !path.is_file() {
            return Err((
                "known_hosts_file",
                format!("{} is not a readable file", path.display()),
            ));
        }
        auth.known_hosts_file = Some(path);
    }
    Ok(())
}

/// Secrets shorter than this can be guessed offline from a single signed request a forge sent.
const MIN_SECRET_BYTES: usize = 16;

/// What is wrong with how a secret is kept: `len` its length when known, `mode` its file's
/// permission bits when it came from a file. Never says anything about the value itself.
fn secret_problems(len: Option<usize>, mode: Option<u32>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(mode) = mode.filter(|m| m & 0o077 != 0) {
        problems.push(format!(
            "secret file is readable by group or others (mode {:o}): chmod 600 it, or 400",
            mode & 0o777
        ));
    }
    if let Some(len) = len.filter(|l| *l < MIN_SECRET_BYTES) {
        problems.push(format!(
            "secret is {len} bytes, shorter than {MIN_SECRET_BYTES}: use a long random value (openssl rand -hex 32)"
        ));
    }
    problems
}

/// The permission bits of `path` (following links, as a read does), when they can be read.
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

/// Warns about each of [`secret_problems`], naming the key and where the secret came from (an
/// environment variable's name, a file's path): never the value.
fn warn_weak_secret(key: &str, source: &str, secret: &Secret, file: Option<&Path>) {
    for problem in secret_problems(Some(secret.expose().len()), file.and_then(file_mode)) {
        tracing::warn!(key, source, "{problem}");
    }
}

/// A static credential's name (unique among its `kind`), and its digest from whichever of
/// `token_sha256`, `token_env` or `token_file` is given; warns about a weak one.
fn static_token(
    key: &str,
    kind: &str,
    (name, sha256, env, file): (&String, &Option<String>, &Option<String>, &Option<PathBuf>),
    names: &mut std::collections::HashSet<String>,
    base: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<[u8; 32], ConfigError> {
    if name.is_empty() || !names.insert(format!("{kind}:{name}")) {
        return Err(ConfigError::key(
            format!("{key}.name"),
            "give each token a distinct, non-empty name",
        ));
    }
    let file = file.as_ref().map(|f| base.join(f));
    warn_weak_token(key, env.as_deref(), file.as_deref(), lookup);
    crate::auth::resolve_digest(
        key,
        sha256.as_deref(),
        env.as_deref(),
        file.as_deref(),
        lookup,
    )
}

/// The same warnings for a static credential given by variable or file (a digest gives nothing to
/// check). Errors are reported by `auth::resolve_digest`, not here.
fn warn_weak_token(
    key: &str,
    env: Option<&str>,
    file: Option<&Path>,
    lookup: &dyn Fn(&str) -> Option<String>,
) {
    if let Some(var) = env {
        if let Some(value) = lookup(var).and_then(|v| non_empty(v.into_bytes())) {
            warn_weak_secret(key, var, &value, None);
        }
    } else if let Some(path) = file {
        if let Ok(secret) = read_secret_file(path) {
            warn_weak_secret(key, &path.display().to_string(), &secret, Some(path));
        }
    }
}

/// Reads a secret from a file, without its trailing newline.
pub(crate) fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    non_empty(bytes).ok_or_else(|| format!("{} is empty", path.display()))
}

/// For a match arm validation has already ruled out.
fn unreachable_key() -> Result<(&'static str, &'static PathBuf), ConfigError> {
    Err(ConfigError::key("auth.jwt", "no key file given"))
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
    fn rollout_policies_are_checked_and_named_in_errors() {
        let policy = |body: &str| format!("{BASE}\n[[rollouts]]\nname = \"canary\"\n{body}\n");
        let ok = parse(
            &policy("stages = [\"10%\", \"zone=eu-1 50%\"]\nbake_secs = 60"),
            &[],
        )
        .expect("valid");
        let p = &ok.rollout_policies()[0];
        assert_eq!(p.stages.len(), 3, "all is added");
        assert_eq!(p.promote_applied_percent, 100);
        let cases = [
            ("stages = []", "rollouts[0].stages", "give 1 to 16"),
            (
                "stages = [\"all\", \"10%\"]",
                "rollouts[0].stages[1]",
                "does not widen",
            ),
            (
                "stages = [\"10%\", \"all\", \"zone=a\"]",
                "rollouts[0].stages[1]",
                "can only be the last",
            ),
            (
                "stages = [\"50%\", \"10%\"]",
                "rollouts[0].stages[1]",
                "`10%` does not widen `50%`",
            ),
            (
                "stages = [\"3\", \"3 instances\"]",
                "rollouts[0].stages[1]",
                "does not widen",
            ),
            ("stages = [\"150%\"]", "rollouts[0].stages[0]", "1% to 100%"),
            (
                "stages = [\"2000000 instances\"]",
                "rollouts[0].stages[0]",
                "a count is 1 to",
            ),
            (
                "stages = [\"zone=a\\u0000\"]",
                "rollouts[0].stages[0]",
                "control character",
            ),
            (
                "stages = [\"10%\"]\nbake_secs = 86401",
                "rollouts[0].bake_secs",
                "at most 86400",
            ),
            (
                "stages = [\"10%\"]\nhalt_failed_percent = 10",
                "rollouts[0].halt_failed_percent",
                "add up to at most 100",
            ),
            (
                "stages = [\"10%\"]\nhalt_failed_percent = 10\npromote_applied_percent = 95",
                "rollouts[0].halt_failed_percent",
                "add up",
            ),
        ];
        for (body, key, expected) in cases {
            let err = parse(&policy(body), &[]).expect_err(body).to_string();
            assert!(err.contains(key) && err.contains(expected), "{body}: {err}");
        }
        assert!(
            parse(
                &policy(
                    "stages = [\"10%\"]\nhalt_failed_percent = 10\npromote_applied_percent = 90"
                ),
                &[]
            )
            .is_ok(),
            "90 applied and 10 failed adds up to 100"
        );
        let sixteen: Vec<String> = (1..=16).map(|n| format!("\"{n}%\"")).collect();
        let err = parse(&policy(&format!("stages = [{}]", sixteen.join(", "))), &[])
            .expect_err("17 with all")
            .to_string();
        assert!(err.contains("counting the `all`"), "{err}");
    }

    #[test]
    fn auth_entries_are_checked_and_named_in_errors() {
        let sha = "a".repeat(64);
        let token = |name: &str| {
            format!("[[auth.api_tokens]]\nname = \"{name}\"\ntoken_sha256 = \"{sha}\"\nscope = \"read\"\n")
        };
        let ok = format!("{}{BASE}", token("ops"));
        let c = parse(&ok, &[]).expect("valid");
        assert_eq!(c.auth.api_tokens[0].digest, Some([0xaa; 32]));
        let twice = format!("{}{}{BASE}", token("ops"), token("ops"));
        let err = parse(&twice, &[]).expect_err("duplicate name").to_string();
        assert!(err.contains("auth.api_tokens[1].name"), "{err}");
        let both = format!(
            "[[auth.instance_tokens]]\nname = \"i\"\ntoken_sha256 = \"{sha}\"\ntoken_env = \"HOOK_SECRET\"\n{BASE}"
        );
        let err = parse(&both, &[]).expect_err("two sources").to_string();
        assert!(
            err.contains("auth.instance_tokens[0]") && err.contains("exactly one"),
            "{err}"
        );
        let bad_topic = format!(
            "[[auth.instance_tokens]]\nname = \"i\"\ntoken_sha256 = \"{sha}\"\ntopics = [\"a*b\"]\n{BASE}"
        );
        let err = parse(&bad_topic, &[]).expect_err("bad pattern").to_string();
        assert!(err.contains("auth.instance_tokens[0].topics[0]"), "{err}");
        let no_key = format!("[auth.jwt]\nissuer = \"x\"\n{BASE}");
        let err = parse(&no_key, &[]).expect_err("no key").to_string();
        assert!(err.contains("auth.jwt"), "{err}");
        let tls = BASE.replace(
            "listen = \"127.0.0.1:9000\"",
            "listen = \"127.0.0.1:9000\"\n[server.tls]\ncert_file = \"missing.pem\"\nkey_file = \"k.pem\"",
        );
        let err = parse(&tls, &[]).expect_err("missing cert").to_string();
        assert!(err.contains("server.tls.cert_file"), "{err}");
    }

    #[test]
    fn command_deadlines_are_checked_and_command_frames_fit_the_frame_bound() {
        let c = parse(BASE, &[]).expect("valid");
        assert!(c.limits.max_frame_bytes() > c.limits.max_command_args_bytes as u64);
        let long = format!(
            "[limits]\ndefault_command_deadline_secs = 100\nmax_command_deadline_secs = 50\n{BASE}"
        );
        let err = parse(&long, &[])
            .expect_err("default above max")
            .to_string();
        assert!(
            err.contains("limits.default_command_deadline_secs"),
            "{err}"
        );
        let zero = format!("[limits]\ndefault_command_deadline_secs = 0\n{BASE}");
        assert!(parse(&zero, &[]).is_err());
        // Tiny topics: the frame bound is then set by the largest command.
        let tiny = format!("[limits]\nmax_topic_bytes = 1\nmax_topic_files = 1\nmax_path_bytes = 1\nmax_command_args_bytes = 1000000\n{BASE}");
        let c = parse(&tiny, &[]).expect("valid");
        assert!(c.limits.max_frame_bytes() >= 1_000_000 + 64 + 4096);
    }

    #[test]
    fn a_wide_listener_needs_credentials_unless_anonymous_is_allowed() {
        let c = parse(BASE, &[]).expect("valid");
        let wide: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let problem = c.exposure_problem(wide).expect("refused");
        assert!(problem.contains("auth.instance_tokens") && problem.contains("auth.api_tokens"));
        assert!(c
            .exposure_problem("127.0.0.1:8080".parse().expect("addr"))
            .is_none());
        let open = parse(&format!("[auth]\nallow_anonymous = true\n{BASE}"), &[]).expect("valid");
        assert!(open.exposure_problem(wide).is_none());
    }

    #[test]
    fn defaults_and_secret_from_env() {
        let c = parse(BASE, &[]).expect("valid");
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.repos[0].branch, "main");
        assert_eq!(
            c.repos[0].webhook_secrets.first().map(Secret::expose),
            Some(b"s3cret".as_slice())
        );
        assert_eq!(c.store_url(), "sqlite://./data/confcast.db");
        assert_eq!(format!("{:?}", c.repos[0].webhook_secrets), "[Secret(***)]");
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
    fn weak_secrets_are_named_by_problem_never_by_value() {
        assert!(secret_problems(Some(32), Some(0o100600)).is_empty());
        assert!(secret_problems(Some(16), Some(0o400)).is_empty());
        let short = secret_problems(Some(6), None);
        assert_eq!(short.len(), 1);
        assert!(short[0].contains("6 bytes"), "{short:?}");
        for mode in [0o100640, 0o100604, 0o100644] {
            let open = secret_problems(Some(32), Some(mode));
            assert_eq!(open.len(), 1, "{mode:o}");
            assert!(open[0].contains("group or others"), "{open:?}");
        }
        assert_eq!(secret_problems(Some(3), Some(0o644)).len(), 2);
    }

    #[test]
    fn a_secret_files_mode_is_read_from_the_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hook");
        std::fs::write(&path, "a-long-enough-webhook-secret\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(file_mode(&path).map(|m| m & 0o777), Some(0o644));
        assert_eq!(secret_problems(None, file_mode(&path)).len(), 1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(secret_problems(None, file_mode(&path)).is_empty());
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

    /// The worst frames the caps allow: every file at the cap with content that escapes badly
    /// (forced to base64), paths of `"` (escaped to twice their length), each file replacing
    /// another (a rename's `old_path`, or an add beside a delete), commit message and author cut
    /// to their longest, all control characters.
    #[test]
    fn the_largest_frames_fit_max_frame_bytes_and_the_default_client_limit() {
        use crate::protocol::{encode_content, Change, FileChange, FileStatus, ServerMessage};
        use crate::sync::git::{MAX_AUTHOR_BYTES, MAX_MESSAGE_BYTES};
        let limits = LimitsConfig {
            max_topic_bytes: 200_000,
            max_topic_files: 2_000,
            max_path_bytes: 1024,
            ..LimitsConfig::default()
        };
        let path = |n: usize| format!("{}{n:04}", "\"".repeat(1020));
        let (content, encoding) = encode_content(&[0x01; 100]);
        let file = |n: usize, status, old_path| FileChange {
            path: path(n),
            status,
            old_path,
            sha: "f".repeat(40),
            content: (status != FileStatus::Deleted).then(|| content.clone()),
            encoding,
        };
        let renames = (0..2_000)
            .map(|n| file(n, FileStatus::Renamed, Some(path(n + 5_000))))
            .collect();
        let adds_and_deletes = (0..2_000)
            .map(|n| file(n, FileStatus::Added, None))
            .chain((0..2_000).map(|n| file(n + 5_000, FileStatus::Deleted, None)))
            .collect();
        for files in [renames, adds_and_deletes] {
            let frame = serde_json::to_string(&ServerMessage::Change(Change {
                seq: u64::MAX,
                topic: "\"".repeat(1024),
                version: u64::MAX,
                previous_version: u64::MAX,
                commit: "f".repeat(40),
                author: "\u{1}".repeat(MAX_AUTHOR_BYTES),
                message: "\u{1}".repeat(MAX_MESSAGE_BYTES),
                files,
            }))
            .expect("serializes");
            assert!(
                frame.len() as u64 <= limits.max_frame_bytes(),
                "{} > {}",
                frame.len(),
                limits.max_frame_bytes()
            );
        }
        let default = LimitsConfig::default().max_frame_bytes();
        assert!(
            default <= crate::client::DEFAULT_MAX_FRAME_BYTES as u64,
            "the bundled client must accept the default largest frame ({default} bytes)"
        );
    }
}
