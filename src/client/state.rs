//! What an instance knows: per topic the latest files it received, the last version it handled
//! and its last good (applied) files, plus the log position to resume from. Optionally persisted
//! in a state directory so a restarted instance resumes without a snapshot and can start on its
//! last good config while the server is unreachable.
//!
//! The resume position only moves past a change once the application acknowledged it, so a crash
//! between receiving and applying replays that change instead of losing it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{decode_content, encode_content, Change, Encoding, FileStatus, Snapshot};

/// A topic's files: repo path -> content.
pub type Files = BTreeMap<String, Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredFile {
    content: String,
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    encoding: Encoding,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredTopic {
    /// Version of `latest`.
    version: u64,
    latest: BTreeMap<String, StoredFile>,
    /// Last version acknowledged (applied or failed), how, and why it failed.
    handled: u64,
    #[serde(default)]
    handled_applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handled_error: Option<String>,
    /// Last version acknowledged as applied, and its files.
    good_version: u64,
    good: BTreeMap<String, StoredFile>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// The log epoch `cursor` and the topics' versions belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
    cursor: Option<u64>,
    topics: BTreeMap<String, StoredTopic>,
}

/// Result of taking in one server frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// New: hand it to the application; it carries the topic's full files at that version.
    Deliver(Files),
    /// Already handled (a replay after reconnect): skip silently.
    Duplicate,
    /// The change does not follow the version we hold: resubscribe for a snapshot.
    Gap { have: u64, previous: u64 },
}

#[derive(Debug, Default)]
pub struct LocalState {
    stored: Stored,
    /// Log positions delivered to the application and not acknowledged yet, by (topic, version).
    pending: BTreeMap<(String, u64), u64>,
    /// Highest log position covered by what was received.
    received: Option<u64>,
    dir: Option<PathBuf>,
}

const FILE: &str = "state.json";

fn to_stored(files: &Files) -> BTreeMap<String, StoredFile> {
    files
        .iter()
        .map(|(p, c)| {
            let (content, encoding) = encode_content(c);
            (p.clone(), StoredFile { content, encoding })
        })
        .collect()
}

fn from_stored(files: &BTreeMap<String, StoredFile>) -> Result<Files, String> {
    files
        .iter()
        .map(|(p, f)| {
            Ok((
                p.clone(),
                decode_content(&f.content, f.encoding).map_err(|e| format!("{p}: {e}"))?,
            ))
        })
        .collect()
}

impl LocalState {
    /// An in-memory state, or the one persisted in `dir` (created when missing).
    pub fn open(dir: Option<&Path>) -> Result<LocalState, StateError> {
        let Some(dir) = dir else {
            return Ok(LocalState::default());
        };
        let io = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(io(e)),
        };
        Ok(LocalState {
            received: stored.cursor,
            stored,
            pending: BTreeMap::new(),
            dir: Some(dir.to_path_buf()),
        })
    }

    /// The log epoch the resume position and versions belong to, if known.
    pub fn epoch(&self) -> Option<&str> {
        self.stored.epoch.as_deref()
    }

    /// Takes the server's log epoch (from `welcome`). When the state belongs to another epoch, the
    /// log it was read from is gone (wiped, restored, reset): the position, the versions and the
    /// unsent verdicts are dropped so that the snapshots that follow are all delivered, and `true`
    /// is returned. The last good files stay, for a restart while the server is away.
    pub fn adopt_epoch(&mut self, epoch: &str) -> Result<bool, StateError> {
        if epoch.is_empty() || self.stored.epoch.as_deref() == Some(epoch) {
            return Ok(false);
        }
        let changed = self.stored.epoch.is_some();
        if changed {
            tracing::warn!(old = ?self.stored.epoch, new = %epoch, "the server's log started a new epoch; starting over from its snapshots");
            self.stored.cursor = None;
            self.received = None;
            self.pending.clear();
            for topic in self.stored.topics.values_mut() {
                topic.version = 0;
                topic.latest.clear();
                topic.handled = 0;
                topic.handled_applied = false;
                topic.handled_error = None;
            }
        }
        self.stored.epoch = Some(epoch.to_string());
        self.persist()?;
        Ok(changed)
    }

    /// Where to resume: everything up to here was acknowledged.
    pub fn cursor(&self) -> Option<u64> {
        match self.pending.values().min() {
            Some(lowest) => Some(lowest.saturating_sub(1)),
            None => self.received,
        }
    }

    /// The latest verdict per topic: (topic, version, applied, error), to repeat to a server.
    pub fn latest_acks(&self) -> Vec<(String, u64, bool, Option<String>)> {
        self.stored
            .topics
            .iter()
            .filter(|(_, t)| t.handled > 0)
            .map(|(name, t)| {
                (
                    name.clone(),
                    t.handled,
                    t.handled_applied,
                    t.handled_error.clone(),
                )
            })
            .collect()
    }

    /// Last good (applied) files per topic, with their version.
    pub fn last_good(&self) -> BTreeMap<String, (u64, Files)> {
        self.stored
            .topics
            .iter()
            .filter(|(_, t)| t.good_version > 0)
            .filter_map(|(name, t)| {
                from_stored(&t.good)
                    .ok()
                    .map(|f| (name.clone(), (t.good_version, f)))
            })
            .collect()
    }

    /// The version of `topic` last applied.
    pub fn applied_version(&self, topic: &str) -> Option<u64> {
        self.stored
            .topics
            .get(topic)
            .map(|t| t.good_version)
            .filter(|v| *v > 0)
    }

    /// Marks the log as covered up to `seq` and persists
    /// the resume position.
    pub fn covered(&mut self, seq: u64) -> Result<(), StateError> {
        self.covered_change(seq);
        self.stored.cursor = self.cursor();
        self.persist()
    }

    /// A `subscribed` marker: the log is covered exactly up to `seq` once the frames before it
    /// are applied. Set, not raised: after a server restore the position can go down.
    pub fn subscribed(&mut self, seq: u64) -> Result<(), StateError> {
        self.received = Some(seq);
        self.stored.cursor = self.cursor();
        self.persist()
    }

    pub fn take_snapshot(&mut self, s: &Snapshot) -> Taken {
        let topic = self.stored.topics.entry(s.topic.clone()).or_default();
        if s.version <= topic.handled && s.version == topic.version {
            return Taken::Duplicate;
        }
        if s.version < topic.version {
            // Versions went backwards: the server's data was reset. Start this topic over.
            tracing::warn!(topic = %s.topic, have = topic.version, got = s.version, "server versions went back; resetting the topic");
            topic.handled = 0;
        }
        let mut files = Files::new();
        for f in &s.files {
            match decode_content(&f.content, f.encoding) {
                Ok(bytes) => {
                    files.insert(f.path.clone(), bytes);
                }
                Err(e) => {
                    tracing::warn!(path = %f.path, error = %e, "undecodable content in snapshot")
                }
            }
        }
        topic.version = s.version;
        topic.latest = to_stored(&files);
        self.pending.insert((s.topic.clone(), s.version), s.seq);
        Taken::Deliver(files)
    }

    pub fn take_change(&mut self, c: &Change) -> Taken {
        self.covered_change(c.seq);
        let key = (c.topic.clone(), c.version);
        let in_flight = self.pending.contains_key(&key);
        let topic = self.stored.topics.entry(c.topic.clone()).or_default();
        if c.version <= topic.handled
            || c.version < topic.version
            || (c.version == topic.version && in_flight)
        {
            return Taken::Duplicate;
        }
        if c.version == topic.version {
            // Received before a restart but never acknowledged: deliver it again.
            return match from_stored(&topic.latest) {
                Ok(files) => {
                    self.pending.insert(key, c.seq);
                    Taken::Deliver(files)
                }
                Err(_) => Taken::Gap {
                    have: topic.version,
                    previous: c.previous_version,
                },
            };
        }
        if c.previous_version != topic.version {
            return Taken::Gap {
                have: topic.version,
                previous: c.previous_version,
            };
        }
        let mut files = match from_stored(&topic.latest) {
            Ok(f) => f,
            Err(_) => {
                return Taken::Gap {
                    have: topic.version,
                    previous: c.previous_version,
                }
            }
        };
        for f in &c.files {
            if let Some(old) = &f.old_path {
                files.remove(old);
            }
            match (f.status, &f.content) {
                (FileStatus::Deleted, _) | (_, None) => {
                    files.remove(&f.path);
                }
                (_, Some(content)) => match decode_content(content, f.encoding) {
                    Ok(bytes) => {
                        files.insert(f.path.clone(), bytes);
                    }
                    Err(e) => {
                        tracing::warn!(path = %f.path, error = %e, "undecodable content in change")
                    }
                },
            }
        }
        topic.version = c.version;
        topic.latest = to_stored(&files);
        self.pending.insert((c.topic.clone(), c.version), c.seq);
        Taken::Deliver(files)
    }

    fn covered_change(&mut self, seq: u64) {
        self.received = Some(self.received.map_or(seq, |r| r.max(seq)));
    }

    /// Records the application's verdict on `version` of `topic` and persists the state.
    pub fn acknowledge(
        &mut self,
        topic: &str,
        version: u64,
        applied: bool,
        error: Option<&str>,
    ) -> Result<(), StateError> {
        let keys: BTreeSet<(String, u64)> = self
            .pending
            .keys()
            .filter(|(t, v)| t == topic && *v <= version)
            .cloned()
            .collect();
        for k in keys {
            if let Some(position) = self.pending.remove(&k) {
                // What was delivered and acknowledged is covered even if its marker is still in flight.
                self.covered_change(position);
            }
        }
        let t = self.stored.topics.entry(topic.to_string()).or_default();
        if version >= t.handled {
            t.handled = version;
            t.handled_applied = applied;
            t.handled_error = error.map(str::to_owned);
        }
        if applied && t.version == version {
            t.good_version = version;
            t.good = t.latest.clone();
        }
        self.stored.cursor = self.cursor();
        self.persist()
    }

    fn persist(&self) -> Result<(), StateError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let io = |source| StateError::Io {
            path: dir.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&self.stored).map_err(|e| StateError::Corrupt {
            path: dir.join(FILE),
            message: e.to_string(),
        })?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, dir.join(FILE)).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FileChange, SnapshotFile};

    fn change(seq: u64, version: u64, files: Vec<FileChange>) -> Change {
        Change {
            seq,
            topic: "t".into(),
            version,
            previous_version: version - 1,
            commit: "c".into(),
            author: "a".into(),
            message: "m".into(),
            files,
        }
    }

    fn modified(path: &str, content: &str) -> FileChange {
        FileChange {
            path: path.into(),
            status: FileStatus::Modified,
            old_path: None,
            sha: "s".into(),
            content: Some(content.into()),
            encoding: Encoding::Utf8,
        }
    }

    #[test]
    fn cursor_waits_for_acks_and_state_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = LocalState::open(Some(dir.path())).expect("open");
        let snap = Snapshot {
            topic: "t".into(),
            version: 1,
            seq: 3,
            commit: "c".into(),
            files: vec![SnapshotFile {
                path: "t/a".into(),
                sha: "s".into(),
                content: "1".into(),
                encoding: Encoding::Utf8,
            }],
        };
        assert!(matches!(s.take_snapshot(&snap), Taken::Deliver(_)));
        s.covered(5).expect("persist");
        assert_eq!(
            s.cursor(),
            Some(2),
            "unacked snapshot holds the cursor back"
        );
        s.acknowledge("t", 1, true, None).expect("ack");
        assert_eq!(s.cursor(), Some(5));
        let delivered = s.take_change(&change(7, 2, vec![modified("t/a", "2")]));
        assert_eq!(
            delivered,
            Taken::Deliver(Files::from([("t/a".to_string(), b"2".to_vec())]))
        );
        assert_eq!(s.cursor(), Some(6));
        // a version the app failed to apply: handled, but last good stays at v1
        s.acknowledge("t", 2, false, Some("bad")).expect("ack");
        assert_eq!(s.cursor(), Some(7));

        let again = LocalState::open(Some(dir.path())).expect("reopen");
        assert_eq!(again.cursor(), Some(7));
        let good = again.last_good();
        assert_eq!(good["t"].0, 1);
        assert_eq!(good["t"].1["t/a"], b"1");
        // a replay of v2 after restart is a duplicate; v3 builds on the latest files
        let mut again = again;
        assert_eq!(
            again.take_change(&change(7, 2, vec![modified("t/a", "2")])),
            Taken::Duplicate
        );
        assert!(
            matches!(again.take_change(&change(9, 3, vec![])), Taken::Deliver(f) if f["t/a"] == b"2")
        );
        assert!(matches!(
            again.take_change(&change(12, 5, vec![])),
            Taken::Gap {
                have: 3,
                previous: 4
            }
        ));
    }
}
