//! Queries on `teams`. Deleted teams are kept (soft delete) so their slugs stay reserved; every
//! lookup here ignores them.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::team_members::Role;
use super::DbError;

#[derive(Debug, Clone)]
pub struct Team {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct TeamWithRole {
    pub team: Team,
    pub role: Role,
    pub is_default: bool,
}

/// A new team, on the default plan.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    name: &str,
    slug: &str,
) -> Result<Team, DbError> {
    Ok(sqlx::query_as!(
        Team,
        "INSERT INTO teams (id, name, slug, plan_id)
         VALUES ($1, $2, $3, (SELECT id FROM plans WHERE is_default))
         RETURNING id, name, slug, created_at",
        id,
        name,
        slug,
    )
    .fetch_one(ex)
    .await?)
}

pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Team>, DbError> {
    Ok(sqlx::query_as!(
        Team,
        "SELECT id, name, slug, created_at FROM teams WHERE id = $1 AND deleted_at IS NULL",
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Up to `limit` of the live teams a user belongs to after `after`: the default team first
/// (`later` false), then the others (`later` true) by creation.
pub async fn page_for_user(
    ex: impl PgExecutor<'_>,
    user: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<TeamWithRole>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT t.id, t.name, t.slug, t.created_at, m.role AS "role: Role", m.is_default
           FROM team_members m JOIN teams t ON t.id = m.team_id
           WHERE m.user_id = $1 AND t.deleted_at IS NULL
             AND (NOT m.is_default, t.created_at, t.id) > ($2, $3, $4)
           ORDER BY m.is_default DESC, t.created_at, t.id LIMIT $5"#,
        user,
        after.later,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| TeamWithRole {
            team: Team {
                id: r.id,
                name: r.name,
                slug: r.slug,
                created_at: r.created_at,
            },
            role: r.role,
            is_default: r.is_default,
        })
        .collect())
}

pub async fn rename(ex: impl PgExecutor<'_>, id: Uuid, name: &str) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE teams SET name = $2 WHERE id = $1 AND deleted_at IS NULL",
        id,
        name
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn soft_delete(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE teams SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL",
        id
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}
