//! Queries on `host_tags`: free-form labels for scheduling and operators.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

pub async fn list(ex: impl PgExecutor<'_>, host: Uuid) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT tag FROM host_tags WHERE host_id = $1 ORDER BY tag",
        host
    )
    .fetch_all(ex)
    .await?)
}

/// Adding a tag the host already has is a no-op.
pub async fn add(ex: impl PgExecutor<'_>, host: Uuid, tag: &str) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO host_tags (host_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        host,
        tag
    )
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn remove(ex: impl PgExecutor<'_>, host: Uuid, tag: &str) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "DELETE FROM host_tags WHERE host_id = $1 AND tag = $2",
        host,
        tag
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}
