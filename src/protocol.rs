//! The wire protocol between confcast and the instances, shared by the server and the client.
//!
//! Every frame is one JSON object in a WebSocket text message, tagged by `"type"`. `docs/PROTOCOL.md`
//! is the prose version of this file; keep the two in step. Nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol revision announced in `welcome`; bumped on an incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket close codes confcast uses (4000-4999 is the application range).
pub mod close {
    /// The server is shutting down; reconnect (to another replica) and resume.
    pub const GOING_AWAY: u16 = 1001;
    /// A client message was larger than the server accepts (`limits.max_client_message_bytes`).
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client did not keep up with the live stream and fell out of its bounded queue; reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// No pong or frame arrived within the keepalive timeout.
    pub const KEEPALIVE_TIMEOUT: u16 = 4009;
    /// The same instance id connected again; this older connection is replaced.
    pub const REPLACED: u16 = 4010;
    /// No `hello` arrived within the server's hello timeout after the upgrade.
    pub const HELLO_TIMEOUT: u16 = 4011;
}

/// Error codes carried in `error` frames. The connection stays open after each of them.
pub mod error_code {
    /// The frame is not JSON, or not one of the client messages.
    pub const MALFORMED: &str = "malformed";
    /// A frame that is valid but not allowed yet (anything before `hello`, or a second `hello`).
    pub const OUT_OF_ORDER: &str = "out_of_order";
    /// An ack for a topic or version the server does not know.
    pub const UNKNOWN_VERSION: &str = "unknown_version";
    /// A field has a value the server refuses (empty instance id, bad topic pattern, ...).
    pub const INVALID: &str = "invalid";
    /// The server could not record or read something; retry later.
    pub const INTERNAL: &str = "internal";
    /// The connection's credential does not allow it: an instance id outside its pattern, an id held
    /// by another credential, a topic pattern or an ack outside its topics.
    pub const FORBIDDEN: &str = "forbidden";
}

/// Messages an instance sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Hello {
        instance: String,
        #[serde(default)]
        app: Option<String>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    Subscribe {
        topics: Vec<String>,
        #[serde(default)]
        since: Option<u64>,
    },
    Ack {
        topic: String,
        version: u64,
        status: AckStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Applied,
    Failed,
}

impl AckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Applied => "applied",
            AckStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "applied" => Some(AckStatus::Applied),
            "failed" => Some(AckStatus::Failed),
            _ => None,
        }
    }
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        protocol: u32,
        server: String,
        instance: String,
        heartbeat_secs: u64,
        /// The largest frame this server may send (from its `[limits]`); 0 from older servers.
        #[serde(default)]
        max_frame_bytes: u64,
    },
    Snapshot(Snapshot),
    /// Sent after the snapshots or the replay of one `subscribe`: from here on the stream is live.
    Subscribed {
        topics: Vec<String>,
        /// The log position the client is now at for these topics; resume from it.
        seq: u64,
        /// `snapshot` or `replay`: how the client was brought up to `seq`.
        mode: String,
        /// Why a snapshot was sent although `since` was given (log trimmed, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Change(Change),
    Command {
        seq: u64,
        name: String,
        #[serde(default)]
        args: serde_json::Value,
    },
    AckRecorded {
        topic: String,
        version: u64,
    },
    Error {
        code: String,
        message: String,
    },
}

/// The full current state of one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub topic: String,
    pub version: u64,
    /// The log position of the topic's last change.
    pub seq: u64,
    pub commit: String,
    pub files: Vec<SnapshotFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub path: String,
    pub sha: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub encoding: Encoding,
}

/// One published version of one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub topic: String,
    pub version: u64,
    /// 0 when the topic is new.
    pub previous_version: u64,
    pub commit: String,
    pub author: String,
    pub message: String,
    pub files: Vec<FileChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    pub status: FileStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    /// The blob id of the new content, or of the removed content for `deleted`.
    pub sha: String,
    /// Absent for `deleted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub encoding: Encoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Added,
    Modified,
    Deleted,
    Renamed,
}

/// How `content` is carried: UTF-8 text as is, anything else base64 (standard alphabet, padded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

impl Encoding {
    pub fn is_utf8(&self) -> bool {
        *self == Encoding::Utf8
    }
}

/// Encodes file bytes for the wire: text stays text, binary becomes base64.
pub fn encode_content(bytes: &[u8]) -> (String, Encoding) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => (text.to_owned(), Encoding::Utf8),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            Encoding::Base64,
        ),
    }
}

/// Decodes wire content back to bytes.
pub fn decode_content(content: &str, encoding: Encoding) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    match encoding {
        Encoding::Utf8 => Ok(content.as_bytes().to_vec()),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(content),
    }
}

/// Whether `topic` matches a subscription pattern: exact, `*` for everything, or a `prefix/*`
/// family (`billing/*` matches `billing/eu` and `billing/eu/v2`, not `billing`).
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    if pattern == "*" || pattern == topic {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(prefix) => {
            topic.len() > prefix.len() + 1
                && topic.starts_with(prefix)
                && topic.as_bytes()[prefix.len()] == b'/'
        }
        None => false,
    }
}

/// Checks a subscription pattern: non-empty, `*` only as the whole pattern or as a final `/*`.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty topic pattern".into());
    }
    let body = pattern.strip_suffix("/*").unwrap_or(pattern);
    if pattern != "*" && body.contains('*') {
        return Err(format!(
            "topic pattern `{pattern}`: `*` is allowed only as the whole pattern or as a final `/*`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_and_reject_unknown_fields() {
        let hello: ClientMessage = serde_json::from_str(
            r#"{"type":"hello","instance":"web-1","app":"web","labels":{"zone":"a"}}"#,
        )
        .expect("hello parses");
        assert_eq!(
            hello,
            ClientMessage::Hello {
                instance: "web-1".into(),
                app: Some("web".into()),
                labels: [("zone".to_string(), "a".to_string())].into()
            }
        );
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"hello","instance":"a","bogus":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"ack","topic":"a","version":1,"status":"maybe"}"#
        )
        .is_err());
    }

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("payments", "payments"));
        assert!(!topic_matches("payments", "payments/eu"));
        assert!(topic_matches("billing/*", "billing/eu"));
        assert!(topic_matches("billing/*", "billing/eu/v2"));
        assert!(!topic_matches("billing/*", "billing"));
        assert!(!topic_matches("billing/*", "billingx/eu"));
        assert!(topic_matches("*", "anything"));
        assert!(validate_pattern("billing/*").is_ok());
        assert!(validate_pattern("bil*ing").is_err());
        assert!(validate_pattern("").is_err());
    }

    #[test]
    fn content_encoding_round_trips() {
        let (text, enc) = encode_content(b"port = 8080\n");
        assert_eq!((text.as_str(), enc), ("port = 8080\n", Encoding::Utf8));
        let binary = [0u8, 159, 146, 150, 255];
        let (b64, enc) = encode_content(&binary);
        assert_eq!(enc, Encoding::Base64);
        assert_eq!(decode_content(&b64, enc).expect("valid base64"), binary);
    }
}
