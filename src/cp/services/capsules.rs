//! Capsules (sandboxes) for a team: create through the scheduler and the host agent, list, get,
//! destroy, ping. What runs inside a running capsule (exec, processes, files, PTYs) is in
//! [`guest`]. Every function is scoped to the caller's team: another team's capsule is simply
//! not found.

pub mod guest;
pub mod network;
mod relocate;

pub use relocate::has_store_copy;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::agent::wire::{
    CreateSandbox, ForkSandbox, MetricsRange, SandboxInfo, SandboxMetrics, SandboxPhase,
    SnapshotTemplate, SnapshotTemplateInfo,
};
use crate::cp::agent_client::{self, AgentError, AgentTarget};
use crate::cp::limits::TeamBusy;
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::pool::Ask;
use crate::cp::scheduler::{self, Demand, Placement, ScheduleError};
use crate::cp::state::AppState;
use crate::db::hosts::{Host, HostStatus};
use crate::db::page::Keyset;
use crate::db::sandboxes::{self, SandboxRoute, SandboxRow, SandboxStatus, Transition};
use crate::db::templates::{self, TemplateType};
use crate::db::{host_templates, template_reservations, DbError};
use crate::egress::EgressPolicy;
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
    /// Its host holds no metrics for it: never sampled, or gone longer than they are kept.
    #[error("no metrics are kept for this capsule")]
    NoMetrics,
    #[error("template `{0}` not found")]
    TemplateNotFound(String),
    #[error("capsule is {0}; this operation needs it running")]
    NotRunning(SandboxStatus),
    #[error("capsule is {0}; only a paused capsule can be resumed")]
    NotPaused(SandboxStatus),
    /// The pause did not happen; the capsule runs on.
    #[error("pausing the capsule failed; it is still running: {message}")]
    PauseFailed { message: String, disk_full: bool },
    /// The resume did not happen; the capsule is still paused.
    #[error("resuming the capsule failed; it is still paused: {message}")]
    ResumeFailed { message: String },
    /// The capsule's VM is gone; it is recorded as failed with this reason.
    #[error("the capsule was lost: {0}")]
    Lost(String),
    #[error("capsule is still {0} after {1:?}; try again")]
    Unsettled(SandboxStatus, Duration),
    #[error("the control plane is shutting down")]
    ShuttingDown,
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
    #[error(transparent)]
    TeamBusy(#[from] TeamBusy),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl CapsuleError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        CapsuleError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// A checked create request; a size left out is the template's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCapsule {
    pub template: TemplateName,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub timeout_sec: u32,
    pub public_ports: network::PublicPorts,
    pub egress: EgressPolicy,
}

fn in_range(
    field: &'static str,
    value: i64,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, CapsuleError> {
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
        public_ports: &[i64],
    ) -> Result<Self, CapsuleError> {
        let template = match template {
            Some(name) => name
                .parse()
                .map_err(|e: TemplateNameError| CapsuleError::invalid("template", e.to_string()))?,
            None => TemplateName::default_template(),
        };
        Ok(Self {
            template,
            vcpus: vcpus
                .map(|v| in_range("vcpus", v, VCPUS_RANGE))
                .transpose()?,
            memory_mb: memory_mb
                .map(|m| in_range("memory_mb", m, MEMORY_MB_RANGE))
                .transpose()?,
            timeout_sec: in_range("timeout_sec", timeout_sec.unwrap_or(0), 0..=MAX_TIMEOUT_SEC)?,
            public_ports: network::PublicPorts::parse(public_ports)?,
            egress: EgressPolicy::default(),
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
        secret: state.agent_secrets.get(host, generation)?,
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
    // A snapshot resumes with the size it was taken at; a base image takes the size asked
    // for, or its template's defaults.
    let template_vcpus = u32::try_from(template.vcpus).unwrap_or(1);
    let template_memory_mb = u32::try_from(template.memory_mb).unwrap_or(512);
    let (vcpus, memory_mb) = match template.template_type {
        TemplateType::Snapshot => (template_vcpus, template_memory_mb),
        TemplateType::Base => (
            new.vcpus.unwrap_or(template_vcpus),
            new.memory_mb.unwrap_or(template_memory_mb),
        ),
    };
    let id = SandboxId::new_random();
    let host = scheduler::place(
        &state.db,
        &state.capsules.scheduler,
        &Placement {
            sandbox_id: id.uuid(),
            team_id: team.uuid(),
            template_id: template.id,
            template_name: template.image_name().to_string(),
            template_sha256: template.image_sha256.clone(),
            // Until a snapshot template is in the store, no other host can get it.
            holders_only: template.template_type == TemplateType::Snapshot
                && template.image_sha256.is_none(),
            timeout_sec: i32::try_from(new.timeout_sec).unwrap_or(i32::MAX),
            public_ports: new.public_ports.to_column(),
            egress: network::egress_column(&new.egress),
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
        template: template.image_name(),
        vcpus,
        memory_mb,
        disk_mb: DISK_MB,
        timeout_sec: new.timeout_sec,
        envs: BTreeMap::new(),
        user: None,
        image: template
            .stored_version()
            .filter(|_| template.template_type == TemplateType::Base),
        snapshot: template
            .stored_version()
            .filter(|_| template.template_type == TemplateType::Snapshot),
        egress: new.egress.clone(),
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
            if let Some(version) = &request.snapshot {
                // The host pulled the template if it lacked it: a delete must find it there
                // before the host's next report.
                let image = template.image_name();
                if let Err(error) = host_templates::add(
                    &state.db,
                    host.id,
                    image.as_str(),
                    template.size_bytes,
                    Some(&version.sha256),
                )
                .await
                {
                    tracing::warn!(template = %image, %error, "could not record the host's copy of the template");
                }
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
pub async fn list(
    state: &AppState,
    team: TeamId,
    page: PageRequest,
) -> Result<Page<SandboxRow>, CapsuleError> {
    let rows =
        sandboxes::page_live_for_team(&state.db, team.uuid(), page.after, page.fetch()).await?;
    Ok(page.page(rows, |s| Keyset::of(s.created_at, s.id)))
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
            relocate::remove_store_copy(state, id).await;
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

/// The capsule, running and its host online: what every exec, process, file and PTY call needs
/// first. A paused capsule is resumed for it (see [`ready`]).
pub async fn running(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<RunningCapsule, CapsuleError> {
    ready(state, id, route(state, team, id).await?).await
}

/// The capsule as `route` found it, if it is running and its host online. Never resumes.
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

/// How long a call waits for a pause or resume in progress before it gives up.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// The capsule as `route` found it, made ready for a call: a paused capsule is resumed
/// (auto-resume), and a pause or resume in progress is waited for, so a caller never needs to
/// know the capsule was idle. Every other status is refused as by [`reach`].
pub async fn ready(
    state: &AppState,
    id: SandboxId,
    mut route: SandboxRoute,
) -> Result<RunningCapsule, CapsuleError> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        match route.status {
            SandboxStatus::Paused => {
                tracing::info!(sandbox = %id, "a call for a paused capsule resumes it");
                // Another call resuming it first, or anything else having moved it on, is
                // no failure of this call: the loop looks at the status again, for a while.
                match resume(state, id, route.clone()).await {
                    Ok(()) => {}
                    Err(CapsuleError::NotPaused(_) | CapsuleError::Busy(_))
                        if tokio::time::Instant::now() <= deadline =>
                    {
                        tokio::time::sleep(SETTLE_POLL).await;
                    }
                    Err(error) => return Err(error),
                }
            }
            SandboxStatus::Pausing | SandboxStatus::Resuming => {
                if tokio::time::Instant::now() > deadline {
                    return Err(CapsuleError::Unsettled(route.status, SETTLE_WAIT));
                }
                tokio::time::sleep(SETTLE_POLL).await;
            }
            SandboxStatus::Missing if relocate::has_store_copy(state, id).await => {
                tracing::info!(sandbox = %id, "a call for a capsule whose host is gone resumes it elsewhere");
                match resume(state, id, route.clone()).await {
                    Ok(()) => {}
                    // Another call is moving it: wait for that, as for a resume in progress.
                    Err(CapsuleError::Busy(_)) if tokio::time::Instant::now() <= deadline => {
                        tokio::time::sleep(SETTLE_POLL).await;
                    }
                    Err(error) => return Err(error),
                }
            }
            SandboxStatus::Running
            | SandboxStatus::Pending
            | SandboxStatus::Starting
            | SandboxStatus::Snapshotting
            | SandboxStatus::Stopping
            | SandboxStatus::Stopped
            | SandboxStatus::Failed
            | SandboxStatus::Missing => return reach(state, id, route),
        }
        // All of it: a resume may have moved the capsule to another host.
        route = sandboxes::route_of(&state.db, id.uuid())
            .await?
            .ok_or(CapsuleError::NotFound)?;
    }
}

/// Runs an operation on a capsule's host in its own task: a caller that goes away (an HTTP
/// client that gave up) never leaves the capsule's row half way.
async fn to_the_end<Op, Fut>(state: &AppState, operation: Op) -> Result<(), CapsuleError>
where
    Op: FnOnce(AppState) -> Fut,
    Fut: std::future::Future<Output = Result<(), CapsuleError>> + Send + 'static,
{
    match tokio::spawn(operation(state.clone())).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(CapsuleError::ShuttingDown),
    }
}

/// Pauses a running capsule: `pausing` while the agent writes it to disk, then `paused`.
/// Pausing a capsule that is not running is refused (409, as the reference API says): one
/// already paused is `NotRunning(paused)`, one in another operation is `Busy`.
pub async fn pause(
    state: &AppState,
    id: SandboxId,
    route: SandboxRoute,
) -> Result<(), CapsuleError> {
    to_the_end(state, move |state| async move {
        operate(&state, id, route, Operation::Pause).await
    })
    .await
}

/// Resumes a paused capsule on the host that holds its files: `resuming`, then `running`.
/// Resuming a capsule that is not paused is refused (409, as the reference API says).
pub async fn resume(
    state: &AppState,
    id: SandboxId,
    route: SandboxRoute,
) -> Result<(), CapsuleError> {
    to_the_end(state, move |state| async move {
        match relocate::must_move(&state, id, &route).await? {
            relocate::Where::Home => operate(&state, id, route, Operation::Resume).await,
            relocate::Where::Elsewhere => relocate::resume_elsewhere(&state, id, route).await,
            // Its host is full, but it runs: with no room elsewhere either, it resumes at
            // home as it always could (overcommitting that host) rather than not at all.
            relocate::Where::ElsewhereIfRoom => {
                match relocate::resume_elsewhere(&state, id, route.clone()).await {
                    Err(CapsuleError::Schedule(
                        ScheduleError::NoRoom { .. } | ScheduleError::NoHosts,
                    )) => operate(&state, id, route, Operation::Resume).await,
                    other => other,
                }
            }
        }
    })
    .await
}

/// A snapshot template made on a host, not yet in the registry.
#[derive(Debug)]
pub struct MadeSnapshot {
    pub info: SnapshotTemplateInfo,
    /// The host that holds it.
    pub host: Uuid,
    /// Its place in the team's disk pool (`template_reservations`), which its registration
    /// releases.
    pub hold: Uuid,
}

/// How long, beyond the agent's snapshot, registering a template may take before the pool
/// stops holding its place.
const TEMPLATE_REGISTER_TIME: Duration = Duration::from_secs(60);

/// Has the capsule's host make the capsule's memory and disk, as they are now, the snapshot
/// template `request.template` there: `snapshotting` meanwhile, then `running` or `paused`
/// again, as it was (the agent pauses a running capsule for a moment). Answers what was made,
/// the host that holds it and its hold on the team's disk pool, taken with the admission,
/// which the caller's registration of the template releases (a failure here does). Runs to
/// its end whatever the caller does.
pub async fn snapshot(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    request: SnapshotTemplate,
) -> Result<MadeSnapshot, CapsuleError> {
    let route = route(state, team, id).await?;
    let from = match route.status {
        SandboxStatus::Running | SandboxStatus::Paused => route.status,
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Resuming
        | SandboxStatus::Snapshotting
        | SandboxStatus::Stopping => return Err(CapsuleError::Busy(route.status)),
        SandboxStatus::Stopped | SandboxStatus::Failed | SandboxStatus::Missing => {
            return Err(CapsuleError::NotRunning(route.status))
        }
    };
    let target = online_target(state, &route)?;
    let source = find(state, team, id).await?;
    let during = Transition::to(SandboxStatus::Snapshotting).from(from);
    // The template will hold at most the capsule's memory and disk, in the team's disk pool.
    let ask = Ask::snapshot(i64::from(source.memory_mb), i64::from(source.disk_mb));
    let hold_for = agent_client::SNAPSHOT_TIMEOUT + TEMPLATE_REGISTER_TIME;
    let admitted =
        scheduler::snapshot_admitted(&state.db, team.uuid(), id.uuid(), during, ask, hold_for);
    let Some(hold) = admitted.await? else {
        return Err(match sandboxes::status_of(&state.db, id.uuid()).await? {
            Some(status) => CapsuleError::Busy(status),
            None => CapsuleError::NotFound,
        });
    };
    let state = state.clone();
    let operation = tokio::spawn(async move {
        let made = async {
            let answer = state
                .capsules
                .agents
                .snapshot_template(&target, id, &request)
                .await;
            settle_after_snapshot(&state, &target, id, answer.as_ref().err()).await?;
            answer.map_err(CapsuleError::from)
        }
        .await;
        match made {
            Ok(info) => Ok(MadeSnapshot {
                info,
                host: target.host.uuid(),
                hold,
            }),
            Err(error) => {
                if let Err(release) = template_reservations::release(&state.db, hold).await {
                    tracing::warn!(sandbox = %id, error = %release, "could not release a failed snapshot's place in the pool; it lapses");
                }
                Err(error)
            }
        }
    });
    match operation.await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(CapsuleError::ShuttingDown),
    }
}

/// Records where a snapshot or a fork left its source (`snapshotting` until then): wherever the
/// agent says, `error` if the agent no longer has it, or unknown for the reconciler to settle.
async fn settle_after_snapshot(
    state: &AppState,
    target: &AgentTarget,
    id: SandboxId,
    failure: Option<&AgentError>,
) -> Result<(), CapsuleError> {
    match state.capsules.agents.get_sandbox(target, id).await {
        Ok(info) => settle(state, id, SandboxStatus::Snapshotting, &info).await,
        Err(AgentError::Rejected { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            let reason = failure.map_or_else(
                || "its host no longer has it".to_owned(),
                ToString::to_string,
            );
            let failed = Transition::to(SandboxStatus::Failed)
                .from(SandboxStatus::Snapshotting)
                .because(&reason);
            sandboxes::transition(&state.db, id.uuid(), failed).await?;
            Ok(())
        }
        Err(error) => {
            tracing::warn!(sandbox = %id, %error, "could not learn where the snapshot left the capsule; the reconciler will");
            Ok(())
        }
    }
}

/// The most children one fork request may ask for: a bound on the request, far above what any
/// host has room for; the real bound is the room on the source's host.
pub const MAX_FORK_CHILDREN: u32 = 10_000;

/// Starts `count` new capsules on the capsule's host, each continuing its memory and disk of one
/// instant; the capsule runs on (or stays paused). The children are the capsule's size and
/// template; they all fit on its host or none is made. Answers them, `running`.
pub async fn fork(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    count: u32,
) -> Result<Vec<SandboxRow>, CapsuleError> {
    if !(1..=MAX_FORK_CHILDREN).contains(&count) {
        return Err(CapsuleError::invalid(
            "count",
            format!("must be between 1 and {MAX_FORK_CHILDREN}, got {count}"),
        ));
    }
    let source = find(state, team, id).await?;
    let route = route(state, team, id).await?;
    let from = match route.status {
        SandboxStatus::Running | SandboxStatus::Paused => route.status,
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Pausing
        | SandboxStatus::Resuming
        | SandboxStatus::Snapshotting
        | SandboxStatus::Stopping => return Err(CapsuleError::Busy(route.status)),
        SandboxStatus::Stopped | SandboxStatus::Failed | SandboxStatus::Missing => {
            return Err(CapsuleError::NotRunning(route.status))
        }
    };
    let target = online_target(state, &route)?;
    let children: Vec<SandboxId> = (0..count).map(|_| SandboxId::new_random()).collect();
    let child_ids: Vec<Uuid> = children.iter().map(|c| c.uuid()).collect();
    scheduler::place_fork(
        &state.db,
        &state.capsules.scheduler,
        target.host.uuid(),
        team.uuid(),
        id.uuid(),
        &child_ids,
        Demand {
            vcpus: i64::from(source.vcpus),
            memory_mb: i64::from(source.memory_mb),
            disk_mb: i64::from(source.disk_mb),
        },
    )
    .await?;
    let state = state.clone();
    let operation = tokio::spawn(async move {
        let fail_children = |reason: String| {
            let state = state.clone();
            let child_ids = child_ids.clone();
            async move {
                for child in child_ids {
                    let failed = Transition::to(SandboxStatus::Failed).because(&reason);
                    sandboxes::transition(&state.db, child, failed).await?;
                }
                Ok::<(), DbError>(())
            }
        };
        let during = Transition::to(SandboxStatus::Snapshotting).from(from);
        if !sandboxes::transition(&state.db, id.uuid(), during).await? {
            fail_children("the source capsule changed before the fork".into()).await?;
            return Err(match sandboxes::status_of(&state.db, id.uuid()).await? {
                Some(status) => CapsuleError::Busy(status),
                None => CapsuleError::NotFound,
            });
        }
        for child in &child_ids {
            let starting = Transition::to(SandboxStatus::Starting).from(SandboxStatus::Pending);
            sandboxes::transition(&state.db, *child, starting).await?;
        }
        let agents = &state.capsules.agents;
        let request = ForkSandbox {
            children: children.clone(),
        };
        let answer = agents.fork_sandbox(&target, id, &request).await;
        settle_after_snapshot(&state, &target, id, answer.as_ref().err()).await?;
        match answer {
            Ok(forked) => {
                let mut rows = Vec::with_capacity(forked.children.len());
                for info in &forked.children {
                    let child = info.sandbox_id;
                    if !sandboxes::mark_started(&state.db, child.uuid(), &guest_metadata(info))
                        .await?
                    {
                        remove_half_created(&state, &target, child).await;
                        continue;
                    }
                    rows.push(find(&state, team, child).await?);
                }
                Ok(rows)
            }
            Err(error) => {
                let outcome_unknown = matches!(
                    error,
                    AgentError::Unreachable { .. }
                        | AgentError::Timeout { .. }
                        | AgentError::Decode { .. }
                );
                if outcome_unknown {
                    for child in &children {
                        remove_half_created(&state, &target, *child).await;
                    }
                }
                fail_children(error.to_string()).await?;
                Err(error.into())
            }
        }
    });
    match operation.await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(CapsuleError::ShuttingDown),
    }
}

/// The two operations that move a capsule between its host's memory and its disk.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Pause,
    Resume,
}

impl Operation {
    /// The status it starts from, and the one the capsule shows while it runs.
    fn statuses(self) -> (SandboxStatus, SandboxStatus) {
        match self {
            Operation::Pause => (SandboxStatus::Running, SandboxStatus::Pausing),
            Operation::Resume => (SandboxStatus::Paused, SandboxStatus::Resuming),
        }
    }

    /// Whether a capsule in `status` may undergo it, and if not, why (409 as the reference
    /// says).
    fn allowed(self, status: SandboxStatus) -> Result<(), CapsuleError> {
        if status == self.statuses().0 {
            return Ok(());
        }
        match status {
            SandboxStatus::Pending
            | SandboxStatus::Starting
            | SandboxStatus::Pausing
            | SandboxStatus::Resuming
            | SandboxStatus::Snapshotting
            | SandboxStatus::Stopping => Err(CapsuleError::Busy(status)),
            SandboxStatus::Running
            | SandboxStatus::Paused
            | SandboxStatus::Stopped
            | SandboxStatus::Failed
            | SandboxStatus::Missing => Err(match self {
                Operation::Pause => CapsuleError::NotRunning(status),
                Operation::Resume => CapsuleError::NotPaused(status),
            }),
        }
    }

    /// The capsule error for an agent's failure of this operation.
    fn failed(self, error: AgentError) -> CapsuleError {
        match (self, error) {
            (
                Operation::Pause,
                AgentError::Failed {
                    status, message, ..
                },
            ) => CapsuleError::PauseFailed {
                message,
                disk_full: status == http::StatusCode::INSUFFICIENT_STORAGE,
            },
            (Operation::Resume, AgentError::Failed { message, .. }) => {
                CapsuleError::ResumeFailed { message }
            }
            (_, other) => other.into(),
        }
    }
}

async fn operate(
    state: &AppState,
    id: SandboxId,
    route: SandboxRoute,
    operation: Operation,
) -> Result<(), CapsuleError> {
    operation.allowed(route.status)?;
    let target = online_target(state, &route)?;
    let (from, during) = operation.statuses();
    let began = match operation {
        Operation::Pause => {
            sandboxes::transition(&state.db, id.uuid(), Transition::to(during).from(from)).await?
        }
        // Running again holds more of the team's pool: admitted with the status change.
        Operation::Resume => {
            let row = sandboxes::by_id(&state.db, id.uuid())
                .await?
                .ok_or(CapsuleError::NotFound)?;
            let change = Transition::to(during).from(from);
            scheduler::change_admitted(&state.db, row.team_id, id.uuid(), change, |plan| {
                Ask::resume(
                    i64::from(row.vcpus),
                    i64::from(row.memory_mb),
                    plan.limits.paused_memory_percent,
                )
            })
            .await?
        }
    };
    if !began {
        return Err(moved_on(state, id, operation).await);
    }
    let agents = &state.capsules.agents;
    let answer = match operation {
        Operation::Pause => agents.pause_sandbox(&target, id).await,
        Operation::Resume => {
            let (egress, _held) = network::held_egress(state, id).await?;
            agents.resume_sandbox(&target, id, &egress).await
        }
    };
    match answer {
        Ok(info) => settle(state, id, during, &info).await,
        Err(error) => match after_failed_operation(state, &target, id, during, error).await? {
            None => Ok(()),
            Some(error) => Err(operation.failed(error)),
        },
    }
}

/// Records where the agent says an operation left the sandbox (`from` is the operation's
/// status). Refused only if something else moved the row meanwhile (a destroy); that wins.
async fn settle(
    state: &AppState,
    id: SandboxId,
    from: SandboxStatus,
    info: &SandboxInfo,
) -> Result<(), CapsuleError> {
    let to = match info.status {
        SandboxPhase::Running => SandboxStatus::Running,
        SandboxPhase::Paused => SandboxStatus::Paused,
        other => {
            tracing::warn!(sandbox = %id, agent_status = %other, "the agent answered an operation with an unsettled sandbox; the reconciler settles it");
            return Ok(());
        }
    };
    let metadata = guest_metadata(info);
    let change = Transition::to(to).from(from).with_metadata(&metadata);
    if !sandboxes::transition(&state.db, id.uuid(), change).await? {
        tracing::info!(sandbox = %id, %to, "the sandbox moved on during the operation");
    }
    Ok(())
}

/// After a pause or resume failed: asks the agent where the sandbox is and records that, so the
/// row never stays `pausing`/`resuming` when the truth is known. A sandbox the agent no longer
/// has was lost: `error`, with the reason. Returns the operation's error, or `None` when the
/// sandbox reached the operation's goal after all (e.g. only the answer was lost).
async fn after_failed_operation(
    state: &AppState,
    target: &AgentTarget,
    id: SandboxId,
    from: SandboxStatus,
    error: AgentError,
) -> Result<Option<AgentError>, CapsuleError> {
    tracing::warn!(sandbox = %id, host = %target.host, %error, operation = %from, "sandbox operation failed");
    match state.capsules.agents.get_sandbox(target, id).await {
        Ok(info) => {
            let reached_goal = matches!(
                (from, info.status),
                (SandboxStatus::Pausing, SandboxPhase::Paused)
                    | (SandboxStatus::Resuming, SandboxPhase::Running)
            );
            settle(state, id, from, &info).await?;
            Ok((!reached_goal).then_some(error))
        }
        Err(AgentError::Rejected { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            let reason = error.to_string();
            let failed = Transition::to(SandboxStatus::Failed)
                .from(from)
                .because(&reason);
            sandboxes::transition(&state.db, id.uuid(), failed).await?;
            Err(CapsuleError::Lost(reason))
        }
        // Unknown: the reconciler settles the row when the agent answers again.
        Err(_) => Ok(Some(error)),
    }
}

/// Why an operation's first transition was refused: what the operation says of the row's
/// status now (`Busy` if it would allow it again: the row moved and came back meanwhile).
async fn moved_on(state: &AppState, id: SandboxId, operation: Operation) -> CapsuleError {
    match sandboxes::status_of(&state.db, id.uuid()).await {
        Ok(Some(status)) => operation
            .allowed(status)
            .err()
            .unwrap_or(CapsuleError::Busy(status)),
        Ok(None) => CapsuleError::NotFound,
        Err(error) => error.into(),
    }
}

/// The capsule's sampled use of its host over `range`, from its host's agent, which keeps them
/// while the capsule is there (paused too) and for a day after it has gone.
pub async fn metrics(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    range: MetricsRange,
) -> Result<SandboxMetrics, CapsuleError> {
    let route = route(state, team, id).await?;
    if route.host_id.is_none() {
        return Err(CapsuleError::NoMetrics);
    }
    let target = online_target(state, &route)?;
    match state
        .capsules
        .agents
        .sandbox_metrics(&target, id, range)
        .await
    {
        Err(AgentError::Rejected { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            Err(CapsuleError::NoMetrics)
        }
        other => Ok(other?),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_and_ranges() {
        let new = NewCapsule::parse(None, None, None, None, &[]).unwrap();
        assert_eq!(
            new,
            NewCapsule {
                template: TemplateName::default_template(),
                vcpus: None,
                memory_mb: None,
                timeout_sec: 0,
                public_ports: network::PublicPorts::default(),
                egress: EgressPolicy::default(),
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
                    NewCapsule::parse(template, vcpus, memory_mb, timeout_sec, &[]),
                    Err(CapsuleError::Invalid { .. })
                ),
                "{template:?} {vcpus:?} {memory_mb:?} {timeout_sec:?}"
            );
        }
    }
}
