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

/// Adds a tag unless the host already has `max` others; adding a tag the host already has is a
/// no-op. `false` when the host is full. Concurrent adds must hold the host's row lock
/// (`hosts::by_id_for_update`) so that they count one after another.
pub async fn add_bounded(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    tag: &str,
    max: i64,
) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar!(
        r#"WITH tags AS (SELECT tag FROM host_tags WHERE host_id = $1),
                added AS (
                    INSERT INTO host_tags (host_id, tag)
                    SELECT $1, $2 WHERE (SELECT count(*) FROM tags) < $3
                    ON CONFLICT DO NOTHING RETURNING tag)
           SELECT EXISTS (SELECT 1 FROM tags WHERE tag = $2)
                  OR EXISTS (SELECT 1 FROM added) AS "tagged!""#,
        host,
        tag,
        max,
    )
    .fetch_one(ex)
    .await?)
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
