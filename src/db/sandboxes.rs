//! Queries on `sandboxes`. The sandbox API arrives later; hosts and teams need these to find and
//! stop what runs on them.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// Statuses in which a sandbox holds resources on its host.
pub const ACTIVE_STATUSES: &[&str] =
    &["pending", "starting", "running", "pausing", "paused", "resuming", "stopping"];

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
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, status, vcpus, memory_mb)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(sandbox.id)
    .bind(sandbox.team_id)
    .bind(sandbox.host_id)
    .bind(sandbox.template_id)
    .bind(sandbox.status)
    .bind(sandbox.vcpus)
    .bind(sandbox.memory_mb)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn active_on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM sandboxes WHERE host_id = $1 AND status = ANY($2) ORDER BY created_at, id",
    )
    .bind(host)
    .bind(ACTIVE_STATUSES)
    .fetch_all(ex)
    .await?)
}

/// Marks the host's active sandboxes stopped and returns them.
pub async fn stop_active_on_host(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "UPDATE sandboxes SET status = 'stopped', last_updated = now()
         WHERE host_id = $1 AND status = ANY($2) RETURNING id",
    )
    .bind(host)
    .bind(ACTIVE_STATUSES)
    .fetch_all(ex)
    .await?)
}

/// Marks the team's active sandboxes stopped and returns them.
pub async fn stop_active_for_team(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "UPDATE sandboxes SET status = 'stopped', last_updated = now()
         WHERE team_id = $1 AND status = ANY($2) RETURNING id",
    )
    .bind(team)
    .bind(ACTIVE_STATUSES)
    .fetch_all(ex)
    .await?)
}
