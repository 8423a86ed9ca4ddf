//! The operator's commands over the HTTP API: `rollback`, `pin`, `unpin` ([`topics`]),
//! `status` ([`status`]) and `command send|show|list` ([`commands`]). They talk to a running
//! server like any other API client, with the API token taken from an environment variable
//! (never from the command line, where `ps` and shell history would show it). `main.rs` only
//! parses their arguments.

pub mod commands;
pub mod status;
pub mod topics;

use std::time::Duration;

use serde_json::Value;

/// Where the server is and which credential to present: shared by every API command.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The server's base URL (`server.listen` of its config; `config/confcast.toml` listens on
    /// 127.0.0.1:8080). `https://` is checked against the system's trust store
    /// (`SSL_CERT_FILE` names a private CA).
    #[arg(long, env = "CONFCAST_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The environment variable that holds the API token (sent as `Authorization: Bearer`).
    /// Unset or empty: no token is sent (a server without `[[auth.api_tokens]]`).
    #[arg(long, default_value = "CONFCAST_API_TOKEN", value_name = "VAR")]
    pub token_env: String,
}

/// Why an API command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error status; `message` is its `error` field.
    #[error("{url}: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// An answer that says the request can never succeed as it is (a wrong credential, an
    /// unknown topic, a bad request), as opposed to a server that is down or busy.
    pub fn is_final(&self) -> bool {
        match self {
            CliError::Refused { status, .. } => *status < 500,
            CliError::Unreachable { .. } => false,
            CliError::Usage(_) => true,
        }
    }
}

/// A client of one server's API.
pub struct Api {
    http: reqwest::Client,
    pub(crate) base: String,
    token: Option<String>,
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    pub fn new(args: &ApiArgs) -> Result<Api, CliError> {
        let base = args.server.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(CliError::Usage(format!(
                "--server {base}: the server URL must start with http:// or https://"
            )));
        }
        let token = std::env::var(&args.token_env)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| CliError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api { http, base, token })
    }

    /// `GET path`, the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// `method path` with an optional JSON body; the JSON answer, or the server's error.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply = request.send().await.map_err(|e| CliError::Unreachable {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        let status = reply.status().as_u16();
        let text = reply.text().await.map_err(|e| CliError::Unreachable {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let message = match &value {
                Value::Object(o) => o
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            return Err(CliError::Refused {
                url,
                status,
                message,
            });
        }
        Ok(value)
    }
}

/// A reqwest error with its causes ("error sending request: ... Connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `/api/v1/topics/<topic><suffix>` with the topic percent-encoded except its `/`.
pub fn topic_path(topic: &str, suffix: &str) -> String {
    let mut path = String::from("/api/v1/topics/");
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push_str(suffix);
    path
}

/// A duration as `500ms`, `60s`, `2m`, `1h` or plain seconds (`60`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 60s, 2m, 500ms)"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (use ms, s, m or h)"
            ))
        }
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn topic_paths_keep_slashes_and_encode_the_rest() {
        assert_eq!(
            topic_path("team-core/db", "/pin"),
            "/api/v1/topics/team-core/db/pin"
        );
        assert_eq!(topic_path("a b?#%", ""), "/api/v1/topics/a%20b%3F%23%25");
    }
}
