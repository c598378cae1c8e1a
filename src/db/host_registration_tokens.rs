//! Queries on `host_registration_tokens`: one-time, expiring tokens an agent trades for its
//! credentials. Only SHA-256 hashes are stored.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

pub async fn insert(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    token_hash: &[u8],
    created_by: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO host_registration_tokens (id, host_id, token_hash, created_by, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
        Uuid::new_v4(),
        host,
        token_hash,
        created_by,
        expires_at,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Marks an unused, unexpired token used and returns its host. Atomic: of two concurrent
/// consumers of one token, exactly one gets the host.
pub async fn consume(ex: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<Option<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE host_registration_tokens SET used_at = now()
         WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
         RETURNING host_id",
        token_hash,
    )
    .fetch_optional(ex)
    .await?)
}

/// Retires every outstanding token of a host, so only the newest one works.
pub async fn retire_unused(ex: impl PgExecutor<'_>, host: Uuid) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "UPDATE host_registration_tokens SET expires_at = least(expires_at, now())
         WHERE host_id = $1 AND used_at IS NULL",
        host,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}
