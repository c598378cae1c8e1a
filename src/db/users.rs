//! Queries on `users`: accounts with an argon2 password hash and a platform-admin flag.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{text_enum, DbError};

text_enum! {
    /// Only active users may authenticate.
    UserStatus, "users.status" { Active => "active", Disabled => "disabled" }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
    pub name: String,
    pub is_admin: bool,
    #[sqlx(try_from = "String")]
    pub status: UserStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, email, password_hash, name, is_admin, status, created_at, updated_at";

pub struct NewUser<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub name: &'a str,
    pub is_admin: bool,
}

pub async fn insert(ex: impl PgExecutor<'_>, user: NewUser<'_>) -> Result<User, DbError> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO users (id, email, password_hash, name, is_admin) VALUES ($1, $2, $3, $4, $5)
         RETURNING {COLUMNS}"
    ))
    .bind(user.id)
    .bind(user.email)
    .bind(user.password_hash)
    .bind(user.name)
    .bind(user.is_admin)
    .fetch_one(ex)
    .await?)
}

pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?)
}

/// Emails compare case-insensitively.
pub async fn by_email(ex: impl PgExecutor<'_>, email: &str) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE lower(email) = lower($1)"))
        .bind(email)
        .fetch_optional(ex)
        .await?)
}

pub async fn any_admin(ex: impl PgExecutor<'_>) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE is_admin)").fetch_one(ex).await?)
}

pub async fn set_admin(ex: impl PgExecutor<'_>, id: Uuid, is_admin: bool) -> Result<bool, DbError> {
    let done = sqlx::query("UPDATE users SET is_admin = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(is_admin)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn rename(ex: impl PgExecutor<'_>, id: Uuid, name: &str) -> Result<Option<User>, DbError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE users SET name = $2, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .fetch_optional(ex)
    .await?)
}

/// Serialises first-user-becomes-admin decisions across concurrent signups.
pub async fn lock_admin_bootstrap(ex: impl PgExecutor<'_>) -> Result<(), DbError> {
    sqlx::query("SELECT pg_advisory_xact_lock(1919250030)").execute(ex).await?;
    Ok(())
}

/// A user together with their role in one team (`None` when not a member of that live team):
/// what every authenticated request re-reads.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserInTeam {
    #[sqlx(flatten)]
    pub user: User,
    #[sqlx(try_from = "OptionalRole")]
    pub role: Option<super::team_members::Role>,
}

/// Glue so a nullable role column decodes through `#[sqlx(try_from)]`.
pub struct OptionalRole(Option<String>);

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for OptionalRole {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(Self(<Option<String> as sqlx::Decode<sqlx::Postgres>>::decode(value)?))
    }
}

impl sqlx::Type<sqlx::Postgres> for OptionalRole {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl TryFrom<OptionalRole> for Option<super::team_members::Role> {
    type Error = super::UnexpectedValue;

    fn try_from(value: OptionalRole) -> Result<Self, Self::Error> {
        value.0.map(super::team_members::Role::try_from).transpose()
    }
}

pub async fn in_team(ex: impl PgExecutor<'_>, id: Uuid, team: Uuid) -> Result<Option<UserInTeam>, DbError> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.email, u.password_hash, u.name, u.is_admin, u.status, u.created_at,
                u.updated_at, m.role
         FROM users u
         LEFT JOIN (team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL)
                ON m.user_id = u.id AND m.team_id = $2
         WHERE u.id = $1",
    )
    .bind(id)
    .bind(team)
    .fetch_optional(ex)
    .await?)
}
