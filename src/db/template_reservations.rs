//! Queries on `template_reservations`: the disk a snapshot template being made holds in its
//! team's pool until its row is in `templates` (`plans::pool_use` counts both).

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// Holds `disk_mb` of `team`'s pool for a template being made of capsule `sandbox`, for at most
/// `hold`; answers the hold's ID. The team's lapsed holds are dropped on the way.
pub async fn hold(
    ex: impl PgExecutor<'_>,
    sandbox: Uuid,
    team: Uuid,
    disk_mb: i64,
    hold: Duration,
) -> Result<Uuid, DbError> {
    let id = Uuid::new_v4();
    let seconds = f64::from(u32::try_from(hold.as_secs()).unwrap_or(u32::MAX));
    sqlx::query!(
        "WITH lapsed AS (DELETE FROM template_reservations
                         WHERE team_id = $3 AND expires_at <= now())
         INSERT INTO template_reservations (id, sandbox_id, team_id, disk_mb, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
        id,
        sandbox,
        team,
        disk_mb,
        seconds,
    )
    .execute(ex)
    .await?;
    Ok(id)
}

/// Ends hold `id`: its template is registered, or failed.
pub async fn release(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    sqlx::query!("DELETE FROM template_reservations WHERE id = $1", id)
        .execute(ex)
        .await?;
    Ok(())
}
