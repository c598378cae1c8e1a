//! Queries on `sandboxes`. The sandbox API arrives later; hosts and teams need these to find and
//! stop what runs on them.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

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
