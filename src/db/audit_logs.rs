//! Queries on `audit_logs`: who did what to which resource, from where, with what outcome.
//! Services record the changes they make in the transaction that makes them; the audit layer
//! (`cp::audit`) records the other mutating requests, and every refused one.

use chrono::{DateTime, Utc};
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

/// Who in a team sees a row about `resource_type`: capsules and templates are every member's
/// business; keys, members, channels, hosts, plans and the team itself its managers'.
pub fn scope_of(resource_type: &str) -> &'static str {
    match resource_type {
        "capsule" | "template" | "build" => "team",
        _ => "admin",
    }
}

pub async fn insert(ex: impl PgExecutor<'_>, entry: Entry<'_>) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO audit_logs (id, team_id, actor_type, actor_id, resource_type, resource_id,
                                 action, metadata, scope)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        Uuid::new_v4(),
        entry.team_id,
        entry.actor_type,
        entry.actor_id,
        entry.resource_type,
        entry.resource_id,
        entry.action,
        entry.metadata,
        scope_of(entry.resource_type),
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// A request the audit layer records.
pub struct RequestEntry<'a> {
    pub entry: Entry<'a>,
    pub actor_name: Option<String>,
    /// `success` or `error`.
    pub status: &'a str,
    pub client_address: Option<String>,
}

pub async fn insert_request(
    ex: impl PgExecutor<'_>,
    request: RequestEntry<'_>,
) -> Result<(), DbError> {
    let entry = request.entry;
    sqlx::query!(
        "INSERT INTO audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type,
                                 resource_id, action, metadata, scope, status, client_address)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        Uuid::new_v4(),
        entry.team_id,
        entry.actor_type,
        entry.actor_id,
        request.actor_name,
        entry.resource_type,
        entry.resource_id,
        entry.action,
        entry.metadata,
        scope_of(entry.resource_type),
        request.status,
        request.client_address,
    )
    .execute(ex)
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct LogRow {
    pub id: Uuid,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub action: String,
    pub scope: String,
    pub status: String,
    pub client_address: Option<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

/// What a page of the log shows.
pub struct LogFilter<'a> {
    pub team: Uuid,
    /// Also rows of `admin` scope.
    pub with_admin_scope: bool,
    /// Rows strictly before this `(created_at, id)`, newest first.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub resource_type: Option<&'a str>,
    pub action: Option<&'a str>,
    pub limit: i64,
}

pub async fn page(ex: impl PgExecutor<'_>, filter: LogFilter<'_>) -> Result<Vec<LogRow>, DbError> {
    let (before_at, before_id) = filter.before.unzip();
    Ok(sqlx::query_as!(
        LogRow,
        "SELECT id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope,
                status, client_address, metadata, created_at
         FROM audit_logs
         WHERE team_id = $1
           AND (scope = 'team' OR $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
           AND ($5::text IS NULL OR resource_type = $5)
           AND ($6::text IS NULL OR action = $6)
         ORDER BY created_at DESC, id DESC
         LIMIT $7",
        filter.team,
        filter.with_admin_scope,
        before_at,
        before_id,
        filter.resource_type,
        filter.action,
        filter.limit,
    )
    .fetch_all(ex)
    .await?)
}
