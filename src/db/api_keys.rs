//! Queries on `team_api_keys`: team-scoped keys stored as SHA-256 hashes with a display prefix.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::DbError;

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub key_prefix: String,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub last_used: Option<DateTime<Utc>>,
}

pub struct NewApiKey<'a> {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: &'a str,
    pub key_hash: &'a [u8],
    pub key_prefix: &'a str,
    pub created_by: Uuid,
}

pub async fn insert(ex: impl PgExecutor<'_>, key: NewApiKey<'_>) -> Result<ApiKey, DbError> {
    Ok(sqlx::query_as!(
        ApiKey,
        "INSERT INTO team_api_keys (id, team_id, name, key_hash, key_prefix, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, team_id, name, key_prefix, created_by, created_at, last_used",
        key.id,
        key.team_id,
        key.name,
        key.key_hash,
        key.key_prefix,
        key.created_by,
    )
    .fetch_one(ex)
    .await?)
}

/// Up to `limit` of the team's keys after `after`, oldest first.
pub async fn page(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<ApiKey>, DbError> {
    Ok(sqlx::query_as!(
        ApiKey,
        "SELECT id, team_id, name, key_prefix, created_by, created_at, last_used
         FROM team_api_keys WHERE team_id = $1 AND (created_at, id) > ($2, $3)
         ORDER BY created_at, id LIMIT $4",
        team,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, team: Uuid, id: Uuid) -> Result<Option<ApiKey>, DbError> {
    Ok(sqlx::query_as!(
        ApiKey,
        "SELECT id, team_id, name, key_prefix, created_by, created_at, last_used
         FROM team_api_keys WHERE team_id = $1 AND id = $2",
        team,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn delete(ex: impl PgExecutor<'_>, team: Uuid, id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "DELETE FROM team_api_keys WHERE team_id = $1 AND id = $2",
        team,
        id
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete_for_team(ex: impl PgExecutor<'_>, team: Uuid) -> Result<u64, DbError> {
    let done = sqlx::query!("DELETE FROM team_api_keys WHERE team_id = $1", team)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes the keys `user` created, in `team` or in every team; returns their IDs.
pub async fn delete_created_by(
    ex: impl PgExecutor<'_>,
    user: Uuid,
    team: Option<Uuid>,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "DELETE FROM team_api_keys WHERE created_by = $1 AND ($2::uuid IS NULL OR team_id = $2)
         RETURNING id",
        user,
        team,
    )
    .fetch_all(ex)
    .await?)
}

/// Resolves a key hash to `(key id, team id)` for a live team and records the use. `last_used`
/// is written at most once a second per key so a busy key does not serialise on its row lock.
pub async fn authenticate(
    ex: impl PgExecutor<'_>,
    key_hash: &[u8],
) -> Result<Option<(Uuid, Uuid)>, DbError> {
    let row = sqlx::query!(
        r#"WITH k AS (
               SELECT k.id, k.team_id, k.last_used FROM team_api_keys k
               JOIN teams t ON t.id = k.team_id
               WHERE k.key_hash = $1 AND t.deleted_at IS NULL
           ), touched AS (
               UPDATE team_api_keys SET last_used = now()
               WHERE id IN (SELECT id FROM k WHERE last_used IS NULL OR last_used < now() - interval '1 second')
           )
           SELECT id AS "id!", team_id AS "team_id!" FROM k"#,
        key_hash,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(|r| (r.id, r.team_id)))
}
