//! The wire protocol between confcast and the instances, shared by the server and the client.
//!
//! Every frame is one JSON object in a WebSocket text message, tagged by `"type"`. `docs/PROTOCOL.md`
//! is the prose version of this file; keep the two in step. Nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol revision announced in `welcome`; bumped on an incompatible change.
pub const PROTOCOL_VERSION: u32 = 4;

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
    /// The log started a new epoch (it lost its head: restored from an older backup); reconnect,
    /// and start over from the new epoch named in `welcome`.
    pub const EPOCH_CHANGED: u16 = 4012;
    /// The credential the connection was opened with expired (a JWT's `exp`): reconnect with a
    /// fresh one.
    pub const CREDENTIAL_EXPIRED: u16 = 4013;
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
        /// Ask for a `heartbeat` message every `heartbeat_secs`, for clients whose WebSocket API
        /// does not show pings.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        heartbeat: bool,
    },
    Subscribe {
        topics: Vec<String>,
        #[serde(default)]
        since: Option<u64>,
        /// The log epoch `since` was read in (from `subscribed`); another epoch's position is
        /// answered with snapshots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    Ack {
        topic: String,
        version: u64,
        status: AckStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// What the instance did with a `command` delivered to it (revision 3).
    CommandAck {
        id: String,
        status: CommandStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

/// An instance's verdict on a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Done,
    Failed,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Done => "done",
            CommandStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "done" => Some(CommandStatus::Done),
            "failed" => Some(CommandStatus::Failed),
            _ => None,
        }
    }
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
        /// The log epoch in force when the connection was accepted.
        #[serde(default)]
        epoch: String,
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
        /// The log epoch `seq` belongs to: keep it with the position and send both back.
        #[serde(default)]
        epoch: String,
    },
    /// Sent every `heartbeat_secs` to a client that asked for it in `hello`.
    Heartbeat,
    Change(Change),
    /// Something to do now, for the instance to ack with `command_ack` (revision 3). Not a log
    /// entry: it has no position, and the same `id` may come again after a reconnect.
    Command {
        id: String,
        name: String,
        #[serde(default)]
        args: serde_json::Value,
        /// When the command stops being delivered (ms since the Unix epoch).
        #[serde(default)]
        deadline_ms: Option<i64>,
        /// Always 0, never a position: only there because revision-2 clients require the field.
        #[serde(default)]
        seq: u64,
    },
    AckRecorded {
        topic: String,
        version: u64,
    },
    /// The receipt for a `command_ack`: `status` is the verdict that stands (the first one).
    CommandRecorded {
        id: String,
        status: CommandStatus,
        /// The command was already acked: this ack changed nothing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
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

/// Encodes file bytes for the wire: text stays text, binary becomes base64. So does text that
/// would grow more in JSON than in base64 (a control character escapes to six bytes): the largest
/// frame is then bounded by the base64 size of the files (`LimitsConfig::max_frame_bytes`).
pub fn encode_content(bytes: &[u8]) -> (String, Encoding) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') && json_escaped_len(text) <= base64_len(bytes.len()) => {
            (text.to_owned(), Encoding::Utf8)
        }
        _ => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            Encoding::Base64,
        ),
    }
}

/// Padded base64 length of `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// The length of `text` inside a JSON string as serde_json writes it: `"` and `\` and the short
/// escapes take two bytes, other C0 controls six (`\u001f`), everything else (DEL, non-ASCII) as is.
fn json_escaped_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// Decodes wire content back to bytes.
pub fn decode_content(content: &str, encoding: Encoding) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    match encoding {
        Encoding::Utf8 => Ok(content.as_bytes().to_vec()),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(content),
    }
}

/// Why a file path may not cross the wire or be written. Paths name files an agent creates and
/// that people read in logs and dashboards: anything but plain relative names could escape the
/// target directory, plant git metadata (a `.git/config` whose `core.fsmonitor` runs on the next
/// `git status`), or show something other than what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("is empty")]
    Empty,
    #[error("is not valid UTF-8")]
    NotUtf8,
    #[error("is absolute")]
    Absolute,
    #[error("has an empty, `.` or `..` component")]
    NotPlain,
    #[error("has a `.git` component (git metadata)")]
    GitDir,
    #[error("contains a backslash")]
    Backslash,
    #[error("contains a control character")]
    Control,
    #[error("contains a bidirectional override or isolate character")]
    Bidi,
}

/// Unicode bidirectional embeddings, overrides (U+202A..U+202E) and isolates (U+2066..U+2069):
/// they make a name display in another order than its bytes.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Checks a repo path given as the raw bytes git stores; returns it as text when it is a plain
/// relative `/`-separated path. The server never publishes a file at a refused path, and clients
/// must refuse to write one whatever the server sends.
pub fn check_path(raw: &[u8]) -> Result<&str, PathRefusal> {
    if raw.is_empty() {
        return Err(PathRefusal::Empty);
    }
    let path = std::str::from_utf8(raw).map_err(|_| PathRefusal::NotUtf8)?;
    if path.starts_with('/') {
        return Err(PathRefusal::Absolute);
    }
    for c in path.chars() {
        if c == '\\' {
            return Err(PathRefusal::Backslash);
        }
        // `char::is_control` is exactly C0, DEL and C1.
        if c.is_control() {
            return Err(PathRefusal::Control);
        }
        if is_bidi_control(c) {
            return Err(PathRefusal::Bidi);
        }
    }
    for name in path.split('/') {
        if name.is_empty() || name == "." || name == ".." {
            return Err(PathRefusal::NotPlain);
        }
        // Case-insensitive: `.GIT` is the same directory on macOS and Windows file systems.
        if name.eq_ignore_ascii_case(".git") {
            return Err(PathRefusal::GitDir);
        }
    }
    Ok(path)
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

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
                labels: [("zone".to_string(), "a".to_string())].into(),
                heartbeat: false,
            }
        );
        let resume: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","topics":["a"],"since":7,"epoch":"e1"}"#)
                .expect("subscribe parses");
        assert_eq!(
            resume,
            ClientMessage::Subscribe {
                topics: vec!["a".into()],
                since: Some(7),
                epoch: Some("e1".into()),
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
    fn command_messages_round_trip_and_stay_readable_by_revision_2_clients() {
        let ack: ClientMessage = serde_json::from_str(
            r#"{"type":"command_ack","id":"c1","status":"failed","message":"exit 3"}"#,
        )
        .expect("command_ack parses");
        assert_eq!(
            ack,
            ClientMessage::CommandAck {
                id: "c1".into(),
                status: CommandStatus::Failed,
                message: Some("exit 3".into()),
            }
        );
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"command_ack","id":"c1","status":"applied"}"#
        )
        .is_err());
        let command = ServerMessage::Command {
            id: "c1".into(),
            name: "refresh-cache".into(),
            args: serde_json::json!({"scope": "all"}),
            deadline_ms: Some(1_700_000_000_000),
            seq: 0,
        };
        let text = serde_json::to_string(&command).expect("encode");
        // A revision-2 client requires `seq` and ignores unknown fields: it still parses.
        let old: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(old["seq"], 0);
        assert_eq!(old["type"], "command");
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&text).expect("decode"),
            command
        );
    }

    #[test]
    fn truncate_utf8_cuts_at_a_character_boundary() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
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

    #[test]
    fn text_that_escapes_larger_than_base64_goes_as_base64() {
        // 100 control characters: 600 bytes as JSON text, 136 as base64.
        let controls = vec![0x01u8; 100];
        let (b64, enc) = encode_content(&controls);
        assert_eq!((enc, b64.len()), (Encoding::Base64, 136));
        assert_eq!(decode_content(&b64, enc).expect("valid base64"), controls);
        // Ordinary config text, quotes, tabs and newlines included, stays text.
        let toml = b"[server]\n\tname = \"payments\"\n\tport = 8443\n";
        assert_eq!(encode_content(toml).1, Encoding::Utf8);
        for text in ["a\u{1}b\u{2}c", "\"\"\"\"\"\"", "x\u{1b}[31m\u{1b}[0m"] {
            let (content, enc) = encode_content(text.as_bytes());
            let json = serde_json::to_string(&content).expect("serializes");
            assert!(
                json.len() - 2 <= base64_len(text.len()),
                "{text:?} became {enc:?} of {} bytes",
                json.len() - 2
            );
        }
    }

    #[test]
    fn only_plain_relative_paths_pass() {
        for (path, why) in [
            (&b""[..], PathRefusal::Empty),
            (b"/etc/passwd", PathRefusal::Absolute),
            (b"payments/../x", PathRefusal::NotPlain),
            (b"../x", PathRefusal::NotPlain),
            (b"payments/./x", PathRefusal::NotPlain),
            (b"payments//x", PathRefusal::NotPlain),
            (b"payments/", PathRefusal::NotPlain),
            (b"payments/a\\b", PathRefusal::Backslash),
            (b"payments/.git/config", PathRefusal::GitDir),
            (b"payments/.GIT/hooks/x", PathRefusal::GitDir),
            (b".Git", PathRefusal::GitDir),
            (b"payments/a\nb", PathRefusal::Control),
            (b"payments/a\x7fb", PathRefusal::Control),
            ("payments/a\u{85}b".as_bytes(), PathRefusal::Control),
            ("payments/cod\u{202e}lmx.toml".as_bytes(), PathRefusal::Bidi),
            ("payments/\u{2066}x".as_bytes(), PathRefusal::Bidi),
            (b"payments/\xff\xfe.toml", PathRefusal::NotUtf8),
        ] {
            assert_eq!(
                check_path(path),
                Err(why),
                "{:?}",
                path.escape_ascii().to_string()
            );
        }
        for ok in [
            "payments/app.toml",
            "payments/.gitignore",
            "payments/.git-config/x",
            "payments/git",
            "payments/..x",
            "payments/x..",
            "zahlungen/grüße.toml",
            "a b/c\"d.json",
        ] {
            assert_eq!(check_path(ok.as_bytes()), Ok(ok));
        }
    }
}
