//! Queries on `events`: the lifecycle events `GET /v1/events/stream` delivers. Capsule status
//! changes are inserted by a trigger on `sandboxes`; the actions (a create, a pause, a host
//! going down, ...) by the control plane.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// An action to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub team_id: Uuid,
    pub kind: &'static str,
    /// `success` or `error`; `None` for events that are no action's outcome.
    pub outcome: Option<&'static str>,
    pub resource_type: &'static str,
    /// A capsule's or host's UUID, a template's name.
    pub resource_id: String,
    /// `user`, `api_key` or `system`.
    pub actor_type: &'static str,
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub metadata: Value,
    pub error: Option<String>,
    pub sandbox_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub team_id: Uuid,
    pub kind: String,
    pub outcome: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub metadata: Value,
    pub error: Option<String>,
    pub sandbox_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

pub async fn insert(ex: impl PgExecutor<'_>, event: &NewEvent) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar!(
        "INSERT INTO events (team_id, kind, outcome, resource_type, resource_id, actor_type,
                             actor_id, actor_name, metadata, error, sandbox_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING id",
        event.team_id,
        event.kind,
        event.outcome,
        event.resource_type,
        event.resource_id,
        event.actor_type,
        event.actor_id,
        event.actor_name,
        event.metadata,
        event.error,
        event.sandbox_id,
    )
    .fetch_one(ex)
    .await?)
}

/// Up to `limit` events of every team after `after`, in order.
pub async fn after(
    ex: impl PgExecutor<'_>,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, DbError> {
    Ok(sqlx::query_as!(
        EventRow,
        "SELECT id, team_id, kind, outcome, resource_type, resource_id, actor_type, actor_id,
                actor_name, metadata, error, sandbox_id, created_at
         FROM events WHERE id > $1 ORDER BY id LIMIT $2",
        after,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// Up to `limit` of `team`'s events after `after`, in order.
pub async fn for_team_after(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, DbError> {
    Ok(sqlx::query_as!(
        EventRow,
        "SELECT id, team_id, kind, outcome, resource_type, resource_id, actor_type, actor_id,
                actor_name, metadata, error, sandbox_id, created_at
         FROM events WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        team,
        after,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// The newest event's ID (0 for none).
pub async fn last_id(ex: impl PgExecutor<'_>) -> Result<i64, DbError> {
    Ok(
        sqlx::query_scalar!(r#"SELECT COALESCE(MAX(id), 0) AS "id!" FROM events"#)
            .fetch_one(ex)
            .await?,
    )
}

/// Deletes the events recorded before `before`.
pub async fn prune(ex: impl PgExecutor<'_>, before: DateTime<Utc>) -> Result<u64, DbError> {
    let done = sqlx::query!("DELETE FROM events WHERE created_at < $1", before)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}
