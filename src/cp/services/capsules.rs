//! Capsules (sandboxes) for a team: create through the scheduler and the host agent, list, get,
//! destroy, ping. What runs inside a running capsule (exec, processes, files, PTYs) is in
//! [`guest`]. Every function is scoped to the caller's team: another team's capsule is simply
//! not found.

pub mod guest;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::agent::wire::{CreateSandbox, SandboxInfo};
use crate::cp::agent_client::{AgentError, AgentTarget};
use crate::cp::scheduler::{self, Demand, Placement, ScheduleError};
use crate::cp::state::AppState;
use crate::db::hosts::{self, Host, HostStatus};
use crate::db::sandboxes::{self, SandboxRow, SandboxStatus};
use crate::db::templates::{self, TemplateType};
use crate::db::DbError;
use crate::error_code::ErrorCode;
use crate::id::{HostId, SandboxId, TeamId};
use crate::template::{TemplateName, TemplateNameError};

/// Every sandbox gets this much disk; the public API does not expose it.
pub const DISK_MB: u32 = 5120;
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=32;
pub const MEMORY_MB_RANGE: std::ops::RangeInclusive<u32> = 128..=65536;
/// A week: longer idle timeouts are almost certainly mistakes.
pub const MAX_TIMEOUT_SEC: u32 = 7 * 24 * 3600;

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

/// `POST /v1/capsules` body; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCapsuleRequest {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub vcpus: Option<i64>,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub timeout_sec: Option<i64>,
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
    pub fn parse(request: CreateCapsuleRequest) -> Result<Self, CapsuleError> {
        let template = match request.template {
            Some(name) => name
                .parse()
                .map_err(|e: TemplateNameError| CapsuleError::invalid("template", e.to_string()))?,
            None => TemplateName::default_template(),
        };
        Ok(Self {
            template,
            vcpus: in_range("vcpus", request.vcpus, 1, VCPUS_RANGE)?,
            memory_mb: in_range("memory_mb", request.memory_mb, 512, MEMORY_MB_RANGE)?,
            timeout_sec: in_range("timeout_sec", request.timeout_sec, 0, 0..=MAX_TIMEOUT_SEC)?,
        })
    }
}

/// The public Capsule representation; empty optional fields are omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capsule {
    pub id: SandboxId,
    /// A `sandboxes.status` value (`running`, `stopped`, `error`, ...).
    pub status: String,
    pub template: String,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub timeout_sec: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<DateTime<Utc>>,
    pub last_updated: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
}

/// The key under which the guest address is kept in `sandboxes.metadata`.
const GUEST_IP_KEY: &str = "guest_ip";

impl From<SandboxRow> for Capsule {
    fn from(row: SandboxRow) -> Self {
        let mut metadata: BTreeMap<String, Value> = match row.metadata {
            Value::Object(map) => map.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let guest_ip = match metadata.remove(GUEST_IP_KEY) {
            Some(Value::String(ip)) => Some(ip),
            _ => None,
        };
        let host_ip = row.host_address.as_deref().map(|address| {
            address
                .rsplit_once(':')
                .map_or(address, |(host, _)| host)
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned()
        });
        Self {
            id: SandboxId(row.id),
            status: row.status.as_str().to_owned(),
            template: row.template,
            vcpus: row.vcpus,
            memory_mb: row.memory_mb,
            timeout_sec: row.timeout_sec,
            guest_ip,
            host_ip,
            created_at: row.created_at,
            started_at: row.started_at,
            last_active_at: row.last_active_at,
            last_updated: row.last_updated,
            metadata,
        }
    }
}

/// How to reach `host`'s agent: its registered address (or `cp.host_agent_addr`) and the
/// secret derived for its current generation.
pub fn agent_target(state: &AppState, host: &Host) -> Option<AgentTarget> {
    let address = state
        .capsules
        .agent_addr_override
        .clone()
        .or_else(|| host.address.clone())?;
    Some(AgentTarget {
        host: HostId(host.id),
        address,
        secret: state
            .tokens
            .agent_secret(host.id, host.agent_secret_generation),
    })
}

async fn online_target(
    state: &AppState,
    host_id: Option<Uuid>,
) -> Result<AgentTarget, CapsuleError> {
    let host_id = host_id.ok_or(CapsuleError::HostUnavailable(HostId(Uuid::nil())))?;
    let host = hosts::by_id(&state.db, host_id)
        .await?
        .ok_or(CapsuleError::HostUnavailable(HostId(host_id)))?;
    if host.status != HostStatus::Online {
        return Err(CapsuleError::HostUnavailable(HostId(host_id)));
    }
    agent_target(state, &host).ok_or(CapsuleError::HostUnavailable(HostId(host_id)))
}

async fn find(state: &AppState, team: TeamId, id: SandboxId) -> Result<SandboxRow, CapsuleError> {
    sandboxes::for_team(&state.db, team.uuid(), id.uuid())
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
    pub capsule: Capsule,
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
    let Some(target) = agent_target(state, &host) else {
        sandboxes::set_status(&state.db, id.uuid(), SandboxStatus::Failed).await?;
        return Err(CapsuleError::HostUnavailable(HostId(host.id)));
    };
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
            sandboxes::mark_started(&state.db, id.uuid(), &guest_metadata(&info)).await?;
            Ok(Created {
                capsule: find(state, team, id).await?.into(),
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
                if let Err(cleanup) = state.capsules.agents.destroy_sandbox(&target, id).await {
                    tracing::warn!(sandbox = %id, %cleanup, "could not remove a half-created sandbox; the reconciler will");
                }
            }
            sandboxes::set_status(&state.db, id.uuid(), SandboxStatus::Failed).await?;
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

pub async fn list(state: &AppState, team: TeamId) -> Result<Vec<Capsule>, CapsuleError> {
    Ok(sandboxes::list_live_for_team(&state.db, team.uuid())
        .await?
        .into_iter()
        .map(Capsule::from)
        .collect())
}

pub async fn get(state: &AppState, team: TeamId, id: SandboxId) -> Result<Capsule, CapsuleError> {
    Ok(find(state, team, id).await?.into())
}

/// Destroys the capsule. Already stopped or failed capsules are gone: a no-op. One whose host is
/// unreachable is recorded stopped now; the reconciler removes it from the host when it returns.
pub async fn destroy(state: &AppState, team: TeamId, id: SandboxId) -> Result<(), CapsuleError> {
    let row = find(state, team, id).await?;
    match row.status {
        SandboxStatus::Stopped | SandboxStatus::Failed => return Ok(()),
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Resuming
        | SandboxStatus::Stopping => return Err(CapsuleError::Busy(row.status)),
        SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Missing => {}
    }
    match online_target(state, row.host_id).await {
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
    sandboxes::set_status(&state.db, id.uuid(), SandboxStatus::Stopped).await?;
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
    let row = find(state, team, id).await?;
    match row.status {
        SandboxStatus::Running => {}
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Paused
        | SandboxStatus::Resuming
        | SandboxStatus::Stopping
        | SandboxStatus::Stopped
        | SandboxStatus::Failed
        | SandboxStatus::Missing => return Err(CapsuleError::NotRunning(row.status)),
    }
    let target = online_target(state, row.host_id).await?;
    Ok(RunningCapsule { id, target })
}

/// Resets the capsule's idle timer on its agent.
pub async fn ping(state: &AppState, team: TeamId, id: SandboxId) -> Result<(), CapsuleError> {
    let capsule = running(state, team, id).await?;
    state
        .capsules
        .agents
        .ping_sandbox(&capsule.target, id)
        .await?;
    sandboxes::touch(&state.db, id.uuid()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_and_ranges() {
        let new = NewCapsule::parse(CreateCapsuleRequest::default()).unwrap();
        assert_eq!(
            new,
            NewCapsule {
                template: TemplateName::default_template(),
                vcpus: 1,
                memory_mb: 512,
                timeout_sec: 0
            }
        );
        for bad in [
            CreateCapsuleRequest {
                vcpus: Some(0),
                ..Default::default()
            },
            CreateCapsuleRequest {
                vcpus: Some(-1),
                ..Default::default()
            },
            CreateCapsuleRequest {
                memory_mb: Some(64),
                ..Default::default()
            },
            CreateCapsuleRequest {
                timeout_sec: Some(-5),
                ..Default::default()
            },
            CreateCapsuleRequest {
                template: Some("../etc".into()),
                ..Default::default()
            },
            CreateCapsuleRequest {
                template: Some(String::new()),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(
                    NewCapsule::parse(bad.clone()),
                    Err(CapsuleError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
