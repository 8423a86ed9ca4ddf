//! The operator dashboard: its page, script and style (embedded in the binary, served without a
//! credential because they hold no data), and the API endpoints written for it: instances by
//! page with filters, and one logged version of a topic with the diff of each file.
//!
//! Everything the page shows comes from the API with the caller's `read` token; the page never
//! puts data into HTML (the script builds text nodes), and its Content-Security-Policy allows no
//! inline script, so a commit message or a label cannot run as code in an operator's browser.

use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use similar::TextDiff;

use super::{views, InstanceView};
use crate::app::{App, AppError, AppState};
use crate::protocol::{decode_content, topic_matches, truncate_utf8, FileStatus};
use crate::store::{FileBefore, InstanceFilter};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Scripts and styles from this origin only (no inline code, no other host), data from this
/// origin only, and no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The most instances one page holds, and the page size when `limit` is not given.
pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;
/// The longest value a filter of `GET /api/v1/instances` accepts.
pub const MAX_FILTER_BYTES: usize = 256;
/// The longest diff text of one file; longer is cut (`truncated: true`).
pub const MAX_FILE_DIFF_BYTES: usize = 256 * 1024;
/// Diff text in one answer, over all its files; files past it get no diff.
pub const MAX_DIFF_BYTES: usize = 1024 * 1024;
/// Time one answer may spend diffing; past it diffs are coarser, then left out.
pub const DIFF_TIME: Duration = Duration::from_secs(2);

fn shell(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard page.
pub async fn index() -> Response {
    shell("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /assets/{file}`: its script and style.
pub async fn asset(Path(file): Path<String>) -> Result<Response, AppError> {
    match file.as_str() {
        "app.js" => Ok(shell("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(shell("text/css; charset=utf-8", APP_CSS)),
        _ => Err(AppError::NotFound(
            "no such endpoint; see docs/API.md".into(),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    limit: Option<u32>,
    after: Option<String>,
    app: Option<String>,
    /// `key=value`
    label: Option<String>,
    q: Option<String>,
    connected: Option<bool>,
    topic: Option<String>,
    status: Option<String>,
}

impl InstancesQuery {
    fn is_empty(&self) -> bool {
        self.limit.is_none()
            && self.after.is_none()
            && self.app.is_none()
            && self.label.is_none()
            && self.q.is_none()
            && self.connected.is_none()
            && self.topic.is_none()
            && self.status.is_none()
    }
}

#[derive(Serialize)]
struct InstancePage {
    instances: Vec<InstanceView>,
    /// How many instances the filters accept, on every page.
    total: u64,
    /// The `after` of the next page; `None` on the last one.
    next: Option<String>,
}

/// `GET /api/v1/instances`: every instance (no parameter), or one page of those the filters
/// accept.
pub async fn instances(
    State(app): State<AppState>,
    Query(q): Query<InstancesQuery>,
) -> Result<Json<serde_json::Value>, AppError> {
    if q.is_empty() {
        let all = super::instance_views(&app).await?;
        let total = u64::try_from(all.len()).unwrap_or(u64::MAX);
        return Ok(Json(
            json!({"instances": all, "total": total, "next": null}),
        ));
    }
    let page = instance_page(&app, q).await?;
    Ok(Json(serde_json::to_value(page).unwrap_or_default()))
}

fn filter_value(name: &str, value: Option<String>) -> Result<Option<String>, AppError> {
    match value {
        Some(v) if v.len() > MAX_FILTER_BYTES => Err(AppError::BadRequest(format!(
            "`{name}` is {} bytes, longer than the limit of {MAX_FILTER_BYTES}",
            v.len()
        ))),
        Some(v) if v.is_empty() => Ok(None),
        v => Ok(v),
    }
}

async fn instance_page(app: &App, q: InstancesQuery) -> Result<InstancePage, AppError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let label = match filter_value("label", q.label)? {
        None => None,
        Some(label) => {
            let (k, v) = label.split_once('=').ok_or_else(|| {
                AppError::BadRequest(format!("`label` must be key=value, not `{label}`"))
            })?;
            Some((k.to_string(), v.to_string()))
        }
    };
    let filter = InstanceFilter {
        app: filter_value("app", q.app)?,
        label,
        text: filter_value("q", q.q)?,
        connected: q.connected,
    };
    let after = filter_value("after", q.after)?;
    let topic = filter_value("topic", q.topic)?;
    let status = filter_value("status", q.status)?;
    if let Some(s) = &status {
        if !["applied", "behind", "failed", "pending"].contains(&s.as_str()) {
            return Err(AppError::BadRequest(format!(
                "`status` must be applied, behind, failed or pending, not `{s}`"
            )));
        }
        if topic.is_none() {
            return Err(AppError::BadRequest(
                "`status` is a status for one topic: give `topic` too".into(),
            ));
        }
    }
    let topics = app.store.topics().await?;
    let Some(topic) = topic else {
        // Everything in SQL: one page and a count, not every instance.
        let (mut records, total) = app
            .store
            .instances_page(&filter, after.as_deref(), limit + 1)
            .await?;
        let more = records.len() > limit as usize;
        records.truncate(limit as usize);
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let acks = app.store.acks_for(&ids).await?;
        let next = more.then(|| ids.last().cloned()).flatten();
        return Ok(InstancePage {
            instances: views(records, &topics, acks),
            total,
            next,
        });
    };
    // Subscriptions are patterns, matched here and not in SQL: the instances the other filters
    // accept are read (without their acks), then those of the topic get theirs.
    let (records, _) = app.store.instances_page(&filter, None, u32::MAX).await?;
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r.subscriptions.iter().any(|p| topic_matches(p, &topic)))
        .collect();
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let acks = app.store.acks_for(&ids).await?;
    let matching: Vec<InstanceView> = views(records, &topics, acks)
        .into_iter()
        .filter(|v| match &status {
            None => true,
            Some(s) => v
                .topics
                .iter()
                .any(|t| t.topic == topic && t.status == s.as_str()),
        })
        .collect();
    let total = u64::try_from(matching.len()).unwrap_or(u64::MAX);
    let mut page: Vec<InstanceView> = matching
        .into_iter()
        .filter(|v| after.as_deref().is_none_or(|a| v.record.id.as_str() > a))
        .take(limit as usize + 1)
        .collect();
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let next = more
        .then(|| page.last().map(|v| v.record.id.clone()))
        .flatten();
    Ok(InstancePage {
        instances: page,
        total,
        next,
    })
}

#[derive(Serialize)]
struct VersionFile {
    path: String,
    status: FileStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_path: Option<String>,
    sha: String,
    /// Size at this version (0 when deleted).
    bytes: usize,
    binary: bool,
    /// Unified diff from the previous version; `None` when binary, unknown or over a cap
    /// (`note` says which).
    diff: Option<String>,
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'static str>,
}

/// `GET /api/v1/topics/{topic}/versions/{version}`: a logged version with each file's diff.
pub async fn version(app: &App, topic: &str, version: u64) -> Result<serde_json::Value, AppError> {
    let logged = app
        .store
        .topic_change(topic, version)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
            "topic `{topic}` has no version {version} in the log (never, or removed by retention)"
        ))
        })?;
    let mut inputs = Vec::with_capacity(logged.change.files.len());
    for f in &logged.change.files {
        let new =
            match (&f.status, &f.content) {
                (FileStatus::Deleted, _) | (_, None) => None,
                (_, Some(content)) => Some(decode_content(content, f.encoding).map_err(|e| {
                    AppError::Store(crate::store::StoreError::Corrupt(e.to_string()))
                })?),
            };
        let old_path = f.old_path.as_deref().unwrap_or(&f.path);
        let old = app.store.file_before(topic, old_path, version).await?;
        inputs.push((f.clone(), old, new));
    }
    // Diffing is CPU work of up to a topic's size: off the async threads, under a time budget.
    let files = tokio::task::spawn_blocking(move || diff_files(inputs))
        .await
        .map_err(|e| AppError::Unavailable(format!("diff failed: {e}")))?;
    let c = &logged.change;
    Ok(json!({
        "topic": c.topic,
        "version": c.version,
        "previous_version": c.previous_version,
        "seq": c.seq,
        "commit": c.commit,
        "author": c.author,
        "message": c.message,
        "created_at_ms": logged.created_at_ms,
        "files": files,
    }))
}

type DiffInput = (crate::protocol::FileChange, FileBefore, Option<Vec<u8>>);

fn diff_files(inputs: Vec<DiffInput>) -> Vec<VersionFile> {
    let started = Instant::now();
    let mut budget = MAX_DIFF_BYTES;
    inputs
        .into_iter()
        .map(|(f, old, new)| {
            let mut file = VersionFile {
                path: f.path.clone(),
                status: f.status,
                old_path: f.old_path.clone(),
                sha: f.sha.clone(),
                bytes: new.as_ref().map_or(0, Vec::len),
                binary: false,
                diff: None,
                truncated: false,
                note: None,
            };
            let old = match old {
                FileBefore::Content(bytes) => bytes,
                FileBefore::Absent => Vec::new(),
                FileBefore::Unknown => {
                    file.note = Some("the previous content is no longer in the log");
                    return file;
                }
            };
            let new = new.unwrap_or_default();
            let (Some(old_text), Some(new_text)) = (text(&old), text(&new)) else {
                file.binary = true;
                file.note = Some("binary");
                return file;
            };
            let left = DIFF_TIME.saturating_sub(started.elapsed());
            if budget == 0 || left.is_zero() {
                file.note = Some("diff left out: this answer's diff budget is spent");
                return file;
            }
            let diff = TextDiff::configure()
                .timeout(left)
                .diff_lines(old_text, new_text);
            let from = format!("a/{}", f.old_path.as_deref().unwrap_or(&f.path));
            let to = format!("b/{}", f.path);
            let text = diff
                .unified_diff()
                .context_radius(3)
                .header(&from, &to)
                .to_string();
            let cap = budget.min(MAX_FILE_DIFF_BYTES);
            let kept = truncate_utf8(&text, cap).to_string();
            file.truncated = kept.len() < text.len();
            budget -= kept.len();
            file.diff = Some(kept);
            file
        })
        .collect()
}

/// `bytes` as text, or `None` for binary content (not UTF-8, or with a NUL byte).
fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|t| !t.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Encoding, FileChange};

    fn change(path: &str, status: FileStatus) -> FileChange {
        FileChange {
            path: path.into(),
            status,
            old_path: None,
            sha: "s".into(),
            content: None,
            encoding: Encoding::default(),
        }
    }

    #[test]
    fn diffs_are_unified_binary_is_named_and_unknown_says_so() {
        let files = diff_files(vec![
            (
                change("a.toml", FileStatus::Modified),
                FileBefore::Content(b"port = 1\nname = \"x\"\n".to_vec()),
                Some(b"port = 2\nname = \"x\"\n".to_vec()),
            ),
            (
                change("logo.png", FileStatus::Added),
                FileBefore::Absent,
                Some(vec![0x89, b'P', 0, 1]),
            ),
            (
                change("old.toml", FileStatus::Modified),
                FileBefore::Unknown,
                Some(b"x = 1\n".to_vec()),
            ),
        ]);
        let diff = files[0].diff.as_deref().unwrap_or_default();
        assert!(diff.contains("--- a/a.toml\n+++ b/a.toml\n"), "{diff}");
        assert!(diff.contains("-port = 1\n+port = 2\n"), "{diff}");
        assert!(files[1].binary && files[1].diff.is_none());
        assert!(files[2].diff.is_none() && files[2].note.is_some());
    }

    #[test]
    fn a_huge_diff_is_cut_at_the_cap() {
        let new: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
        let files = diff_files(vec![(
            change("big.txt", FileStatus::Added),
            FileBefore::Absent,
            Some(new.into_bytes()),
        )]);
        let diff = files[0].diff.as_deref().unwrap_or_default();
        assert!(files[0].truncated);
        assert!(diff.len() <= MAX_FILE_DIFF_BYTES);
    }
}
