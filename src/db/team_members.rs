//! Queries on `team_members`: who belongs to which team, with which role.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::{text_enum, DbError};

text_enum! {
    /// A member's role in a team. Owners and admins manage the team; only owners delete it.
    Role, "team_members.role" { Owner => "owner", Admin => "admin", Member => "member" }
}

impl Role {
    pub fn can_manage(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub user_id: Uuid,
    pub email: String,
    pub role: Role,
    pub joined_at: DateTime<Utc>,
}

pub async fn insert(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    user: Uuid,
    role: Role,
    is_default: bool,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO team_members (team_id, user_id, role, is_default) VALUES ($1, $2, $3, $4)",
        team,
        user,
        role.as_str(),
        is_default,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// The user's role in a live team, if they are a member.
pub async fn role_of(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    user: Uuid,
) -> Result<Option<Role>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT m.role AS "role: Role" FROM team_members m JOIN teams t ON t.id = m.team_id
           WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL"#,
        team,
        user,
    )
    .fetch_optional(ex)
    .await?)
}

/// Up to `limit` of the team's members after `after` (by joining time and user ID).
pub async fn page(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<Member>, DbError> {
    Ok(sqlx::query_as!(
        Member,
        r#"SELECT m.user_id, u.email, m.role AS "role: Role", m.created_at AS joined_at
           FROM team_members m JOIN users u ON u.id = m.user_id
           WHERE m.team_id = $1 AND (m.created_at, m.user_id) > ($2, $3)
           ORDER BY m.created_at, m.user_id LIMIT $4"#,
        team,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

pub async fn get(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    user: Uuid,
) -> Result<Option<Member>, DbError> {
    Ok(sqlx::query_as!(
        Member,
        r#"SELECT m.user_id, u.email, m.role AS "role: Role", m.created_at AS joined_at
           FROM team_members m JOIN users u ON u.id = m.user_id
           WHERE m.team_id = $1 AND m.user_id = $2"#,
        team,
        user,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn set_role(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    user: Uuid,
    role: Role,
) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE team_members SET role = $3 WHERE team_id = $1 AND user_id = $2",
        team,
        user,
        role.as_str(),
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn remove(ex: impl PgExecutor<'_>, team: Uuid, user: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2",
        team,
        user
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}
