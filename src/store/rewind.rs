//! A topic's files as they were at an earlier version, rebuilt from its current files and the
//! event log, and the change that takes the current files there (what a rollback publishes).
//!
//! The log holds each version's change, not each version's state. Going back from the current
//! files to version N undoes the changes after N: every file they touched gets the content the
//! last change at or before N gave it (or none). That needs, per touched file, a change at or
//! before N in the log, or the log to reach back to the topic's first version. When retention
//! removed what is needed, the version cannot be rebuilt exactly and nothing is guessed.

use std::collections::{BTreeMap, BTreeSet};

use super::{ChangedFile, HistoryEntry, Store, StoreError};
use crate::protocol::{decode_content, FileStatus};

/// One file of a topic's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAt {
    pub sha: String,
    pub content: Vec<u8>,
}

/// A topic's files, by path.
pub type Files = BTreeMap<String, FileAt>;

/// Version `version` of a topic next to its current state.
#[derive(Debug, Clone)]
pub struct Rewound {
    pub current_version: u64,
    pub current: Files,
    /// The commit version `version` was published from.
    pub commit: String,
    pub target: Files,
}

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error("no topic `{0}`")]
    UnknownTopic(String),
    #[error("topic `{topic}` has no version {version} (versions run from 1 to {current})")]
    NoSuchVersion {
        topic: String,
        version: u64,
        current: u64,
    },
    #[error(
        "version {version} of topic `{topic}` can no longer be rebuilt exactly: {why} (retention, CONFIGURATION.md section 4)"
    )]
    Trimmed {
        topic: String,
        version: u64,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Rebuilds `topic` at `version` from its current files and the log.
pub async fn files_at(
    store: &dyn Store,
    topic: &str,
    version: u64,
) -> Result<Rewound, RewindError> {
    let summary = store
        .topics()
        .await?
        .into_iter()
        .find(|t| t.topic == topic)
        .ok_or_else(|| RewindError::UnknownTopic(topic.to_string()))?;
    let current_version = summary.version;
    if version == 0 || version > current_version {
        return Err(RewindError::NoSuchVersion {
            topic: topic.to_string(),
            version,
            current: current_version,
        });
    }
    let trimmed = |why: String| RewindError::Trimmed {
        topic: topic.to_string(),
        version,
        why,
    };
    let (_, mut snapshots) = store.snapshots(&|t| t == topic).await?;
    let mut current = Files::new();
    for f in snapshots.pop().map(|s| s.files).unwrap_or_default() {
        let content = decode_content(&f.content, f.encoding)
            .map_err(|e| StoreError::Corrupt(format!("stored file {}: {e}", f.path)))?;
        current.insert(
            f.path,
            FileAt {
                sha: f.sha,
                content,
            },
        );
    }
    let mut history = store.topic_history(topic, u32::MAX).await?;
    history.reverse();
    let plan = plan(&history, current_version, version).map_err(trimmed)?;
    let mut target = current.clone();
    for path in &plan.touched {
        target.remove(path);
    }
    for (v, paths) in &plan.from {
        let change = store
            .change_at(topic, *v)
            .await?
            .ok_or_else(|| trimmed(format!("version {v} left the log meanwhile")))?;
        for path in paths {
            // The same order as `Store::publish` applies a change's files.
            let mut state = None;
            for f in &change.files {
                if f.old_path.as_deref() == Some(path.as_str()) {
                    state = None;
                }
                if f.path == *path {
                    state = match (&f.status, &f.content) {
                        (FileStatus::Deleted, _) | (_, None) => None,
                        (_, Some(content)) => Some(FileAt {
                            sha: f.sha.clone(),
                            content: decode_content(content, f.encoding).map_err(|e| {
                                StoreError::Corrupt(format!("logged file {path}: {e}"))
                            })?,
                        }),
                    };
                }
            }
            if let Some(file) = state {
                target.insert(path.clone(), file);
            }
        }
    }
    Ok(Rewound {
        current_version,
        current,
        commit: plan.commit,
        target,
    })
}

/// What rebuilding a version needs from the log.
#[derive(Debug, PartialEq)]
struct Plan {
    commit: String,
    /// Files changed after the version: their content comes from the log, or they are absent.
    touched: BTreeSet<String>,
    /// Per version, the touched files whose content at the target that version's change set.
    from: BTreeMap<u64, Vec<String>>,
}

/// Plans the rebuild of `version` from `history` (oldest first); `Err` says why it cannot be
/// done exactly.
fn plan(history: &[HistoryEntry], current: u64, version: u64) -> Result<Plan, String> {
    let (Some(oldest), Some(newest)) = (history.first(), history.last()) else {
        return Err("the log keeps none of its versions".into());
    };
    if newest.version != current {
        return Err(format!(
            "the log's newest version is {}, not the current {current}",
            newest.version
        ));
    }
    if history.windows(2).any(|w| w[1].version != w[0].version + 1) {
        return Err("the log has a gap in this topic's versions".into());
    }
    if version < oldest.version {
        return Err(format!(
            "the log keeps versions {} to {current} only",
            oldest.version
        ));
    }
    let touches = |e: &HistoryEntry, path: &str| {
        e.files
            .iter()
            .any(|f| f.path == path || f.old_path.as_deref() == Some(path))
    };
    let (before, after): (Vec<&HistoryEntry>, Vec<&HistoryEntry>) =
        history.iter().partition(|e| e.version <= version);
    let commit = before.last().map(|e| e.commit.clone()).unwrap_or_default();
    let touched: BTreeSet<String> = after
        .iter()
        .flat_map(|e| {
            e.files
                .iter()
                .flat_map(|f| std::iter::once(f.path.clone()).chain(f.old_path.clone()))
        })
        .collect();
    let mut from: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for path in &touched {
        match before.iter().rev().find(|e| touches(e, path)) {
            Some(e) => from.entry(e.version).or_default().push(path.clone()),
            // Never touched since the topic began: it did not exist at the version.
            None if oldest.version == 1 => {}
            None => {
                return Err(format!(
                    "file `{path}` was last changed before version {}, the oldest the log keeps",
                    oldest.version
                ))
            }
        }
    }
    Ok(Plan {
        commit,
        touched,
        from,
    })
}

/// The change that turns `current` into `target`: files added, modified (another blob or other
/// bytes) and deleted, by path.
pub fn change_to(current: &Files, target: &Files) -> Vec<ChangedFile> {
    let mut files = Vec::new();
    for (path, want) in target {
        let status = match current.get(path) {
            None => FileStatus::Added,
            Some(have) if have != want => FileStatus::Modified,
            Some(_) => continue,
        };
        files.push(ChangedFile {
            path: path.clone(),
            status,
            old_path: None,
            sha: want.sha.clone(),
            content: Some(want.content.clone()),
        });
    }
    for (path, have) in current {
        if !target.contains_key(path) {
            files.push(ChangedFile {
                path: path.clone(),
                status: FileStatus::Deleted,
                old_path: None,
                sha: have.sha.clone(),
                content: None,
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HistoryFile;

    fn entry(version: u64, files: &[(&str, Option<&str>)]) -> HistoryEntry {
        HistoryEntry {
            seq: version * 10,
            version,
            commit: format!("c{version}"),
            author: String::new(),
            message: String::new(),
            created_at_ms: 0,
            files: files
                .iter()
                .map(|(path, old)| HistoryFile {
                    path: path.to_string(),
                    status: if old.is_some() {
                        FileStatus::Renamed
                    } else {
                        FileStatus::Modified
                    },
                    old_path: old.map(str::to_string),
                    sha: String::new(),
                })
                .collect(),
            rollback: None,
        }
    }

    #[test]
    fn each_file_changed_later_comes_from_its_last_change_at_or_before_the_version() {
        let log = [
            entry(1, &[("a", None), ("b", None)]),
            entry(2, &[("a", None)]),
            entry(3, &[("c", Some("b"))]),
            entry(4, &[("a", None)]),
        ];
        let two = plan(&log, 4, 2).expect("plannable");
        assert_eq!(two.commit, "c2");
        let touched: Vec<&str> = two.touched.iter().map(String::as_str).collect();
        assert_eq!(touched, ["a", "b", "c"]);
        // `a` from v2, `b` from v1; `c` never existed by v2.
        assert_eq!(
            two.from,
            BTreeMap::from([(1, vec!["b".to_string()]), (2, vec!["a".to_string()])])
        );
        // The current version needs nothing from the log.
        assert!(plan(&log, 4, 4).expect("plannable").touched.is_empty());
    }

    #[test]
    fn a_trimmed_log_refuses_what_it_cannot_rebuild() {
        let log = [
            entry(3, &[("a", None)]),
            entry(4, &[("b", None)]),
            entry(5, &[("a", None)]),
        ];
        // v4: `a` comes from v3, in the log.
        assert!(plan(&log, 5, 4).is_ok());
        assert!(plan(&log, 5, 2).unwrap_err().contains("versions 3 to 5"));
        // v3: `b` changed at v4 and its content before is not in the log.
        let why = plan(&log, 5, 3).unwrap_err();
        assert!(why.contains("file `b`"), "{why}");
        assert!(plan(&log[..2], 5, 3).unwrap_err().contains("newest"));
        assert!(plan(&[log[0].clone(), log[2].clone()], 5, 3)
            .unwrap_err()
            .contains("gap"));
    }

    #[test]
    fn the_change_adds_modifies_and_deletes() {
        let file = |sha: &str, c: &str| FileAt {
            sha: sha.into(),
            content: c.as_bytes().to_vec(),
        };
        let current = Files::from([
            ("keep".to_string(), file("1", "x")),
            ("edit".to_string(), file("2", "new")),
            ("gone".to_string(), file("3", "y")),
        ]);
        let target = Files::from([
            ("keep".to_string(), file("1", "x")),
            ("edit".to_string(), file("4", "old")),
            ("back".to_string(), file("5", "z")),
        ]);
        let change: Vec<(String, FileStatus)> = change_to(&current, &target)
            .into_iter()
            .map(|f| (f.path, f.status))
            .collect();
        assert_eq!(
            change,
            [
                ("back".to_string(), FileStatus::Added),
                ("edit".to_string(), FileStatus::Modified),
                ("gone".to_string(), FileStatus::Deleted),
            ]
        );
        assert!(change_to(&current, &current).is_empty());
    }
}
