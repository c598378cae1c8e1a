//! Queries on `host_refresh_tokens`: long-lived, single-use tokens that rotate the host JWT.
//! Only SHA-256 hashes are stored.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

pub async fn insert(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO host_refresh_tokens (id, host_id, token_hash, expires_at) VALUES ($1, $2, $3, $4)",
        Uuid::new_v4(),
        host,
        token_hash,
        expires_at,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Revokes a live token and returns its host; `None` for unknown, expired or revoked tokens.
pub async fn revoke(ex: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<Option<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE host_refresh_tokens SET revoked_at = now()
         WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > now()
         RETURNING host_id",
        token_hash,
    )
    .fetch_optional(ex)
    .await?)
}
