//! The git side of a sync: a bare mirror under `data_dir`, a fetch of the one configured branch,
//! and a tree-to-tree diff (with rename detection) from the last published commit to the new head.
//!
//! Blocking code: called from `spawn_blocking` only. The last published commit comes from the store,
//! never from a webhook payload, so force pushes and lost or reordered webhooks all diff correctly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use git2::{
    Delta, DiffFindOptions, DiffOptions, FetchOptions, FileMode, ObjectType, Oid, Repository,
};

use super::auth;
use crate::config::{LimitsConfig, RepoConfig};
use crate::protocol::FileStatus;
use crate::store::{ChangedFile, SyncOutcome, TopicChange};

/// Longest commit message and author sent in a `change`. With the topic name they must fit the
/// fixed 64 KiB of `LimitsConfig::max_frame_bytes`, even JSON-escaped at six bytes per byte.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;
/// The longest `Confcast-Rollout` trailer value kept: longer than any policy name (64), so a
/// longer one names no policy and is reported as unknown.
pub const MAX_TRAILER_BYTES: usize = 128;
pub const MAX_AUTHOR_BYTES: usize = 512;

/// Why a topic's change cannot be published whatever its files say: a path that must never reach
/// an instance, or a size over `[limits]`. Names the first file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The path, escaped for display (`display_path`).
    pub path: String,
    pub message: String,
}

/// What one sync found: the outcome to publish, and the topics in it that must be held back.
#[derive(Debug)]
pub struct Synced {
    pub outcome: SyncOutcome,
    pub held: BTreeMap<String, Held>,
    /// The topics whose whole git state was compared with their stored files ([`Compare`]).
    pub compared: Vec<String>,
}

/// A topic whose stored files may differ from git (after a rollback or an unpin): when it is
/// due, or when the commits synced touch it, its change is its whole git state at the new head
/// compared with `stored`, not the diff between two commits, so the result equals the git tree.
#[derive(Debug, Clone, Default)]
pub struct Compare {
    pub due: bool,
    /// The topic's stored files: path to blob id.
    pub stored: BTreeMap<String, String>,
}

/// One topic's changed files before their content is read: content is read only once the topic is
/// known to be publishable, so a file over the cap is never loaded into memory.
#[derive(Default)]
struct TopicDiff {
    /// Each file with the blob its content is still to be read from.
    files: Vec<(ChangedFile, Option<Oid>)>,
    held: Option<Held>,
}

/// Blob sizes from object headers, which git reads without inflating the content.
struct BlobSizes<'r> {
    odb: git2::Odb<'r>,
    known: HashMap<Oid, u64>,
}

impl BlobSizes<'_> {
    fn of(&mut self, id: Oid) -> Result<u64, git2::Error> {
        if let Some(size) = self.known.get(&id) {
            return Ok(*size);
        }
        let (size, _) = self.odb.read_header(id)?;
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        self.known.insert(id, size);
        Ok(size)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("repo `{repo}`: cannot open the mirror at {path}: {source}")]
    Mirror {
        repo: String,
        path: PathBuf,
        source: git2::Error,
    },
    #[error("repo `{repo}`: fetch of branch `{branch}` from {url} failed: {source}")]
    Fetch {
        repo: String,
        branch: String,
        url: String,
        source: git2::Error,
    },
    #[error("repo `{repo}`: branch `{branch}` does not exist on the remote (check repos.branch)")]
    BranchMissing { repo: String, branch: String },
    #[error("{message}")]
    Remote { message: String },
    #[error("repo `{repo}`: {what}: {source}")]
    Read {
        repo: String,
        what: String,
        source: git2::Error,
    },
}

/// Maps a libgit2 error while reading the mirror to one naming the repo and what was read.
fn read_error(repo: &RepoConfig, what: &'static str) -> impl FnOnce(git2::Error) -> GitError {
    let name = repo.name.clone();
    move |source| GitError::Read {
        repo: name,
        what: what.to_string(),
        source,
    }
}

/// Where the mirror of `repo` lives.
pub fn mirror_path(data_dir: &Path, repo: &str) -> PathBuf {
    data_dir.join("mirrors").join(format!("{repo}.git"))
}

/// Fetches `repo.branch` into the mirror and returns what changed since `last` (the last published
/// commit), or `None` when the head has not moved.
pub fn sync(
    data_dir: &Path,
    repo: &RepoConfig,
    limits: &LimitsConfig,
    last: Option<&str>,
    withheld: &BTreeMap<String, String>,
    compare: &BTreeMap<String, Compare>,
) -> Result<Option<Synced>, GitError> {
    let path = mirror_path(data_dir, &repo.name);
    match consolidate_packs(&path) {
        Ok(0) => {}
        Ok(n) => tracing::info!(repo = %repo.name, packs = n, "mirror packs consolidated into one"),
        // Only slower lookups: the packs are all still there.
        Err(e) => {
            tracing::warn!(repo = %repo.name, error = %e, "could not consolidate the mirror's packs")
        }
    }
    let mirror = open_mirror(&path, repo)?;
    let head = fetch(&mirror, repo)?;
    if last == Some(head.to_string().as_str()) && !compare.values().any(|c| c.due) {
        return Ok(None);
    }
    changes(&mirror, repo, limits, last, head, withheld, compare).map(Some)
}

/// What changed in `mirror` from `last` (the last published commit; nothing when `None`) to
/// `head`: the diff grouped by topic, with each published file's content read and the topics that
/// must be held back. [`sync`] calls it after its fetch; it is public for `benches/hot_paths.rs`.
pub fn changes(
    mirror: &Repository,
    repo: &RepoConfig,
    limits: &LimitsConfig,
    last: Option<&str>,
    head: Oid,
    withheld: &BTreeMap<String, String>,
    compare: &BTreeMap<String, Compare>,
) -> Result<Synced, GitError> {
    let read = |what: &'static str| read_error(repo, what);
    let new_commit = mirror.find_commit(head).map_err(read("new head commit"))?;
    let new_tree = new_commit.tree().map_err(read("new head tree"))?;
    let tree_of = |commit: Option<&str>| match commit.map(Oid::from_str) {
        Some(Ok(oid)) => match mirror.find_commit(oid).and_then(|c| c.tree()) {
            Ok(tree) => Some(tree),
            Err(e) => {
                tracing::warn!(repo = %repo.name, commit = ?commit, error = %e,
                    "published commit is not in the mirror; diffing from an empty tree");
                None
            }
        },
        _ => None,
    };
    let mut sizes = BlobSizes {
        odb: mirror.odb().map_err(read("object database"))?,
        known: HashMap::new(),
    };
    let mut topics = diff_topics(
        mirror,
        repo,
        limits,
        &mut sizes,
        tree_of(last).as_ref(),
        &new_tree,
    )?;
    // Topics held back by a failed validation diff from where they last were good, so nothing
    // committed since is lost when they are published again.
    topics.retain(|t, _| !withheld.contains_key(t));
    let mut bases: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (topic, base) in withheld {
        bases.entry(base.as_str()).or_default().push(topic.as_str());
    }
    for (base, names) in bases {
        let base = (!base.is_empty()).then_some(base);
        let mut from_base = diff_topics(
            mirror,
            repo,
            limits,
            &mut sizes,
            tree_of(base).as_ref(),
            &new_tree,
        )?;
        for name in names {
            topics.insert(name.to_string(), from_base.remove(name).unwrap_or_default());
        }
    }
    // A topic whose stored files may differ from git: its whole git state against them.
    let compared: Vec<String> = compare
        .iter()
        .filter(|(t, c)| c.due || topics.get(*t).is_some_and(|d| !d.files.is_empty()))
        .map(|(t, _)| t.clone())
        .collect();
    if !compared.is_empty() {
        let mut full = compare_topics(
            mirror, repo, limits, &mut sizes, &new_tree, &compared, compare,
        )?;
        for topic in &compared {
            topics.insert(topic.clone(), full.remove(topic).unwrap_or_default());
        }
    }
    hold_over_totals(mirror, repo, limits, &mut sizes, &new_tree, &mut topics)?;
    let mut held = BTreeMap::new();
    let mut changes = Vec::with_capacity(topics.len());
    for (topic, diff) in topics {
        let mut files = Vec::with_capacity(diff.files.len());
        for (mut file, blob) in diff.files {
            // A held-back topic is never published: its files' content is not even read.
            if let (Some(id), None) = (blob, &diff.held) {
                file.content = Some(
                    mirror
                        .find_blob(id)
                        .map_err(read("blob"))?
                        .content()
                        .to_vec(),
                );
            }
            files.push(file);
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(h) = diff.held {
            held.insert(topic.clone(), h);
        }
        changes.push(TopicChange { topic, files });
    }
    let author = new_commit.author();
    let author = match (author.name(), author.email()) {
        (Some(n), Some(e)) => format!("{n} <{e}>"),
        (Some(n), None) => n.to_string(),
        _ => String::new(),
    };
    Ok(Synced {
        outcome: SyncOutcome {
            repo: repo.name.clone(),
            commit: head.to_string(),
            author: cut(&author, MAX_AUTHOR_BYTES),
            message: cut(
                new_commit.message().unwrap_or_default().trim_end(),
                MAX_MESSAGE_BYTES,
            ),
            rollout_trailer: crate::staging::trailer(&String::from_utf8_lossy(
                new_commit.message_bytes(),
            ))
            .map(|name| cut(name, MAX_TRAILER_BYTES)),
            topics: changes,
            rejected: Vec::new(),
            cleared: Vec::new(),
            ..SyncOutcome::default()
        },
        held,
        compared,
    })
}

/// Each topic of `wanted` as the change from its stored files (`compare`) to its files in
/// `tree`: added, modified (another blob) and deleted files, judged like a diff's. Content is
/// not read yet.
fn compare_topics(
    mirror: &Repository,
    repo: &RepoConfig,
    limits: &LimitsConfig,
    sizes: &mut BlobSizes<'_>,
    tree: &git2::Tree<'_>,
    wanted: &[String],
    compare: &BTreeMap<String, Compare>,
) -> Result<BTreeMap<String, TopicDiff>, GitError> {
    let read = |what: &'static str| read_error(repo, what);
    let mut topics: BTreeMap<String, TopicDiff> = BTreeMap::new();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Iterative: a hostile tree can nest deeper than any stack.
    let mut pending: Vec<(Vec<u8>, git2::Tree<'_>)> = vec![(Vec::new(), tree.clone())];
    while let Some((prefix, tree)) = pending.pop() {
        for entry in tree.iter() {
            let mut raw = prefix.clone();
            if !raw.is_empty() {
                raw.push(b'/');
            }
            raw.extend_from_slice(entry.name_bytes());
            match entry.kind() {
                Some(ObjectType::Tree) => {
                    let subtree = mirror.find_tree(entry.id()).map_err(read("tree"))?;
                    pending.push((raw, subtree));
                }
                Some(ObjectType::Blob) => {
                    if !FILE_MODES
                        .into_iter()
                        .any(|m| i32::from(m) == entry.filemode())
                    {
                        continue;
                    }
                    let path = String::from_utf8_lossy(&raw).into_owned();
                    let Some(topic) = repo.rules.topic_of(&path).filter(|t| wanted.contains(t))
                    else {
                        continue;
                    };
                    let stored = compare.get(&topic).and_then(|c| c.stored.get(&path));
                    seen.entry(topic.clone()).or_default().insert(path.clone());
                    let sha = entry.id().to_string();
                    if stored == Some(&sha) {
                        continue;
                    }
                    let held =
                        judge(&raw, entry.id(), limits, sizes).map_err(read("blob header"))?;
                    let diff = topics.entry(topic).or_default();
                    if diff.held.is_none() {
                        diff.held = held;
                    }
                    let status = if stored.is_some() {
                        FileStatus::Modified
                    } else {
                        FileStatus::Added
                    };
                    let file = ChangedFile {
                        path,
                        status,
                        old_path: None,
                        sha,
                        content: None,
                    };
                    diff.files.push((file, Some(entry.id())));
                }
                _ => {}
            }
        }
    }
    for topic in wanted {
        let Some(c) = compare.get(topic) else {
            continue;
        };
        let present = seen.get(topic);
        for (path, sha) in &c.stored {
            if present.is_some_and(|p| p.contains(path)) {
                continue;
            }
            let file = ChangedFile {
                path: path.clone(),
                status: FileStatus::Deleted,
                old_path: None,
                sha: sha.clone(),
                content: None,
            };
            topics
                .entry(topic.clone())
                .or_default()
                .files
                .push((file, None));
        }
    }
    Ok(topics)
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let kept = crate::protocol::truncate_utf8(text, max.saturating_sub('…'.len_utf8()));
    format!("{kept}…")
}

/// Modes of regular files (not symlinks, submodules or trees): the only entries ever published.
const FILE_MODES: [FileMode; 3] = [
    FileMode::Blob,
    FileMode::BlobExecutable,
    FileMode::BlobGroupWritable,
];

fn is_file(mode: FileMode) -> bool {
    FILE_MODES.contains(&mode)
}

/// A raw git path escaped for display in the API and logs: control, bidi and other invisible
/// characters as `\u{..}`, bytes that are not UTF-8 as `\xNN`, and cut to 200 characters (a hostile
/// path can be any length).
pub fn display_path(raw: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    let mut shown = String::new();
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                // Readable as is inside the quotes messages put around paths.
                '\'' => shown.push(c),
                c => shown.extend(c.escape_debug()),
            }
        }
        for b in chunk.invalid() {
            shown.push_str(&format!("\\x{b:02x}"));
        }
    }
    match shown.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}…", &shown[..end]),
        None => shown,
    }
}

/// Why the file at `raw` with blob `id` may not be published, if it may not: a path that is too
/// long or not plain (`protocol::check_path`), or content over `max_file_bytes`.
fn judge(
    raw: &[u8],
    id: Oid,
    limits: &LimitsConfig,
    sizes: &mut BlobSizes<'_>,
) -> Result<Option<Held>, git2::Error> {
    let path = display_path(raw);
    let message = if raw.len() > limits.max_path_bytes {
        format!(
            "path \"{path}\" is {} bytes, over limits.max_path_bytes = {}",
            raw.len(),
            limits.max_path_bytes
        )
    } else if let Err(why) = crate::protocol::check_path(raw) {
        format!("path \"{path}\" {why}: such a path is never published")
    } else {
        let size = sizes.of(id)?;
        if size <= limits.max_file_bytes {
            return Ok(None);
        }
        format!(
            "file is {size} bytes, over limits.max_file_bytes = {}",
            limits.max_file_bytes
        )
    };
    Ok(Some(Held { path, message }))
}

/// The changes from `old` (or nothing) to `new`, grouped by topic, with the topics that cannot be
/// published marked. Content is not read yet.
fn diff_topics(
    mirror: &Repository,
    repo: &RepoConfig,
    limits: &LimitsConfig,
    sizes: &mut BlobSizes<'_>,
    old_tree: Option<&git2::Tree<'_>>,
    new_tree: &git2::Tree<'_>,
) -> Result<BTreeMap<String, TopicDiff>, GitError> {
    let read = |what: &'static str| read_error(repo, what);
    let mut opts = DiffOptions::new();
    opts.include_typechange(true);
    let mut diff = mirror
        .diff_tree_to_tree(old_tree, Some(new_tree), Some(&mut opts))
        .map_err(read("diff"))?;
    // libgit2 measures similarity on whole blobs: with a file over the cap among the rename
    // candidates (added and deleted files), only identical content counts as a rename, so that
    // file is never loaded.
    let mut oversized = false;
    for delta in diff.deltas() {
        if !matches!(delta.status(), Delta::Added | Delta::Deleted) {
            continue;
        }
        for f in [delta.old_file(), delta.new_file()] {
            if is_file(f.mode())
                && sizes.of(f.id()).map_err(read("blob header"))? > limits.max_file_bytes
            {
                oversized = true;
            }
        }
    }
    let mut find = DiffFindOptions::new();
    find.renames(true);
    find.exact_match_only(oversized);
    diff.find_similar(Some(&mut find))
        .map_err(read("rename detection"))?;

    let mut topics: BTreeMap<String, TopicDiff> = BTreeMap::new();
    for delta in diff.deltas() {
        let new_file = delta.new_file();
        let old_file = delta.old_file();
        // Judged on the raw bytes: a lossy conversion first would make distinct names that are
        // not UTF-8 collide, and hide them. Removals are not judged, so a file published before
        // paths were checked can still be deleted.
        let lossy = |raw: &[u8]| String::from_utf8_lossy(raw).into_owned();
        let (old_raw, new_raw) = (old_file.path_bytes(), new_file.path_bytes());
        let (old_path, new_path) = (old_raw.map(lossy), new_raw.map(lossy));
        let skip = |mode: FileMode| matches!(mode, FileMode::Link | FileMode::Commit);
        let mut judge_new = || -> Result<Option<Held>, GitError> {
            match new_raw {
                Some(raw) => judge(raw, new_file.id(), limits, sizes).map_err(read("blob header")),
                None => Ok(None),
            }
        };
        let mut push = |topic: Option<String>, file: ChangedFile, blob: Option<Oid>, held| {
            if let Some(topic) = topic {
                let entry = topics.entry(topic).or_default();
                if entry.held.is_none() {
                    entry.held = held;
                }
                entry.files.push((file, blob));
            }
        };
        match delta.status() {
            Delta::Deleted => {
                let (Some(path), false) = (old_path, skip(old_file.mode())) else {
                    continue;
                };
                let file = ChangedFile {
                    path: path.clone(),
                    status: FileStatus::Deleted,
                    old_path: None,
                    sha: old_file.id().to_string(),
                    content: None,
                };
                push(repo.rules.topic_of(&path), file, None, None);
            }
            Delta::Added | Delta::Copied | Delta::Modified | Delta::Typechange => {
                let Some(path) = new_path else { continue };
                let status = if matches!(delta.status(), Delta::Modified | Delta::Typechange)
                    && !skip(old_file.mode())
                {
                    FileStatus::Modified
                } else {
                    FileStatus::Added
                };
                if skip(new_file.mode()) {
                    if status == FileStatus::Modified {
                        // A file became a symlink or submodule: for instances it is gone.
                        let file = ChangedFile {
                            path: path.clone(),
                            status: FileStatus::Deleted,
                            old_path: None,
                            sha: old_file.id().to_string(),
                            content: None,
                        };
                        push(repo.rules.topic_of(&path), file, None, None);
                    }
                    continue;
                }
                let held = judge_new()?;
                let file = ChangedFile {
                    path: path.clone(),
                    status,
                    old_path: None,
                    sha: new_file.id().to_string(),
                    content: None,
                };
                push(repo.rules.topic_of(&path), file, Some(new_file.id()), held);
            }
            Delta::Renamed => {
                let (Some(from), Some(to)) = (old_path, new_path) else {
                    continue;
                };
                if skip(new_file.mode()) {
                    continue;
                }
                let held = judge_new()?;
                let (from_topic, to_topic) = (repo.rules.topic_of(&from), repo.rules.topic_of(&to));
                let blob = Some(new_file.id());
                let sha = new_file.id().to_string();
                if from_topic == to_topic {
                    push(
                        to_topic,
                        ChangedFile {
                            path: to,
                            status: FileStatus::Renamed,
                            old_path: Some(from),
                            sha,
                            content: None,
                        },
                        blob,
                        held,
                    );
                } else {
                    // Moved between topics: gone from one, new in the other.
                    push(
                        from_topic,
                        ChangedFile {
                            path: from,
                            status: FileStatus::Deleted,
                            old_path: None,
                            sha: old_file.id().to_string(),
                            content: None,
                        },
                        None,
                        None,
                    );
                    push(
                        to_topic,
                        ChangedFile {
                            path: to,
                            status: FileStatus::Added,
                            old_path: None,
                            sha,
                            content: None,
                        },
                        blob,
                        held,
                    );
                }
            }
            _ => {}
        }
    }
    Ok(topics)
}

/// Holds back each not yet held topic whose files in `tree` number or weigh more than `[limits]`
/// allows. Counted over the whole tree, not the diff: the git state is the truth, and a topic
/// grown by many small commits is as large as one grown at once.
fn hold_over_totals(
    mirror: &Repository,
    repo: &RepoConfig,
    limits: &LimitsConfig,
    sizes: &mut BlobSizes<'_>,
    tree: &git2::Tree<'_>,
    topics: &mut BTreeMap<String, TopicDiff>,
) -> Result<(), GitError> {
    let read = |what: &'static str| read_error(repo, what);
    let mut totals: BTreeMap<String, (usize, u64)> = topics
        .iter()
        .filter(|(_, d)| d.held.is_none())
        .map(|(t, _)| (t.clone(), (0, 0)))
        .collect();
    if totals.is_empty() {
        return Ok(());
    }
    // Iterative: a hostile tree can nest deeper than any stack.
    let mut pending: Vec<(Vec<u8>, git2::Tree<'_>)> = vec![(Vec::new(), tree.clone())];
    while let Some((prefix, tree)) = pending.pop() {
        for entry in tree.iter() {
            let mut path = prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(entry.name_bytes());
            match entry.kind() {
                Some(ObjectType::Tree) => {
                    let subtree = mirror.find_tree(entry.id()).map_err(read("tree"))?;
                    pending.push((path, subtree));
                }
                Some(ObjectType::Blob) => {
                    let mode = entry.filemode();
                    if !FILE_MODES.into_iter().any(|m| i32::from(m) == mode) {
                        continue;
                    }
                    let Some(topic) = repo.rules.topic_of(&String::from_utf8_lossy(&path)) else {
                        continue;
                    };
                    if let Some((files, bytes)) = totals.get_mut(&topic) {
                        *files += 1;
                        // Past the file cap the topic is held anyway: read no more headers.
                        if *files <= limits.max_topic_files {
                            *bytes = bytes
                                .saturating_add(sizes.of(entry.id()).map_err(read("blob header"))?);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for (topic, (files, bytes)) in totals {
        let message = if files > limits.max_topic_files {
            format!(
                "topic `{topic}` has {files} files, over limits.max_topic_files = {}",
                limits.max_topic_files
            )
        } else if bytes > limits.max_topic_bytes {
            format!(
                "topic `{topic}` files total {bytes} bytes, over limits.max_topic_bytes = {}",
                limits.max_topic_bytes
            )
        } else {
            continue;
        };
        if let Some(diff) = topics.get_mut(&topic) {
            // Name a file this change adds or modifies: what made the topic grow.
            let path = diff
                .files
                .iter()
                .find(|(f, _)| f.status != FileStatus::Deleted)
                .or(diff.files.first())
                .map(|(f, _)| f.path.clone())
                .unwrap_or_default();
            diff.held = Some(Held { path, message });
        }
    }
    Ok(())
}

fn open_mirror(path: &Path, repo: &RepoConfig) -> Result<Repository, GitError> {
    let err = |source| GitError::Mirror {
        repo: repo.name.clone(),
        path: path.to_path_buf(),
        source,
    };
    let mirror = if path.join("HEAD").exists() {
        Repository::open_bare(path).map_err(err)?
    } else {
        std::fs::create_dir_all(path).map_err(|e| err(git2::Error::from_str(&e.to_string())))?;
        Repository::init_bare(path).map_err(err)?
    };
    Ok(mirror)
}

/// Packs in a mirror past which a sync first consolidates them into one (git's default
/// `gc.autoPackLimit`).
pub const PACK_LIMIT: usize = 50;

/// Every fetch writes one more pack into the mirror and libgit2 never repacks, so without this
/// each object lookup searches one more pack index per push ever fetched (after a few hundred
/// pushes that was most of a sync's time). Past [`PACK_LIMIT`] packs, every object in the mirror
/// (reachable or not: after a force push a diff starts from a commit no ref reaches any more) is
/// written into one new pack and the old packs are removed. Returns how many packs were replaced.
/// Runs under the repo's sync lock, before the mirror is opened for the fetch.
pub fn consolidate_packs(mirror: &Path) -> Result<usize, git2::Error> {
    let dir = mirror.join("objects").join("pack");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let packs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    if packs.len() <= PACK_LIMIT {
        return Ok(0);
    }
    let name = {
        let repo = Repository::open_bare(mirror)?;
        let odb = repo.odb()?;
        let mut ids = Vec::new();
        odb.foreach(|id| {
            ids.push(*id);
            true
        })?;
        let mut builder = repo.packbuilder()?;
        for id in ids {
            builder.insert_object(id, None)?;
        }
        builder.write(&dir, 0)?;
        builder
            .name()
            .map(|n| format!("pack-{n}"))
            .ok_or_else(|| git2::Error::from_str("the new pack has no name"))?
    };
    let mut removed = 0;
    for pack in packs {
        if pack.file_stem().is_some_and(|s| *s == *name) {
            continue;
        }
        // The index first: a pack without one is ignored, an index without its pack is an error.
        std::fs::remove_file(pack.with_extension("idx"))
            .map_err(|e| git2::Error::from_str(&e.to_string()))?;
        let _ = std::fs::remove_file(pack.with_extension("rev"));
        std::fs::remove_file(&pack).map_err(|e| git2::Error::from_str(&e.to_string()))?;
        removed += 1;
    }
    Ok(removed)
}

/// Fetches the configured branch; returns its new head.
fn fetch(mirror: &Repository, repo: &RepoConfig) -> Result<Oid, GitError> {
    let fetch_err = |source| GitError::Fetch {
        repo: repo.name.clone(),
        branch: repo.branch.clone(),
        url: redact_url(&repo.url),
        source: scrub_error(source, &repo.url),
    };
    let missing = || GitError::BranchMissing {
        repo: repo.name.clone(),
        branch: repo.branch.clone(),
    };
    let mut remote = mirror.remote_anonymous(&repo.url).map_err(fetch_err)?;
    let local = format!("refs/remotes/origin/{}", repo.branch);
    let remote_ref = format!("refs/heads/{}", repo.branch);
    let refspec = format!("+{remote_ref}:{local}");
    let deadline = std::time::Instant::now() + auth::fetch_timeout(&repo.auth);
    let failure = std::rc::Rc::new(std::cell::RefCell::new(None::<String>));
    let mut opts = FetchOptions::new();
    opts.download_tags(git2::AutotagOption::None);
    // With pruning, a branch deleted on the remote disappears here too, so "missing" is
    // detected (a refspec naming a missing branch otherwise fetches nothing and fails nothing).
    opts.prune(git2::FetchPrune::On);
    opts.remote_callbacks(auth::callbacks(repo, deadline, failure.clone()));
    remote
        .fetch(&[refspec.as_str()], Some(&mut opts), None)
        .map_err(|source| {
            let text = source.message().to_ascii_lowercase();
            if text.contains("couldn't find remote ref")
                || text.contains("could not find remote ref")
            {
                missing()
            } else {
                auth::explain(repo, source, &failure)
            }
        })?;
    let reference = mirror.find_reference(&local).map_err(|_| missing())?;
    reference.target().ok_or_else(missing)
}

/// Hides what a URL may carry as credentials, before it goes into an error, a log, the API or
/// `check-config` output: the whole userinfo (`user:password@`, or a token given as the user, as
/// GitHub allows) becomes `***@`, and every query value becomes `***` (`?access_token=***`),
/// whatever its name, since forges and proxies each name their token parameter differently.
/// Scheme, host, path, query keys and fragment stay, so the URL still says where it points.
///
/// The userinfo ends at the last `@` before the query: a password with a raw `@` or `/` is
/// still hidden whole, at the price of also hiding a host when the path itself has an `@`.
pub fn redact_url(url: &str) -> String {
    let (head, tail) = url.split_at(url.find(['?', '#']).unwrap_or(url.len()));
    let mut out = match (head.find("://"), head.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &head[..scheme], &head[at + 1..])
        }
        _ => head.to_string(),
    };
    match tail.strip_prefix('?') {
        Some(rest) => {
            let (query, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) => format!("{key}=***"),
                    None if pair.is_empty() => String::new(),
                    None => "***".to_string(),
                })
                .collect();
            out.push('?');
            out.push_str(&masked.join("&"));
            out.push_str(fragment);
        }
        None => out.push_str(tail),
    }
    out
}

/// Credentials shorter than this are not searched for in free text: replacing every `1` or
/// `ab` would garble messages, and so short a secret protects nothing anyway.
const SCRUB_MIN_BYTES: usize = 4;

/// `text` (a libgit2 or driver message about `url`) with the URL and each credential in it
/// hidden: such messages may quote the URL as given, or only a piece of it (a libgit2 message
/// may show the URL it built for a request, with the same token in it).
pub fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for secret in credentials(url) {
        if secret.len() >= SCRUB_MIN_BYTES {
            out = out.replace(secret, "***");
        }
    }
    out
}

/// The parts of `url` that [`redact_url`] hides: the userinfo, its password, the query values.
fn credentials(url: &str) -> Vec<&str> {
    let head = &url[..url.find(['?', '#']).unwrap_or(url.len())];
    let mut found = Vec::new();
    if let (Some(scheme), Some(at)) = (head.find("://"), head.rfind('@')) {
        if at > scheme + 3 {
            let userinfo = &head[scheme + 3..at];
            found.push(userinfo);
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password);
            }
        }
    }
    if let Some(start) = url.find('?') {
        let query = &url[start + 1..];
        let query = &query[..query.find('#').unwrap_or(query.len())];
        for pair in query.split('&') {
            found.push(pair.split_once('=').map_or(pair, |(_, value)| value));
        }
    }
    // Longest first, so a password inside the userinfo does not leave the rest of it behind.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found
}

/// `error` with its message [`scrub`]bed of `url`'s credentials, its code and class kept.
pub fn scrub_error(error: git2::Error, url: &str) -> git2::Error {
    git2::Error::new(error.code(), error.class(), scrub(error.message(), url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        for (url, shown) in [
            (
                "https://user:tok@example.com/r.git",
                "https://***@example.com/r.git",
            ),
            // A token as the user, as GitHub accepts.
            (
                "https://ghp_abcdef@github.com/o/r.git",
                "https://***@github.com/o/r.git",
            ),
            // A raw `@` or `/` in a password: hidden whole.
            (
                "https://u:p@ss/w@git.example.com/r.git",
                "https://***@git.example.com/r.git",
            ),
            (
                "https://git.example.com/r.git?access_token=s3cr3t&private_token=x",
                "https://git.example.com/r.git?access_token=***&private_token=***",
            ),
            (
                "https://h/r.git?token=a&password=b&key=c&bare#frag",
                "https://h/r.git?token=***&password=***&key=***&***#frag",
            ),
            (
                "postgres://confcast:pw@db:5432/confcast?sslmode=require",
                "postgres://***@db:5432/confcast?sslmode=***",
            ),
            ("file:///tmp/r.git", "file:///tmp/r.git"),
            ("git@github.com:o/r.git", "git@github.com:o/r.git"),
            (
                "sqlite:///var/lib/confcast/confcast.db",
                "sqlite:///var/lib/confcast/confcast.db",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn messages_lose_the_url_and_each_credential_in_it() {
        let url = "https://bot:hunter22@git.example.com/r.git?access_token=t0ken-value";
        let message = format!(
            "failed to connect to {url}; retried https://git.example.com/r.git/info/refs?service=git-upload-pack&access_token=t0ken-value as bot:hunter22"
        );
        let clean = scrub(&message, url);
        for secret in ["hunter22", "t0ken-value"] {
            assert!(!clean.contains(secret), "{clean}");
        }
        assert!(
            clean.contains("https://***@git.example.com/r.git?access_token=***"),
            "{clean}"
        );
        // Values too short to search for are left alone in free text (not in the URL).
        assert_eq!(scrub("HTTP 401", "https://h/r?page=1"), "HTTP 401");
        let error = scrub_error(
            git2::Error::new(git2::ErrorCode::Auth, git2::ErrorClass::Http, &message),
            url,
        );
        assert!(!error.message().contains("hunter22"));
        assert_eq!(error.class(), git2::ErrorClass::Http);
    }

    #[test]
    fn hostile_paths_display_escaped_and_bounded() {
        assert_eq!(display_path(b"payments/app.toml"), "payments/app.toml");
        assert_eq!(display_path(b"payments/a\\b"), "payments/a\\\\b");
        assert_eq!(display_path(b"payments/\xff\xfex"), "payments/\\xff\\xfex");
        assert_eq!(
            display_path("p/\u{202e}lmx\u{1b}[2J'".as_bytes()),
            "p/\\u{202e}lmx\\u{1b}[2J'"
        );
        let long = display_path(&[b'a'; 5000]);
        assert_eq!(long.chars().count(), 201, "200 characters and the ellipsis");
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        let cut_text = cut(&"é".repeat(100), 11);
        assert!(cut_text.len() <= 11, "{cut_text}");
        assert_eq!(cut_text, "éééé…");
    }
}
