//! Queries on `template_reservations`: the disk a snapshot template being made holds in its
//! team's pool until its row is in `templates`.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// Holds `disk_mb` of `team`'s pool for the template being made of capsule `sandbox`, for at
/// most `hold`.
pub async fn hold(
    ex: impl PgExecutor<'_>,
    sandbox: Uuid,
    team: Uuid,
    disk_mb: i64,
    hold: Duration,
) -> Result<(), DbError> {
    let seconds = f64::from(u32::try_from(hold.as_secs()).unwrap_or(u32::MAX));
    sqlx::query!(
        "INSERT INTO template_reservations (sandbox_id, team_id, disk_mb, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))
         ON CONFLICT (sandbox_id) DO UPDATE
             SET team_id = $2, disk_mb = $3, expires_at = now() + make_interval(secs => $4)",
        sandbox,
        team,
        disk_mb,
        seconds,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Ends the hold of capsule `sandbox`'s template: it is registered, or it failed.
pub async fn release(ex: impl PgExecutor<'_>, sandbox: Uuid) -> Result<(), DbError> {
    sqlx::query!(
        "DELETE FROM template_reservations WHERE sandbox_id = $1",
        sandbox
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// What `team`'s templates being made hold.
pub async fn held_mb(ex: impl PgExecutor<'_>, team: Uuid) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(disk_mb), 0)::BIGINT AS "mb!" FROM template_reservations
           WHERE team_id = $1 AND expires_at > now()"#,
        team,
    )
    .fetch_one(ex)
    .await?)
}
