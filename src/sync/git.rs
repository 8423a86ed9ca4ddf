//! The git side of a sync: a bare mirror under `data_dir`, a fetch of the one configured branch,
//! and a tree-to-tree diff (with rename detection) from the last published commit to the new head.
//!
//! Blocking code: called from `spawn_blocking` only. The last published commit comes from the store,
//! never from a webhook payload, so force pushes and lost or reordered webhooks all diff correctly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{Delta, DiffFindOptions, DiffOptions, FetchOptions, FileMode, Oid, Repository};

use super::auth;
use crate::config::RepoConfig;
use crate::protocol::FileStatus;
use crate::store::{ChangedFile, SyncOutcome, TopicChange};

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
    last: Option<&str>,
    withheld: &BTreeMap<String, String>,
) -> Result<Option<SyncOutcome>, GitError> {
    let path = mirror_path(data_dir, &repo.name);
    let mirror = open_mirror(&path, repo)?;
    let head = fetch(&mirror, repo)?;
    if last == Some(head.to_string().as_str()) {
        return Ok(None);
    }
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
    let mut topics = diff_topics(&mirror, repo, tree_of(last).as_ref(), &new_tree)?;
    // Topics held back by a failed validation diff from where they last were good, so nothing
    // committed since is lost when they are published again.
    topics.retain(|t, _| !withheld.contains_key(t));
    let mut bases: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (topic, base) in withheld {
        bases.entry(base.as_str()).or_default().push(topic.as_str());
    }
    for (base, names) in bases {
        let base = (!base.is_empty()).then_some(base);
        let mut from_base = diff_topics(&mirror, repo, tree_of(base).as_ref(), &new_tree)?;
        for name in names {
            topics.insert(name.to_string(), from_base.remove(name).unwrap_or_default());
        }
    }
    let author = new_commit.author();
    let author = match (author.name(), author.email()) {
        (Some(n), Some(e)) => format!("{n} <{e}>"),
        (Some(n), None) => n.to_string(),
        _ => String::new(),
    };
    Ok(Some(SyncOutcome {
        repo: repo.name.clone(),
        commit: head.to_string(),
        author,
        message: new_commit
            .message()
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        topics: topics
            .into_iter()
            .map(|(topic, mut files)| {
                files.sort_by(|a, b| a.path.cmp(&b.path));
                TopicChange { topic, files }
            })
            .collect(),
        rejected: Vec::new(),
        cleared: Vec::new(),
    }))
}

/// The changes from `old` (or nothing) to `new`, grouped by topic.
fn diff_topics(
    mirror: &Repository,
    repo: &RepoConfig,
    old_tree: Option<&git2::Tree<'_>>,
    new_tree: &git2::Tree<'_>,
) -> Result<BTreeMap<String, Vec<ChangedFile>>, GitError> {
    let read = |what: &'static str| read_error(repo, what);
    let mut opts = DiffOptions::new();
    opts.include_typechange(true);
    let mut diff = mirror
        .diff_tree_to_tree(old_tree, Some(new_tree), Some(&mut opts))
        .map_err(read("diff"))?;
    let mut find = DiffFindOptions::new();
    find.renames(true);
    diff.find_similar(Some(&mut find))
        .map_err(read("rename detection"))?;

    let mut topics: BTreeMap<String, Vec<ChangedFile>> = BTreeMap::new();
    for delta in diff.deltas() {
        let new_file = delta.new_file();
        let old_file = delta.old_file();
        let path_of = |f: &git2::DiffFile<'_>| f.path().map(|p| p.to_string_lossy().into_owned());
        let skip = |mode: FileMode| matches!(mode, FileMode::Link | FileMode::Commit);
        let (old_path, new_path) = (path_of(&old_file), path_of(&new_file));
        let blob = |oid: Oid| -> Result<Vec<u8>, GitError> {
            Ok(mirror
                .find_blob(oid)
                .map_err(read("blob"))?
                .content()
                .to_vec())
        };
        let mut push = |topic: Option<String>, file: ChangedFile| {
            if let Some(topic) = topic {
                topics.entry(topic).or_default().push(file);
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
                push(repo.rules.topic_of(&path), file);
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
                        push(repo.rules.topic_of(&path), file);
                    }
                    continue;
                }
                let file = ChangedFile {
                    path: path.clone(),
                    status,
                    old_path: None,
                    sha: new_file.id().to_string(),
                    content: Some(blob(new_file.id())?),
                };
                push(repo.rules.topic_of(&path), file);
            }
            Delta::Renamed => {
                let (Some(from), Some(to)) = (old_path, new_path) else {
                    continue;
                };
                if skip(new_file.mode()) {
                    continue;
                }
                let (from_topic, to_topic) = (repo.rules.topic_of(&from), repo.rules.topic_of(&to));
                let content = Some(blob(new_file.id())?);
                let sha = new_file.id().to_string();
                if from_topic == to_topic {
                    push(
                        to_topic,
                        ChangedFile {
                            path: to,
                            status: FileStatus::Renamed,
                            old_path: Some(from),
                            sha,
                            content,
                        },
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
                    );
                    push(
                        to_topic,
                        ChangedFile {
                            path: to,
                            status: FileStatus::Added,
                            old_path: None,
                            sha,
                            content,
                        },
                    );
                }
            }
            _ => {}
        }
    }
    Ok(topics)
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
}
