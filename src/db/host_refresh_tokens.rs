//! Queries on `host_refresh_tokens`: long-lived, single-use tokens that rotate the host JWT,
//! grouped in families (one per registration) for reuse detection. Only SHA-256 hashes are
//! stored. Callers hold the host's row lock (`hosts::by_id_for_update`) while they change a
//! host's tokens, so rotations of one host never interleave.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub id: Uuid,
    pub host_id: Uuid,
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub replaced_by: Option<Uuid>,
    /// The database's clock when the row was read, so every replica judges expiry and grace
    /// windows by the same clock that stamped them.
    pub checked_at: DateTime<Utc>,
}

impl RefreshToken {
    pub fn is_expired(&self) -> bool {
        self.expires_at <= self.checked_at
    }

    pub fn is_live(&self) -> bool {
        self.revoked_at.is_none() && !self.is_expired()
    }

    /// Whether it was rotated less than `window` ago.
    pub fn rotated_within(&self, window: std::time::Duration) -> bool {
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        self.replaced_by.is_some()
            && self
                .revoked_at
                .is_some_and(|at| self.checked_at.signed_duration_since(at) < window)
    }
}

/// Stores a new live token of `family` and returns its ID.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    family: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<Uuid, DbError> {
    let id = Uuid::new_v4();
    sqlx::query!(
        "INSERT INTO host_refresh_tokens (id, host_id, family_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
        id,
        host,
        family,
        token_hash,
        expires_at,
    )
    .execute(ex)
    .await?;
    Ok(id)
}

/// The token with this hash, whatever its state.
pub async fn by_hash(
    ex: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> Result<Option<RefreshToken>, DbError> {
    Ok(sqlx::query_as!(
        RefreshToken,
        r#"SELECT id, host_id, family_id, expires_at, revoked_at, replaced_by,
                  now() AS "checked_at!"
           FROM host_refresh_tokens WHERE token_hash = $1"#,
        token_hash,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<RefreshToken>, DbError> {
    Ok(sqlx::query_as!(
        RefreshToken,
        r#"SELECT id, host_id, family_id, expires_at, revoked_at, replaced_by,
                  now() AS "checked_at!"
           FROM host_refresh_tokens WHERE id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Records that `id` was traded for `successor`. A token already rotated keeps its original
/// rotation time, so a retry grace window counts from the first rotation.
pub async fn mark_rotated(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    successor: Uuid,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE host_refresh_tokens SET revoked_at = coalesce(revoked_at, now()), replaced_by = $2
         WHERE id = $1",
        id,
        successor,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Revokes one token without a successor, so presenting it later counts as reuse.
pub async fn revoke(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE host_refresh_tokens SET revoked_at = now(), replaced_by = NULL
         WHERE id = $1 AND revoked_at IS NULL",
        id,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Revokes every live token of a family; returns how many were live.
pub async fn revoke_family(ex: impl PgExecutor<'_>, family: Uuid) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "UPDATE host_refresh_tokens SET revoked_at = now()
         WHERE family_id = $1 AND revoked_at IS NULL AND expires_at > now()",
        family,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

/// What a host JWT of `family` for `host` stands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyStanding {
    pub host_exists: bool,
    /// The family still has a live token: it was neither revoked nor replaced by a new
    /// registration.
    pub family_live: bool,
}

pub async fn family_standing(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    family: Uuid,
) -> Result<FamilyStanding, DbError> {
    Ok(sqlx::query_as!(
        FamilyStanding,
        r#"SELECT EXISTS (SELECT 1 FROM hosts WHERE id = $1) AS "host_exists!",
                  EXISTS (SELECT 1 FROM host_refresh_tokens
                          WHERE family_id = $2 AND host_id = $1
                            AND revoked_at IS NULL AND expires_at > now()) AS "family_live!""#,
        host,
        family,
    )
    .fetch_one(ex)
    .await?)
}

/// Whether the host holds any usable refresh token; a host without one can only come back by
/// registering again.
pub async fn any_live(ex: impl PgExecutor<'_>, host: Uuid) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM host_refresh_tokens
                          WHERE host_id = $1 AND revoked_at IS NULL AND expires_at > now())
           AS "exists!""#,
        host,
    )
    .fetch_one(ex)
    .await?)
}

/// Deletes the host's expired tokens: past their expiry they are refused whatever their state,
/// so they no longer serve reuse detection.
pub async fn delete_expired(ex: impl PgExecutor<'_>, host: Uuid) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "DELETE FROM host_refresh_tokens WHERE host_id = $1 AND expires_at <= now()",
        host,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}
