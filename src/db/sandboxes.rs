//! Queries on `sandboxes`: placement, the capsule API's reads, and status changes, every one of
//! which is a compare-and-set against [`SandboxStatus::can_become`]: the database applies a
//! change only from a status the table allows, so two actors racing on one row cannot both win.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::hosts::HostStatus;
use super::page::Keyset;
use super::{text_enum, DbError};

pub struct NewSandbox {
    pub id: Uuid,
    pub team_id: Uuid,
    pub host_id: Option<Uuid>,
    pub template_id: Uuid,
    pub status: SandboxStatus,
    pub vcpus: i32,
    pub memory_mb: i32,
}

pub async fn insert(ex: impl PgExecutor<'_>, sandbox: NewSandbox) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, template_name, status, vcpus,
             memory_mb)
         SELECT $1, $2, $3, t.id, t.name, $5, $6, $7 FROM templates t WHERE t.id = $4",
        sandbox.id,
        sandbox.team_id,
        sandbox.host_id,
        sandbox.template_id,
        sandbox.status.as_str(),
        sandbox.vcpus,
        sandbox.memory_mb,
    )
    .execute(ex)
    .await?;
    Ok(())
}

text_enum! {
    /// A sandbox's lifecycle as the control plane records it: `pending` from placement until the
    /// agent is asked to create it, `starting` while it boots, `missing` while its host cannot be
    /// reached, `error` (a failed create or operation) and `stopped` are final. The `-ing`
    /// statuses are operations in progress, which GET shows as they happen. Every change follows
    /// [`SandboxStatus::can_become`].
    SandboxStatus, "sandboxes.status" {
        Pending => "pending",
        Starting => "starting",
        Running => "running",
        Pausing => "pausing",
        Paused => "paused",
        Resuming => "resuming",
        Snapshotting => "snapshotting",
        Stopping => "stopping",
        Stopped => "stopped",
        Failed => "error",
        Missing => "missing",
    }
}

impl SandboxStatus {
    pub const ALL: [SandboxStatus; 11] = [
        SandboxStatus::Pending,
        SandboxStatus::Starting,
        SandboxStatus::Running,
        SandboxStatus::Pausing,
        SandboxStatus::Paused,
        SandboxStatus::Resuming,
        SandboxStatus::Snapshotting,
        SandboxStatus::Stopping,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
        SandboxStatus::Missing,
    ];

    /// The transition table, the only place that says which status may follow which. Any live
    /// status may be recorded `stopped` directly: a deleted team or host, or a sandbox its agent
    /// no longer has, leaves nothing to stop on the agent that the reconciler would not remove.
    pub fn can_become(self, to: SandboxStatus) -> bool {
        use SandboxStatus as S;
        match self {
            S::Pending => matches!(to, S::Starting | S::Failed | S::Stopped),
            S::Starting => matches!(to, S::Running | S::Failed | S::Stopped),
            // Running ⇄ Paused directly: the agent pauses an idle sandbox by itself and resumes
            // it on a call, and the reconciler records what it did.
            S::Running => matches!(
                to,
                S::Pausing
                    | S::Paused
                    | S::Snapshotting
                    | S::Stopping
                    | S::Stopped
                    | S::Missing
                    | S::Failed
            ),
            // A refused pause leaves the VM running; a refused resume leaves it paused. Missing:
            // the host stopped answering during the operation, whose outcome is then unknown.
            S::Pausing => matches!(
                to,
                S::Paused | S::Running | S::Failed | S::Stopped | S::Missing
            ),
            // Missing: its host stopped answering; the files are still there.
            S::Paused => matches!(
                to,
                S::Resuming | S::Running | S::Snapshotting | S::Stopping | S::Stopped | S::Missing
            ),
            S::Resuming => matches!(
                to,
                S::Running | S::Paused | S::Failed | S::Stopped | S::Missing
            ),
            // A snapshot template is taken of a running or a paused capsule, which stays so.
            S::Snapshotting => matches!(
                to,
                S::Running | S::Paused | S::Failed | S::Stopped | S::Missing
            ),
            S::Stopping => matches!(to, S::Stopped | S::Failed),
            // The reconciler's view of an unreachable host: back to what the agent reports
            // when it answers again.
            S::Missing => matches!(to, S::Running | S::Paused | S::Stopping | S::Stopped),
            S::Stopped | S::Failed => false,
        }
    }

    /// Whether the sandbox may still hold resources on its host.
    pub fn is_live(self) -> bool {
        match self {
            SandboxStatus::Pending
            | SandboxStatus::Starting
            | SandboxStatus::Running
            | SandboxStatus::Pausing
            | SandboxStatus::Paused
            | SandboxStatus::Resuming
            | SandboxStatus::Snapshotting
            | SandboxStatus::Stopping
            | SandboxStatus::Missing => true,
            SandboxStatus::Stopped | SandboxStatus::Failed => false,
        }
    }

    /// The statuses from which `to` may be reached, as the database compares them.
    fn sources(to: SandboxStatus) -> Vec<String> {
        Self::ALL
            .into_iter()
            .filter(|from| from.can_become(to))
            .map(|from| from.as_str().to_owned())
            .collect()
    }
}

/// A sandbox with what its API representation needs from other tables.
#[derive(Debug, Clone)]
pub struct SandboxRow {
    pub id: Uuid,
    pub team_id: Uuid,
    pub host_id: Option<Uuid>,
    pub template: String,
    pub status: SandboxStatus,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub disk_mb: i32,
    pub timeout_sec: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub last_active_at: Option<DateTime<Utc>>,
    pub last_updated: DateTime<Utc>,
    pub metadata: Value,
    pub host_address: Option<String>,
}

/// A sandbox the scheduler has placed, inserted `pending` with its host.
pub struct PlacedSandbox {
    pub id: Uuid,
    pub team_id: Uuid,
    pub host_id: Uuid,
    pub template_id: Uuid,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub disk_mb: i32,
    pub timeout_sec: i32,
    pub public_ports: Vec<i32>,
    pub egress: Value,
}

pub async fn insert_placed(ex: impl PgExecutor<'_>, s: &PlacedSandbox) -> Result<(), DbError> {
    let inserted = sqlx::query!(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, template_name, status, vcpus,
             memory_mb, disk_mb, timeout_sec, public_ports, egress)
         SELECT $1, $2, $3, t.id, t.name, 'pending', $5, $6, $7, $8, $9, $10
         FROM templates t WHERE t.id = $4",
        s.id,
        s.team_id,
        s.host_id,
        s.template_id,
        s.vcpus,
        s.memory_mb,
        s.disk_mb,
        s.timeout_sec,
        &s.public_ports,
        &s.egress,
    )
    .execute(ex)
    .await?;
    // The template was deleted since it was looked up.
    if inserted.rows_affected() == 0 {
        return Err(DbError::Query(sqlx::Error::RowNotFound));
    }
    Ok(())
}

/// Inserts `children`, `pending` on the host of sandbox `source`, each of its template and size:
/// the children of a fork. Answers how many were inserted (none when `source` is gone).
pub async fn insert_forked(
    ex: impl PgExecutor<'_>,
    source: Uuid,
    children: &[Uuid],
) -> Result<u64, DbError> {
    let inserted = sqlx::query!(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, template_name, status, vcpus,
             memory_mb, disk_mb, timeout_sec, egress)
         SELECT c.id, s.team_id, s.host_id, s.template_id, s.template_name, 'pending', s.vcpus,
                s.memory_mb, s.disk_mb, s.timeout_sec, s.egress
         FROM sandboxes s, unnest($2::uuid[]) AS c(id)
         WHERE s.id = $1",
        source,
        children,
    )
    .execute(ex)
    .await?;
    Ok(inserted.rows_affected())
}

/// The sandbox, whatever its status and team.
pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, s.template_name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// The sandboxes of `ids` that exist, whatever their team and status.
pub async fn by_ids(ex: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, s.template_name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = ANY($1)"#,
        ids,
    )
    .fetch_all(ex)
    .await?)
}

/// The team's sandbox, whatever its status.
pub async fn for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
) -> Result<Option<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, s.template_name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1 AND s.team_id = $2"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// What a call into a sandbox needs, in one read: its status and how to reach its host.
#[derive(Debug, Clone)]
pub struct SandboxRoute {
    pub status: SandboxStatus,
    pub host_id: Option<Uuid>,
    pub host_status: Option<HostStatus>,
    pub host_address: Option<String>,
    pub agent_secret_generation: Option<i32>,
}

/// The team's sandbox with its host, whatever its status.
pub async fn route_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
) -> Result<Option<SandboxRoute>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRoute,
        r#"SELECT s.status AS "status: SandboxStatus", s.host_id,
                  h.status AS "host_status?: HostStatus", h.address AS "host_address?",
                  h.agent_secret_generation AS "agent_secret_generation?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1 AND s.team_id = $2"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// The sandbox with its host, whatever its status (read again after it may have moved).
pub async fn route_of(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<SandboxRoute>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRoute,
        r#"SELECT s.status AS "status: SandboxStatus", s.host_id,
                  h.status AS "host_status?: HostStatus", h.address AS "host_address?",
                  h.agent_secret_generation AS "agent_secret_generation?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// What the port proxy needs of a sandbox before it knows who asks: its team, the ports anyone
/// may reach, and its route.
#[derive(Debug, Clone)]
pub struct ProxyRoute {
    pub team_id: Uuid,
    pub public_ports: Vec<i32>,
    pub route: SandboxRoute,
}

pub async fn proxy_route(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ProxyRoute>, DbError> {
    let row = sqlx::query!(
        r#"SELECT s.team_id, s.public_ports, s.status AS "status: SandboxStatus", s.host_id,
                  h.status AS "host_status?: HostStatus", h.address AS "host_address?",
                  h.agent_secret_generation AS "agent_secret_generation?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(|r| ProxyRoute {
        team_id: r.team_id,
        public_ports: r.public_ports,
        route: SandboxRoute {
            status: r.status,
            host_id: r.host_id,
            host_status: r.host_status,
            host_address: r.host_address,
            agent_secret_generation: r.agent_secret_generation,
        },
    }))
}

/// A sandbox's network settings.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub public_ports: Vec<i32>,
    pub egress: Value,
}

/// The team's sandbox's network settings; `None` when the team has no such sandbox.
pub async fn network(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
) -> Result<Option<NetworkSettings>, DbError> {
    Ok(sqlx::query_as!(
        NetworkSettings,
        "SELECT public_ports, egress FROM sandboxes WHERE id = $1 AND team_id = $2",
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// Serialises changes of a sandbox's egress policy with each other and with the resumes that
/// carry it to the agent, until the transaction ends.
pub async fn lock_egress(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    sqlx::query!(
        r#"SELECT 1 AS "locked!" FROM pg_advisory_xact_lock(hashtextextended('egress ' || $1::uuid::text, 0))"#,
        id,
    )
    .fetch_one(ex)
    .await?;
    Ok(())
}

/// The sandbox's egress policy, whatever its team; `None` when there is no such sandbox.
pub async fn egress(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Value>, DbError> {
    Ok(
        sqlx::query_scalar!("SELECT egress FROM sandboxes WHERE id = $1", id)
            .fetch_optional(ex)
            .await?,
    )
}

/// Replaces the network settings of the team's sandbox; `false` when the team has no such
/// sandbox.
pub async fn set_network(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
    settings: &NetworkSettings,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE sandboxes SET public_ports = $3, egress = $4, last_updated = now()
         WHERE id = $1 AND team_id = $2",
        id,
        team,
        &settings.public_ports,
        &settings.egress,
    )
    .execute(ex)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// The team's sandboxes that are not `stopped` or `error`, oldest first.
/// Up to `limit` of the team's live (not stopped or failed) sandboxes after `after`, oldest
/// first.
pub async fn page_live_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, s.template_name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.team_id = $1 AND s.status NOT IN ('stopped', 'error')
             AND (s.created_at, s.id) > ($2, $3)
           ORDER BY s.created_at, s.id LIMIT $4"#,
        team,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// A change of one sandbox's status. The database applies it only from a status the table
/// allows, narrowed by `from` and `unchanged_since` when given.
#[derive(Debug, Clone, Copy)]
pub struct Transition<'a> {
    pub to: SandboxStatus,
    /// Only from this status.
    pub from: Option<SandboxStatus>,
    /// Only if nothing changed the row since then (the reconciler's view of the agent).
    pub unchanged_since: Option<DateTime<Utc>>,
    /// The agent's metadata for the sandbox (after a create or resume), replacing the old.
    pub metadata: Option<&'a Value>,
    /// A create's success: started (and active) now.
    pub started: bool,
    /// Why the sandbox stopped or failed, kept in its metadata as [`STATUS_REASON_KEY`].
    pub reason: Option<&'a str>,
}

/// The metadata key that says why a sandbox stopped or failed when it did so on its own.
pub const STATUS_REASON_KEY: &str = "status_reason";

impl<'a> Transition<'a> {
    pub fn to(to: SandboxStatus) -> Self {
        Self {
            to,
            from: None,
            unchanged_since: None,
            metadata: None,
            started: false,
            reason: None,
        }
    }

    pub fn from(self, from: SandboxStatus) -> Self {
        Self {
            from: Some(from),
            ..self
        }
    }

    pub fn with_metadata(self, metadata: &'a Value) -> Self {
        Self {
            metadata: Some(metadata),
            ..self
        }
    }

    pub fn because(self, reason: &'a str) -> Self {
        Self {
            reason: Some(reason),
            ..self
        }
    }
}

/// The one compare-and-set through which a sandbox's status changes; returns whether it applied.
pub async fn transition(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    change: Transition<'_>,
) -> Result<bool, DbError> {
    let mut allowed = SandboxStatus::sources(change.to);
    if let Some(from) = change.from {
        allowed.retain(|s| s == from.as_str());
    }
    if allowed.is_empty() {
        return Ok(false);
    }
    let done = sqlx::query!(
        "UPDATE sandboxes SET status = $2, last_updated = now(),
             metadata = COALESCE($4, metadata)
                 || CASE WHEN $7::text IS NULL THEN '{}'::jsonb
                         ELSE jsonb_build_object($8::text, $7::text) END,
             started_at = CASE WHEN $6 THEN now() ELSE started_at END,
             last_active_at = CASE WHEN $6 THEN now() ELSE last_active_at END
         WHERE id = $1 AND status = ANY($3)
             AND ($5::timestamptz IS NULL OR last_updated <= $5)",
        id,
        change.to.as_str(),
        &allowed,
        change.metadata,
        change.unchanged_since,
        change.started,
        change.reason,
        STATUS_REASON_KEY,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves a paused (or missing: its host is gone) sandbox to host `to`, `resuming` there, to be
/// resumed from its copy in the template store; refused (false) if the row left `from_status`
/// on `from_host` meanwhile. Outside the transition table on purpose: only the relocation
/// changes a sandbox's host, and [`move_back`] is its only undo.
pub async fn relocate(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    from_host: Uuid,
    from_status: SandboxStatus,
    to: Uuid,
) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE sandboxes SET host_id = $4, status = 'resuming', last_updated = now()
         WHERE id = $1 AND host_id = $2 AND status = $3 AND status IN ('paused', 'missing')",
        id,
        from_host,
        from_status.as_str(),
        to,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Undoes a [`relocate`] whose import failed: the sandbox goes back to `host`, `status`, if it is
/// still `resuming` on `from` (a destroy meanwhile wins).
pub async fn move_back(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    from: Uuid,
    host: Uuid,
    status: SandboxStatus,
) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE sandboxes SET host_id = $3, status = $4, last_updated = now()
         WHERE id = $1 AND host_id = $2 AND status = 'resuming'",
        id,
        from,
        host,
        status.as_str(),
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a create's success: `starting` becomes `running` with what the agent reported. Refused
/// (false) when something else moved the row meanwhile: the reconciler gave the create up, or its
/// team or host was deleted.
pub async fn mark_started(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    metadata: &Value,
) -> Result<bool, DbError> {
    transition(
        ex,
        id,
        Transition {
            started: true,
            ..Transition::to(SandboxStatus::Running)
                .from(SandboxStatus::Starting)
                .with_metadata(metadata)
        },
    )
    .await
}

/// Moves every sandbox on `host` that may become `to`; returns them.
pub async fn transition_on_host(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    to: SandboxStatus,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE sandboxes SET status = $2, last_updated = now()
         WHERE host_id = $1 AND status = ANY($3) RETURNING id",
        host,
        to.as_str(),
        &SandboxStatus::sources(to),
    )
    .fetch_all(ex)
    .await?)
}

/// Moves every sandbox of `team` that may become `to`; returns them.
pub async fn transition_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    to: SandboxStatus,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE sandboxes SET status = $2, last_updated = now()
         WHERE team_id = $1 AND status = ANY($3) RETURNING id",
        team,
        to.as_str(),
        &SandboxStatus::sources(to),
    )
    .fetch_all(ex)
    .await?)
}

/// The sandbox's status, whatever its team.
pub async fn status_of(
    ex: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<SandboxStatus>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT status AS "status: SandboxStatus" FROM sandboxes WHERE id = $1"#,
        id
    )
    .fetch_optional(ex)
    .await?)
}

/// The sandboxes on `host` that may still hold resources there (`status NOT IN ('stopped',
/// 'error')` is [`SandboxStatus::is_live`], spelled as the partial index `sandboxes_live_on_host`
/// needs it).
pub async fn live_on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM sandboxes WHERE host_id = $1 AND status NOT IN ('stopped', 'error')
         ORDER BY created_at, id",
        host,
    )
    .fetch_all(ex)
    .await?)
}

pub async fn touch(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE sandboxes SET last_active_at = now() WHERE id = $1",
        id
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// What a host has promised to its sandboxes, in the units the scheduler compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

/// How many capsules are in each status.
pub async fn count_by_status(ex: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT status, count(*) AS "count!" FROM sandboxes GROUP BY status ORDER BY status"#
    )
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}

/// Resources held on `host`: CPU and memory by every sandbox that may be running there, disk by
/// every sandbox that still has files there (paused ones too).
pub async fn reserved_on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Reserved, DbError> {
    Ok(sqlx::query_as!(
        Reserved,
        r#"SELECT
               COALESCE(SUM(vcpus) FILTER (WHERE status <> 'paused'), 0)::BIGINT AS "vcpus!",
               COALESCE(SUM(memory_mb) FILTER (WHERE status <> 'paused'), 0)::BIGINT AS "memory_mb!",
               COALESCE(SUM(disk_mb), 0)::BIGINT AS "disk_mb!"
           FROM sandboxes
           WHERE host_id = $1 AND status NOT IN ('stopped', 'error')"#,
        host,
    )
    .fetch_one(ex)
    .await?)
}

/// [`reserved_on_host`] for each of `hosts` in one read; hosts holding nothing are absent.
pub async fn reserved_on_hosts(
    ex: impl PgExecutor<'_>,
    hosts: &[Uuid],
) -> Result<Vec<(Uuid, Reserved)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT host_id AS "host_id!",
               COALESCE(SUM(vcpus) FILTER (WHERE status <> 'paused'), 0)::BIGINT AS "vcpus!",
               COALESCE(SUM(memory_mb) FILTER (WHERE status <> 'paused'), 0)::BIGINT AS "memory_mb!",
               COALESCE(SUM(disk_mb), 0)::BIGINT AS "disk_mb!"
           FROM sandboxes
           WHERE host_id = ANY($1) AND status NOT IN ('stopped', 'error')
           GROUP BY host_id"#,
        hosts,
    )
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let reserved = Reserved {
                vcpus: r.vcpus,
                memory_mb: r.memory_mb,
                disk_mb: r.disk_mb,
            };
            (r.host_id, reserved)
        })
        .collect())
}

/// One sandbox as the reconciler sees it.
#[derive(Debug, Clone)]
pub struct HostSandbox {
    pub id: Uuid,
    pub status: SandboxStatus,
    pub last_updated: DateTime<Utc>,
}

/// The sandboxes on `host` that may still hold resources there (as [`live_on_host`]).
pub async fn live_rows_on_host(
    ex: impl PgExecutor<'_>,
    host: Uuid,
) -> Result<Vec<HostSandbox>, DbError> {
    Ok(sqlx::query_as!(
        HostSandbox,
        r#"SELECT id, status AS "status: SandboxStatus", last_updated
           FROM sandboxes WHERE host_id = $1 AND status NOT IN ('stopped', 'error')
           ORDER BY created_at, id"#,
        host,
    )
    .fetch_all(ex)
    .await?)
}

/// The database's clock, so comparisons with `last_updated` never mix two clocks.
pub async fn db_now(ex: impl PgExecutor<'_>) -> Result<DateTime<Utc>, DbError> {
    Ok(sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(ex)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::SandboxStatus as S;

    /// Queries spell "may still hold resources" as `status NOT IN ('stopped', 'error')`, which
    /// partial indexes rely on; it must stay [`S::is_live`].
    #[test]
    fn the_sql_spelling_of_live_is_is_live() {
        let mut not_live: Vec<&str> = S::ALL
            .into_iter()
            .filter(|s| !s.is_live())
            .map(S::as_str)
            .collect();
        not_live.sort_unstable();
        assert_eq!(not_live, ["error", "stopped"]);
    }

    /// Every pair the table allows, written out once more so a change to the table is a
    /// deliberate change here too.
    const ALLOWED: &[(S, S)] = &[
        (S::Pending, S::Starting),
        (S::Pending, S::Failed),
        (S::Pending, S::Stopped),
        (S::Starting, S::Running),
        (S::Starting, S::Failed),
        (S::Starting, S::Stopped),
        (S::Running, S::Pausing),
        (S::Running, S::Paused),
        (S::Running, S::Snapshotting),
        (S::Running, S::Stopping),
        (S::Running, S::Stopped),
        (S::Running, S::Missing),
        (S::Running, S::Failed),
        (S::Pausing, S::Paused),
        (S::Pausing, S::Running),
        (S::Pausing, S::Failed),
        (S::Pausing, S::Stopped),
        (S::Pausing, S::Missing),
        (S::Paused, S::Resuming),
        (S::Paused, S::Running),
        (S::Paused, S::Snapshotting),
        (S::Paused, S::Missing),
        (S::Paused, S::Stopping),
        (S::Paused, S::Stopped),
        (S::Resuming, S::Running),
        (S::Resuming, S::Paused),
        (S::Resuming, S::Failed),
        (S::Resuming, S::Stopped),
        (S::Resuming, S::Missing),
        (S::Snapshotting, S::Running),
        (S::Snapshotting, S::Paused),
        (S::Snapshotting, S::Failed),
        (S::Snapshotting, S::Stopped),
        (S::Snapshotting, S::Missing),
        (S::Stopping, S::Stopped),
        (S::Stopping, S::Failed),
        (S::Missing, S::Running),
        (S::Missing, S::Paused),
        (S::Missing, S::Stopping),
        (S::Missing, S::Stopped),
    ];

    #[test]
    fn the_table_allows_exactly_the_listed_transitions() {
        for from in S::ALL {
            for to in S::ALL {
                assert_eq!(
                    from.can_become(to),
                    ALLOWED.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn final_statuses_stay_final_and_live_ones_can_be_stopped() {
        for from in S::ALL {
            assert!(!from.can_become(from), "{from} -> itself");
            assert_eq!(from.is_live(), from.can_become(S::Stopped), "{from}");
        }
        assert_eq!(
            S::sources(S::Missing),
            ["running", "pausing", "paused", "resuming", "snapshotting"]
                .map(String::from)
                .to_vec(),
            "only sandboxes that are (or may be) on their host go missing"
        );
    }

    #[test]
    fn every_status_round_trips_through_its_text() {
        for status in S::ALL {
            assert_eq!(S::try_from(status.as_str().to_owned()).unwrap(), status);
        }
    }
}
