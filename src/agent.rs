//! `confcast agent`: materializes topics as files under one directory and runs a reload command,
//! acknowledging each version as applied or failed. Built on [`crate::client::Client`].
//!
//! Layout (the same trick as Kubernetes ConfigMap volumes): every version is written in full to a
//! fresh generation directory `DIR/.confcast/gen-N`, then the symlink `DIR/.confcast/current` is
//! swapped to it with one rename, so a whole change appears at once or not at all. The visible
//! top-level entries (`DIR/payments`) are symlinks into `current`.
//!
//! Must never: write outside `DIR` (paths with `..`, absolute paths or anything but plain names are
//! refused, and an existing entry the agent did not create is never replaced), write git metadata
//! (a `.git` component in any case) or a name that displays as something else (control and bidi
//! characters), or ack `applied` for a version whose reload command failed. The server refuses such
//! paths too; the agent checks again because it is the one that writes.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::client::state::Files;
use crate::client::{Client, ClientOptions, Delivery};
use crate::protocol::{AckStatus, CommandStatus};

/// The agent's own directory inside `DIR`.
pub const META: &str = ".confcast";

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub client: ClientOptions,
    pub dir: PathBuf,
    /// Run with `sh -c` on a new version's files before they are swapped in (`CONFCAST_DIR` is
    /// the new generation); a non-zero exit acks the version `failed` with its output and
    /// nothing changes on disk.
    pub check: Option<String>,
    /// Run with `sh -c` after each new version is in place; exit 0 = applied.
    pub exec: Option<String>,
    pub exec_timeout: Duration,
    /// On a failed reload, put the previous files back.
    pub rollback_on_failure: bool,
    /// Command name -> shell command run with `sh -c` when the server sends that command (its
    /// args in `CONFCAST_COMMAND_ARGS`, never in the shell text); exit 0 = done. Bounded by
    /// `exec_timeout` like the reload command.
    pub commands: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("client state: {0}")]
    State(#[from] crate::client::state::StateError),
}

/// Why a version could not be applied; sent as the ack's error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("refused path {path:?}: it {reason}; only plain relative paths inside the directory are written (nothing of this version was)")]
    UnsafePath { path: String, reason: String },
    #[error("refused: {0} exists and was not created by confcast; move it away")]
    Foreign(String),
    #[error("writing files failed: {0}")]
    Io(String),
    #[error("reload command failed ({status}): {stderr_tail}")]
    Reload { status: String, stderr_tail: String },
    #[error("check command failed ({status}), the files were not swapped in: {output_tail}")]
    Check { status: String, output_tail: String },
}

/// Checks that a server-given path is a plain relative path that stays inside the directory.
pub fn safe_path(path: &str) -> Result<PathBuf, ApplyError> {
    let refuse = |reason: String| ApplyError::UnsafePath {
        path: path.to_string(),
        reason,
    };
    crate::protocol::check_path(path.as_bytes()).map_err(|why| refuse(why.to_string()))?;
    // `Path::components` would quietly drop a `.` inside the path; `check_path` has refused those,
    // so every component here is a plain name.
    let mut clean = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) if name != META => clean.push(name),
            Component::Normal(_) => {
                return Err(refuse(format!("names the agent's own directory `{META}`")))
            }
            _ => return Err(refuse("is not a plain relative path".into())),
        }
    }
    Ok(clean)
}

/// What [`materialize`] did: the generation it replaced and where the time went.
#[derive(Debug)]
pub struct Written {
    /// The previous generation's name, to roll back to, if there was one.
    pub previous: Option<String>,
    /// Creating the new generation's directories and files.
    pub write: Duration,
    /// Making them durable, before the swap.
    pub sync: Duration,
}

/// Writes `files` as the new current generation under `dir`: in full, durable, then swapped in.
pub fn materialize(dir: &Path, files: &Files) -> Result<Written, ApplyError> {
    prepare(dir, files)?.swap_in(dir)
}

/// A generation written in full and made durable, not yet current: [`Prepared::swap_in`] makes
/// it current, [`Prepared::discard`] removes it.
#[derive(Debug)]
pub struct Prepared {
    /// Its name under `.confcast`.
    pub generation: String,
    /// Its directory, where a check command reads the new files.
    pub path: PathBuf,
    tops: std::collections::BTreeSet<String>,
    previous: Option<String>,
    write: Duration,
    sync: Duration,
}

impl Prepared {
    /// Points `current` at this generation and the top-level links at its entries.
    pub fn swap_in(self, dir: &Path) -> Result<Written, ApplyError> {
        let io = |e: std::io::Error| ApplyError::Io(e.to_string());
        swap_current(dir, &self.generation).map_err(io)?;
        link_tops(dir, &self.tops).map_err(io)?;
        Ok(Written {
            previous: self.previous,
            write: self.write,
            sync: self.sync,
        })
    }

    /// Removes this generation; `current` never pointed at it.
    pub fn discard(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(error = %e, generation = %self.generation, "could not remove a refused generation");
        }
    }
}

/// Writes `files` as a new generation under `dir`, in full and durable, without making it current.
pub fn prepare(dir: &Path, files: &Files) -> Result<Prepared, ApplyError> {
    let io = |e: std::io::Error| ApplyError::Io(e.to_string());
    let meta = dir.join(META);
    std::fs::create_dir_all(&meta).map_err(io)?;
    let mut paths = Vec::with_capacity(files.len());
    for (path, content) in files {
        paths.push((safe_path(path)?, content));
    }
    // Top-level entries we will expose: refuse before writing anything if one is not ours.
    let tops: std::collections::BTreeSet<String> = paths
        .iter()
        .filter_map(|(p, _)| {
            p.components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
        })
        .collect();
    for top in &tops {
        check_ours(dir, top)?;
    }
    let previous = current_generation(dir);
    let next = next_generation(&meta).map_err(io)?;
    let gen_dir = meta.join(&next);
    std::fs::create_dir(&gen_dir).map_err(io)?;
    // Opened before the first file is written: syncfs reports the writeback errors the
    // filesystem recorded since this descriptor was opened (Linux 5.8 and later), so a write
    // that fails in the background below cannot go unnoticed.
    let handle = std::fs::File::open(&gen_dir).map_err(io)?;
    let started = Instant::now();
    // Parents are created once each, not looked up again for every file in them.
    let mut dirs: HashSet<&Path> = HashSet::new();
    for (path, content) in &paths {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !dirs.contains(parent) {
                std::fs::create_dir_all(gen_dir.join(parent)).map_err(io)?;
                dirs.extend(parent.ancestors().filter(|a| !a.as_os_str().is_empty()));
            }
        }
        std::fs::write(gen_dir.join(path), content).map_err(io)?;
    }
    let write = started.elapsed();
    let started = Instant::now();
    // The swap below must never point `current` at files whose data could still be lost, so the
    // whole generation is made durable first; the rename itself is made durable by the fsync of
    // `.confcast` in `swap_current`. A crash at any point leaves `current` at a complete
    // generation, old or new. One sync per generation, not one fsync per file: on a journaled
    // filesystem each fsync waits for a journal commit, and with many files those were nearly
    // all of an apply (`confcast bench agent`).
    sync_generation(
        &handle,
        &gen_dir,
        paths.iter().map(|(p, _)| p.as_path()),
        &dirs,
    )
    .map_err(io)?;
    let sync = started.elapsed();
    Ok(Prepared {
        generation: next,
        path: gen_dir,
        tops,
        previous,
        write,
        sync,
    })
}

/// Makes a generation durable, data and directory entries (including its own in `.confcast`),
/// with one `syncfs(2)` of the filesystem holding it. That flushes whatever else is dirty on that
/// filesystem too, which on a busy host costs more than our files alone, but it is one call
/// whatever the number of files, where an fsync per file costs a journal commit each.
#[cfg(target_os = "linux")]
fn sync_generation<'a>(
    handle: &std::fs::File,
    _gen_dir: &Path,
    _files: impl Iterator<Item = &'a Path>,
    _dirs: &HashSet<&Path>,
) -> std::io::Result<()> {
    rustix::fs::syncfs(handle)?;
    Ok(())
}

/// Without `syncfs`: every file, then every directory of the generation and `.confcast` itself.
#[cfg(not(target_os = "linux"))]
fn sync_generation<'a>(
    handle: &std::fs::File,
    gen_dir: &Path,
    files: impl Iterator<Item = &'a Path>,
    dirs: &HashSet<&Path>,
) -> std::io::Result<()> {
    for file in files {
        std::fs::File::open(gen_dir.join(file))?.sync_all()?;
    }
    for d in dirs {
        std::fs::File::open(gen_dir.join(d))?.sync_all()?;
    }
    handle.sync_all()?;
    if let Some(meta) = gen_dir.parent() {
        std::fs::File::open(meta)?.sync_all()?;
    }
    Ok(())
}

/// Points `current` back at `generation` and removes the newer one.
pub fn rollback(dir: &Path, generation: &str) -> Result<(), ApplyError> {
    let io = |e: std::io::Error| ApplyError::Io(e.to_string());
    let failed = current_generation(dir);
    swap_current(dir, generation).map_err(io)?;
    let tops = generation_tops(&dir.join(META).join(generation)).map_err(io)?;
    link_tops(dir, &tops).map_err(io)?;
    if let Some(failed) = failed.filter(|f| f != generation) {
        let _ = std::fs::remove_dir_all(dir.join(META).join(failed));
    }
    Ok(())
}

/// Removes every generation but the current one.
pub fn prune(dir: &Path) {
    let current = current_generation(dir);
    if let Ok(entries) = std::fs::read_dir(dir.join(META)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("gen-") && Some(&name) != current.as_ref() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn current_generation(dir: &Path) -> Option<String> {
    std::fs::read_link(dir.join(META).join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn next_generation(meta: &Path) -> std::io::Result<String> {
    let mut highest = 0u64;
    for e in std::fs::read_dir(meta)?.flatten() {
        if let Some(n) = e
            .file_name()
            .to_string_lossy()
            .strip_prefix("gen-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            highest = highest.max(n);
        }
    }
    Ok(format!("gen-{}", highest + 1))
}

fn generation_tops(gen_dir: &Path) -> std::io::Result<std::collections::BTreeSet<String>> {
    Ok(std::fs::read_dir(gen_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

fn link_target(top: &str) -> PathBuf {
    Path::new(META).join("current").join(top)
}

/// A top-level name is ours when it is absent or our own symlink.
fn check_ours(dir: &Path, top: &str) -> Result<(), ApplyError> {
    let path = dir.join(top);
    match std::fs::symlink_metadata(&path) {
        Err(_) => Ok(()),
        Ok(m)
            if m.file_type().is_symlink()
                && std::fs::read_link(&path).ok().as_deref()
                    == Some(link_target(top).as_path()) =>
        {
            Ok(())
        }
        Ok(_) => Err(ApplyError::Foreign(path.display().to_string())),
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the agent needs symlinks (unix)",
    ))
}

/// Atomically points `DIR/.confcast/current` at `generation`.
fn swap_current(dir: &Path, generation: &str) -> std::io::Result<()> {
    let meta = dir.join(META);
    let tmp = meta.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(Path::new(generation), &tmp)?;
    std::fs::rename(&tmp, meta.join("current"))?;
    sync_dir(&meta);
    Ok(())
}

/// Makes the visible top-level symlinks match `tops`, removing our links that are no longer needed.
fn link_tops(dir: &Path, tops: &std::collections::BTreeSet<String>) -> std::io::Result<()> {
    for top in tops {
        if std::fs::symlink_metadata(dir.join(top)).is_err() {
            symlink(&link_target(top), &dir.join(top))?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != META
            && !tops.contains(&name)
            && check_ours(dir, &name).is_ok()
            && e.path().is_symlink()
        {
            std::fs::remove_file(e.path())?;
        }
    }
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// How many characters of a command's output an ack's error keeps (the last ones).
pub const OUTPUT_TAIL_CHARS: usize = 2048;

/// Bytes of output held while a command runs: enough for [`OUTPUT_TAIL_CHARS`] characters of
/// any UTF-8, however much the command writes.
const OUTPUT_TAIL_BYTES: usize = OUTPUT_TAIL_CHARS * 4;

/// Why a shell command did not succeed: its exit status (or why it has none) and the tail of what
/// it wrote.
struct ShellFailure {
    status: String,
    tail: String,
}

/// Reads `reader` to its end, keeping only its last `cap` bytes.
async fn read_tail(reader: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    let mut kept = std::collections::VecDeque::with_capacity(cap.min(4096));
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut chunk = [0u8; 4096];
    while let Ok(n) = reader.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        kept.extend(&chunk[..n]);
        let over = kept.len().saturating_sub(cap);
        kept.drain(..over);
    }
    kept.into()
}

/// The last [`OUTPUT_TAIL_CHARS`] characters of `bytes`, lossily decoded and trimmed.
fn tail_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let skip = text.chars().count().saturating_sub(OUTPUT_TAIL_CHARS);
    text.chars()
        .skip(skip)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Runs `command` with `sh -c`, stdin closed, killed after `timeout`. Keeps the tail of stderr,
/// and of stdout too when `with_stdout` (stdout first, then stderr).
async fn run_shell(
    command: &str,
    timeout: Duration,
    env: &[(&str, String)],
    with_stdout: bool,
) -> Result<(), ShellFailure> {
    let piped = std::process::Stdio::piped;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(if with_stdout {
            piped()
        } else {
            std::process::Stdio::null()
        })
        .stderr(piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| ShellFailure {
        status: "could not start".into(),
        tail: e.to_string(),
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (out, err) = tokio::join!(
            read_tail(stdout, OUTPUT_TAIL_BYTES),
            read_tail(stderr, OUTPUT_TAIL_BYTES)
        );
        let mut both = out;
        if !both.is_empty() && !err.is_empty() && both.last() != Some(&b'\n') {
            both.push(b'\n');
        }
        both.extend(err);
        (child.wait().await, both)
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(ShellFailure {
            status: format!("timed out after {timeout:?}, killed"),
            tail: String::new(),
        }),
        Ok((Err(e), _)) => Err(ShellFailure {
            status: "wait failed".into(),
            tail: e.to_string(),
        }),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), output)) => Err(ShellFailure {
            status: status.to_string(),
            tail: tail_text(&output),
        }),
    }
}

/// Runs the reload command; `Err` carries the exit status and the tail of stderr.
pub async fn reload(
    command: &str,
    timeout: Duration,
    env: &[(&str, String)],
) -> Result<(), ApplyError> {
    run_shell(command, timeout, env, false)
        .await
        .map_err(|f| ApplyError::Reload {
            status: f.status,
            stderr_tail: f.tail,
        })
}

/// Runs the check command on a prepared generation; `Err` carries the exit status and the tail
/// of its output, stdout then stderr (`nginx -t` writes its verdict to stderr).
pub async fn check(
    command: &str,
    timeout: Duration,
    env: &[(&str, String)],
) -> Result<(), ApplyError> {
    run_shell(command, timeout, env, true)
        .await
        .map_err(|f| ApplyError::Check {
            status: f.status,
            output_tail: f.tail,
        })
}

/// Runs the agent until `shutdown`.
pub async fn run(
    opts: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(opts.dir.join(META)).map_err(|source| AgentError::Dir {
        path: opts.dir.clone(),
        source,
    })?;
    let mut client_opts = opts.client.clone();
    if client_opts.state_dir.is_none() {
        client_opts.state_dir = Some(opts.dir.join(META).join("state"));
    }
    let mut client = Client::start(client_opts)?;
    // Applied files per topic; starts from the last good config kept in the state directory.
    let mut topics: BTreeMap<String, Files> = client
        .last_good()
        .into_iter()
        .map(|(t, (_, f))| (t, f))
        .collect();
    if current_generation(&opts.dir).is_none() && !topics.is_empty() {
        let dir = opts.dir.clone();
        let all = union(&topics);
        match tokio::task::spawn_blocking(move || materialize(&dir, &all)).await {
            Ok(Ok(_)) => tracing::info!("started on the last good config from the state directory"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not restore the last good config"),
            Err(e) => tracing::warn!(error = %e, "restore task failed"),
        }
    }
    tokio::pin!(shutdown);
    loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            d = client.next() => d,
        };
        let Some(delivery) = delivery else {
            return Ok(());
        };
        match delivery {
            Delivery::Connected { url } => tracing::info!(%url, "connected"),
            Delivery::Disconnected { reason } => {
                tracing::warn!(%reason, "disconnected; reconnecting")
            }
            Delivery::Command {
                id,
                name,
                args,
                deadline_ms,
            } => {
                let (status, message) = run_command(&opts, &id, &name, &args, deadline_ms).await;
                client.ack_command(&id, status, message);
            }
            Delivery::Update(update) => {
                let span =
                    tracing::info_span!("apply", topic = %update.topic, version = update.version);
                let _enter = span.enter();
                let previous = topics.insert(update.topic.clone(), update.files.clone());
                if previous.as_ref() == Some(&update.files)
                    && current_generation(&opts.dir).is_some()
                {
                    // The same files as in place (a change that only moves the version, such as
                    // the end of a rollout this instance was outside of): nothing to write,
                    // check or reload.
                    tracing::info!(commit = %update.commit, "files unchanged; applied without a reload");
                    client.ack(&update.topic, update.version, AckStatus::Applied, None)?;
                    continue;
                }
                let result = apply(&opts, &topics, &update).await;
                match &result {
                    Ok(written) => tracing::info!(
                        commit = %update.commit,
                        files = update.files.len(),
                        write_ms = written.write.as_millis(),
                        sync_ms = written.sync.as_millis(),
                        "applied"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "not applied");
                        if opts.rollback_on_failure
                            || matches!(
                                e,
                                ApplyError::UnsafePath { .. }
                                    | ApplyError::Foreign(_)
                                    | ApplyError::Io(_)
                                    | ApplyError::Check { .. }
                            )
                        {
                            // The files on disk are the previous ones again: so is our view.
                            match previous {
                                Some(p) => topics.insert(update.topic.clone(), p),
                                None => topics.remove(&update.topic),
                            };
                        }
                    }
                }
                let (status, error) = match &result {
                    Ok(_) => (AckStatus::Applied, None),
                    Err(e) => (AckStatus::Failed, Some(e.to_string())),
                };
                client.ack(&update.topic, update.version, status, error)?;
                if result.is_ok() {
                    // Older generations go after the ack, not before it: removing one of many
                    // files takes seconds, and the version is already in place.
                    let dir = opts.dir.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || prune(&dir)).await {
                        tracing::warn!(error = %e, "pruning old generations failed");
                    }
                }
            }
        }
    }
}

/// Runs the shell command mapped to `name` with the command's id, name, args and deadline in its
/// environment; `Done` on exit 0, otherwise `Failed` with the exit status and the stderr tail.
pub async fn run_command(
    opts: &AgentOptions,
    id: &str,
    name: &str,
    args: &serde_json::Value,
    deadline_ms: Option<i64>,
) -> (CommandStatus, Option<String>) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("command", command = %id, %name);
    run_mapped(opts, id, name, args, deadline_ms)
        .instrument(span)
        .await
}

async fn run_mapped(
    opts: &AgentOptions,
    id: &str,
    name: &str,
    args: &serde_json::Value,
    deadline_ms: Option<i64>,
) -> (CommandStatus, Option<String>) {
    let Some(shell) = opts.commands.get(name) else {
        tracing::warn!("no command configured under this name; acked failed");
        return (
            CommandStatus::Failed,
            Some(format!(
                "no command configured for `{name}` in the agent's [commands]"
            )),
        );
    };
    let env = [
        ("CONFCAST_COMMAND_ID", id.to_string()),
        ("CONFCAST_COMMAND_NAME", name.to_string()),
        ("CONFCAST_COMMAND_ARGS", args.to_string()),
        (
            "CONFCAST_COMMAND_DEADLINE_MS",
            deadline_ms.map(|d| d.to_string()).unwrap_or_default(),
        ),
        ("CONFCAST_DIR", opts.dir.display().to_string()),
    ];
    match reload(shell, opts.exec_timeout, &env).await {
        Ok(()) => {
            tracing::info!("command done");
            (CommandStatus::Done, None)
        }
        Err(ApplyError::Reload {
            status,
            stderr_tail,
        }) => {
            tracing::warn!(%status, "command failed");
            let message = if stderr_tail.is_empty() {
                format!("command failed ({status})")
            } else {
                format!("command failed ({status}): {stderr_tail}")
            };
            (CommandStatus::Failed, Some(message))
        }
        Err(e) => (CommandStatus::Failed, Some(e.to_string())),
    }
}

fn union(topics: &BTreeMap<String, Files>) -> Files {
    topics
        .values()
        .flat_map(|f| f.iter().map(|(p, c)| (p.clone(), c.clone())))
        .collect()
}

async fn apply(
    opts: &AgentOptions,
    topics: &BTreeMap<String, Files>,
    update: &crate::client::Update,
) -> Result<Written, ApplyError> {
    let dir = opts.dir.clone();
    let all = union(topics);
    let prepared = tokio::task::spawn_blocking(move || prepare(&dir, &all))
        .await
        .map_err(|e| ApplyError::Io(e.to_string()))??;
    let about = [
        ("CONFCAST_TOPIC", update.topic.clone()),
        ("CONFCAST_VERSION", update.version.to_string()),
        ("CONFCAST_COMMIT", update.commit.clone()),
    ];
    if let Some(command) = &opts.check {
        let mut env = about.to_vec();
        env.push(("CONFCAST_DIR", prepared.path.display().to_string()));
        env.push(("CONFCAST_LIVE_DIR", opts.dir.display().to_string()));
        if let Err(e) = check(command, opts.exec_timeout, &env).await {
            prepared.discard();
            return Err(e);
        }
    }
    let dir = opts.dir.clone();
    let written = tokio::task::spawn_blocking(move || prepared.swap_in(&dir))
        .await
        .map_err(|e| ApplyError::Io(e.to_string()))??;
    let Some(command) = &opts.exec else {
        return Ok(written);
    };
    let mut env = about.to_vec();
    env.push(("CONFCAST_DIR", opts.dir.display().to_string()));
    match reload(command, opts.exec_timeout, &env).await {
        Ok(()) => Ok(written),
        Err(e) => {
            if opts.rollback_on_failure {
                if let Some(prev) = written.previous {
                    rollback(&opts.dir, &prev)?;
                }
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Files {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn a_flood_of_output_is_held_as_its_tail_only() {
        let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let kept = read_tail(Some(&big[..]), 1000).await;
        assert_eq!(kept, &big[big.len() - 1000..]);
        assert_eq!(read_tail(None::<&[u8]>, 1000).await, b"");
        let text = format!("{}é\n", "x".repeat(5000));
        let tail = tail_text(text.as_bytes());
        assert_eq!(
            tail.chars().count(),
            OUTPUT_TAIL_CHARS - 1,
            "trimmed newline"
        );
        assert!(tail.ends_with('é'));
        // A cut through a multi-byte character decodes lossily instead of failing.
        assert_eq!(tail_text(&"é".as_bytes()[1..]), "\u{fffd}");
    }

    #[tokio::test]
    async fn a_check_reports_stdout_then_stderr_and_its_status() {
        let err = check(
            "echo out; echo err >&2; exit 4",
            Duration::from_secs(5),
            &[],
        )
        .await
        .expect_err("fails");
        assert_eq!(
            err.to_string(),
            "check command failed (exit status: 4), the files were not swapped in: out\nerr"
        );
        assert!(check("true", Duration::from_secs(5), &[]).await.is_ok());
        let slow = check("sleep 5", Duration::from_millis(100), &[])
            .await
            .expect_err("times out");
        assert!(slow.to_string().contains("timed out"), "{slow}");
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "./a",
            "",
            "a\\..\\b",
            ".confcast/state/x",
            "a/\0b",
            "a/./b",
            "a//b",
            "payments/.git/config",
            "payments/.GIT/hooks/post-checkout",
            ".git",
            "payments/a\\b",
            "payments/a\u{1b}[2Jb",
            "payments/a\u{9b}b",
            "payments/\u{202e}lmx.toml",
        ] {
            assert!(safe_path(bad).is_err(), "{bad:?} must be refused");
        }
        let err = safe_path("payments/.git/config").expect_err("git metadata");
        assert_eq!(
            err.to_string(),
            "refused path \"payments/.git/config\": it has a `.git` component (git metadata); \
             only plain relative paths inside the directory are written (nothing of this version was)"
        );
        assert_eq!(
            safe_path("payments/app.toml").expect("plain path"),
            PathBuf::from("payments/app.toml")
        );
    }

    #[test]
    fn generations_swap_atomically_and_roll_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert_eq!(
            materialize(
                d,
                &files(&[("payments/app.toml", "v1"), ("web/a.json", "{}")])
            )
            .expect("v1")
            .previous,
            None
        );
        assert_eq!(
            std::fs::read_to_string(d.join("payments/app.toml")).expect("read"),
            "v1"
        );
        let prev = materialize(d, &files(&[("payments/app.toml", "v2")]))
            .expect("v2")
            .previous;
        assert_eq!(
            std::fs::read_to_string(d.join("payments/app.toml")).expect("read"),
            "v2"
        );
        assert!(
            !d.join("web").exists(),
            "a topic's files that are gone disappear"
        );
        rollback(d, &prev.expect("had a previous generation")).expect("rollback");
        assert_eq!(
            std::fs::read_to_string(d.join("payments/app.toml")).expect("read"),
            "v1"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("web/a.json")).expect("read"),
            "{}"
        );
        prune(d);
        let gens = std::fs::read_dir(d.join(META))
            .expect("meta")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
            .count();
        assert_eq!(gens, 1);
    }

    /// A reader following `current` while new generations are swapped in finds every file of the
    /// generation it points at, all of one version: the swap comes after the last file.
    #[test]
    fn current_only_ever_points_at_a_complete_generation() {
        use std::sync::atomic::{AtomicBool, Ordering};
        const FILES: usize = 100;
        let path = |n: usize| format!("payments/d{}/f{n}.toml", n % 7);
        let version = |v: usize| -> Files {
            (0..FILES)
                .map(|n| (path(n), format!("v = {v}\n").into_bytes()))
                .collect()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        materialize(&d, &version(0)).expect("v0");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let reader = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || loop {
                let generation = std::fs::read_link(d.join(META).join("current")).expect("current");
                let root = d.join(META).join(&generation);
                let versions: std::collections::BTreeSet<String> = (0..FILES)
                    .map(|n| {
                        std::fs::read_to_string(root.join(path(n))).unwrap_or_else(|e| {
                            panic!("{generation:?} is current without {}: {e}", path(n))
                        })
                    })
                    .collect();
                assert_eq!(versions.len(), 1, "{generation:?} mixes {versions:?}");
                std::thread::sleep(Duration::from_millis(1));
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            })
        };
        for v in 1..=10 {
            materialize(&d, &version(v)).expect("new version");
        }
        stop.store(true, Ordering::Relaxed);
        reader
            .join()
            .expect("the reader only saw complete generations");
        assert_eq!(
            std::fs::read_to_string(d.join(path(FILES - 1))).expect("read"),
            "v = 10\n"
        );
    }

    #[test]
    fn a_bad_path_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = materialize(dir.path(), &files(&[("ok/a", "1"), ("../escape", "x")]))
            .expect_err("refused");
        assert!(
            matches!(&err, ApplyError::UnsafePath { path, .. } if path == "../escape"),
            "{err:?}"
        );
        assert!(!dir.path().join("ok").exists());
        assert!(!dir.path().parent().expect("parent").join("escape").exists());
    }

    #[test]
    fn git_metadata_from_the_server_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in [
            "payments/.git/config",
            "payments/.Git/hooks/x",
            "payments/a\\b",
        ] {
            let err = materialize(
                dir.path(),
                &files(&[("payments/app.toml", "port = 1\n"), (bad, "x")]),
            )
            .expect_err("refused");
            assert!(
                matches!(&err, ApplyError::UnsafePath { path, .. } if path == bad),
                "{err:?}"
            );
        }
        let written: Vec<_> = std::fs::read_dir(dir.path().join(META))
            .expect("meta")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(written.is_empty(), "no generation was started: {written:?}");
        assert!(!dir.path().join("payments").exists());
    }

    #[test]
    fn foreign_entries_are_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        symlink(outside.path(), &dir.path().join("payments")).expect("plant symlink");
        let err =
            materialize(dir.path(), &files(&[("payments/app.toml", "x")])).expect_err("refused");
        assert!(matches!(err, ApplyError::Foreign(_)), "{err:?}");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("outside").count(),
            0,
            "nothing written outside"
        );
    }
}
