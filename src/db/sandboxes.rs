//! Queries on `sandboxes`: placement, the capsule API's reads and status changes, and what hosts,
//! teams and the reconciler need to find and stop what runs on a host.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{text_enum, DbError};

/// Statuses in which a sandbox holds resources on its host.
pub const ACTIVE_STATUSES: &[&str] = &[
    "pending", "starting", "running", "pausing", "paused", "resuming", "stopping",
];

fn active() -> Vec<String> {
    ACTIVE_STATUSES.iter().map(|s| (*s).to_owned()).collect()
}

pub struct NewSandbox {
    pub id: Uuid,
    pub team_id: Uuid,
    pub host_id: Option<Uuid>,
    pub template_id: Uuid,
    pub status: &'static str,
    pub vcpus: i32,
    pub memory_mb: i32,
}

pub async fn insert(ex: impl PgExecutor<'_>, sandbox: NewSandbox) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, status, vcpus, memory_mb)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        sandbox.id,
        sandbox.team_id,
        sandbox.host_id,
        sandbox.template_id,
        sandbox.status,
        sandbox.vcpus,
        sandbox.memory_mb,
    )
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn active_on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM sandboxes WHERE host_id = $1 AND status = ANY($2) ORDER BY created_at, id",
        host,
        &active(),
    )
    .fetch_all(ex)
    .await?)
}

/// Marks the host's active sandboxes stopped and returns them.
pub async fn stop_active_on_host(
    ex: impl PgExecutor<'_>,
    host: Uuid,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE sandboxes SET status = 'stopped', last_updated = now()
         WHERE host_id = $1 AND status = ANY($2) RETURNING id",
        host,
        &active(),
    )
    .fetch_all(ex)
    .await?)
}

/// Marks the team's active sandboxes stopped and returns them.
pub async fn stop_active_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE sandboxes SET status = 'stopped', last_updated = now()
         WHERE team_id = $1 AND status = ANY($2) RETURNING id",
        team,
        &active(),
    )
    .fetch_all(ex)
    .await?)
}

text_enum! {
    /// A sandbox's lifecycle as the control plane records it. `pending` from placement until the
    /// agent's create answers; `missing` while its host cannot be reached.
    SandboxStatus, "sandboxes.status" {
        Pending => "pending",
        Starting => "starting",
        Running => "running",
        Pausing => "pausing",
        Paused => "paused",
        Resuming => "resuming",
        Stopping => "stopping",
        Stopped => "stopped",
        Failed => "error",
        Missing => "missing",
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
}

pub async fn insert_placed(ex: impl PgExecutor<'_>, s: &PlacedSandbox) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, status, vcpus, memory_mb,
             disk_mb, timeout_sec)
         VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8)",
        s.id,
        s.team_id,
        s.host_id,
        s.template_id,
        s.vcpus,
        s.memory_mb,
        s.disk_mb,
        s.timeout_sec,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// The team's sandbox, whatever its status.
pub async fn for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
) -> Result<Option<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, t.name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           JOIN templates t ON t.id = s.template_id
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.id = $1 AND s.team_id = $2"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// The team's sandboxes that are not `stopped` or `error`, oldest first.
pub async fn list_live_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
) -> Result<Vec<SandboxRow>, DbError> {
    Ok(sqlx::query_as!(
        SandboxRow,
        r#"SELECT s.id, s.team_id, s.host_id, t.name AS template, s.status AS "status: SandboxStatus",
                  s.vcpus, s.memory_mb, s.disk_mb, s.timeout_sec, s.created_at, s.started_at,
                  s.last_active_at, s.last_updated, s.metadata,
                  h.address AS "host_address?"
           FROM sandboxes s
           JOIN templates t ON t.id = s.template_id
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE s.team_id = $1 AND s.status NOT IN ('stopped', 'error')
           ORDER BY s.created_at, s.id"#,
        team,
    )
    .fetch_all(ex)
    .await?)
}

/// Records a successful create: `running`, started now, with what the agent reported.
pub async fn mark_started(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    metadata: &Value,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE sandboxes SET status = 'running', metadata = $2, started_at = now(),
             last_active_at = now(), last_updated = now()
         WHERE id = $1",
        id,
        metadata,
    )
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn set_status(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    status: SandboxStatus,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE sandboxes SET status = $2, last_updated = now() WHERE id = $1",
        id,
        status.as_str(),
    )
    .execute(ex)
    .await?;
    Ok(())
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

/// One sandbox as the reconciler sees it.
#[derive(Debug, Clone)]
pub struct HostSandbox {
    pub id: Uuid,
    pub status: SandboxStatus,
    pub last_updated: DateTime<Utc>,
}

/// Every sandbox placed on `host`, any status.
pub async fn on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<HostSandbox>, DbError> {
    Ok(sqlx::query_as!(
        HostSandbox,
        r#"SELECT id, status AS "status: SandboxStatus", last_updated
           FROM sandboxes WHERE host_id = $1 ORDER BY created_at, id"#,
        host,
    )
    .fetch_all(ex)
    .await?)
}

/// Moves a sandbox from `from` to `to` unless something else changed it since `seen`; returns
/// whether it moved.
pub async fn transition_if_unchanged(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    from: SandboxStatus,
    to: SandboxStatus,
    seen: DateTime<Utc>,
) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE sandboxes SET status = $3, last_updated = now()
         WHERE id = $1 AND status = $2 AND last_updated <= $4",
        id,
        from.as_str(),
        to.as_str(),
        seen,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks the host's `running` sandboxes `missing`; returns them.
pub async fn mark_missing_on_host(
    ex: impl PgExecutor<'_>,
    host: Uuid,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE sandboxes SET status = 'missing', last_updated = now()
         WHERE host_id = $1 AND status = 'running' RETURNING id",
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
