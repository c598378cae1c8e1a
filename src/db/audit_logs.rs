//! Queries on `audit_logs`: who did what to which resource.

use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

pub struct Entry<'a> {
    pub team_id: Option<Uuid>,
    /// `user`, `api_key`, `host` or `system`.
    pub actor_type: &'a str,
    pub actor_id: Option<String>,
    pub resource_type: &'a str,
    pub resource_id: Option<String>,
    pub action: &'a str,
    pub metadata: Value,
}

pub async fn insert(ex: impl PgExecutor<'_>, entry: Entry<'_>) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO audit_logs (id, team_id, actor_type, actor_id, resource_type, resource_id, action, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        Uuid::new_v4(),
        entry.team_id,
        entry.actor_type,
        entry.actor_id,
        entry.resource_type,
        entry.resource_id,
        entry.action,
        entry.metadata,
    )
    .execute(ex)
    .await?;
    Ok(())
}
