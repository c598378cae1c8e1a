//! The schema migrations in `migrations/`, embedded in the binary, and `wrenn migrate`'s
//! operations on them.

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::PgPool;

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration failed: {0}")]
    Migrate(#[from] MigrateError),
    #[error("reading the migration history failed: {0}")]
    History(#[from] sqlx::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    /// When it was applied; `None` while pending.
    pub applied_at: Option<DateTime<Utc>>,
}

/// Applies every pending migration; a no-op when none is pending. Returns the versions applied.
pub async fn up(db: &PgPool) -> Result<Vec<i64>, MigrationError> {
    let before = applied(db).await?;
    MIGRATOR.run(db).await?;
    let after = applied(db).await?;
    Ok(after
        .into_iter()
        .map(|(v, _)| v)
        .filter(|v| !before.iter().any(|(b, _)| b == v))
        .collect())
}

/// Reverts the most recently applied migration, returning its version (`None` when none is applied).
pub async fn down(db: &PgPool) -> Result<Option<i64>, MigrationError> {
    let applied = applied(db).await?;
    let Some(&(last, _)) = applied.last() else {
        return Ok(None);
    };
    let target = applied.iter().rev().nth(1).map_or(0, |(v, _)| *v);
    MIGRATOR.undo(db, target).await?;
    Ok(Some(last))
}

/// Every migration known to this binary, with when it was applied.
pub async fn status(db: &PgPool) -> Result<Vec<MigrationStatus>, MigrationError> {
    let applied = applied(db).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationStatus {
            version: m.version,
            description: m.description.to_string(),
            applied_at: applied
                .iter()
                .find(|(v, _)| *v == m.version)
                .map(|(_, at)| *at),
        })
        .collect())
}

/// Runtime-checked on purpose: `_sqlx_migrations` is sqlx's own table and is absent before the
/// first migration, so it is not part of the schema the checked queries are compiled against.
async fn applied(db: &PgPool) -> Result<Vec<(i64, DateTime<Utc>)>, sqlx::Error> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(db)
        .await?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "SELECT version, installed_on FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(db)
    .await
}
