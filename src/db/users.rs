//! Queries on `users`: accounts with an argon2 password hash and a platform-admin flag.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::team_members::Role;
use super::{text_enum, DbError};

text_enum! {
    /// Only active users may authenticate.
    UserStatus, "users.status" { Active => "active", Disabled => "disabled" }
}

/// `Debug` leaves out the password hash, which an offline attack could use.
#[derive(Clone)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
    pub name: String,
    pub is_admin: bool,
    pub status: UserStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("name", &self.name)
            .field("is_admin", &self.is_admin)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

pub struct NewUser<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub name: &'a str,
    pub is_admin: bool,
}

pub async fn insert(ex: impl PgExecutor<'_>, user: NewUser<'_>) -> Result<User, DbError> {
    Ok(sqlx::query_as!(
        User,
        r#"INSERT INTO users (id, email, password_hash, name, is_admin) VALUES ($1, $2, $3, $4, $5)
           RETURNING id, email, password_hash, name, is_admin, status AS "status: UserStatus",
                     created_at, updated_at"#,
        user.id,
        user.email,
        user.password_hash,
        user.name,
        user.is_admin,
    )
    .fetch_one(ex)
    .await?)
}

pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as!(
        User,
        r#"SELECT id, email, password_hash, name, is_admin, status AS "status: UserStatus",
                  created_at, updated_at
           FROM users WHERE id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Emails compare case-insensitively.
pub async fn by_email(ex: impl PgExecutor<'_>, email: &str) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as!(
        User,
        r#"SELECT id, email, password_hash, name, is_admin, status AS "status: UserStatus",
                  created_at, updated_at
           FROM users WHERE lower(email) = lower($1)"#,
        email,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn any_admin(ex: impl PgExecutor<'_>) -> Result<bool, DbError> {
    Ok(
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM users WHERE is_admin) AS "exists!""#)
            .fetch_one(ex)
            .await?,
    )
}

pub async fn set_admin(ex: impl PgExecutor<'_>, id: Uuid, is_admin: bool) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE users SET is_admin = $2, updated_at = now() WHERE id = $1",
        id,
        is_admin
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn set_status(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    status: UserStatus,
) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE users SET status = $2, updated_at = now() WHERE id = $1",
        id,
        status.as_str()
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn rename(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    name: &str,
) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as!(
        User,
        r#"UPDATE users SET name = $2, updated_at = now() WHERE id = $1
           RETURNING id, email, password_hash, name, is_admin, status AS "status: UserStatus",
                     created_at, updated_at"#,
        id,
        name,
    )
    .fetch_optional(ex)
    .await?)
}

/// Serialises first-user-becomes-admin decisions across concurrent signups.
pub async fn lock_admin_bootstrap(ex: impl PgExecutor<'_>) -> Result<(), DbError> {
    sqlx::query!(r#"SELECT 1 AS "locked!" FROM pg_advisory_xact_lock(1919250030)"#)
        .fetch_one(ex)
        .await?;
    Ok(())
}

/// A user together with their role in one team (`None` when not a member of that live team):
/// what every authenticated request re-reads.
#[derive(Debug, Clone)]
pub struct UserInTeam {
    pub user: User,
    pub role: Option<Role>,
}

pub async fn in_team(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    team: Uuid,
) -> Result<Option<UserInTeam>, DbError> {
    let row = sqlx::query!(
        r#"SELECT u.id, u.email, u.password_hash, u.name, u.is_admin,
                  u.status AS "status: UserStatus", u.created_at, u.updated_at,
                  m.role AS "role?: Role"
           FROM users u
           LEFT JOIN (team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL)
                  ON m.user_id = u.id AND m.team_id = $2
           WHERE u.id = $1"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(|r| UserInTeam {
        user: User {
            id: r.id,
            email: r.email,
            password_hash: r.password_hash,
            name: r.name,
            is_admin: r.is_admin,
            status: r.status,
            created_at: r.created_at,
            updated_at: r.updated_at,
        },
        role: r.role,
    }))
}
