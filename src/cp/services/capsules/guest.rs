//! What runs inside a running capsule: exec, processes, files and process sessions, each a call of
//! envd's typed client (`envd::client`) through the capsule's host agent. The public shapes are
//! translated to envd's here; the command parser is [`command`], the WebSocket protocols
//! [`ws`]. A failed envd call is told in the agent's terms (`AgentError::from_envd`), so envd's
//! refusals keep their status and code and everything else is the agent failing.

pub mod command;
pub mod ws;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::{CapsuleError, RunningCapsule};
use crate::cp::agent_client::AgentError;
use crate::cp::state::AppState;
use crate::db::sandboxes;
use crate::envd::api as envd;
use crate::envd::client::{EnvdClient, EnvdClientError, FileDownload, ProcessSession};
use crate::id::SandboxId;
use command::{CommandRequest, Exec};

/// envd's default for a foreground command that names no timeout.
const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads take as long as the client takes to send; only an agent silent for this long fails.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// envd's client for the capsule, through its host's agent and the control plane's pool.
fn envd(state: &AppState, capsule: &RunningCapsule) -> Result<EnvdClient, CapsuleError> {
    Ok(state.capsules.agents.envd(&capsule.target, capsule.id)?)
}

/// Awaits one envd call for at most `after`.
async fn within<T>(
    capsule: &RunningCapsule,
    after: Duration,
    call: impl Future<Output = Result<T, EnvdClientError>>,
) -> Result<T, CapsuleError> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(AgentError::from_envd(&capsule.target, error).into()),
        Err(_) => Err(AgentError::Timeout {
            host: capsule.target.host,
            after,
        }
        .into()),
    }
}

fn request_timeout(state: &AppState) -> Duration {
    state.capsules.agents.timeouts().request
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResponse {
    pub sandbox_id: SandboxId,
    pub cmd: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub encoding: envd::Encoding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackgroundExecResponse {
    pub sandbox_id: SandboxId,
    pub cmd: String,
    pub pid: u32,
    pub tag: String,
}

pub enum ExecOutcome {
    Finished(ExecResponse),
    Started(BackgroundExecResponse),
}

/// Runs a command in the foreground (waiting for its output) or starts it in the background.
pub async fn exec(
    state: &AppState,
    capsule: &RunningCapsule,
    request: CommandRequest,
) -> Result<ExecOutcome, CapsuleError> {
    let exec = request.exec()?;
    let envd = envd(state, capsule)?;
    match exec {
        Exec::Background(start) => {
            let started = within(capsule, request_timeout(state), envd.start(&start)).await?;
            Ok(ExecOutcome::Started(BackgroundExecResponse {
                sandbox_id: capsule.id,
                cmd: start.process.cmd,
                pid: started.pid,
                tag: started.tag,
            }))
        }
        Exec::Foreground(run) => {
            // The answer comes when the command ends: allow for its own timeout.
            let runs_for = run
                .timeout_sec
                .map_or(DEFAULT_RUN_TIMEOUT, Duration::from_secs);
            let done = within(capsule, request_timeout(state) + runs_for, envd.run(&run)).await?;
            // Activity bookkeeping must not delay the answer the caller is waiting for.
            let db = state.db.clone();
            let id = capsule.id;
            tokio::spawn(async move {
                if let Err(error) = sandboxes::touch(&db, id.uuid()).await {
                    tracing::debug!(sandbox = %id, %error, "could not record activity");
                }
            });
            Ok(ExecOutcome::Finished(ExecResponse {
                sandbox_id: capsule.id,
                cmd: run.process.cmd,
                stdout: done.stdout,
                stderr: done.stderr,
                exit_code: done.exit_code,
                duration_ms: done.duration_ms,
                encoding: done.encoding,
            }))
        }
    }
}

/// Opens a process session (start or re-attach) for a WebSocket stream.
pub async fn attach(
    state: &AppState,
    capsule: &RunningCapsule,
    request: &envd::AttachRequest,
) -> Result<ProcessSession, CapsuleError> {
    let envd = envd(state, capsule)?;
    within(capsule, request_timeout(state), envd.attach(request)).await
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub pid: u32,
    pub tag: String,
    pub cmd: String,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessListResponse {
    pub processes: Vec<ProcessEntry>,
}

pub async fn list_processes(
    state: &AppState,
    capsule: &RunningCapsule,
) -> Result<ProcessListResponse, CapsuleError> {
    let envd = envd(state, capsule)?;
    let processes = within(capsule, request_timeout(state), envd.list()).await?;
    Ok(ProcessListResponse {
        processes: processes
            .into_iter()
            .map(|p| ProcessEntry {
                pid: p.pid,
                tag: p.tag,
                cmd: p.cmd,
                args: p.args,
            })
            .collect(),
    })
}

/// The signals the public API lets a caller send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KillSignal {
    #[serde(rename = "SIGKILL")]
    Kill,
    #[serde(rename = "SIGTERM")]
    Term,
}

impl KillSignal {
    fn as_str(self) -> &'static str {
        match self {
            KillSignal::Kill => "SIGKILL",
            KillSignal::Term => "SIGTERM",
        }
    }
}

/// A process selector: a PID or a tag.
pub fn check_selector(selector: &str) -> Result<(), CapsuleError> {
    let valid = !selector.is_empty()
        && selector.len() <= 64
        && selector
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(CapsuleError::invalid(
            "selector",
            format!("`{selector}` is neither a PID nor a process tag"),
        ))
    }
}

pub async fn kill_process(
    state: &AppState,
    capsule: &RunningCapsule,
    selector: &str,
    signal: KillSignal,
) -> Result<(), CapsuleError> {
    check_selector(selector)?;
    let envd = envd(state, capsule)?;
    within(
        capsule,
        request_timeout(state),
        envd.kill(selector, Some(signal.as_str())),
    )
    .await
}

/// `{path}` bodies of the file calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDirRequest {
    pub path: String,
    #[serde(default)]
    pub depth: Option<i64>,
}

/// The public FileEntry: like envd's, with the modification time in Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: envd::EntryType,
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl From<envd::EntryInfo> for FileEntry {
    fn from(entry: envd::EntryInfo) -> Self {
        let modified_at = DateTime::parse_from_rfc3339(&entry.modified_at)
            .map(|t| t.timestamp())
            .unwrap_or(0);
        Self {
            name: entry.name,
            path: entry.path,
            kind: entry.kind,
            size: entry.size,
            mode: entry.mode,
            permissions: entry.permissions,
            owner: entry.owner,
            group: entry.group,
            modified_at,
            symlink_target: entry.symlink_target,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListDirResponse {
    pub entries: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MakeDirResponse {
    pub entry: FileEntry,
}

/// A guest path: non-empty, no NUL, bounded.
pub fn check_path(path: &str) -> Result<(), CapsuleError> {
    if path.is_empty() {
        return Err(CapsuleError::invalid("path", "must not be empty"));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(CapsuleError::invalid(
            "path",
            "must be at most 4096 bytes without NUL",
        ));
    }
    Ok(())
}

/// The public depth counts 0 and 1 alike as "the directory's children"; envd counts from 1.
fn envd_depth(depth: Option<i64>) -> Result<u32, CapsuleError> {
    match depth {
        None => Ok(1),
        Some(d @ 0..=64) => Ok(u32::try_from(d).unwrap_or(1).max(1)),
        Some(d) => Err(CapsuleError::invalid(
            "depth",
            format!("{d} is out of range 0..=64"),
        )),
    }
}

pub async fn list_dir(
    state: &AppState,
    capsule: &RunningCapsule,
    request: ListDirRequest,
) -> Result<ListDirResponse, CapsuleError> {
    check_path(&request.path)?;
    let depth = envd_depth(request.depth)?;
    let envd = envd(state, capsule)?;
    let list = envd::ListRequest {
        path: request.path,
        depth: Some(depth),
        user: None,
    };
    let entries = within(capsule, request_timeout(state), envd.list_dir(&list)).await?;
    Ok(ListDirResponse {
        entries: entries.into_iter().map(FileEntry::from).collect(),
    })
}

pub async fn mkdir(
    state: &AppState,
    capsule: &RunningCapsule,
    request: PathRequest,
) -> Result<MakeDirResponse, CapsuleError> {
    check_path(&request.path)?;
    let envd = envd(state, capsule)?;
    let entry = within(
        capsule,
        request_timeout(state),
        envd.mkdir(&request.path, None),
    )
    .await?;
    Ok(MakeDirResponse {
        entry: entry.into(),
    })
}

pub async fn remove(
    state: &AppState,
    capsule: &RunningCapsule,
    request: PathRequest,
) -> Result<(), CapsuleError> {
    check_path(&request.path)?;
    let envd = envd(state, capsule)?;
    within(
        capsule,
        request_timeout(state),
        envd.remove(&request.path, None),
    )
    .await
}

/// Streams `body` into the guest file at `path`; nothing is held beyond the chunk in flight.
pub async fn upload<S>(
    state: &AppState,
    capsule: &RunningCapsule,
    path: &str,
    body: S,
) -> Result<(), CapsuleError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    check_path(path)?;
    let envd = envd(state, capsule)?;
    within(capsule, UPLOAD_DEADLINE, envd.write_file(path, None, body))
        .await
        .map(drop)
}

/// Starts streaming the guest file at `path`; its chunks arrive as envd sends them.
pub async fn download(
    state: &AppState,
    capsule: &RunningCapsule,
    path: &str,
) -> Result<FileDownload, CapsuleError> {
    check_path(path)?;
    let envd = envd(state, capsule)?;
    within(capsule, request_timeout(state), envd.read_file(path, None)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_entries_carry_unix_seconds() {
        let entry = envd::EntryInfo {
            name: "a".into(),
            path: "/a".into(),
            kind: envd::EntryType::File,
            size: 3,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "root".into(),
            group: "root".into(),
            modified_at: "2026-01-02T03:04:05Z".into(),
            symlink_target: None,
        };
        assert_eq!(FileEntry::from(entry).modified_at, 1_767_323_045);
    }

    #[test]
    fn selectors_paths_and_depths() {
        assert!(check_selector("42").is_ok());
        assert!(check_selector("proc-1a2b").is_ok());
        assert!(check_selector("a/b").is_err());
        assert!(check_selector("").is_err());
        assert!(check_path("/tmp/x").is_ok());
        assert!(check_path("").is_err());
        assert!(check_path("a\0b").is_err());
        assert_eq!(envd_depth(None).unwrap(), 1);
        assert_eq!(envd_depth(Some(0)).unwrap(), 1);
        assert_eq!(envd_depth(Some(3)).unwrap(), 3);
        assert!(envd_depth(Some(-1)).is_err());
        assert!(envd_depth(Some(65)).is_err());
    }
}
