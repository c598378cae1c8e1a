//! `GET /v1/audit-logs`: the team's audit log, newest first, a page at a time.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cp::auth::AuthUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiQuery};
use crate::cp::services::{audit_logs, ServiceError};
use crate::cp::state::AppState;
use crate::db::audit_logs::LogRow;
use crate::id::LogId;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    before: Option<DateTime<Utc>>,
    #[serde(default)]
    before_id: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    resource_type: Option<String>,
    #[serde(default)]
    action: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LogEntry {
    id: LogId,
    actor_type: String,
    actor_id: Option<String>,
    actor_name: Option<String>,
    resource_type: String,
    resource_id: Option<String>,
    action: String,
    scope: String,
    status: String,
    /// The caller's address, for requests.
    address: Option<String>,
    metadata: Value,
    created_at: DateTime<Utc>,
}

impl From<LogRow> for LogEntry {
    fn from(r: LogRow) -> Self {
        Self {
            id: LogId(r.id),
            actor_type: r.actor_type,
            actor_id: r.actor_id,
            actor_name: r.actor_name,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            action: r.action,
            scope: r.scope,
            status: r.status,
            address: r.client_address,
            metadata: r.metadata,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LogPage {
    items: Vec<LogEntry>,
    /// With `next_before_id`, the cursor of the next (older) page; null on the last.
    next_before: Option<DateTime<Utc>>,
    next_before_id: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let before =
        match (query.before, query.before_id.as_deref()) {
            (Some(at), Some(id)) => Some((at, path_id::<LogId>("before_id", id)?.uuid())),
            (None, None) => None,
            _ => return Err(ServiceError::invalid(
                "before",
                "`before` and `before_id` go together (a page's next_before and next_before_id)",
            )
            .into()),
        };
    let page = audit_logs::page(
        &state.db,
        &auth.caller,
        audit_logs::PageQuery {
            before,
            limit: query.limit,
            resource_type: query.resource_type.as_deref(),
            action: query.action.as_deref(),
        },
    )
    .await?;
    let next = page
        .more
        .then(|| page.rows.last().map(|r| (r.created_at, LogId(r.id))))
        .flatten();
    Ok(Json(LogPage {
        next_before: next.as_ref().map(|(at, _)| *at),
        next_before_id: next.map(|(_, id)| id.to_string()),
        items: page.rows.into_iter().map(LogEntry::from).collect(),
    }))
}
