//! Capsules (sandboxes) for a team: create through the scheduler and the host agent, list, get,
//! destroy, ping, and the translation of the public exec/process/file calls to envd's API behind
//! the agent. Every function is scoped to the caller's team: another team's capsule is simply
//! not found.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use futures::Stream;
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::agent::wire::{CreateSandbox, SandboxInfo};
use crate::cp::agent_client::{AgentError, AgentTarget};
use crate::cp::scheduler::{self, Demand, Placement, ScheduleError};
use crate::cp::state::AppState;
use crate::db::hosts::{Host, HostStatus};
use crate::db::sandboxes::{self, SandboxRoute, SandboxRow, SandboxStatus, Transition};
use crate::db::templates::{self, TemplateType};
use crate::db::DbError;
use crate::envd::api as envd;
use crate::error_code::ErrorCode;
use crate::id::{HostId, SandboxId, TeamId};
use crate::template::{TemplateName, TemplateNameError};

/// Every sandbox gets this much disk; the public API does not expose it.
pub const DISK_MB: u32 = 5120;
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=32;
pub const MEMORY_MB_RANGE: std::ops::RangeInclusive<u32> = 128..=65536;
/// A week: longer idle timeouts are almost certainly mistakes.
pub const MAX_TIMEOUT_SEC: u32 = 7 * 24 * 3600;
/// Foreground commands may run at most a day.
pub const MAX_EXEC_TIMEOUT_SEC: u64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum CapsuleError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("capsule not found")]
    NotFound,
    #[error("template `{0}` not found")]
    TemplateNotFound(String),
    #[error("capsule is {0}; this operation needs it running")]
    NotRunning(SandboxStatus),
    #[error("capsule is {0}; try again once it has settled")]
    Busy(SandboxStatus),
    /// The create's row was moved on while the agent booted it (its team or host was deleted,
    /// or the reconciler gave it up); the sandbox was removed from the agent again.
    #[error("capsule became {0} while it was being created")]
    Interrupted(SandboxStatus),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("the capsule's host {0} is not online")]
    HostUnavailable(HostId),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl CapsuleError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        CapsuleError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// A checked create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCapsule {
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub timeout_sec: u32,
}

fn in_range(
    field: &'static str,
    value: Option<i64>,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, CapsuleError> {
    let value = value.unwrap_or(i64::from(default));
    u32::try_from(value)
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| {
            CapsuleError::invalid(
                field,
                format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

impl NewCapsule {
    /// Checks what a caller asked for; what they left out gets the defaults.
    pub fn parse(
        template: Option<&str>,
        vcpus: Option<i64>,
        memory_mb: Option<i64>,
        timeout_sec: Option<i64>,
    ) -> Result<Self, CapsuleError> {
        let template = match template {
            Some(name) => name
                .parse()
                .map_err(|e: TemplateNameError| CapsuleError::invalid("template", e.to_string()))?,
            None => TemplateName::default_template(),
        };
        Ok(Self {
            template,
            vcpus: in_range("vcpus", vcpus, 1, VCPUS_RANGE)?,
            memory_mb: in_range("memory_mb", memory_mb, 512, MEMORY_MB_RANGE)?,
            timeout_sec: in_range("timeout_sec", timeout_sec, 0, 0..=MAX_TIMEOUT_SEC)?,
        })
    }
}

/// The key under which the guest address is kept in `sandboxes.metadata`.
pub const GUEST_IP_KEY: &str = "guest_ip";

/// How to reach `host`'s agent: its registered address (or `cp.host_agent_addr`) and the
/// secret derived for its current generation.
pub fn agent_target(state: &AppState, host: &Host) -> Option<AgentTarget> {
    target(
        state,
        host.id,
        host.address.as_deref(),
        host.agent_secret_generation,
    )
}

fn target(
    state: &AppState,
    host: Uuid,
    address: Option<&str>,
    generation: i32,
) -> Option<AgentTarget> {
    let address = state
        .capsules
        .agent_addr_override
        .as_deref()
        .or(address)?
        .to_owned();
    Some(AgentTarget {
        host: HostId(host),
        address,
        secret: state.agent_secrets.get(&state.tokens, host, generation),
    })
}

/// How to reach the sandbox's agent, if its host is online.
fn online_target(state: &AppState, route: &SandboxRoute) -> Result<AgentTarget, CapsuleError> {
    let host = route
        .host_id
        .ok_or(CapsuleError::HostUnavailable(HostId(Uuid::nil())))?;
    let unavailable = CapsuleError::HostUnavailable(HostId(host));
    match (route.host_status, route.agent_secret_generation) {
        (Some(HostStatus::Online), Some(generation)) => {
            target(state, host, route.host_address.as_deref(), generation).ok_or(unavailable)
        }
        (Some(HostStatus::Pending | HostStatus::Unreachable) | None, _) | (_, None) => {
            Err(unavailable)
        }
    }
}

async fn find(state: &AppState, team: TeamId, id: SandboxId) -> Result<SandboxRow, CapsuleError> {
    sandboxes::for_team(&state.db, team.uuid(), id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)
}

async fn route(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<SandboxRoute, CapsuleError> {
    sandboxes::route_for_team(&state.db, team.uuid(), id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)
}

fn guest_metadata(info: &SandboxInfo) -> Value {
    let mut metadata: serde_json::Map<String, Value> = info
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Some(ip) = &info.guest_addr {
        metadata.insert(GUEST_IP_KEY.to_owned(), Value::String(ip.clone()));
    }
    Value::Object(metadata)
}

/// A created capsule and how long its agent took to boot it (the rest of the request's time is
/// the control plane's).
pub struct Created {
    pub sandbox: SandboxRow,
    pub agent_time: Duration,
}

/// Places the capsule, asks the agent to boot it, and returns it `running`. A failed create
/// leaves the row `error` (never `running`) and, as far as the control plane can tell, nothing
/// on the host: the agent rolls back its own failures, and when the outcome is unknown (the agent
/// vanished or timed out) the control plane destroys the sandbox there too, leaving any
/// remainder to the reconciler.
pub async fn create(
    state: &AppState,
    team: TeamId,
    new: NewCapsule,
) -> Result<Created, CapsuleError> {
    let template = templates::visible_by_name(&state.db, team.uuid(), new.template.as_str())
        .await?
        .ok_or_else(|| CapsuleError::TemplateNotFound(new.template.to_string()))?;
    // A snapshot resumes with the size it was taken at.
    let (vcpus, memory_mb) = match template.template_type {
        TemplateType::Snapshot => (
            u32::try_from(template.vcpus).unwrap_or(1),
            u32::try_from(template.memory_mb).unwrap_or(512),
        ),
        TemplateType::Base => (new.vcpus, new.memory_mb),
    };
    let id = SandboxId::new_random();
    let host = scheduler::place(
        &state.db,
        &state.capsules.scheduler,
        &Placement {
            sandbox_id: id.uuid(),
            team_id: team.uuid(),
            template_id: template.id,
            timeout_sec: i32::try_from(new.timeout_sec).unwrap_or(i32::MAX),
            demand: Demand {
                vcpus: i64::from(vcpus),
                memory_mb: i64::from(memory_mb),
                disk_mb: i64::from(DISK_MB),
            },
        },
    )
    .await?;
    let failed = Transition::to(SandboxStatus::Failed);
    let Some(target) = agent_target(state, &host) else {
        sandboxes::transition(&state.db, id.uuid(), failed).await?;
        return Err(CapsuleError::HostUnavailable(HostId(host.id)));
    };
    if !sandboxes::transition(
        &state.db,
        id.uuid(),
        Transition::to(SandboxStatus::Starting).from(SandboxStatus::Pending),
    )
    .await?
    {
        return Err(interrupted(state, id).await);
    }
    let request = CreateSandbox {
        sandbox_id: id,
        template: new.template.clone(),
        vcpus,
        memory_mb,
        disk_mb: DISK_MB,
        timeout_sec: new.timeout_sec,
        envs: BTreeMap::new(),
        user: None,
    };
    let asked = std::time::Instant::now();
    let answer = state
        .capsules
        .agents
        .create_sandbox(&target, &request)
        .await;
    let agent_time = asked.elapsed();
    match answer {
        Ok(info) => {
            if !sandboxes::mark_started(&state.db, id.uuid(), &guest_metadata(&info)).await? {
                remove_half_created(state, &target, id).await;
                return Err(interrupted(state, id).await);
            }
            Ok(Created {
                sandbox: find(state, team, id).await?,
                agent_time,
            })
        }
        Err(error) => {
            let outcome_unknown = matches!(
                error,
                AgentError::Unreachable { .. }
                    | AgentError::Timeout { .. }
                    | AgentError::Decode { .. }
            );
            if outcome_unknown {
                remove_half_created(state, &target, id).await;
            }
            sandboxes::transition(&state.db, id.uuid(), failed.from(SandboxStatus::Starting))
                .await?;
            tracing::warn!(sandbox = %id, host = %target.host, %error, "sandbox creation failed");
            match error {
                AgentError::Rejected {
                    code: ErrorCode::TemplateNotFound,
                    ..
                } => Err(CapsuleError::TemplateNotFound(template.name)),
                AgentError::Rejected {
                    status, message, ..
                } => Err(CapsuleError::Agent(AgentError::Failed {
                    host: target.host,
                    status,
                    message,
                })),
                other => Err(other.into()),
            }
        }
    }
}

/// Destroys what a create may have left on the agent; what remains is the reconciler's.
async fn remove_half_created(state: &AppState, target: &AgentTarget, id: SandboxId) {
    if let Err(cleanup) = state.capsules.agents.destroy_sandbox(target, id).await {
        tracing::warn!(sandbox = %id, %cleanup, "could not remove a half-created sandbox; the reconciler will");
    }
}

/// Why a create's transition was refused: what the row became meanwhile.
async fn interrupted(state: &AppState, id: SandboxId) -> CapsuleError {
    match sandboxes::status_of(&state.db, id.uuid()).await {
        Ok(Some(status)) => {
            tracing::warn!(sandbox = %id, %status, "sandbox changed while it was being created");
            CapsuleError::Interrupted(status)
        }
        Ok(None) => CapsuleError::NotFound,
        Err(error) => error.into(),
    }
}

/// The team's capsules that are not stopped or failed.
pub async fn list(state: &AppState, team: TeamId) -> Result<Vec<SandboxRow>, CapsuleError> {
    Ok(sandboxes::list_live_for_team(&state.db, team.uuid()).await?)
}

pub async fn get(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<SandboxRow, CapsuleError> {
    find(state, team, id).await
}

/// Destroys the capsule: `stopping` while the agent removes it, then `stopped`. Already stopped
/// or failed capsules are gone: a no-op. One whose host is away is recorded stopped now; the
/// reconciler removes it from the host when it returns. If the agent fails, the capsule stays
/// `stopping` and the reconciler finishes the destroy.
pub async fn destroy(state: &AppState, team: TeamId, id: SandboxId) -> Result<(), CapsuleError> {
    let route = route(state, team, id).await?;
    match route.status {
        SandboxStatus::Stopped | SandboxStatus::Failed => return Ok(()),
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Resuming
        | SandboxStatus::Snapshotting
        | SandboxStatus::Stopping => return Err(CapsuleError::Busy(route.status)),
        SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Missing => {}
    }
    let stopping = Transition::to(SandboxStatus::Stopping).from(route.status);
    if !sandboxes::transition(&state.db, id.uuid(), stopping).await? {
        return match sandboxes::status_of(&state.db, id.uuid()).await? {
            Some(SandboxStatus::Stopped | SandboxStatus::Failed) => Ok(()),
            Some(other) => Err(CapsuleError::Busy(other)),
            None => Err(CapsuleError::NotFound),
        };
    }
    match online_target(state, &route) {
        Ok(target) => match state.capsules.agents.destroy_sandbox(&target, id).await {
            Ok(()) => {}
            Err(AgentError::Rejected { status, .. }) if status == http::StatusCode::NOT_FOUND => {}
            Err(AgentError::Rejected {
                code: ErrorCode::InvalidState,
                ..
            }) => {
                return Err(CapsuleError::Busy(SandboxStatus::Stopping));
            }
            Err(error) => return Err(error.into()),
        },
        Err(CapsuleError::HostUnavailable(host)) => {
            tracing::info!(sandbox = %id, %host, "destroying a capsule whose host is away; it is removed there on return");
        }
        Err(other) => return Err(other),
    }
    // Refused only if the reconciler saw it gone first and recorded it stopped.
    sandboxes::transition(
        &state.db,
        id.uuid(),
        Transition::to(SandboxStatus::Stopped).from(SandboxStatus::Stopping),
    )
    .await?;
    Ok(())
}

/// A running capsule of the team and how to reach its envd.
#[derive(Debug, Clone)]
pub struct RunningCapsule {
    pub id: SandboxId,
    pub target: AgentTarget,
}

/// The capsule, if it is running and its host online: what every exec, process, file and PTY
/// call needs first.
pub async fn running(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<RunningCapsule, CapsuleError> {
    reach(state, id, route(state, team, id).await?)
}

/// The capsule as `route` found it, if it is running and its host online.
pub fn reach(
    state: &AppState,
    id: SandboxId,
    route: SandboxRoute,
) -> Result<RunningCapsule, CapsuleError> {
    match route.status {
        SandboxStatus::Running => {}
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Paused
        | SandboxStatus::Resuming
        | SandboxStatus::Snapshotting
        | SandboxStatus::Stopping
        | SandboxStatus::Stopped
        | SandboxStatus::Failed
        | SandboxStatus::Missing => return Err(CapsuleError::NotRunning(route.status)),
    }
    let target = online_target(state, &route)?;
    Ok(RunningCapsule { id, target })
}

/// Resets the capsule's idle timer on its agent.
pub async fn ping(state: &AppState, capsule: &RunningCapsule) -> Result<(), CapsuleError> {
    state
        .capsules
        .agents
        .ping_sandbox(&capsule.target, capsule.id)
        .await?;
    sandboxes::touch(&state.db, capsule.id.uuid()).await?;
    Ok(())
}

/// `POST /v1/capsules/{id}/exec` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: String,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub timeout_sec: Option<i64>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub cwd: Option<String>,
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

fn process_spec(request: &ExecRequest) -> Result<envd::ProcessSpec, CapsuleError> {
    if request.cmd.trim().is_empty() {
        return Err(CapsuleError::invalid("cmd", "must not be empty"));
    }
    Ok(envd::ProcessSpec {
        cmd: request.cmd.clone(),
        args: request.args.clone().unwrap_or_default(),
        envs: request.envs.clone().unwrap_or_default(),
        cwd: request.cwd.clone().filter(|c| !c.is_empty()),
        user: None,
    })
}

/// Runs a command in the foreground (waiting for its output) or starts it in the background.
/// `cwd` and `envs` apply to both.
pub async fn exec(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    request: ExecRequest,
) -> Result<ExecOutcome, CapsuleError> {
    let spec = process_spec(&request)?;
    let capsule = running(state, team, id).await?;
    let agents = &state.capsules.agents;
    if request.background.unwrap_or(false) {
        let tag = request.tag.clone().filter(|t| !t.is_empty());
        if let Some(tag) = &tag {
            let valid = tag.len() <= 64
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid || tag.chars().all(|c| c.is_ascii_digit()) {
                return Err(CapsuleError::invalid(
                    "tag",
                    "must be 1-64 characters of A-Z a-z 0-9 - _ . and not only digits",
                ));
            }
        }
        let started: envd::StartResponse = agents
            .envd_json(
                &capsule.target,
                id,
                Method::POST,
                "/processes",
                Some(&envd::StartRequest {
                    process: spec,
                    tag,
                    pty: None,
                }),
                Duration::ZERO,
            )
            .await?;
        return Ok(ExecOutcome::Started(BackgroundExecResponse {
            sandbox_id: id,
            cmd: request.cmd,
            pid: started.pid,
            tag: started.tag,
        }));
    }
    let timeout_sec = match request.timeout_sec {
        None => None,
        Some(t) => Some(
            u64::try_from(t)
                .ok()
                .filter(|t| (1..=MAX_EXEC_TIMEOUT_SEC).contains(t))
                .ok_or_else(|| {
                    CapsuleError::invalid(
                        "timeout_sec",
                        format!("{t} is out of range 1..={MAX_EXEC_TIMEOUT_SEC}"),
                    )
                })?,
        ),
    };
    let run: envd::RunResponse = agents
        .envd_json(
            &capsule.target,
            id,
            Method::POST,
            "/processes/run",
            Some(&envd::RunRequest {
                process: spec,
                timeout_sec,
            }),
            Duration::from_secs(timeout_sec.unwrap_or(30)),
        )
        .await?;
    sandboxes::touch(&state.db, id.uuid()).await?;
    Ok(ExecOutcome::Finished(ExecResponse {
        sandbox_id: id,
        cmd: request.cmd,
        stdout: run.stdout,
        stderr: run.stderr,
        exit_code: run.exit_code,
        duration_ms: run.duration_ms,
        encoding: run.encoding,
    }))
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
    team: TeamId,
    id: SandboxId,
) -> Result<ProcessListResponse, CapsuleError> {
    let capsule = running(state, team, id).await?;
    let list: envd::ProcessList = state
        .capsules
        .agents
        .envd_json(
            &capsule.target,
            id,
            Method::GET,
            "/processes",
            None::<&()>,
            Duration::ZERO,
        )
        .await?;
    Ok(ProcessListResponse {
        processes: list
            .processes
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
    team: TeamId,
    id: SandboxId,
    selector: &str,
    signal: KillSignal,
) -> Result<(), CapsuleError> {
    check_selector(selector)?;
    let capsule = running(state, team, id).await?;
    state
        .capsules
        .agents
        .envd_call(
            &capsule.target,
            id,
            Method::DELETE,
            &format!("/processes/{selector}?signal={}", signal.as_str()),
            None::<&()>,
        )
        .await?;
    Ok(())
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

pub async fn list_dir(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    request: ListDirRequest,
) -> Result<ListDirResponse, CapsuleError> {
    check_path(&request.path)?;
    // The public depth counts 0 and 1 alike as "the directory's children"; envd counts from 1.
    let depth = match request.depth {
        None => 1,
        Some(d @ 0..=64) => u32::try_from(d).unwrap_or(1).max(1),
        Some(d) => {
            return Err(CapsuleError::invalid(
                "depth",
                format!("{d} is out of range 0..=64"),
            ))
        }
    };
    let capsule = running(state, team, id).await?;
    let list: envd::ListResponse = state
        .capsules
        .agents
        .envd_json(
            &capsule.target,
            id,
            Method::POST,
            "/files/list",
            Some(&envd::ListRequest {
                path: request.path,
                depth: Some(depth),
                user: None,
            }),
            Duration::ZERO,
        )
        .await?;
    Ok(ListDirResponse {
        entries: list.entries.into_iter().map(FileEntry::from).collect(),
    })
}

pub async fn mkdir(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    request: PathRequest,
) -> Result<MakeDirResponse, CapsuleError> {
    check_path(&request.path)?;
    let capsule = running(state, team, id).await?;
    let entry: envd::EntryInfo = state
        .capsules
        .agents
        .envd_json(
            &capsule.target,
            id,
            Method::POST,
            "/files/mkdir",
            Some(&envd::PathRequest {
                path: request.path,
                user: None,
            }),
            Duration::ZERO,
        )
        .await?;
    Ok(MakeDirResponse {
        entry: entry.into(),
    })
}

pub async fn remove(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    request: PathRequest,
) -> Result<(), CapsuleError> {
    check_path(&request.path)?;
    let capsule = running(state, team, id).await?;
    state
        .capsules
        .agents
        .envd_call(
            &capsule.target,
            id,
            Method::POST,
            "/files/remove",
            Some(&envd::PathRequest {
                path: request.path,
                user: None,
            }),
        )
        .await?;
    Ok(())
}

fn file_query(path: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("path", path)
        .finish();
    format!("/files?{query}")
}

/// Streams `body` into the guest file at `path`.
pub async fn upload<S>(
    state: &AppState,
    capsule: &RunningCapsule,
    path: &str,
    body: S,
) -> Result<(), CapsuleError>
where
    S: Stream<Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    check_path(path)?;
    state
        .capsules
        .agents
        .envd_upload(&capsule.target, capsule.id, &file_query(path), body)
        .await?;
    Ok(())
}

/// Starts streaming the guest file at `path`; the response body arrives as envd sends it.
pub async fn download(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    path: &str,
) -> Result<http::Response<hyper::body::Incoming>, CapsuleError> {
    check_path(path)?;
    let capsule = running(state, team, id).await?;
    Ok(state
        .capsules
        .agents
        .envd_download(&capsule.target, id, &file_query(path))
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_and_ranges() {
        let new = NewCapsule::parse(None, None, None, None).unwrap();
        assert_eq!(
            new,
            NewCapsule {
                template: TemplateName::default_template(),
                vcpus: 1,
                memory_mb: 512,
                timeout_sec: 0
            }
        );
        for (template, vcpus, memory_mb, timeout_sec) in [
            (None, Some(0), None, None),
            (None, Some(-1), None, None),
            (None, None, Some(64), None),
            (None, None, None, Some(-5)),
            (Some("../etc"), None, None, None),
            (Some(""), None, None, None),
        ] {
            assert!(
                matches!(
                    NewCapsule::parse(template, vcpus, memory_mb, timeout_sec),
                    Err(CapsuleError::Invalid { .. })
                ),
                "{template:?} {vcpus:?} {memory_mb:?} {timeout_sec:?}"
            );
        }
    }

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
    fn selectors_and_paths() {
        assert!(check_selector("42").is_ok());
        assert!(check_selector("proc-1a2b").is_ok());
        assert!(check_selector("a/b").is_err());
        assert!(check_selector("").is_err());
        assert!(check_path("/tmp/x").is_ok());
        assert!(check_path("").is_err());
        assert!(check_path("a\0b").is_err());
        assert_eq!(file_query("/a b&c"), "/files?path=%2Fa+b%26c");
    }
}
